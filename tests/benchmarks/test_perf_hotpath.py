"""The statistics hot path: no host synchronisation and no growth over a long stream (the
kernels themselves: tests/tta/test_layer_stats.py)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import tta
from benchmarks.perf.profiling import host_sync_ops
from tests.conftest import bn_net
from tta.layers.base import AdaptiveNorm
from tta.layers.bcn import convert_to_bcn_ws
from tta.methods import base
from tta.registry import method_class
from tta.spec import split_name

pytestmark = pytest.mark.usefixtures("one_thread")


#: every registered statistics method (and ``source``), with extra settings that change the
#: hot path; from the registry, so a new statistics method is checked without editing this
STATISTICS = [
    (name, {}) for name in tta.registered_methods() if method_class(name).role in (base.STATISTICS, base.NONE)
] + [("norm", {"momentum": 0.1})]


def model_for(method: str) -> nn.Module:
    """:func:`bn_net`, converted to batch-channel normalization for ``bcn``."""
    net = bn_net()
    if method == "bcn":
        net = convert_to_bcn_ws(net, num_groups=4, estimated_stats=True).eval()
    return net


def inputs(batch: int = 16, size: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator) * 1.5 + 0.5


# -- host synchronisation ------------------------------------------------------------------
@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("method, hparams", STATISTICS)
def test_statistics_step_has_no_host_synchronising_operator(method, hparams, streams):
    """No ``item``/``_local_scalar_dense``/``is_nonzero``/data-dependent-shape operator in a
    step: on CUDA the step never waits for the device (NaN guard included)."""
    adapted = tta.adapt(model_for(method), method, num_streams=streams, **hparams)
    x = inputs()
    assert host_sync_ops(lambda: adapted(x), torch.device("cpu")) == {}
    with adapted.no_adapt():
        assert host_sync_ops(lambda: adapted(x), torch.device("cpu")) == {}


def test_sync_detector_sees_item_calls():
    assert host_sync_ops(lambda: torch.ones(3).sum().item(), torch.device("cpu"))["aten::item"] == 1


# -- long streams ----------------------------------------------------------------------------
def _live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def test_repeated_steps_keep_no_graph_and_no_garbage():
    """A long stream must not accumulate autograd graphs, staged updates or tensors."""
    methods = STATISTICS + [("tent", {}), ("unmix_tns+tent", {}), ("unmix_tns", {"num_streams": 2})]
    models = [tta.adapt(model_for(split_name(method)[0]), method, **hparams) for method, hparams in methods]
    x = inputs(batch=8, size=8)
    for adapted in models:
        for _ in range(3):
            adapted(x)
    before = _live_tensor_count()
    for adapted in models:
        for _ in range(15):
            out = adapted(x)
    del out
    assert _live_tensor_count() <= before
    for adapted in models:
        for layer in adapted.model.modules():
            if isinstance(layer, AdaptiveNorm):
                assert layer._pending is None
                for name, buffer in layer.named_buffers(recurse=False):
                    assert buffer.grad_fn is None and not buffer.requires_grad, name
        for parameter in adapted.parameters():
            assert parameter.grad is None or parameter.grad.grad_fn is None

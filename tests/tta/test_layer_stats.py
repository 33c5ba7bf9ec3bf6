"""The fast statistics kernels of ``tta.layers.stats`` equal the reference formulas on the
sizes that select them, and the batched commit of ``tta.layers.base`` equals the layer-by-layer
one without a host synchronisation.

The core exactness tests use tiny maps; the CPU fast paths start at 64 positions per map and
32K elements per batch, so these tests use maps that large.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.perf.profiling import SYNC_OPS
from tta.layers import stats

pytestmark = pytest.mark.usefixtures("one_thread")


# -- fast kernels == reference formulas ------------------------------------------------------
def _reference_stream_stats(x: torch.Tensor, streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = x.double().unflatten(0, (streams, -1))
    dims = [1, *range(3, grouped.dim())]
    var, mean = torch.var_mean(grouped, dim=dims, correction=0)
    return mean, var


SHAPES = [
    ((64, 16, 32, 32), 1),  # CPU row-moment path (>= 64 positions, >= 32K elements)
    ((60, 16, 16, 16), 3),  # the same, per stream
    ((4, 16, 4, 4), 2),  # batch-norm kernel, one per stream
    ((2, 8, 4, 4), 1),  # batch-norm kernel
    ((8, 64, 2, 2), 1),  # small maps
]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape, streams", SHAPES)
def test_fast_statistics_equal_the_reference(shape, streams, memory_format):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=generator) * 3 + 2).contiguous(memory_format=memory_format)
    mean, var = stats.stream_stats(x, streams)
    ref_mean, ref_var = _reference_stream_stats(x, streams)
    assert mean.dtype == torch.float32 and mean.shape == (streams, shape[1])
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=1e-6)
    inst_mean, inst_var = stats.instance_stats(x)
    ref_inst_var, ref_inst_mean = torch.var_mean(x.double(), dim=(2, 3), correction=0)
    torch.testing.assert_close(inst_mean.double(), ref_inst_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inst_var.double(), ref_inst_var, rtol=2e-5, atol=1e-6)


def test_constant_maps_have_zero_variance_on_every_path():
    for shape in [(64, 16, 32, 32), (2, 4, 4, 4)]:
        x = torch.full(shape, 3.0)
        mean, var = stats.stream_stats(x, 1)
        assert torch.equal(var, torch.zeros_like(var)) and torch.allclose(mean, torch.full_like(mean, 3.0))
        inst_mean, inst_var = stats.instance_stats(x)
        assert torch.equal(inst_var, torch.zeros_like(inst_var))


@pytest.mark.parametrize("rows", [0, 1, 4, 64])
def test_fused_normalize_equals_the_formula(rows):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 8, 8, generator=generator)
    shape = (16,) if rows == 0 else (rows, 16)
    mean = torch.randn(shape, generator=generator)
    var = torch.rand(shape, generator=generator) + 0.1
    weight, bias = torch.rand(16, generator=generator), torch.randn(16, generator=generator)
    out = stats.normalize(x, mean, var, weight, bias, 1e-5)
    m = mean.reshape(-1, 16).repeat_interleave(64 // max(rows, 1), 0) if rows else mean[None]
    v = var.reshape(-1, 16).repeat_interleave(64 // max(rows, 1), 0) if rows else var[None]
    expected = (x - m[..., None, None]) / torch.sqrt(v[..., None, None] + 1e-5) * weight[:, None, None] + bias[:, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_batch_normalize_equals_train_mode_batch_norm_with_gradients():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, 16, 16, generator=generator).requires_grad_(True)
    weight = torch.rand(16, generator=generator).requires_grad_(True)
    bias = torch.randn(16, generator=generator).requires_grad_(True)
    out = stats.batch_normalize(x, weight, bias, 1e-5)
    expected = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
    torch.testing.assert_close(out, expected)
    (out.square().sum()).backward()
    grads = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    expected.square().sum().backward()
    for got, t in zip(grads, (x, weight, bias)):
        torch.testing.assert_close(got, t.grad)
    with torch.no_grad():  # the CPU row-moment path (no autograd) gives the same output
        torch.testing.assert_close(stats.batch_normalize(x, weight, bias, 1e-5), expected, rtol=1e-5, atol=1e-5)


# -- batched commit across layers (the CUDA path, forced here on the CPU) ---------------------
@pytest.mark.parametrize("streams", [1, 3])
def test_batched_commit_equals_layer_by_layer_commit(streams):
    import copy

    from tta.layers import TestTimeBatchNorm, UnMixTNS
    from tta.layers.base import _commit_batched
    from tta.surgery import source_state

    generator = torch.Generator().manual_seed(0)
    layers = []
    for channels in (4, 8, 3):
        bn = nn.BatchNorm2d(channels)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        layers.append(UnMixTNS(source_state(bn), k=3, num_streams=streams))
        layers.append(TestTimeBatchNorm(source_state(bn), momentum=0.3, num_streams=streams))
    twins = copy.deepcopy(layers)
    batches = [torch.randn(2 * streams, layer.num_features, 4, 4, generator=generator) for layer in layers]
    batches[2][0, 0, 0, 0] = float("nan")  # third layer, first stream
    batches[5][-1, 1, 1, 1] = float("inf")  # last layer, last stream
    with torch.no_grad():
        for layer, twin, x in zip(layers, twins, batches):
            layer(x)
            twin(x)
    for layer in layers:
        layer.commit()
    staged = [twin for twin in twins if twin._pending]
    # the first commit of a layout builds its device-resident segment indices (once); later
    # commits of that layout read nothing back to the host
    assert _commit_batched(copy.deepcopy(staged))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert _commit_batched(staged)
    assert not [event.name for event in prof.events() if event.name in SYNC_OPS]
    for layer, twin in zip(layers, twins):
        assert twin._pending is None
        for (name, expected), (_, got) in zip(layer.named_buffers(), twin.named_buffers()):
            assert torch.equal(expected, got), name
    # the non-finite streams kept their state, the others moved
    assert torch.equal(layers[2].component_means[0], twins[2].component_means[0])


def test_batched_commit_refuses_mixed_layouts():
    from tta.layers import TestTimeBatchNorm
    from tta.layers.base import _commit_batched
    from tta.surgery import source_state

    one = TestTimeBatchNorm(source_state(nn.BatchNorm2d(4)), momentum=0.5, num_streams=1)
    two = TestTimeBatchNorm(source_state(nn.BatchNorm2d(4)), momentum=0.5, num_streams=2)
    with torch.no_grad():
        one(torch.randn(4, 4, 2, 2))
        two(torch.randn(4, 4, 2, 2))
    assert not _commit_batched([one, two]) and one._pending is not None and two._pending is not None

"""Batched multi-stream evaluation equals S separate runs (stream-major sub-batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tta
from benchmarks.evaluation import check_aligned, evaluate, evaluate_multi_stream
from benchmarks.streams import GeneratedSource, StreamConfig, build_domain_streams
from tests.benchmarks.test_streams import RecordingCorruption, tiny_arrays
from tests.conftest import small_bn_cnn


def bn_net() -> nn.Module:
    return small_bn_cnn(num_classes=3, width=8)


def per_domain_streams(**overrides):
    values = dict(
        domains=("fog", "snow", "clean"), severities=(5, 3), schedule="reset_each_shift",
        batch_size=16, n_examples=40, seed=2,
    )
    values.update(overrides)
    return build_domain_streams(StreamConfig(**values), GeneratedSource(tiny_arrays(n=40)), corrupt_fn=RecordingCorruption())


def assert_same_results(joint, separate):
    for a, b in zip(joint, separate):
        assert a.num_samples == b.num_samples and a.num_batches == b.num_batches
        assert np.array_equal(a.records.prediction, b.records.prediction)
        assert np.array_equal(a.records.correct, b.records.correct)
        # Predictions and error counts match exactly; probabilities to float rounding (a
        # convolution over 3B rows may sum in a different order than over B rows).
        np.testing.assert_allclose(a.records.confidence, b.records.confidence, rtol=0, atol=1e-5)
        assert a.error == b.error
        assert [r["n_errors"] for r in a.rows()] == [r["n_errors"] for r in b.rows()]


def adapt_seeded(net: nn.Module, method: str, **kwargs):
    # UnMix-TNS initialises its components with noise from the global torch RNG; every run
    # must start from the same draw, as S streams of one multi-stream model do.
    torch.manual_seed(123)
    return tta.adapt(net, method, **kwargs)


@pytest.mark.parametrize("method", ["norm", "unmix_tns"])
def test_multi_stream_equals_separate_runs(method):
    net = bn_net()
    streams = per_domain_streams()
    assert [len(b) for b in streams[0]] == [16, 16, 8, 16, 16, 8]  # partial batches included
    joint = evaluate_multi_stream(adapt_seeded(net, method, num_streams=len(streams)), streams, progress=False)
    separate = [evaluate(adapt_seeded(net, method), s, progress=False) for s in streams]
    assert [r.name for r in joint] == ["fog", "snow", "clean"]
    assert all(r.num_streams == 3 for r in joint)
    assert_same_results(joint, separate)
    # The streams really differ (otherwise equality would be trivial).
    assert not np.array_equal(joint[0].records.confidence, joint[2].records.confidence)


def test_multi_stream_reset_is_shared_and_matches_flags():
    streams = per_domain_streams(severities=(5,), n_examples=24)
    model = tta.adapt(bn_net(), "norm", num_streams=3)
    calls = []
    original = model.reset

    def counting_reset():
        calls.append(1)
        original()

    evaluate_multi_stream(model, streams, reset=counting_reset, progress=False)
    assert len(calls) == 1  # one reset (all S states) before the first step


def test_stateless_model_multi_stream_equals_separate():
    net = bn_net()
    streams = per_domain_streams()
    with torch.no_grad():
        joint = evaluate_multi_stream(net, streams, progress=False)
        separate = [evaluate(net, s, progress=False) for s in streams]
    assert_same_results(joint, separate)


def test_misaligned_streams_are_rejected():
    a = per_domain_streams(domains=("fog",), n_examples=40)[0]
    b = per_domain_streams(domains=("snow",), n_examples=30)[0]
    with pytest.raises(ValueError, match="batch schedule"):
        check_aligned([a, b])
    with pytest.raises(ValueError):
        evaluate_multi_stream(lambda x: torch.zeros(len(x), 3), [a, b], progress=False)
    # Plain iterables are checked step by step.
    with pytest.raises(ValueError, match="unequal batch sizes|different steps"):
        evaluate_multi_stream(lambda x: torch.zeros(len(x), 3), [list(a), list(b)], progress=False)


def test_num_streams_mismatch_is_rejected():
    streams = per_domain_streams()
    with pytest.raises(ValueError, match="num_streams"):
        evaluate_multi_stream(tta.adapt(bn_net(), "norm", num_streams=2), streams, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_multi_stream_on_cuda_equals_separate_runs():
    net = bn_net().cuda()
    streams = per_domain_streams(device="cuda")
    joint = evaluate_multi_stream(adapt_seeded(net, "norm", num_streams=3), streams, progress=False)
    separate = [evaluate(adapt_seeded(net, "norm"), s, progress=False) for s in streams]
    assert_same_results(joint, separate)
    assert joint[0].peak_memory_kind == "cuda_max_allocated" and joint[0].peak_memory_mb > 0

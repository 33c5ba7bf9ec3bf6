"""Bad input, non-finite batches, dtypes, memory formats, devices."""

import copy

import pytest
import torch
from torch import nn

import tta
from tests.conftest import batches, small_bn_cnn

STATEFUL = [("norm", {"momentum": 0.2}), ("unmix_tns", {"k": 4})]


def _tensor_state(adapted):
    return {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}


def _assert_state_equal(adapted, state):
    for key, value in _tensor_state(adapted).items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("method,hparams", STATEFUL)
@pytest.mark.parametrize(
    "bad,error,match",
    [
        (torch.randn(3, 8, 8), ValueError, "rank 4"),
        (torch.randn(2, 3, 2, 8, 8), ValueError, "rank 4"),
        (torch.randn(0, 3, 8, 8), ValueError, "empty"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), TypeError, "floating"),
        (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, "dtype"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_before_any_state_changes(method, hparams, bad, error, match):
    adapted = tta.adapt(small_bn_cnn(), method, **hparams)
    adapted(batches(1)[0])
    state = _tensor_state(adapted)
    with pytest.raises(error, match=match):
        adapted(bad)
    _assert_state_equal(adapted, state)


@pytest.mark.parametrize("method,hparams", STATEFUL)
def test_exception_inside_the_model_leaves_state_unchanged(method, hparams):
    """Wrong channel count passes the rank check and fails in the first conv; a failure in a
    later layer after a statistics layer already ran must not leave a partial update."""
    adapted = tta.adapt(small_bn_cnn(), method, **hparams)
    adapted(batches(1)[0])
    state = _tensor_state(adapted)
    with pytest.raises(RuntimeError):
        adapted(torch.randn(2, 4, 8, 8))
    original_head = adapted.model[8]
    adapted.model[8] = nn.Linear(7, 2)  # shape mismatch after all norm layers ran
    with pytest.raises(RuntimeError):
        adapted(batches(1)[0])
    adapted.model[8] = original_head
    _assert_state_equal(adapted, state)


@pytest.mark.parametrize("method,hparams", STATEFUL)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_batch_never_corrupts_state(method, hparams, value):
    adapted = tta.adapt(small_bn_cnn(), method, **hparams)
    clean = batches(2)
    adapted(clean[0])
    state = _tensor_state(adapted)
    poisoned = clean[1].clone()
    poisoned[0, 0, 0, 0] = value
    adapted(poisoned)  # documented: the step runs, its statistics are not kept
    _assert_state_equal(adapted, state)
    assert torch.isfinite(adapted(clean[1])).all()


def test_non_finite_stream_only_skips_its_own_update():
    adapted = tta.adapt(small_bn_cnn(), "norm", momentum=0.5, num_streams=2)
    x = torch.cat(batches(2, batch_size=4))
    before = adapted.model[1].target_mean.clone()
    x[0, 0, 0, 0] = float("nan")
    adapted(x)
    after = adapted.model[1].target_mean
    assert torch.equal(after[0], before[0])
    assert not torch.equal(after[1], before[1])


def test_model_without_batch_norm_under_statistics_method_names_supported_types():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="BatchNorm2d.*FrozenBatchNorm2d"):
        tta.adapt(model, "norm")


def test_batch_not_divisible_into_streams_is_rejected():
    adapted = tta.adapt(small_bn_cnn(), "norm", num_streams=2)
    with pytest.raises(ValueError, match="2 equal-size"):
        adapted(torch.randn(3, 3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["norm", "alpha_bn", "unmix_tns"])
def test_half_precision_keeps_fp32_statistics(method, dtype):
    model = small_bn_cnn()
    x = batches(1)[0]
    reference = tta.adapt(model, method, **({"momentum": 0.5} if method == "norm" else {}))
    torch.manual_seed(0)
    half_model = copy.deepcopy(model).to(dtype)
    adapted = tta.adapt(half_model, method, **({"momentum": 0.5} if method == "norm" else {}))
    out = adapted(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    for name, buffer in adapted.named_buffers():
        if "mean" in name or "var" in name:
            assert buffer.dtype == torch.float32, name
    torch.manual_seed(0)
    reference = tta.adapt(model, method, **({"momentum": 0.5} if method == "norm" else {}))
    torch.testing.assert_close(out.float(), reference(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("method", ["norm", "alpha_bn", "unmix_tns"])
def test_channels_last_matches_contiguous(method):
    model = small_bn_cnn()
    x = batches(1)[0]
    torch.manual_seed(0)
    plain = tta.adapt(model, method)(x)
    torch.manual_seed(0)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = tta.adapt(cl_model, method)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_batch_size_one_and_one_by_one_spatial_maps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.randn(1, 3, 6, 6)
    for method in ["norm", "alpha_bn", "unmix_tns"]:
        assert torch.isfinite(tta.adapt(model, method)(x)).all(), method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["norm", "alpha_bn", "unmix_tns"])
def test_cuda_matches_cpu(method):
    model = small_bn_cnn()
    x = batches(1)[0]
    torch.manual_seed(0)
    cpu = tta.adapt(model, method)(x)
    torch.manual_seed(0)
    gpu = tta.adapt(copy.deepcopy(model).cuda(), method)(x.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)

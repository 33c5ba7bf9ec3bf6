"""Public API: registry, wrapping, reset, state dicts, no_adapt, threads, multi-stream."""

import copy
import logging
import threading
import time
import warnings

import pytest
import torch
from torch import nn

import tta
from tests.conftest import batches, small_bn_cnn, small_gn_cnn
from tta.layers.bcn import BatchChannelNorm2d

STATISTICS_METHODS = ["norm", "alpha_bn", "unmix_tns"]
STATEFUL = [("norm", {"momentum": 0.2}), ("unmix_tns", {"k": 4})]


def test_available_methods_lists_the_statistics_methods():
    names = tta.available_methods()
    for name in ["source", *STATISTICS_METHODS]:
        assert name in names


def test_unknown_method_and_hparam_raise_listing_valid_ones():
    model = small_bn_cnn()
    with pytest.raises(ValueError, match="available: .*norm"):
        tta.adapt(model, "nrom")
    with pytest.raises(ValueError, match=r"valid: .*'tau'"):
        tta.adapt(model, "unmix_tns", temperature=0.1)
    with pytest.raises(ValueError, match="alpha must lie"):
        tta.adapt(model, "alpha_bn", alpha=1.5)
    with pytest.raises(ValueError, match="statistics methods"):
        tta.adapt(model, "norm+unmix_tns")
    with pytest.raises(ValueError, match="two parts"):
        tta.adapt(model, "norm+source+source")


def test_auto_picks_from_the_normalization_layers_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="tta"):
        adapted = tta.adapt(small_bn_cnn())
    assert adapted.method_name == "follow"
    assert "BatchNorm" in adapted.auto_reason
    assert "follow" in caplog.text
    gn_adapted = tta.adapt(small_gn_cnn())
    assert (gn_adapted.method_name, gn_adapted.auto_reason) == ("follow", "the model has GroupNorm/LayerNorm layers")
    gn_headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval()
    assert tta.adapt(gn_headless).method_name == "source"
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert tta.adapt(headless).method_name == "source"  # no classifier to read the class count
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    assert tta.adapt(plain).method_name == "source"
    bcn_model = nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchChannelNorm2d(4, num_groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    bcn_adapted = tta.adapt(bcn_model)
    assert bcn_adapted.method_name == "bcn" and "batch-channel" in bcn_adapted.auto_reason
    assert bcn_adapted(torch.randn(8, 3, 6, 6)).shape == (8, 3)


def test_the_registry_imports_no_method_module():
    """The package imports the methods (tta/methods/__init__.py); the registry stays a leaf
    that method modules import, so there is no import loop through it."""
    import ast
    import pathlib

    import tta.registry

    tree = ast.parse(pathlib.Path(tta.registry.__file__).read_text())
    runtime_imports = [
        node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
    ]  # module level only: the TYPE_CHECKING block is an ast.If
    names = [alias.name for node in runtime_imports for alias in node.names] + [
        node.module or "" for node in runtime_imports if isinstance(node, ast.ImportFrom)
    ]
    assert not [name for name in names if name.startswith("tta")], names


def test_auto_tells_a_user_without_logging_what_it_chose(capsys):
    """No logging configured: the choice still reaches the user, once per call site, as an
    AutoChoice warning (a UserWarning, printed to stderr by Python's default filters)."""
    with pytest.warns(tta.AutoChoice, match=r"method='auto' chose 'follow' \(the model has BatchNorm layers\)"):
        adapted = tta.adapt(small_bn_cnn())
    assert (adapted.method_name, adapted.auto_reason) == ("follow", "the model has BatchNorm layers")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tta.adapt(small_bn_cnn(), "norm")
    assert not [w for w in seen if issubclass(w.category, tta.AutoChoice)]  # an explicit method says nothing


def test_norm_warns_when_a_batchnorm1d_normalizes_a_single_value():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    adapted = tta.adapt(model, "norm")
    with pytest.warns(RuntimeWarning, match="single value.*layers='spatial'"):
        first = adapted(torch.randn(1, 4))
    assert torch.allclose(first, adapted(torch.randn(1, 4)), atol=1e-3)  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted(torch.randn(1, 4))  # once per layer
        tta.adapt(model, "norm")(torch.randn(5, 4))  # batches of several samples are fine


def test_auto_is_deterministic_for_a_model():
    model = small_bn_cnn()
    first, second = tta.adapt(model), tta.adapt(model)
    torch.manual_seed(123)
    outputs = [first(x) for x in batches(4)]
    torch.manual_seed(456)  # the global RNG plays no part
    for x, expected in zip(batches(4), outputs):
        assert torch.equal(second(x), expected)


def test_caller_model_untouched_unless_inplace():
    model = small_bn_cnn()
    before = copy.deepcopy(model.state_dict())
    adapted = tta.adapt(model, "norm", momentum=0.5)
    for x in batches(3):
        adapted(x)
    assert all(isinstance(m, nn.BatchNorm2d) for m in [model[1], model[4]])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    inplace = tta.adapt(model, "norm", inplace=True)
    assert inplace.model is model
    assert not isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("method,hparams", STATEFUL)
def test_reset_restores_exact_source_state(method, hparams):
    torch.manual_seed(3)
    adapted = tta.adapt(small_bn_cnn(), method, **hparams)
    x0 = batches(1, seed=9)[0]
    first = adapted(x0)
    for x in batches(4):
        adapted(x)
    assert not torch.equal(adapted(x0), first)
    adapted.reset()
    assert torch.equal(adapted(x0), first)


@pytest.mark.parametrize("method,hparams", STATEFUL)
def test_state_dict_round_trip_continues_bit_identically(method, hparams, tmp_path):
    torch.manual_seed(3)
    model = small_bn_cnn()
    service = tta.adapt(model, method, **hparams)
    stream = batches(6)
    for x in stream[:3]:
        service(x)
    path = tmp_path / "state.pt"
    torch.save(service.state_dict(), path)
    torch.manual_seed(99)  # a restarted process draws different UnMix-TNS noise...
    restarted = tta.adapt(model, method, **hparams)
    restarted.load_state_dict(torch.load(path, weights_only=False))  # ...which the state overrides
    for x in stream[3:]:
        assert torch.equal(service(x), restarted(x))


def test_load_state_dict_from_another_method_is_refused():
    state = tta.adapt(small_bn_cnn(), "norm").state_dict()
    with pytest.raises((ValueError, RuntimeError)):
        tta.adapt(small_bn_cnn(), "alpha_bn").load_state_dict(state)


@pytest.mark.parametrize("method,hparams", STATEFUL)
def test_no_adapt_predicts_like_a_step_without_changing_state(method, hparams):
    adapted = tta.adapt(small_bn_cnn(), method, **hparams)
    for x in batches(2):
        adapted(x)
    state = copy.deepcopy(adapted.state_dict())
    probe = batches(1, seed=5)[0]
    with adapted.no_adapt():
        held_out = adapted(probe)
        assert torch.equal(adapted(probe), held_out)
    for key, value in adapted.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    assert torch.equal(adapted(probe), held_out)  # the real step predicts the same


def test_calls_from_several_threads_are_serialized():
    adapted = tta.adapt(small_bn_cnn(), "norm", momentum=0.1)
    active, overlaps = [0], [0]
    step = adapted.method.step

    def guarded_step(model, x):
        active[0] += 1
        overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.002)
        try:
            return step(model, x)
        finally:
            active[0] -= 1

    adapted.method.step = guarded_step
    xs = batches(16)
    threads = [threading.Thread(target=adapted, args=(x,)) for x in xs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps[0] == 1
    # 16 EMA updates happened: the state moved away from a single update's
    single = tta.adapt(small_bn_cnn(), "norm", momentum=0.1)
    single(xs[0])
    assert not torch.equal(single.model[1].target_mean, adapted.model[1].target_mean)


@pytest.mark.parametrize("method,hparams", [("norm", {}), ("norm", {"momentum": 0.3}), ("alpha_bn", {}), ("unmix_tns", {"k": 4}), ("source", {})])
def test_multi_stream_equals_separate_runs(method, hparams):
    streams = [batches(4, batch_size=5, seed=s, shift=s * 0.3) for s in range(3)]
    torch.manual_seed(7)
    joint = tta.adapt(small_bn_cnn(), method, num_streams=3, **hparams)
    joint_out = [joint(torch.cat([stream[t] for stream in streams])).split(5) for t in range(4)]
    for s, stream in enumerate(streams):
        torch.manual_seed(7)
        alone = tta.adapt(small_bn_cnn(), method, **hparams)
        for t, x in enumerate(stream):
            torch.testing.assert_close(joint_out[t][s], alone(x), rtol=1e-5, atol=1e-5)


def test_adapted_model_can_be_deep_copied_and_pickled():
    adapted = tta.adapt(small_bn_cnn(), "unmix_tns", k=2)
    x = batches(1)[0]
    clone = copy.deepcopy(adapted)
    assert torch.equal(clone(x), adapted(x))

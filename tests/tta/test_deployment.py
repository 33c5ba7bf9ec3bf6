"""Deployment hardening of ``tta.adapt`` (issue 15), parametrized over every registered method
(methods added later are covered automatically) and the compositions of the README.

Tiny model, tiny batches: each case runs in milliseconds.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tests.conftest import batches, small_bn_cnn
from tta.layers import SourceStatsNorm
from tta.layers.bcn import convert_to_bcn_ws
from tta.registry import method_class

COMPOSITIONS = ["alpha_bn+tent", "unmix_tns+tent", "unmix_tns+sar"]
METHODS = sorted(tta.available_methods()) + COMPOSITIONS


def model_for(method: str) -> nn.Module:
    model = small_bn_cnn(width=8)
    if method.split("+")[0] == "bcn":
        model = convert_to_bcn_ws(model, num_groups=4, estimated_stats=True).eval()
    return model


def data(n: int = 3, batch_size: int = 6, seed: int = 1) -> list[torch.Tensor]:
    return batches(n, batch_size=batch_size, seed=seed)


def needs(method: str) -> dict[str, typing.Any]:
    """What a method requires beyond the model (its ``requires``): adanpc's labelled source
    data, petta's source data."""
    last = method.split("+")[-1]
    if last == "adanpc":
        return {"source_loader": [(x, torch.arange(x.shape[0]) % 4) for x in data(2, seed=7)]}
    if last == "petta":
        return {"source_loader": data(2, seed=7)}
    return {}


def full_state(adapted: tta.Adapted) -> dict[str, typing.Any]:
    """Everything a step can change: module state dict and the method's extra state."""
    return copy.deepcopy(adapted.state_dict())


def assert_same(a: typing.Any, b: typing.Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif type(a).__module__ == "numpy":
        assert type(a) is type(b) and np.array_equal(a, b, equal_nan=True), where
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def trained(adapted: tta.Adapted) -> list:
    return adapted.method.optimizers()


# -- 1. half precision ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_models_adapt_with_fp32_state(method: str, dtype: torch.dtype) -> None:
    model = model_for(method)
    adapted = tta.adapt(copy.deepcopy(model).to(dtype), method, **needs(method))
    reference = tta.adapt(model, method, **needs(method))
    initial = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    for x in data():
        out = adapted(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        reference(x)
    for name, p in adapted.model.named_parameters():
        assert p.dtype == dtype and torch.isfinite(p).all(), name
    from tta.methods.optim import MasterOptimizer

    for optimizer in trained(adapted):
        assert isinstance(optimizer, MasterOptimizer)
        assert all(m.dtype == torch.float32 for m in optimizer.masters)
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    masters = {id(p): m for o in trained(adapted) for p, m in zip(o.params, o.masters)}
    for part in adapted.method.parts():  # a teacher averaged on fp32 copies (rotta, petta)
        masters.update({id(p): m for p, m in zip(getattr(part, "teacher_params", []), getattr(part, "teacher_master", []))})
    moved = {
        n for n, p in adapted.model.named_parameters()
        if not torch.equal(p, initial[n]) or (id(p) in masters and not torch.equal(masters[id(p)], initial[n].float()))
    }
    fp32_moved = {n for n, p in reference.model.named_parameters() if not torch.equal(p.to(dtype), initial[n])}
    assert fp32_moved <= moved  # bf16 parameters may round small updates away; the masters keep them


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tent_follows_the_fp32_run(dtype: torch.dtype) -> None:
    """fp16 Adam state used to underflow to NaN after one step; bf16 parameters dropped
    updates below their resolution. With fp32 masters both track the fp32 run."""
    model = small_bn_cnn()
    reference = tta.adapt(model, "tent")
    half = tta.adapt(copy.deepcopy(model).to(dtype), "tent")
    for x in data(4):
        reference(x)
        half(x.to(dtype))
    ref = dict(reference.model.named_parameters())
    for name, p in half.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.float(), ref[name], atol=2e-2), name
    masters = half.method.method.optimizer.masters
    params = half.method.method.optimizer.params
    assert all(torch.equal(m.to(dtype), p) for m, p in zip(masters, params))


# -- 2. serving contexts --------------------------------------------------------------------
@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
@pytest.mark.parametrize("method", METHODS)
def test_serving_under_inference_mode_and_no_grad(method: str, context) -> None:
    model = model_for(method)
    plain = tta.adapt(model, method, **needs(method))
    served = tta.adapt(model, method, **needs(method))
    xs = data()
    for x in xs:
        with plain.no_adapt():
            expected_prediction = plain(x)
        expected = plain(x)
        with context():
            with served.no_adapt():
                prediction = served(x)
            out = served(x)
        assert torch.equal(prediction, expected_prediction)
        assert torch.equal(out, expected)
    assert_same(full_state(served), full_state(plain))
    served(xs[0])  # state created under inference mode is usable outside it


# -- 3. .to() / .half() after wrapping ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_converting_the_wrapped_model_carries_the_state(method: str, dtype: torch.dtype) -> None:
    adapted = tta.adapt(model_for(method), method, **needs(method))
    xs = data()
    adapted(xs[0])
    converted = adapted.to(dtype)
    assert converted is adapted
    for x in xs[1:]:
        out = adapted(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
    for layer in adapted.adaptive_layers():
        for name, buffer in layer.named_buffers():
            assert buffer.dtype == torch.float32, name  # statistics stay fp32
    for optimizer in trained(adapted):  # fp32 masters for half precision, else the parameters
        master_dtype = dtype if dtype == torch.float64 else torch.float32
        assert all(m.dtype == master_dtype for m in optimizer.masters)
    adapted.reset()
    adapted.float()
    for x in xs:
        assert torch.isfinite(adapted(x)).all()


def test_half_after_wrapping_keeps_fp32_masters_from_before_the_conversion() -> None:
    adapted = tta.adapt(small_bn_cnn(), "tent", lr=1e-2)
    for x in data(2):
        adapted(x)
    weights = [p.detach().clone() for p in adapted.method.method.params]
    adapted.half()
    optimizer = adapted.method.method.optimizer
    assert all(torch.equal(m, w) for m, w in zip(optimizer.masters, weights))  # not fp16-rounded
    assert all(p.dtype == torch.float16 for p in optimizer.params)


# -- 4. non-finite batches ------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_a_nonfinite_batch_changes_no_state(method: str, bad_value: float) -> None:
    model = model_for(method)
    adapted = tta.adapt(model, method, **needs(method))
    twin = tta.adapt(model, method, **needs(method))
    xs = data()
    adapted(xs[0])
    twin(xs[0])
    before = full_state(adapted)
    bad = xs[1].clone()
    bad[0, 0, 0, 0] = bad_value
    adapted(bad)
    assert_same(full_state(adapted), before)
    assert torch.equal(adapted(xs[2]), twin(xs[2]))  # and the run continues as if it never came


# -- 5. hyperparameter types and ranges -----------------------------------------------------
def _wrong_type_value(annotation: typing.Any) -> typing.Any:
    text = repr(annotation)
    if "bool" in text:
        return "yes"
    if "float" in text or "int" in text:
        return "1e-3"
    if "str" in text:
        return 3
    return None


def _typed_fields() -> list[tuple[str, str, typing.Any]]:
    cases = []
    for name in sorted(tta.available_methods()):
        cls = method_class(name)
        hints = typing.get_type_hints(cls.Hparams)
        for field in dataclasses.fields(cls.Hparams):
            wrong = _wrong_type_value(hints.get(field.name))
            if wrong is not None:
                cases.append((name, field.name, wrong))
    return cases


@pytest.mark.parametrize("method,field,value", _typed_fields())
def test_a_hyperparameter_of_the_wrong_type_is_named_at_adapt_time(method: str, field: str, value) -> None:
    with pytest.raises(TypeError, match=rf"method '{method}': hyperparameter {field} must be .*got {value!r}"):
        tta.adapt(model_for(method), method, **{field: value})


@pytest.mark.parametrize(
    "method,hparams,error,match",
    [
        ("tent", {"lr": "1e-3"}, TypeError, r"lr must be a float \(> 0\), got '1e-3' \(str\)"),
        ("tent", {"lr": 0}, ValueError, r"lr must be > 0, got 0.0"),
        ("tent", {"optimizer": "adamw"}, ValueError, r"optimizer must be one of \['adam', 'sgd'\]"),
        ("tent", {"steps": 1.5}, TypeError, r"steps must be an integer"),
        ("tent", {"nesterov": 1}, TypeError, r"nesterov must be a bool"),
        ("unmix_tns", {"k": 0}, ValueError, r"k must be a positive integer"),
        ("alpha_bn", {"alpha": 1.5}, ValueError, r"alpha must lie in \[0, 1\]"),
        ("alpha_bn", {"layers": "1d"}, ValueError, r"layers must be one of \['spatial', 'all'\]"),
        ("sar", {"ema_decay": 1.0}, ValueError, r"ema_decay must lie in \[0, 1\)"),
        ("sar", {"exclude": 3}, TypeError, r"exclude must be a list of strings"),
        ("unmix_tns+tent", {"tent__lr": "fast"}, TypeError, r"method 'tent': hyperparameter lr"),
    ],
)
def test_hyperparameter_messages_name_the_parameter_and_the_accepted_values(method, hparams, error, match) -> None:
    with pytest.raises(error, match=match):
        tta.adapt(small_bn_cnn(), method, **hparams)


def test_hyperparameters_are_converted_to_their_declared_types() -> None:
    tent = tta.build_method("tent", lr=1, steps=2.0).method
    assert tent.hparams.lr == 1.0 and isinstance(tent.hparams.lr, float)
    assert tent.hparams.steps == 2 and isinstance(tent.hparams.steps, int)
    sar = tta.build_method("sar", exclude=["a", "b"]).method
    assert sar.hparams.exclude == ("a", "b")


# -- 6. wrapping twice ----------------------------------------------------------------------
def test_adapting_an_adapted_model_raises() -> None:
    adapted = tta.adapt(small_bn_cnn(), "norm")
    with pytest.raises(TypeError, match="already adapted.*adapted.model"):
        tta.adapt(adapted)
    with pytest.raises(TypeError, match="already adapted"):
        tta.adapt(adapted, "tent")


# -- 7. no_adapt predicts exactly what a step returns ---------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_no_adapt_returns_exactly_the_prediction_of_a_step(method: str) -> None:
    adapted = tta.adapt(model_for(method), method, **needs(method))
    xs = data()
    adapted(xs[0])
    for x in xs[1:]:
        before = full_state(adapted)
        with adapted.no_adapt():
            predicted = adapted(x)
        assert_same(full_state(adapted), before)
        assert torch.equal(predicted, adapted(x))


# -- 8. determinism --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_two_wraps_agree_and_leave_the_global_rng_alone(method: str) -> None:
    model = model_for(method)
    xs = data()
    rng = torch.get_rng_state()
    first = tta.adapt(model, method, **needs(method))
    outs = [first(x) for x in xs]
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(123)  # a different global stream must not matter
    second = tta.adapt(model, method, **needs(method))
    for x, out in zip(xs, outs):
        assert torch.equal(second(x), out)


def test_the_seed_argument_selects_the_random_initial_state() -> None:
    model = small_bn_cnn()
    a = tta.adapt(model, "unmix_tns", seed=0)
    b = tta.adapt(model, "unmix_tns", seed=0)
    c = tta.adapt(model, "unmix_tns", seed=1)
    assert torch.equal(a.model[1].component_means, b.model[1].component_means)
    assert not torch.equal(a.model[1].component_means, c.model[1].component_means)
    with pytest.raises(TypeError, match="seed must be an integer"):
        tta.adapt(model, "unmix_tns", seed="0")


# -- state dict and reset cover the registered state ---------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_and_reset_for_every_method(method: str) -> None:
    model = model_for(method)
    xs = data(4)
    adapted = tta.adapt(model, method, **needs(method))
    initial = full_state(adapted)
    for x in xs[:2]:
        adapted(x)
    restored = tta.adapt(model, method, **needs(method))
    restored.load_state_dict(copy.deepcopy(adapted.state_dict()))
    for x in xs[2:]:
        assert torch.equal(restored(x), adapted(x))
    adapted.reset()
    assert_same(full_state(adapted), initial)


# -- 10. which BatchNorm layers the statistics methods adapt ------------------------------
def bn1d_head_model() -> nn.Module:
    model = small_bn_cnn(width=8)
    head = nn.BatchNorm1d(8)
    with torch.no_grad():
        head.running_mean.uniform_(-0.5, 0.5)
        head.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(*list(model)[:-1], head, list(model)[-1]).eval()


@pytest.mark.parametrize(
    "method,default_adapts_1d",
    [("alpha_bn", False), ("unmix_tns", False), ("norm", True)],
)
def test_layers_choice_of_the_statistics_methods(method: str, default_adapts_1d: bool) -> None:
    """Reference behaviour by default: the BN-alpha reference wraps BatchNorm2d only and the
    official UnMix-TNS keeps BatchNorm1d at source statistics (UnMixTNS1d)."""
    model = bn1d_head_model()
    default = tta.adapt(model, method)
    assert isinstance(default.model[1], type(default.model[4]))
    assert isinstance(default.model[8], SourceStatsNorm) != default_adapts_1d
    spatial = tta.adapt(model, method, layers="spatial")
    assert isinstance(spatial.model[8], SourceStatsNorm)
    assert not isinstance(spatial.model[1], SourceStatsNorm)
    x = data(1)[0]
    with torch.no_grad():
        # the head of "spatial" normalizes exactly as the source BatchNorm1d in eval mode
        features = nn.Sequential(*list(spatial.model)[:8])(x)
        assert torch.allclose(spatial.model[8](features), model[8](features), atol=1e-6)
    if method != "unmix_tns":  # unmix_tns on a BatchNorm1d needs (N, C, L) inputs
        every = tta.adapt(model, method, layers="all")
        assert not isinstance(every.model[8], SourceStatsNorm)
        assert torch.isfinite(every(x)).all()


# -- 11. one default per composition ---------------------------------------------------------
def test_unmix_tns_compositions_default_to_the_authors_learning_rate() -> None:
    assert tta.build_method("unmix_tns+tent").method.hparams.lr == 1e-5
    assert tta.build_method("unmix_tns+sar").method.hparams.lr == 1e-5
    assert tta.build_method("unmix_tns+tent", tent__lr=1e-4).method.hparams.lr == 1e-4
    assert tta.build_method("tent").method.hparams.lr == 1e-3  # TENT alone keeps its own
    assert tta.build_method("alpha_bn+tent").method.hparams.lr == 1e-3


def test_documented_composition_override_works_through_the_hydra_app() -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from benchmarks.app.checks import check_method

    for file, name in (("unmix_tns_tent", "unmix_tns+tent"), ("unmix_tns_sar", "unmix_tns+sar")):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            default = compose(config_name="config", overrides=[f"method={file}"])
            override = compose(
                config_name="config", overrides=[f"method={file}", f"+method.hparams.{name.split('+')[1]}__lr=1e-4"]
            )
        assert default.method.name == name
        assert OmegaConf.to_container(default.method.hparams) == {}  # the default lives in Python
        hparams = check_method(name, dict(OmegaConf.to_container(override.method.hparams)))
        built = tta.build_method(name, **hparams)
        assert built.method.hparams.lr == 1e-4


def test_the_hydra_configs_get_the_same_hyperparameter_checks() -> None:
    from benchmarks.app.checks import check_method
    from benchmarks.app.errors import BenchConfigError

    with pytest.raises(BenchConfigError, match=r"optimizer must be one of \['adam', 'sgd'\]"):
        check_method("tent", {"optimizer": "adamw"})
    with pytest.raises(BenchConfigError, match=r"layers must be one of \['spatial', 'all'\]"):
        check_method("unmix_tns+tent", {"layers": "1d"})


def test_benchmarks_doc_override_example_matches_the_configs() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "BENCHMARKS.md").read_text()
    assert "method=unmix_tns_tent +method.hparams.tent__lr=1e-4" in text
    yaml = (root / "conf" / "method" / "unmix_tns_tent.yaml").read_text()
    assert "hparams: {}" in yaml and "name: unmix_tns+tent" in yaml

"""The protocol fingerprint: what run.json records, how the report compares runs, the diff CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import benchmarks.app  # noqa: F401
from benchmarks.app.compare import group_runs, swept_config_keys
from benchmarks.app.records import RECORD_NAME, write_record
from benchmarks.app.spec import RunSpec
from benchmarks.protocol import (
    PROTOCOL_SCHEMA,
    PROTOCOL_VERSION,
    differences,
    fingerprint_of,
    main as protocol_main,
    sha256_file,
    state_dict_sha256,
)
from benchmarks.report import make_report

TINY = [
    "experiment=digits_quick",
    "stream.domains=[gaussian_noise,contrast]",
    "stream.n_examples=48",
    "stream.batch_size=24",
    "runtime.progress=false",
]


def compose_tiny(tmp_path: Path, *overrides: str):  # noqa: ANN201
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, f"paths.output_root={tmp_path}", *overrides])


def protocol_for(tmp_path: Path, *overrides: str) -> dict:
    """The protocol block the app builds for a config (model, method and stream, no evaluation)."""
    import tta
    from benchmarks.app.checks import check_method
    from benchmarks.app.fingerprint import build_protocol
    from benchmarks.app.models import build_model
    from benchmarks.streams import build_stream

    spec = RunSpec.from_config(compose_tiny(tmp_path, *overrides))
    model = build_model(spec.model, num_classes=spec.num_classes)
    adapted = tta.adapt(model, spec.method, **check_method(spec.method, spec.hparams))
    return build_protocol(spec, model, adapted.method, [build_stream(spec.stream)]).to_dict()


@pytest.mark.parametrize("name", ["norm", "tent", "unmix_tns+sar", "lame"])
def test_the_protocol_asks_the_method_for_its_parts(name: str) -> None:
    """Parts of a composition (explicit or an objective on its default statistics) are the
    method's own, from its spec or the built method alike; nothing is guessed."""
    import tta
    from benchmarks.protocol import resolved_hparams

    spec = tta.MethodSpec.parse(name)
    assert resolved_hparams(spec) == resolved_hparams(spec.build())
    assert list(resolved_hparams(spec)) == [part.name for part in spec.parts]
    assert len(spec.parts) == (2 if spec.is_composite else 1)


@pytest.fixture(scope="module")
def digits_model():  # noqa: ANN201
    from benchmarks.models.digits import digits_source_model

    return digits_source_model()


def test_protocol_block_pins_weights_data_setting_method_and_software(tmp_path: Path, digits_model) -> None:  # noqa: ANN001
    from benchmarks.app.fingerprint import _digits_cache_file
    from benchmarks.data import load_digits

    block = protocol_for(tmp_path, "method=tent")
    assert block["schema"] == PROTOCOL_SCHEMA and block["version"] == PROTOCOL_VERSION
    model = block["model"]
    assert model["weights_sha256"] == state_dict_sha256(digits_model.state_dict())
    spec = RunSpec.from_config(compose_tiny(tmp_path))
    cached = _digits_cache_file(spec)
    assert model["checkpoint_sha256"] == sha256_file(cached)
    assert 0.5 < model["clean_accuracy"] <= 1.0
    assert model["normalization_layers"] and all("BatchNorm2d" in n for n in model["normalization_layers"])
    assert block["input"] == {"value_range": [0.0, 1.0], "resolution": 32, "mean": None, "std": None, "normalization": "none"}
    # data.sha256 over the exact uint8 rows the stream reads (the first 48 test digits here)
    digits = load_digits("test", 32)
    digest = hashlib.sha256()
    digest.update(b"'clean'\0")
    for array in (digits.images[:48], digits.labels[:48].astype(np.int64)):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    assert block["data"]["sha256"] == digest.hexdigest()
    assert block["data"]["images_per_domain"] == 48 and block["data"]["domains"] == ["gaussian_noise", "contrast"]
    assert block["data"]["corruption_generator_version"].startswith("code-sha256:")
    assert block["setting"]["reset_policy"].startswith("reset once") and block["setting"]["batch_size"] == 24
    assert block["setting"]["seeds"] == {"run": 1, "stream": 1, "corruption": 0}
    assert block["method"]["hparams"]["tent"]["lr"] == 1e-3  # resolved defaults are recorded
    assert block["metric"]["name"] == "online_error"
    assert block["software"]["torch"] and block["software"]["project_version"]

    other = protocol_for(tmp_path, "method=tent", "stream.n_examples=40", "stream.label_order=sorted")
    changed = {k for k, _, _ in differences(block, other)}
    assert {"data.sha256", "data.images_per_domain", "setting.label_order", "setting.order_sha256"} <= changed
    assert not any(k.startswith(("model.", "method.", "software.")) for k in changed)


def test_run_json_carries_the_protocol_and_the_config_is_converted_once(
    tmp_path: Path, digits_model, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    import benchmarks.app.runner as runner
    from benchmarks.app.identity import run_id

    conversions = []
    original = RunSpec.from_config.__func__  # type: ignore[attr-defined]

    def counting(cls, cfg):  # noqa: ANN001, ANN202
        if not isinstance(cfg, RunSpec):
            conversions.append(cfg)
        return original(cls, cfg)

    monkeypatch.setattr(RunSpec, "from_config", classmethod(counting))
    cfg = compose_tiny(tmp_path, "method=norm")
    runner.run(cfg)
    assert len(conversions) == 1
    record = json.loads((tmp_path / "digits_quick" / run_id(cfg) / RECORD_NAME).read_text())
    assert record["fingerprint"] == fingerprint_of(record["protocol"])
    assert record["protocol"]["method"]["name"] == "norm"


def fake_run(root: Path, name: str, method: str, protocol: dict, overrides: list[str], error: float) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    write_record(run_dir, {
        "run_id": name, "run_key": name, "name": "fake", "seed": 1,
        "method": {"name": method, "hparams": {}, "label": method},
        "setting": {"model": "digits_cnn(bn)", "dataset": "digits", "schedule": "continual", "label_order": "iid"},
        "summary": {"mean_error": error, "error": error, "domain_errors": {"fog": error}, "curve": {}},
        "identity": {}, "protocol": protocol, "overrides": overrides,
    })


BASE = {
    "schema": PROTOCOL_SCHEMA, "version": 1,
    "model": {"label": "digits_cnn(bn)", "weights_sha256": "w1"},
    "data": {"sha256": "d1"},
    "setting": {"batch_size": 64, "seeds": {"run": 1}},
    "method": {"name": "norm"},
    "software": {"torch": "2.4"},
}


def variant(**changes: dict) -> dict:
    block = copy.deepcopy(BASE)
    for section, values in changes.items():
        block[section].update(values)
    return block


def test_report_puts_runs_side_by_side_only_when_protocols_agree(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_run(runs, "a", "norm", variant(), ["method=norm"], 0.30)
    fake_run(runs, "b", "tent", variant(method={"name": "tent"}, setting={"seeds": {"run": 2}}), ["method=tent", "seed=2"], 0.20)
    # same model name, other weights: must not share a table with a and b
    fake_run(runs, "c", "source", variant(model={"weights_sha256": "w2"}, method={"name": "source"}), ["method=source"], 0.50)
    text = make_report([runs], plots=False)["markdown"].read_text()
    assert "2 protocol groups" in text and "model.weights_sha256" in text
    assert "# Protocol group 1 of 2: model.weights_sha256=w1" in text
    assert "# Protocol group 2 of 2: model.weights_sha256=w2" in text
    group1 = text.split("# Protocol group 2")[0]
    assert "| norm |" in group1 and "| tent |" in group1 and "| source |" not in group1
    assert "protocol_group" in (runs / "report" / "summary.csv").read_text()

    # the difference named as swept (here: the model) puts them back together
    text = make_report([runs], tmp_path / "r2", plots=False, swept=["model"])["markdown"].read_text()
    assert "Protocol group" not in text and "| source |" in text


def test_swept_keys_come_from_the_runs_overrides(tmp_path: Path) -> None:
    records = [
        {"overrides": ["method=norm", "model=digits_cnn"], "protocol": variant()},
        {"overrides": ["method=norm", "model=digits_cnn_gn"], "protocol": variant(model={"weights_sha256": "w3", "label": "gn"})},
        {"overrides": ["method=norm", "model=digits_cnn", "stream.batch_size=16"], "protocol": variant(setting={"batch_size": 16})},
    ]
    assert swept_config_keys(records) == ["model", "stream.batch_size"]
    assert len(group_runs(records).groups) == 1
    software = [dict(records[0]), {**records[0], "protocol": variant(software={"torch": "2.5"})}]
    comparison = group_runs(software)
    assert len(comparison.groups) == 2 and comparison.differing_keys == ["software.torch"]
    assert len(group_runs(software, swept=["software"]).groups) == 1


def test_records_without_protocol_form_their_own_group(tmp_path: Path) -> None:
    comparison = group_runs([{"overrides": []}, {"overrides": [], "protocol": variant()}])
    assert len(comparison.groups) == 2
    assert "no protocol" in comparison.groups[0].describe()


def test_diff_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"protocol": variant()}))
    b.write_text(json.dumps(variant(data={"sha256": "d2"})))  # a bare protocol block, e.g. a published one
    assert protocol_main(["diff", str(a), str(b)]) == 1
    assert "data.sha256: A=d1 | B=d2" in capsys.readouterr().out
    assert protocol_main(["diff", str(a), str(b), "--ignore", "data"]) == 0
    assert protocol_main(["show", str(a)]) == 0
    assert 'model.weights_sha256 = "w1"' in capsys.readouterr().out


def test_diff_cli_refuses_a_newer_protocol_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(variant()))
    b.write_text(json.dumps({**variant(), "version": PROTOCOL_VERSION + 1}))
    assert protocol_main(["diff", str(a), str(b)]) == 2
    assert "newer than this code" in capsys.readouterr().err


def test_imbalance_and_seeding_are_in_the_setting_row_and_the_protocol(tmp_path: Path, digits_model) -> None:  # noqa: ANN001
    from benchmarks.app.runner import setting_of

    plain = RunSpec.from_config(compose_tiny(tmp_path))
    skewed = RunSpec.from_config(compose_tiny(tmp_path, "stream.imbalance_factor=10"))
    row_plain, row_skewed = setting_of(plain, plain.stream), setting_of(skewed, skewed.stream)
    assert row_plain["imbalance"] is None and row_skewed["imbalance"] == "10:constant"
    assert row_plain["seeding"] == "library"
    params = protocol_for(tmp_path, "stream.imbalance_factor=10")["setting"]["label_order_params"]
    assert params["imbalance_factor"] == 10.0 and params["imbalance_order"] == "constant"
    assert params["seeding"] == "library"

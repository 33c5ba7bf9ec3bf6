"""Config composition, schema validation, pre-flight checks and run identity (in-process)."""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import importlib.resources
import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import benchmarks.app  # noqa: F401  (schema + resolvers)
import tta
from benchmarks.app.checks import check_config, check_method, stream_config
from benchmarks.app.errors import BenchConfigError
from benchmarks.app.identity import identity, run_id, run_key
from benchmarks.app.schema import DatasetConfig, StreamSchema
from benchmarks.streams import StreamConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PRESETS = ("digits_quick", "cifar10c_reset", "cifar10c_continual", "cifar10c_mixed", "cifar10c_noniid")


def make(overrides: list[str] = (), hydra: bool = False):  # noqa: ANN201
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_mirror_the_code() -> None:
    for group in ("model", "method", "dataset", "stream", "launcher", "experiment"):
        assert group_options(group), group
    assert set(PRESETS) <= set(group_options("experiment"))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose(preset: str) -> None:
    cfg = make([f"experiment={preset}"])
    assert cfg.name == preset
    config = stream_config(cfg)
    assert isinstance(config, StreamConfig)
    if preset.startswith("cifar10c"):
        assert cfg.dataset.name.startswith("cifar10") and len(config.domains) == 15 and config.severities == (5,)
    expected = {"cifar10c_reset": "reset_each_shift", "cifar10c_mixed": "mixed", "cifar10c_continual": "continual"}
    if preset in expected:
        assert config.schedule == expected[preset]
    if preset == "cifar10c_noniid":
        assert config.label_order == "dirichlet" and config.delta == 0.1
    if preset == "digits_quick":
        check_config(cfg)  # runnable here: the digits model trains itself


def test_every_method_file_is_registered_and_every_method_has_a_file() -> None:
    names = {}
    for option in group_options("method"):
        cfg = make([f"method={option}"])
        names[option] = cfg.method.name
        check_method(cfg.method.name, dict(cfg.method.hparams))
    assert names["unmix_tns_tent"] == "unmix_tns+tent"
    assert names["unmix_tns_sar"] == "unmix_tns+sar"
    missing = set(tta.available_methods()) - set(names.values())
    assert not missing, f"registered methods without a conf/method/<name>.yaml: {sorted(missing)}"


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("local", "BasicLauncher"),
        ("joblib", "JoblibLauncher"),
        ("submitit_local", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
        ("ray", "RayLauncher"),
        ("ray_cluster", "RayLauncher"),
    ],
)
def test_launchers_compose(launcher: str, target: str) -> None:
    if launcher.startswith("ray"):
        if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:  # an optional extra, not a dependency
            pytest.skip("the [ray] extra is not installed (pip install -e .[ray])")
    cfg = make([f"launcher={launcher}"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        cfg = make(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"], hydra=True)
        assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.timeout_min == 30
        assert cfg.hydra.launcher.gpus_per_node == 1
    # launchers never change what a run computes
    assert identity(make([f"launcher={launcher}"])) == identity(make())


@pytest.mark.parametrize(
    "override, message",
    [
        ("method=bogus", "Could not find 'method/bogus'"),
        ("stream.batch_size=abc", "could not be converted to Integer"),
        ("stream.delta=high", "could not be converted to Float"),
        ("stream.schedule=contnual", "expected one of"),
        ("stream.batchsize=8", "batchsize"),
        ("model.kind=timmm", "expected one of"),
        ("experiment=digits_slow", "Could not find 'experiment/digits_slow'"),
    ],
)
def test_bad_overrides_fail_in_composition(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        make(["experiment=digits_quick", override])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert message in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.name=bogus"], "unknown method 'bogus'"),
        (["method.name=unmix_tns+bogus"], "unknown method 'bogus'"),
        # one type check for tta.adapt and the app (tta.hyperparams), no longer OmegaConf's wording
        (["method=unmix_tns", "+method.hparams.k=abc"], "hyperparameter k must be an integer (>= 1), got 'abc'"),
        (["method=unmix_tns", "+method.hparams.kk=3"], "unknown hyperparameter"),
        (["method=unmix_tns", "+method.hparams.k=0"], "k must be a positive integer"),
        (["method.name=norm+unmix_tns"], "cannot stack two statistics methods"),  # before any run
        (["stream.domains=[gaussian_noise,fgo]"], "unknown domain(s) ['fgo']"),
        (["eval.multi_stream=true"], "needs stream.schedule=reset_each_shift"),
        (["stream.severities=[6]"], "severities must be"),
        (["model=timm"], "model.checkpoint is required"),
        (["model=cifar10_resnet26", "model.checkpoint=/nonexistent/w.pt"], "model weights not found: /nonexistent/w.pt"),
    ],
)
def test_checks_reject_with_readable_errors(overrides: list[str], message: str) -> None:
    cfg = make(["experiment=digits_quick", *overrides])
    with pytest.raises(BenchConfigError) as info:
        check_config(cfg)
    assert message in str(info.value)


def test_hparams_are_converted_to_the_declared_types() -> None:
    assert check_method("norm", {"momentum": 0}) == {"momentum": 0.0}
    assert isinstance(check_method("norm", {"momentum": 0})["momentum"], float)
    assert check_method("unmix_tns+tent", {"k": 4, "lr": 1e-4}) == {"k": 4, "lr": 1e-4}


def test_schema_covers_stream_config() -> None:
    """dataset + stream + top-level device fill exactly the fields of StreamConfig."""
    ours = {f.name for f in dataclasses.fields(StreamSchema)}
    ours |= {"dataset", "source", "data_root", "split", "image_size", "device"}
    assert ours == {f.name for f in dataclasses.fields(StreamConfig)}
    assert {"num_classes"} == {f.name for f in dataclasses.fields(DatasetConfig)} - {"name", "source", "data_root", "split", "image_size"}


def test_run_identity() -> None:
    base = make(["experiment=digits_quick"])
    key = run_key(identity(base))
    # where things are, threads and progress bars do not change what a run computes
    same = make(["experiment=digits_quick", "paths.output_root=/elsewhere", "runtime.num_threads=1",
                 "runtime.progress=true", "name=other"])
    assert run_key(identity(same)) == key
    for change in (["method=unmix_tns"], ["+method.hparams.momentum=0.1"], ["seed=2"], ["stream.delta=0.5"],
                   ["device=cuda"], ["model=digits_cnn_gn"]):
        assert run_key(identity(make(["experiment=digits_quick", *change]))) != key, change
    assert run_id(base) == f"norm-{key}"
    assert run_id(make(["experiment=digits_quick", "method=unmix_tns_tent"])).startswith("unmix_tns+tent-")
    # the seed reaches the stream
    assert stream_config(make(["experiment=digits_quick", "seed=3"])).seed == 3


def test_run_dirs_are_stable_and_named_by_identity(tmp_path: Path) -> None:
    cfg = make(["experiment=digits_quick", f"paths.output_root={tmp_path}"], hydra=True)
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir == tmp_path / "digits_quick" / run_id(cfg)
    assert Path(cfg.hydra.sweep.dir) / cfg.hydra.sweep.subdir == run_dir
    relative = make(["experiment=digits_quick", "paths.output_root=rel"], hydra=True)
    assert Path(relative.hydra.sweep.dir).is_absolute()


def test_configs_ship_with_the_package() -> None:
    """setup.cfg's package_data pattern covers every YAML file, and conf is a package."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in parser["options.package_data"]["conf"].split(",")]
    files = [p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")]
    assert files and all(any(fnmatch.fnmatch(f, pat) or fnmatch.fnmatch(f, pat.replace("**/", "")) for pat in patterns) for f in files)
    assert (CONF / "__init__.py").is_file()
    resources = importlib.resources.files("conf")
    assert resources.joinpath("config.yaml").is_file()
    assert resources.joinpath("experiment", "digits_quick.yaml").is_file()
    assert "conf" in parser["options.packages.find"]["include"]


def test_method_group_yaml_is_name_plus_hparams() -> None:
    for path in (CONF / "method").glob("*.yaml"):
        data = OmegaConf.load(path)
        assert set(data.keys()) == {"name", "hparams"}, path


def test_fields_added_later_leave_earlier_run_keys_unchanged() -> None:
    from benchmarks.app.schema import IDENTITY_NEUTRAL_DEFAULTS, EvalConfig, MethodConfig, StreamSchema

    base = run_key(identity(make(["experiment=digits_quick"])))
    assert "recurrences" not in identity(make(["experiment=digits_quick"]))["stream"]
    assert run_key(identity(make(["experiment=digits_quick", "stream.recurrences=3"]))) != base
    assert run_key(identity(make(["experiment=digits_quick", "method.reset_every=1000"]))) != base
    assert run_key(identity(make(["experiment=digits_quick", "eval.online_eta=1.0"]))) != base
    defaults = {"stream": StreamSchema(), "method": MethodConfig(), "eval": EvalConfig()}
    for dotted, neutral in IDENTITY_NEUTRAL_DEFAULTS.items():  # the neutral values are the defaults
        group, name = dotted.split(".", 1)
        assert getattr(defaults[group], name) == neutral

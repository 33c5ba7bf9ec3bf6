"""The continuously changing (CCC-style) stream: a calibrated walk over corruption states."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from benchmarks.streams import GeneratedSource, StreamConfig, build_stream
from benchmarks.streams.ccc import allowed_states, calibrate, load_table, save_table, walk_schedule
from tests.benchmarks.test_streams import RecordingCorruption, tiny_arrays

TABLE = {
    ("fog", 1): 0.80, ("fog", 3): 0.45, ("fog", 5): 0.30,
    ("snow", 2): 0.42, ("snow", 5): 0.10,
    ("contrast", 4): 0.38, ("contrast", 5): 0.20,
    ("brightness", 5): 0.90,  # never close to the target: never visited
}


def test_allowed_states_and_the_walk_hold_the_target() -> None:
    assert allowed_states(TABLE, 0.4, 0.06) == [("contrast", 4), ("fog", 3), ("snow", 2)]
    steps = walk_schedule(TABLE, 0.4, 40, np.random.default_rng(0), band=0.06, transition=4, dwell=2)
    assert len(steps) == 40
    visited = {s.current for s in steps} | {s.following for s in steps}
    assert visited <= {("contrast", 4), ("fog", 3), ("snow", 2)} and len({v[0] for v in visited}) >= 2
    # dwell 2 steps, then blend over 4 steps: 1/5 .. 4/5, then the following state is current
    assert [round(s.blend, 2) for s in steps[:6]] == [0.0, 0.0, 0.2, 0.4, 0.6, 0.8]
    assert steps[6].current == steps[5].following and steps[6].current[0] != steps[0].current[0]
    mean_accuracy = np.mean([(1 - s.blend) * TABLE[s.current] + s.blend * TABLE[s.following] for s in steps])
    assert abs(mean_accuracy - 0.4) < 0.06
    with pytest.raises(ValueError, match="two corruptions"):
        walk_schedule(TABLE, 0.9, 10, np.random.default_rng(0), band=0.05)


def test_calibration_table_round_trip(tmp_path) -> None:
    class AlwaysZero(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([1.0, 0.0, 0.0]).expand(len(x), 3)

    arrays = tiny_arrays(n=30, num_classes=3)  # labels 0,1,2,0,1,2,...: a third are class 0
    corrupt = RecordingCorruption()
    table = calibrate(AlwaysZero(), arrays.to_tensor(), torch.as_tensor(arrays.labels), corrupt, ["fog", "snow"], [1, 5],
                      batch_size=7)
    assert table == {("fog", 1): 1 / 3, ("fog", 5): 1 / 3, ("snow", 1): 1 / 3, ("snow", 5): 1 / 3}
    assert len(corrupt.calls) == 4 * 5  # 4 states x 5 batches of at most 7
    save_table(table, tmp_path / "table.json", model="linear")
    assert load_table(tmp_path / "table.json") == table


def test_ccc_stream_follows_the_walk(tmp_path) -> None:
    save_table(TABLE, tmp_path / "table.json")
    config = StreamConfig(domains=("fog", "snow", "contrast"), schedule="ccc", walk_table=str(tmp_path / "table.json"),
                          walk_target=0.4, walk_band=0.06, walk_speed=40, walk_steps=12, walk_transition=3,
                          walk_dwell=1, batch_size=16, seed=4)
    corrupt = RecordingCorruption()
    stream = build_stream(config, GeneratedSource(tiny_arrays(n=60, num_classes=3)), corrupt_fn=corrupt)
    plan = stream.plan
    assert plan.num_samples == 12 * 40 and len(plan.segments) == 12
    assert len(np.unique(plan.sample_id)) == plan.num_samples  # every position its own corruption draw
    steps = walk_schedule(TABLE, 0.4, 12, np.random.default_rng(np.random.SeedSequence([4, 2])), band=0.06,
                          transition=3, dwell=1)
    for index, step in enumerate(steps):
        rows = plan.segment_id == index
        states = set(zip((plan.domains[d] for d in plan.domain_id[rows]), plan.severity[rows].tolist()))
        assert states <= {step.current, step.following}
        if step.blend == 0:
            assert states == {step.current}
    batches = list(stream)
    assert sum(len(b) for b in batches) == plan.num_samples and batches[0].reset and not batches[1].reset
    # each batch is corrupted once per (corruption, severity) group present in it
    assert {(name, severity) for name, severity, _, _ in corrupt.calls} <= {s.current for s in steps} | {s.following for s in steps}
    again = build_stream(config, GeneratedSource(tiny_arrays(n=60, num_classes=3)), corrupt_fn=RecordingCorruption())
    assert torch.equal(again.batch(5).images, stream.batch(5).images)
    with pytest.raises(ValueError, match="walk_table"):
        StreamConfig(schedule="ccc")


def test_the_app_measures_and_caches_the_table_when_the_config_names_none(tmp_path) -> None:
    from hydra import compose, initialize_config_module

    import benchmarks.app  # noqa: F401
    import benchmarks.app.runner as runner
    from benchmarks.app.ccc_calibration import CALIBRATION_IMAGES
    from benchmarks.app.identity import run_id
    from benchmarks.app.records import RECORD_NAME, read_record
    from benchmarks.models.digits import digits_source_model

    digits_source_model()

    def make(*overrides: str):  # noqa: ANN202
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return compose(config_name="config", overrides=[
                "experiment=digits_quick", "stream=ccc", "stream.domains=[gaussian_noise,contrast]",
                "stream.walk_steps=4", "stream.walk_speed=48", "stream.walk_target=0.6", "stream.walk_band=0.4",
                "stream.batch_size=16", "runtime.progress=false", f"paths.output_root={tmp_path / 'out'}",
                f"paths.cache_dir={tmp_path / 'cache'}", *overrides,
            ])

    cfg = make("method=norm")
    runner.run(cfg)
    (table_file,) = (tmp_path / "cache" / "ccc_tables").glob("*.json")
    table = load_table(table_file)
    assert sorted(table) == [(c, s) for c in ("contrast", "gaussian_noise") for s in (1, 2, 3, 4, 5)]
    meta = json.loads(table_file.read_text())["meta"]
    assert meta["images"] == CALIBRATION_IMAGES and meta["corruptions"] == ["contrast", "gaussian_noise"]
    record = read_record(tmp_path / "out" / "digits_quick" / run_id(cfg) / RECORD_NAME)
    walk = record["protocol"]["setting"]["schedule_params"]["walk"]
    assert walk["table_sha256"] == hashlib.sha256(table_file.read_bytes()).hexdigest() and walk["steps"] == 4
    assert record["summary"]["num_samples"] == 4 * 48
    stamp = table_file.stat().st_mtime_ns
    runner.run(make("method=tent"))  # the same model: the cached table, not measured again
    assert table_file.stat().st_mtime_ns == stamp and len(list((tmp_path / "cache" / "ccc_tables").glob("*.json"))) == 1
    plain = make("method=norm", "stream=continual")
    runner.run(plain)
    plain_record = read_record(tmp_path / "out" / "digits_quick" / run_id(plain) / RECORD_NAME)
    assert "schedule_params" not in plain_record["protocol"]["setting"]  # earlier fingerprints unchanged

"""Stream simulator: schedules, reset flags, determinism, batching and sources (§9.3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.data.base import ImageArrays
from benchmarks.streams import (
    GRADUAL_SEVERITIES,
    STANDARD_DOMAINS,
    FileSource,
    GeneratedSource,
    StreamConfig,
    build_segments,
    build_stream,
    from_setting,
    split_by_domain,
)

# -- shared helpers (also imported by the evaluation tests) -------------------------------------


def tiny_arrays(n: int = 60, num_classes: int = 3, size: int = 8, seed: int = 0) -> ImageArrays:
    """Random uint8 images with balanced labels in dataset order 0,1,2,0,1,2,..."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % num_classes
    return ImageArrays(images, labels, tuple(str(c) for c in range(num_classes)))


class RecordingCorruption:
    """A deterministic stand-in for ``benchmarks.corruptions.corrupt``.

    The output depends only on (image, seed, name, severity, sample_id), as the real contract
    requires, and every call is recorded so tests can check the batching.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, list[int]]] = []

    def __call__(
        self,
        images: torch.Tensor,
        name: str,
        severity: int,
        *,
        seed: int = 0,
        sample_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert sample_ids is not None and sample_ids.device == images.device
        self.calls.append((name, severity, len(images), sample_ids.tolist()))
        name_code = sum(ord(c) for c in name) % 97
        shift = ((sample_ids * 31 + name_code * 7 + severity * 3 + seed) % 101).to(images.dtype) / 1000.0
        return (images * 0.5 + shift.view(-1, 1, 1, 1)).clamp(0, 1)


def make_stream(source: ImageArrays | None = None, corrupt=None, **overrides):
    values = dict(domains=("fog", "snow", "clean"), batch_size=16, seed=3)
    values.update(overrides)
    config = StreamConfig(**values)
    corrupt = corrupt if corrupt is not None else RecordingCorruption()
    return build_stream(config, GeneratedSource(source if source is not None else tiny_arrays()), corrupt_fn=corrupt)


def segment_sequence(stream) -> list[tuple[str, int, bool]]:
    return [(s.name, s.severity, s.reset) for s in stream.plan.segments]


# -- config ---------------------------------------------------------------------------------------


def test_config_validates_and_normalises():
    config = StreamConfig(domains=["fog"], severities=[3], schedule="mixed_domains")
    assert config.domains == ("fog",) and config.severities == (3,) and config.schedule == "mixed"
    for bad in (
        dict(batch_size=0),
        dict(severities=(6,)),
        dict(schedule="random"),
        dict(label_order="shuffled"),
        dict(domains=()),
        dict(domains=("fog", "fog")),
        dict(replays=0),
        dict(delta=-1.0),
    ):
        with pytest.raises(ValueError):
            StreamConfig(**bad)
    assert StreamConfig(label_order="dirichlet", delta=0.0).effective_label_order == "sorted"
    assert STANDARD_DOMAINS[0] == "gaussian_noise" and len(STANDARD_DOMAINS) == 15
    round_trip = StreamConfig.from_dict(config.to_dict())
    assert round_trip == config


def test_standard_domains_match_corruption_registry():
    from benchmarks import corruptions
    assert STANDARD_DOMAINS == tuple(corruptions.CORRUPTIONS)


def test_from_setting_maps_official_names():
    assert from_setting("reset_each_shift").schedule == "reset_each_shift"
    correlated = from_setting("correlated", delta=0.1)
    assert (correlated.schedule, correlated.label_order) == ("continual", "dirichlet")
    mixed = from_setting("mixed_domains_correlated", delta=0.0)
    assert mixed.schedule == "mixed" and mixed.effective_label_order == "sorted"
    assert from_setting("gradual_correlated").schedule == "gradual"
    with pytest.raises(ValueError):
        from_setting("sometimes")


# -- schedules and reset flags ----------------------------------------------------------------------


def test_reset_each_shift_resets_at_every_domain():
    config = StreamConfig(domains=("a", "b", "c"), severities=(5, 3), schedule="reset_each_shift")
    assert [(s.name, s.severity, s.reset) for s in build_segments(config)] == [
        ("a", 5, True), ("a", 3, False), ("b", 5, True), ("b", 3, False), ("c", 5, True), ("c", 3, False),
    ]


def test_continual_resets_once():
    config = StreamConfig(domains=("a", "b"), severities=(5,), schedule="continual")
    assert [(s.name, s.severity, s.reset) for s in build_segments(config)] == [("a", 5, True), ("b", 5, False)]


def test_gradual_ramps_severity_per_domain():
    config = StreamConfig(domains=("a", "b"), severities=(5,), schedule="gradual")
    segments = build_segments(config)
    assert GRADUAL_SEVERITIES == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert [s.severity for s in segments] == list(GRADUAL_SEVERITIES) * 2
    assert [s.name for s in segments] == ["a"] * 9 + ["b"] * 9
    assert [s.reset for s in segments] == [True] + [False] * 17
    # With several severities configured, gradual uses them as given.
    explicit = StreamConfig(domains=("a",), severities=(2, 4), schedule="gradual")
    assert [s.severity for s in build_segments(explicit)] == [2, 4]


def test_mixed_is_one_segment_per_severity():
    config = StreamConfig(domains=("a", "b", "c"), severities=(5, 1), schedule="mixed")
    segments = build_segments(config)
    assert [(s.domains, s.severity, s.reset) for s in segments] == [
        (("a", "b", "c"), 5, True), (("a", "b", "c"), 1, False),
    ]


def test_stream_batches_follow_schedule_and_flags():
    stream = make_stream(schedule="reset_each_shift", n_examples=40, batch_size=16)
    batches = list(stream)
    # 40 samples per domain -> batches of 16, 16, 8; batches never straddle domains.
    assert [len(b) for b in batches] == [16, 16, 8] * 3
    assert [b.domain for b in batches] == ["fog"] * 3 + ["snow"] * 3 + ["clean"] * 3
    assert [b.reset for b in batches] == [True, False, False] * 3
    assert [b.severity for b in batches] == [5] * 9
    assert all(b.images.shape[1:] == (3, 8, 8) and b.images.dtype == torch.float32 for b in batches)
    assert torch.cat([b.positions for b in batches]).tolist() == list(range(120))
    continual = make_stream(schedule="continual", n_examples=40)
    assert [b.reset for b in continual] == [True] + [False] * 8


def test_gradual_stream_reports_domain_severity_sequence():
    stream = make_stream(domains=("fog",), schedule="gradual", n_examples=10, batch_size=10)
    assert [(b.domain, b.severity, b.reset) for b in stream] == [
        ("fog", s, i == 0) for i, s in enumerate(GRADUAL_SEVERITIES)
    ]


def test_every_domain_presents_the_same_image_order():
    # The official loaders reseed per domain, so each domain shows the images in one order.
    stream = make_stream(schedule="continual", n_examples=30)
    plan = stream.plan
    per_segment = np.split(plan.base_index, plan.segment_bounds[1:-1])
    assert all(np.array_equal(per_segment[0], seg) for seg in per_segment[1:])
    assert sorted(per_segment[0].tolist()) == list(range(30))


# -- determinism ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["continual", "mixed", "gradual"])
@pytest.mark.parametrize("label_order", ["iid", "dirichlet"])
def test_same_seed_same_stream_sample_for_sample(schedule, label_order):
    kwargs = dict(schedule=schedule, label_order=label_order, delta=0.5, dirichlet_min_chunk=1, replays=2)
    first, second = make_stream(**kwargs), make_stream(**kwargs)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.sample_ids, b.sample_ids) and torch.equal(a.domain_ids, b.domain_ids)
        assert (a.domain, a.severity, a.reset) == (b.domain, b.severity, b.reset)
    other = make_stream(**{**kwargs, "seed": 4})
    assert not np.array_equal(first.plan.base_index, other.plan.base_index)


def test_batch_is_random_access_and_independent_of_batch_size():
    # Per-sample corruption ids make a sample's pixels independent of how batches are cut.
    small, large = make_stream(batch_size=7), make_stream(batch_size=32)
    assert torch.equal(small.batch(2).images, list(small)[2].images)
    images_small = torch.cat([b.images for b in small])
    images_large = torch.cat([b.images for b in large])
    assert torch.equal(images_small, images_large)


# -- replays, corruption batching, mixed streams -------------------------------------------------------


def test_replays_are_fresh_draws_of_the_same_images():
    corrupt = RecordingCorruption()
    stream = make_stream(corrupt=corrupt, domains=("fog",), replays=3, n_examples=20)
    plan = stream.plan
    assert stream.num_samples == 60
    assert sorted(plan.sample_id.tolist()) == list(range(60))
    assert np.array_equal(plan.base_index, plan.sample_id % 20)
    images = torch.cat([b.images for b in stream])
    by_id = images[np.argsort(plan.sample_id)]
    # Same clean image, different corruption draw per replay.
    assert not torch.equal(by_id[:20], by_id[20:40])


def test_corruption_is_batched_per_domain_not_per_sample():
    corrupt = RecordingCorruption()
    stream = make_stream(corrupt=corrupt, schedule="continual", n_examples=40, batch_size=16)
    list(stream)
    # One call per batch of a corrupted domain; the clean domain is never corrupted.
    assert [(c[0], c[1], c[2]) for c in corrupt.calls] == [("fog", 5, 16), ("fog", 5, 16), ("fog", 5, 8)] + [
        ("snow", 5, 16), ("snow", 5, 16), ("snow", 5, 8)
    ]


def test_mixed_stream_tags_and_corrupts_each_sample_with_its_domain():
    corrupt = RecordingCorruption()
    source = tiny_arrays(n=30)
    stream = make_stream(source=source, corrupt=corrupt, schedule="mixed", n_examples=30, batch_size=20)
    batches = list(stream)
    assert stream.num_samples == 90 and len(batches) == 5
    domain_ids = torch.cat([b.domain_ids for b in batches])
    assert torch.bincount(domain_ids).tolist() == [30, 30, 30]
    # Calls: at most one per domain present in a batch.
    assert len(corrupt.calls) <= 2 * len(batches)
    reference = RecordingCorruption()
    clean = source.to_tensor()
    for batch in batches:
        for row in range(len(batch)):
            domain = batch.domains[int(batch.domain_ids[row])]
            base = int(batch.sample_ids[row]) % 30
            expected = clean[base : base + 1]
            if domain != "clean":
                expected = reference(expected, domain, 5, seed=0, sample_ids=batch.sample_ids[row : row + 1])
            assert torch.equal(batch.images[row : row + 1], expected)
        names = {batch.domains[int(i)] for i in batch.domain_ids}
        assert batch.domain == (names.pop() if len(names) == 1 else "mixed")


def test_cached_stream_replays_identical_batches_without_recorrupting():
    corrupt = RecordingCorruption()
    config = StreamConfig(domains=("fog",), batch_size=16, n_examples=40)
    stream = build_stream(config, GeneratedSource(tiny_arrays()), corrupt_fn=corrupt, cache=True)
    first = [b.images for b in stream]
    calls = len(corrupt.calls)
    first[0].mul_(0)  # a consumer editing its input in place must not alter the cache
    second = [b.images for b in stream]
    assert len(corrupt.calls) == calls == 3
    fresh = [b.images for b in make_stream(domains=("fog",), n_examples=40, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(second, fresh))


def test_quantize_matches_official_8bit_storage():
    from benchmarks import corruptions
    plain = make_stream(domains=("fog",), n_examples=20)
    quantized = make_stream(domains=("fog",), n_examples=20, quantize=True)
    for a, b in zip(plain, quantized):
        assert torch.equal(b.images, corruptions.to_uint8(a.images).float() / 255.0)


def test_n_examples_takes_the_first_rows_in_file_order():
    stream = make_stream(domains=("clean",), n_examples=12)
    assert sorted(stream.plan.base_index.tolist()) == list(range(12))


# -- label orders inside a stream -----------------------------------------------------------------------


def test_sorted_stream_is_class_contiguous_per_segment():
    stream = make_stream(label_order="sorted", n_examples=30)
    for seg in np.split(stream.plan.labels, stream.plan.segment_bounds[1:-1]):
        assert np.all(np.diff(seg) >= 0)


def test_dirichlet_stream_is_label_correlated():
    source = tiny_arrays(n=300, num_classes=3)
    iid = make_stream(source=source, domains=("clean",), label_order="iid")
    corr = make_stream(source=source, domains=("clean",), label_order="dirichlet", delta=0.1)
    from benchmarks.streams import mean_run_length

    assert mean_run_length(corr.plan.labels) > 5 * mean_run_length(iid.plan.labels)
    assert sorted(corr.plan.base_index.tolist()) == list(range(300))


# -- sources ------------------------------------------------------------------------------------------


def test_file_source_reads_precorrupted_images_without_corrupting():
    calls = []

    def loader(domain: str, severity: int) -> ImageArrays:
        calls.append((domain, severity))
        return tiny_arrays(n=20, seed=severity + len(domain))

    def no_corruption(*args, **kwargs):
        raise AssertionError("a file source must not be corrupted again")

    config = StreamConfig(domains=("fog", "snow"), severities=(2,), batch_size=8, source="files")
    stream = build_stream(config, FileSource(loader), corrupt_fn=no_corruption)
    batches = list(stream)
    assert sorted(set(calls)) == [("fog", 2), ("snow", 2)]
    fog = tiny_arrays(n=20, seed=2 + 3).to_tensor()
    first = batches[0]
    base = first.sample_ids.numpy()
    assert torch.equal(first.images, fog[base])


def test_multi_stream_split_by_domain():
    config = StreamConfig(domains=("fog", "snow"), schedule="reset_each_shift", batch_size=8)
    parts = split_by_domain(config)
    assert [p.domains for p in parts] == [("fog",), ("snow",)]
    with pytest.raises(ValueError):
        split_by_domain(config.replace(schedule="mixed"))


def test_digits_stream_end_to_end():
    config = StreamConfig(dataset="digits", domains=("clean",), batch_size=100, n_examples=200, replays=2)
    stream = build_stream(config)
    batches = list(stream)
    assert stream.num_classes == 10 and stream.num_samples == 400
    assert batches[0].images.shape == (100, 3, 32, 32)
    assert 0.0 <= float(batches[0].images.min()) and float(batches[0].images.max()) <= 1.0


def test_real_corruptions_are_deterministic_per_sample():
    config = StreamConfig(dataset="digits", domains=("gaussian_noise",), severities=(3,), n_examples=24, batch_size=8)
    a = torch.cat([b.images for b in build_stream(config)])
    b = torch.cat([b.images for b in build_stream(config.replace(batch_size=5))])
    assert torch.equal(a, b)
    clean = torch.cat([b.images for b in build_stream(config.replace(domains=("clean",)))])
    assert not torch.equal(a, clean)


def test_quantized_real_stream_holds_the_reference_8bit_values():
    from benchmarks.corruptions import corrupt, corrupt_uint8, to_uint8

    config = StreamConfig(dataset="digits", domains=("brightness",), severities=(4,), n_examples=32, batch_size=16)
    clean = list(build_stream(config.replace(domains=("clean",))))
    quantized = list(build_stream(config.replace(quantize=True)))
    truncated_float32 = 0
    for c, q in zip(clean, quantized):
        expected = corrupt_uint8(c.images, "brightness", 4, seed=config.corruption_seed, sample_ids=c.sample_ids)
        assert torch.equal(q.images, expected.float() / 255.0)
        float_path = to_uint8(corrupt(c.images, "brightness", 4, seed=config.corruption_seed, sample_ids=c.sample_ids))
        truncated_float32 += int((float_path != expected).sum())
    assert truncated_float32 > 0  # the float32 route would have stored other values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_matches_cpu_stream():
    cpu = make_stream(schedule="mixed", n_examples=30)
    cuda = make_stream(schedule="mixed", n_examples=30, device="cuda")
    for a, b in zip(cpu, cuda):
        assert b.images.is_cuda and b.labels.is_cuda
        torch.testing.assert_close(a.images, b.images.cpu(), rtol=0, atol=1e-6)
        assert torch.equal(a.labels, b.labels.cpu()) and torch.equal(a.domain_ids, b.domain_ids)

"""Tests of the batched CIFAR-10-C corruptions (docs/METHODS.md §9.1).

The reference transcriptions below are written from the spec, one image at a time with
NumPy / Pillow / SciPy / OpenCV / scikit-image, as the official generator works; a test
needing an optional library skips when it is missing.
"""

from __future__ import annotations

import importlib.util
from io import BytesIO

import numpy as np
import pytest
import torch

from benchmarks.corruptions import CORRUPTIONS, corrupt, corrupt_uint8, to_uint8
from benchmarks.corruptions import blur, digital, weather
from benchmarks.corruptions._random import SampleRandom
from benchmarks.data import load_digits

HAS = {name: importlib.util.find_spec(name) is not None for name in ("cv2", "scipy", "skimage", "imagecorruptions")}
RANDOM = {
    "gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur",
    "snow", "frost", "fog", "elastic_transform",
}  # fmt: skip
# Corruptions whose mean distance to the clean image grows with every severity step. The
# others follow the reference parameters, which are not monotone in pixel distance: motion
# blur 3 and 4 share sigma, glass blur 1-3 differ mostly in the first blur, frost mixes
# random textures, and elastic severity 1 has the largest affine jitter.
MONOTONE = set(CORRUPTIONS) - {"motion_blur", "glass_blur", "frost", "elastic_transform"}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tests run many small tensor ops; on a shared 2-core machine, intra-op threads
    spend far more time waiting for each other than computing, so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _colour_images(n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """CIFAR-like 8-bit test images: smooth random colour fields with digit strokes."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=gen)
    field = torch.nn.functional.interpolate(base, size=size, mode="bilinear", align_corners=False)
    digits = load_digits("test").to_tensor()[:n, :1]
    digits = torch.nn.functional.interpolate(digits, size=size, mode="bilinear", align_corners=False)
    mixed = (0.75 * field + 0.35 * digits * torch.rand(n, 3, 1, 1, generator=gen)).clamp(0, 1)
    return (mixed * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def uint8_images() -> np.ndarray:
    return np.concatenate([_colour_images(6), load_digits("test").images[10:12]])


@pytest.fixture(scope="module")
def images(uint8_images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(uint8_images).permute(0, 3, 1, 2).float() / 255.0


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).double().numpy()


# ---------------------------------------------------------------- API and invariants


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_range_and_determinism(name: str, images: torch.Tensor) -> None:
    out = corrupt(images, name, 3, seed=5)
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device == images.device
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, corrupt(images, name, 3, seed=5))
    assert not torch.equal(out, images)
    if name in RANDOM:
        assert not torch.equal(out, corrupt(images, name, 3, seed=6))
    else:
        assert torch.equal(out, corrupt(images, name, 3, seed=6))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_batch_composition_independence_is_bit_exact(name: str, images: torch.Tensor) -> None:
    """A sample's output is a function of (image, seed, name, severity, sample_id) alone, bit
    for bit: alone, in any split, in any order, next to other images (small images, so
    every corruption runs in a few milliseconds)."""
    small = images[:, :, 5:25, 3:23].contiguous()  # 20x20: no helper may assume 32x32
    ids = torch.arange(100, 100 + len(small))
    others = torch.rand(5, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    for severity in (2, 5):
        def run(batch: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
            return corrupt(batch, name, severity, seed=1, sample_ids=sample_ids)

        alone = torch.cat([run(small[i : i + 1], ids[i : i + 1]) for i in range(len(small))])
        assert torch.equal(run(small, ids), alone), (name, severity, "whole batch")
        assert torch.equal(torch.cat([run(small[:3], ids[:3]), run(small[3:], ids[3:])]), alone), (name, severity)
        perm = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
        assert torch.equal(run(small[perm], ids[perm]), alone[perm]), (name, severity, "permuted")
        mixed = run(torch.cat([others[:2], small[2:6], others[2:]]), torch.cat([ids[:2] + 50, ids[2:6], ids[:3] + 60]))
        assert torch.equal(mixed[2:6], alone[2:6]), (name, severity, "other neighbours")


def test_severity_ordering(images: torch.Tensor) -> None:
    batch = torch.cat([images, load_digits("test").to_tensor()[:16]])
    for name in CORRUPTIONS:
        dist = [float((corrupt(batch, name, s) - batch).abs().mean()) for s in range(1, 6)]
        assert min(dist) > 0, (name, dist)
        if name in MONOTONE:
            assert all(b > a for a, b in zip(dist, dist[1:])), (name, dist)
        elif name != "elastic_transform":
            assert dist[4] > dist[0], (name, dist)


def test_invalid_arguments(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="gaussian_noise.*jpeg_compression"):
        corrupt(images, "speckle", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(images, "fog", severity)
    with pytest.raises(ValueError):
        corrupt(images[:, :1], "fog", 1)
    with pytest.raises(ValueError):
        corrupt(images, "fog", 1, sample_ids=torch.arange(3))
    assert corrupt(images[:0], "snow", 2).shape == (0, 3, 32, 32)


def test_to_uint8_truncates_like_numpy(images: torch.Tensor) -> None:
    for dtype in (torch.float32, torch.float64):
        levels = torch.arange(256, dtype=dtype) / 255.0
        assert torch.equal(to_uint8(levels), torch.arange(256, dtype=torch.uint8))
    # np.uint8(np.clip(x, 0, 1) * 255): a value a hair below a level truncates to the level below
    values = np.array([0.99 / 255, 1.7 / 255, -0.2, 1.3, (100 - 1e-4) / 255, (51 - 4e-14) / 255])
    expected = np.uint8(np.clip(values, 0, 1) * 255)
    assert expected.tolist() == [0, 1, 0, 255, 99, 50]
    assert to_uint8(torch.from_numpy(values)).tolist() == expected.tolist()
    assert to_uint8(images).shape == images.shape


def test_random_streams_are_per_sample_and_path_independent() -> None:
    ids = torch.tensor([3, 2**40 + 7, 11])
    rng = SampleRandom(9, 4, 2, ids)
    u = rng.uniform((3, 5), stream=2)
    assert torch.equal(SampleRandom(9, 4, 2, ids[1:2]).uniform((3, 5), stream=2)[0], u[1])
    rows, cols = torch.tensor([2, 0]), torch.tensor([14, 3])
    assert torch.equal(rng.uniform_at(rows, cols, 2), u.view(3, -1)[rows, cols])
    slow = SampleRandom(9, 4, 2, ids)
    slow._fast = False  # the int64 hash must give the same numbers as the int32 one
    assert torch.equal(slow.uniform((3, 5), stream=2), u)
    big = SampleRandom(0, 0, 1, torch.arange(64)).uniform((4096,))
    assert abs(float(big.mean()) - 0.5) < 0.01 and 0 < float(big.min()) and float(big.max()) < 1


# ---------------------------------------------------------------- noise statistics


def test_noise_statistics() -> None:
    grey = torch.full((16, 3, 32, 32), 0.4)
    for severity, std in enumerate((0.04, 0.06, 0.08, 0.09, 0.10), 1):
        noise = corrupt(grey, "gaussian_noise", severity) - grey
        assert abs(float(noise.std()) - std) < 0.05 * std and abs(float(noise.mean())) < 0.002
    for severity, photons in enumerate((500, 250, 100, 75, 50), 1):
        for value in (0.4, 0.4 + 1e-3, 0.03 + 1e-3):  # 8-bit grid (table path) and off it
            counts = corrupt(torch.full((8, 3, 32, 32), value), "shot_noise", severity) * photons
            rate = value * photons
            assert abs(float(counts.mean()) - rate) < 4 * (rate / counts.numel()) ** 0.5 + 1e-3
            assert abs(float(counts.var()) / rate - 1) < 0.1
    for severity, amount in enumerate((0.01, 0.02, 0.03, 0.05, 0.07), 1):
        out = corrupt(grey, "impulse_noise", severity)
        changed = (out != grey).float()
        assert abs(float(changed.mean()) - amount) < 0.15 * amount
        assert set(out[out != grey].unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------- reference transcriptions


def test_contrast_matches_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    for severity, c in enumerate((0.75, 0.5, 0.4, 0.3, 0.15), 1):
        x = uint8_images / 255.0
        means = x.mean(axis=(1, 2), keepdims=True)
        ref = np.clip((x - means) * c + means, 0, 1)
        np.testing.assert_allclose(_hwc(corrupt(images, "contrast", severity)), ref, atol=2e-6)


@pytest.mark.skipif(not HAS["skimage"], reason="scikit-image not installed")
def test_brightness_matches_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    from skimage.color import hsv2rgb, rgb2hsv

    for severity, c in enumerate((0.05, 0.1, 0.15, 0.2, 0.3), 1):
        ref = []
        for image in uint8_images:
            hsv = rgb2hsv(image / 255.0)
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
            ref.append(np.clip(hsv2rgb(hsv), 0, 1))
        np.testing.assert_allclose(_hwc(corrupt(images, "brightness", severity)), np.stack(ref), atol=2e-6)


def test_pixelate_matches_pillow(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    from PIL import Image

    for severity, c in enumerate((0.95, 0.9, 0.85, 0.75, 0.65), 1):
        side = int(32 * c)
        ref = [
            np.asarray(Image.fromarray(im).resize((side, side), Image.BOX).resize((32, 32), Image.BOX))
            for im in uint8_images
        ]
        out = to_uint8(corrupt(images, "pixelate", severity)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(out, np.stack(ref))


def _pil_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_jpeg_matches_pillow(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    for severity, quality in enumerate((80, 65, 58, 50, 40), 1):
        ref = np.stack([_pil_jpeg(im, quality) for im in uint8_images]).astype(np.int64)
        out = to_uint8(corrupt(images, "jpeg_compression", severity)).permute(0, 2, 3, 1).numpy().astype(np.int64)
        diff = np.abs(out - ref)
        assert diff.mean() < 0.05 and diff.max() <= 2, (quality, diff.mean(), diff.max())


def test_jpeg_roundtrip_odd_sizes_and_recompression() -> None:
    from benchmarks.corruptions._jpeg import jpeg_roundtrip

    rng = np.random.default_rng(0)
    for h, w, quality in ((28, 36, 75), (17, 9, 40), (8, 8, 90), (5, 2, 50)):
        smooth = _colour_images(2, size=(h, w))
        noisy = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        batch = np.concatenate([smooth, noisy])
        ref = np.stack([_pil_jpeg(np.ascontiguousarray(im), quality) for im in batch])
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
        out = to_uint8(jpeg_roundtrip(x, quality)).permute(0, 2, 3, 1).numpy()
        assert np.abs(out.astype(int) - ref).mean() < 0.05, (h, w, quality)
    # images that were JPEG-compressed before (like the shared CIFAR-10 JPEGs) put DCT
    # coefficients on rounding ties; the integer DCT must break them like libjpeg
    once = np.stack([_pil_jpeg(im, 75) for im in _colour_images(4)])
    once_t = torch.from_numpy(once).permute(0, 3, 1, 2).float() / 255
    out = to_uint8(jpeg_roundtrip(once_t, 50)).permute(0, 2, 3, 1).numpy()
    ref = np.stack([_pil_jpeg(im, 50) for im in once])
    assert np.abs(out.astype(int) - ref).mean() < 0.05


@pytest.mark.skipif(not HAS["cv2"], reason="opencv not installed")
def test_defocus_matches_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    import cv2

    for severity, (radius, alias) in enumerate(((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), 1):
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
        disk /= disk.sum()
        kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
        ref = [np.stack([cv2.filter2D(im[..., ch] / 255.0, -1, kernel) for ch in range(3)], -1) for im in uint8_images]
        ours = _hwc(corrupt(images, "defocus_blur", severity))
        np.testing.assert_allclose(ours, np.clip(np.stack(ref), 0, 1), atol=1e-5)


@pytest.mark.skipif(not HAS["cv2"], reason="opencv not installed")
def test_defocus_kernel_is_the_reference_float32_kernel_bit_for_bit() -> None:
    import cv2

    for radius, alias in blur.DEFOCUS:
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
        disk /= np.sum(disk)
        expected = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
        np.testing.assert_array_equal(blur.defocus_kernel(radius, alias), expected.astype(np.float64))


@pytest.mark.skipif(not HAS["scipy"], reason="scipy not installed")
def test_zoom_blur_matches_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    from scipy.ndimage import zoom as scipy_zoom

    def clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
        side = int(np.ceil(32 / factor))
        top = (32 - side) // 2
        zoomed = scipy_zoom(img[top : top + side, top : top + side], (factor, factor, 1), order=1)
        trim = (zoomed.shape[0] - 32) // 2
        return zoomed[trim : trim + 32, trim : trim + 32]

    for severity, end in enumerate((1.06, 1.11, 1.16, 1.21, 1.26), 1):
        factors = np.arange(1, end, 0.01)
        assert len(factors) == (7, 12, 16, 21, 26)[severity - 1]
        ref = []
        for im in uint8_images:
            x = (im / 255.0).astype(np.float32)
            total = sum(clipped_zoom(x, z) for z in factors)
            ref.append(np.clip((x + total) / (len(factors) + 1), 0, 1))
        np.testing.assert_allclose(_hwc(corrupt(images, "zoom_blur", severity)), np.stack(ref), atol=1e-5)


def _plasma_reference(uniforms: list[np.ndarray], mapsize: int, decay: float) -> np.ndarray:
    """Diamond-square as §9.1 item 10 describes it, consuming ``uniforms`` (in [0, 1)) in order."""
    grid = np.zeros((mapsize, mapsize))
    draws = iter(uniforms)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * (-wibble + 2 * wibble * next(draws))

    while step >= 2:
        half = step // 2
        corners = grid[::step, ::step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        grid[half::step, half::step] = wibbled_mean(total)
        centres, corners = grid[half::step, half::step], grid[::step, ::step]
        row_mid = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[::step, half::step] = wibbled_mean(row_mid)
        col_mid = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half::step, ::step] = wibbled_mean(col_mid)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _plasma_draws(seed: int, mapsize: int) -> list[np.ndarray]:
    state = np.random.RandomState(seed)
    draws, n = [], 1
    while n <= mapsize // 2:
        draws += [state.random_sample((n, n)) for _ in range(3)]
        n *= 2
    return draws


def test_plasma_matches_reference() -> None:
    for decay in (3.0, 1.75):
        draws = _plasma_draws(0, 32)
        draw = lambda call, n: torch.from_numpy(draws[call])[None]  # noqa: E731
        ours = weather.plasma_fractal(draw, 1, 32, decay, torch.device("cpu"))
        np.testing.assert_allclose(ours[0].numpy(), _plasma_reference(draws, 32, decay), atol=1e-12)


@pytest.mark.skipif(not HAS["imagecorruptions"], reason="imagecorruptions-imaug not installed")
def test_plasma_matches_imagecorruptions() -> None:
    from imagecorruptions import corruptions as ic

    draws = _plasma_draws(3, 32)
    np.random.seed(3)  # its plasma draws np.random.uniform(-w, w) = -w + 2w * random_sample()
    expected = ic.plasma_fractal(mapsize=32, wibbledecay=2.5)
    ours = weather.plasma_fractal(lambda call, n: torch.from_numpy(draws[call])[None], 1, 32, 2.5, torch.device("cpu"))
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-6)


def test_fog_with_fixed_plasma_matches_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    plasma = np.stack([_plasma_reference(_plasma_draws(i, 32), 32, 2.0) for i in range(len(images))])
    for strength in (0.2, 0.5, 0.75, 1.0, 1.5):
        ref = []
        for im, p in zip(uint8_images, plasma):
            x = im / 255.0
            peak = x.max()
            x = x + strength * p[..., None]
            ref.append(np.clip(x * peak / (peak + strength), 0, 1))
        ours = weather.fog_from_plasma(images, torch.from_numpy(plasma), strength)
        np.testing.assert_allclose(_hwc(ours), np.stack(ref), atol=2e-6)


@pytest.mark.skipif(not HAS["skimage"], reason="scikit-image not installed")
def test_glass_blur_parallel_copy_equals_sequential_reference(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    from skimage.filters import gaussian

    ids = torch.arange(len(images))
    for severity, (sigma, delta, iterations) in enumerate(blur.GLASS, 1):
        rng = SampleRandom(0, CORRUPTIONS.index("glass_blur"), severity, ids)
        shifts = [rng.randint(-1, 1, (2, 30, 30), it).numpy() for it in range(iterations)]
        out = _hwc(corrupt(images, "glass_blur", severity))
        out_uint8 = corrupt_uint8(images, "glass_blur", severity).permute(0, 2, 3, 1).numpy()
        for b, im in enumerate(uint8_images):
            x = np.uint8(gaussian(im / 255.0, sigma=sigma, channel_axis=-1) * 255)
            for it in range(iterations):
                for h in range(32 - delta, delta, -1):  # the reference's in-place scan
                    for w in range(32 - delta, delta, -1):
                        dy, dx = shifts[it][b, :, h - 2, w - 2]
                        hp, wp = h + dy, w + dx
                        x[h, w], x[hp, wp] = x[hp, wp], x[h, w]  # views: a copy, not a swap
            ref = np.clip(gaussian(x / 255.0, sigma=sigma, channel_axis=-1), 0, 1)
            np.testing.assert_allclose(out[b], ref, atol=1e-6)
            np.testing.assert_array_equal(out_uint8[b], _reference_uint8(ref))


def _warp_affine_opencv4(image: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """OpenCV 4's ``warpAffine`` (bilinear, reflect-101) of a float32 HxWxC image, transcribed.

    OpenCV 4 (what the reference generator ran on) maps each output pixel in fixed point:
    ``rint((m01*y + m02) * 1024) + 16 + rint(m00*x * 1024)``, shifted right by 5 bits (1/32 px),
    the integer part by 5 more; the bilinear weights are float32 products of the 1/32
    fractions and the four terms are summed left to right in float32. OpenCV 5 resamples at
    exact float positions instead, so it cannot serve as the reference here.
    """
    h, w = image.shape[:2]
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    fixed_x = np.rint((inverse[0, 1] * ys + inverse[0, 2]) * 1024).astype(np.int64) + 16
    fixed_y = np.rint((inverse[1, 1] * ys + inverse[1, 2]) * 1024).astype(np.int64) + 16
    sx = (fixed_x + np.rint(inverse[0, 0] * xs * 1024).astype(np.int64)) >> 5
    sy = (fixed_y + np.rint(inverse[1, 0] * xs * 1024).astype(np.int64)) >> 5
    fx, fy = (sx & 31).astype(np.float32) / 32, (sy & 31).astype(np.float32) / 32

    def reflect101(i: np.ndarray, n: int) -> np.ndarray:
        i = np.abs(i) % (2 * n - 2)
        return np.minimum(i, 2 * n - 2 - i)

    terms = [
        image[reflect101((sy >> 5) + dy, h), reflect101((sx >> 5) + dx, w)] * (wy * wx)[..., None]
        for dy, wy in ((0, 1 - fy), (1, fy))
        for dx, wx in ((0, 1 - fx), (1, fx))
    ]
    return ((terms[0] + terms[1]) + terms[2]) + terms[3]


def _elastic_reference(uint8_images: np.ndarray, severity: int) -> np.ndarray:
    """The reference elastic transform (§9.1 item 13) fed with our random draws, in 0..255 units
    (float32, before the uint8 cast): float32 anchor points, OpenCV's affine matrix, the
    OpenCV 4 warp, SciPy's Gaussian and ``map_coordinates``."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    alpha, sigma, affine = digital.ELASTIC[severity - 1]
    ids = torch.arange(len(uint8_images))
    rng = SampleRandom(0, CORRUPTIONS.index("elastic_transform"), severity, ids)
    uniforms = rng.uniform((3, 2), 0).double().numpy()  # the draws behind np.random.uniform
    fields = rng.uniform((2, 32, 32), 1).double().numpy()
    out = []
    for b, im in enumerate(uint8_images):
        x = np.array(im, dtype=np.float32) / 255.0
        centre, side = np.float32((32, 32)) // 2, 32 // 3
        src = np.float32([centre + side, [centre[0] + side, centre[1] - side], centre - side])
        dst = src + (-affine + 2 * affine * uniforms[b]).astype(np.float32)
        x = _warp_affine_opencv4(x, cv2.invertAffineTransform(cv2.getAffineTransform(src, dst)))
        dx = (gaussian(-1 + 2 * fields[b, 0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        dy = (gaussian(-1 + 2 * fields[b, 1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
        cols, rows, chans = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
        coords = ((rows + dy[..., None]).reshape(-1), (cols + dx[..., None]).reshape(-1), chans.reshape(-1))
        x = map_coordinates(x, coords, order=1, mode="reflect").reshape(32, 32, 3)
        out.append(np.clip(x, 0, 1) * 255)
    return np.stack(out)


@pytest.mark.skipif(not (HAS["cv2"] and HAS["scipy"] and HAS["skimage"]), reason="opencv/scipy/scikit-image missing")
def test_elastic_matches_reference_semantics_given_the_same_draws(uint8_images: np.ndarray) -> None:
    # textured images too: on smooth ones a 1/32-pixel shift of the warp barely shows
    noise = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    uint8_images = np.concatenate([uint8_images, noise])
    images = torch.from_numpy(uint8_images).permute(0, 3, 1, 2).float() / 255.0
    for severity in range(1, 6):
        ref = _elastic_reference(uint8_images, severity)
        ours = _hwc(corrupt(images, "elastic_transform", severity)) * 255
        # float32 rounding only; float64 anchor points (an old bug) moved values by > 1 level
        assert np.abs(ours - ref).max() < 1e-3, (severity, np.abs(ours - ref).max())
        ours_uint8 = corrupt_uint8(images, "elastic_transform", severity).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(ours_uint8, np.uint8(ref))


@pytest.mark.skipif(not HAS["cv2"], reason="opencv not installed")
def test_affine_matrix_is_opencvs() -> None:
    """Our transcription of OpenCV 4's LU solve; the installed OpenCV (5.x) solves the same
    system with a different operation order (last-bit differences in about a third of the
    entries), far below what could move a 1/1024-pixel rounding of the warp."""
    import cv2

    src = digital.affine_source_points(32, 32)
    jitter = torch.rand(64, 3, 2, generator=torch.Generator().manual_seed(0)).numpy() * 5 - 2.5
    dst = (src + jitter.astype(np.float32)).astype(np.float32)
    ours = digital.opencv_affine_transform(torch.from_numpy(src).expand(64, 3, 2), torch.from_numpy(dst))
    expected = np.stack([cv2.getAffineTransform(src, d) for d in dst])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-15)
    np.testing.assert_array_equal(
        digital.opencv_invert_affine(torch.from_numpy(expected)).numpy(),
        np.stack([cv2.invertAffineTransform(m) for m in expected]),
    )


# ---------------------------------------------------------------- the reference's 8-bit values


def _reference_uint8(values: np.ndarray) -> np.ndarray:
    """The reference's final step: ``np.uint8(np.clip(x, 0, 1) * 255)``, truncating."""
    return np.uint8(np.clip(values, 0, 1) * 255)


@pytest.mark.skipif(not (HAS["cv2"] and HAS["skimage"] and HAS["scipy"]), reason="opencv/scikit-image/scipy missing")
def test_corrupt_uint8_gives_the_reference_8bit_values(uint8_images: np.ndarray, images: torch.Tensor) -> None:
    """Defocus, brightness, contrast and zoom blur computed by the reference's formulas in its
    precision (float64; zoom blur float32) and truncated by its cast. Truncating rounded or
    float32 values lands one level off for up to ~9 % of the values (defocus severity 4,
    brightness severity 4), so this compares exactly."""
    import cv2
    from scipy.ndimage import zoom as scipy_zoom
    from skimage.color import hsv2rgb, rgb2hsv

    def defocus(im: np.ndarray, radius: float, alias: float) -> np.ndarray:
        grid = np.arange(-8, 9)
        xx, yy = np.meshgrid(grid, grid)
        disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
        disk /= np.sum(disk)
        kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
        x = im / 255.0
        return np.stack([cv2.filter2D(x[..., ch], -1, kernel) for ch in range(3)], -1)

    def brightness(im: np.ndarray, c: float) -> np.ndarray:
        hsv = rgb2hsv(im / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        return hsv2rgb(hsv)

    def contrast(im: np.ndarray, c: float) -> np.ndarray:
        x = im / 255.0
        means = np.mean(x, axis=(0, 1), keepdims=True)
        return (x - means) * c + means

    def zoom_blur(im: np.ndarray, end: float) -> np.ndarray:
        x = (im / 255.0).astype(np.float32)
        out = np.zeros_like(x)
        for factor in np.arange(1, end, 0.01):
            side = int(np.ceil(32 / factor))
            top = (32 - side) // 2
            zoomed = scipy_zoom(x[top : top + side, top : top + side], (factor, factor, 1), order=1)
            trim = (zoomed.shape[0] - 32) // 2
            out += zoomed[trim : trim + 32, trim : trim + 32]
        return (x + out) / (len(np.arange(1, end, 0.01)) + 1)

    cases = {
        "defocus_blur": (defocus, blur.DEFOCUS),
        "brightness": (brightness, [(c,) for c in digital.BRIGHTNESS]),
        "contrast": (contrast, [(c,) for c in digital.CONTRAST]),
        "zoom_blur": (zoom_blur, [(end,) for end in blur.ZOOM_END]),
    }
    for name, (reference, parameters) in cases.items():
        for severity, args in enumerate(parameters, 1):
            ref = np.stack([_reference_uint8(reference(im, *args)) for im in uint8_images])
            ours = corrupt_uint8(images, name, severity).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(ours, ref, err_msg=f"{name} severity {severity}")


@pytest.mark.skipif(not HAS["imagecorruptions"], reason="imagecorruptions-imaug not installed")
def test_motion_kernel_matches_imagecorruptions_transcription(images: torch.Tensor) -> None:
    from benchmarks.corruptions import _filters
    from imagecorruptions import corruptions as ic

    for radius, sigma, angle in ((6, 1.0, 30.0), (9, 2.5, -44.0), (14, 12.0, -100.0)):
        ours = _filters.motion_blur(images[:3], radius, sigma, torch.full((3,), angle))
        for b in range(3):
            ref = ic._motion_blur(_hwc(images[b : b + 1])[0] * 255.0, radius=radius, sigma=sigma, angle=angle)
            np.testing.assert_allclose(_hwc(ours[b : b + 1])[0] * 255.0, ref, atol=1e-3)


@pytest.mark.skipif(not (HAS["cv2"] and HAS["imagecorruptions"]), reason="opencv/imagecorruptions-imaug missing")
def test_frost_textures_match_opencv_resize() -> None:
    import cv2

    textures, sizes = weather.frost_textures(torch.device("cpu"))
    folder = weather.frost_directory()
    for i, name in enumerate(weather.FROST_FILES):
        expected = cv2.resize(cv2.imread(str(folder / name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        h, w = sizes[i].tolist()
        assert (h, w) == expected.shape[:2]
        ours = (textures[i, :, :h, :w].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(ours, expected)


def test_frost_is_a_blend_with_a_texture_crop(images: torch.Tensor) -> None:
    black = torch.zeros(4, 3, 32, 32)
    out = corrupt(black, "frost", 1)  # (1.0, 0.2): out = 0.2 * crop
    textures, sizes = weather.frost_textures(torch.device("cpu"))
    for crop in out / 0.2:
        found = False
        for texture, (h, w) in zip(textures, sizes.tolist()):
            corner = (texture[:, : h - 31, : w - 31] - crop[:, :1, :1]).abs().amax(dim=0) < 1e-5
            for i, j in torch.nonzero(corner).tolist():  # candidate top-left corners
                found = found or bool((texture[:, i : i + 32, j : j + 32] - crop).abs().max() < 1e-5)
        assert found


def test_frost_without_the_texture_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weather.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(weather, "_FROST_CACHE", {})
    with pytest.raises(ImportError, match="imagecorruptions-imaug"):
        corrupt(torch.zeros(1, 3, 32, 32), "frost", 1)


# ---------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_cuda_matches_cpu(name: str, images: torch.Tensor) -> None:
    cpu = corrupt(images, name, 5, seed=2)
    gpu = corrupt(images.cuda(), name, 5, seed=2)
    assert gpu.device.type == "cuda"
    diff = (gpu.cpu() - cpu).abs()
    # float rounding may flip a few 8-bit roundings (motion blur, snow, glass blur)
    assert float(diff.mean()) < 1e-4 and float((diff > 1e-4).float().mean()) < 0.01, name


def test_shot_noise_8bit_sampler_is_exact_cdf_inversion() -> None:
    """The table sampler returns the smallest j with CDF(j) >= u, for the uniforms it is given."""
    from benchmarks.corruptions.noise import _poisson_8bit

    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (20000,), generator=generator).float()
    bits = torch.randint(0, 2**23, (20000,), generator=generator)
    bits[:50] = 0  # the extreme tails, where bins hold many thresholds
    bits[50:100] = 2**23 - 1
    u = (bits.float() + 0.5) * 2.0**-23
    for photons in (500.0, 60.0):
        rate = levels.double() * photons / 255.0
        j = torch.arange(1000, dtype=torch.float64)
        cdf = torch.cumsum(torch.exp(-rate[:, None] + j * torch.log(rate.clamp(min=1e-300))[:, None] - torch.lgamma(j + 1)), 1)
        cdf[rate == 0] = 1.0
        expected = (cdf < u.double()[:, None]).sum(1).float()
        assert torch.equal(_poisson_8bit(levels, u, photons), expected)

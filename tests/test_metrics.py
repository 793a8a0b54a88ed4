import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from kmgpu import cpu_kernels, metrics
from kmgpu.metrics import (
    _blur,
    _blur_stack,
    _gaussian_taps,
    bits_per_pixel,
    lossless_png_bytes,
    luma,
    psnr,
    quality_indexed,
    quality_of,
    ssim,
)

from .conftest import SAMPLES


@pytest.fixture(autouse=True, params=["compiled", "generic"])
def cpu_path(request, monkeypatch):
    """Every measure here is checked with numba's one-pass kernel (cpu_kernels._quality) and without."""
    if request.param == "generic":
        monkeypatch.setenv("KMGPU_NUMBA", "0")
    elif not cpu_kernels.compiled():
        pytest.skip("the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)")
    return request.param


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [2, 64, 256])
def test_quality_indexed_equals_psnr_and_ssim_of_the_rebuilt_image(name, k):
    with Image.open(SAMPLES / name) as im:
        q = im.convert("RGB").quantize(k, method=Image.Quantize.MEDIANCUT)
        a = np.asarray(im.convert("RGB"))
    palette = np.asarray(q.getpalette()[: 3 * k], dtype=np.uint8).reshape(-1, 3)
    indices = np.asarray(q)
    rebuilt = palette[indices]
    got = quality_indexed(a, palette, indices)
    assert got[0] == pytest.approx(psnr(a, rebuilt), rel=1e-14)
    assert got[1] == pytest.approx(ssim(a, rebuilt), abs=1e-12)
    gray = a[:, :, :1]
    levels = np.arange(0, 256, 255 // (k - 1), dtype=np.uint8)[:k, None]
    idx = np.abs(gray[:, :, 0, None].astype(int) - levels[:, 0]).argmin(-1).astype(np.uint8)
    got = quality_indexed(gray, levels, idx)
    assert got[0] == pytest.approx(psnr(gray, levels[idx]), rel=1e-14)
    assert got[1] == pytest.approx(ssim(gray, levels[idx]), abs=1e-12)


@pytest.mark.parametrize("name", ["astronaut.png", "camera.png", "coffee.png", "rocket.jpg"])
@pytest.mark.parametrize("k", [4, 64])
def test_ssim_equals_scikit_image(name, k):
    with Image.open(SAMPLES / name) as im:
        rgb = im.convert("RGB")
    a = np.asarray(rgb)
    b = np.asarray(rgb.quantize(k, dither=Image.Dither.NONE).convert("RGB"))
    ref = structural_similarity(
        luma(a), luma(b), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert ssim(a, b) == pytest.approx(ref, abs=1e-9)


def test_measures_in_strips_equal_the_whole_image(monkeypatch):
    """PSNR and SSIM run strip by strip (bounded memory); cut into many strips they give the same numbers."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(83, 57, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    ref_ssim = structural_similarity(
        luma(a), luma(b), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    diff = a.astype(np.float64) - b
    ref_psnr = 10 * np.log10(255**2 / np.mean(diff * diff))
    monkeypatch.setattr(metrics, "_STRIP_VALUES", {"cpu": 1})  # the minimum: 16 rows a strip, 5 strips here
    assert len(metrics._strips(83, 57 * 3, "cpu")) == 6 and len(metrics._strips(73, 57, "cpu")) == 5
    assert ssim(a, b) == pytest.approx(ref_ssim, abs=1e-12)
    assert psnr(a, b) == pytest.approx(ref_psnr, rel=1e-14)
    palette, inverse = np.unique(b.reshape(-1, 3), axis=0, return_inverse=True)
    got = quality_of(torch.tensor(a), torch.tensor(palette), torch.tensor(inverse.reshape(83, 57)))
    assert got[0].item() == pytest.approx(ref_psnr, rel=1e-14) and got[1].item() == pytest.approx(ref_ssim, abs=1e-12)


def test_bands_on_threads_give_the_numbers_of_one_pass(monkeypatch, cpu_path):
    """The compiled kernel measures bands of window rows on several threads: the PSNR of one pass exactly,
    its SSIM to rounding, and the same numbers bit for bit whatever the threads."""
    if cpu_path == "generic":
        pytest.skip("bands are the compiled kernel's")
    with Image.open(SAMPLES / "coffee.png") as im:
        q = im.convert("RGB").quantize(64, method=Image.Quantize.MEDIANCUT)
        a = np.asarray(im.convert("RGB"))
    palette = np.asarray(q.getpalette()[: 3 * 64], dtype=np.uint8).reshape(-1, 3)
    indices = np.asarray(q)
    monkeypatch.setattr(metrics, "_BAND_ROWS", 10**6)
    whole = quality_indexed(a, palette, indices)
    threads = torch.get_num_threads()
    try:
        for rows in (1, 37, 256):
            monkeypatch.setattr(metrics, "_BAND_ROWS", rows)
            got = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                got.append(quality_indexed(a, palette, indices))
                got.append(metrics.ssim(a, palette[indices]))
            assert got[0] == got[2] == got[4] and got[1] == got[3] == got[5]
            assert got[0][0] == whole[0] and got[0][1] == pytest.approx(whole[1], abs=1e-12)
            assert got[1] == pytest.approx(whole[1], abs=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_identical_images():
    a = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")


def test_psnr_by_hand():
    a = np.zeros((2, 2, 1), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10  # MSE = 100 / 4 = 25
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 25))


def test_tiny_images_have_an_ssim():
    a = np.random.default_rng(1).integers(0, 256, size=(5, 8, 1), dtype=np.uint8)
    assert -1 <= ssim(a, 255 - a) < ssim(a, a) == pytest.approx(1.0)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))


def test_sizes():
    a = np.asarray(Image.open(SAMPLES / "coffee.png").convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert lossless_png_bytes(a) == buf.tell()
    assert bits_per_pixel(1000, 100, 10) == 8.0


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA"])
def test_quality_of_tensors_equals_psnr_and_ssim(mode):
    """The on-device measure (used on CUDA) gives the numbers of the NumPy one."""
    with Image.open(SAMPLES / "coffee.png") as im:
        im = im.convert("RGB").resize((150, 100))
    if mode in ("LA", "RGBA"):
        im.putalpha(Image.linear_gradient("L").resize(im.size))
    im = im.convert(mode)
    a = np.asarray(im).reshape(im.height, im.width, -1)
    q = im.quantize(16, method=Image.Quantize.FASTOCTREE) if mode == "RGBA" else im.convert("RGB").quantize(16)
    b = np.asarray(q.convert(mode)).reshape(a.shape)
    palette, inverse = np.unique(b.reshape(-1, a.shape[2]), axis=0, return_inverse=True)
    indices = inverse.reshape(im.height, im.width)
    assert np.array_equal(palette[indices], b) and 0 < psnr(a, b) < 60
    got = quality_of(torch.tensor(a), torch.tensor(palette), torch.tensor(indices)).tolist()
    assert got[0] == pytest.approx(psnr(a, b), rel=1e-12) and got[1] == pytest.approx(ssim(a, b), abs=1e-12)
    own, inverse = np.unique(a.reshape(-1, a.shape[2]), axis=0, return_inverse=True)
    same = quality_of(torch.tensor(a), torch.tensor(own), torch.tensor(inverse.reshape(im.height, im.width)))
    assert same[0].item() == float("inf") and same[1].item() == pytest.approx(1.0)


def test_grouped_convolution_blur_equals_shifted_sums():
    rng = np.random.default_rng(2)
    maps = torch.from_numpy(rng.uniform(0, 255 * 255, size=(3, 37, 52)))
    for size in (11, 5):
        taps = _gaussian_taps(size, 1.5 * size / 11)
        ref = torch.stack([_blur(m, taps) for m in maps])
        torch.testing.assert_close(_blur_stack(maps, taps), ref, rtol=1e-13, atol=1e-9)


def test_quality_indexed_refuses_indices_beyond_the_palette():
    a = np.zeros((4, 5, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="indices reach 3, beyond the palette's 2 entries"):
        quality_indexed(a, np.zeros((2, 3), dtype=np.uint8), np.full((4, 5), 3, dtype=np.uint8))
    with pytest.raises(ValueError, match="shapes differ"):
        quality_indexed(a, np.zeros((2, 3), dtype=np.uint8), np.zeros((5, 4), dtype=np.uint8))

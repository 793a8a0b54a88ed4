import io
import os
import stat

import numpy as np
import pytest
from PIL import Image

from kmgpu import quantize
from kmgpu.imageio import ImageReadError, load_image, write_atomic
from kmgpu.metrics import psnr

from .conftest import SAMPLES
from .images import encoded, exif_rotated_png, photo, png_info, srgb_icc, with_alpha


@pytest.mark.parametrize(
    "fmt, ext, kw",
    [("JPEG", "jpg", {"quality": 90}), ("PNG", "png", {}), ("WEBP", "webp", {"lossless": True}),
     ("TIFF", "tif", {}), ("BMP", "bmp", {}), ("GIF", "gif", {})],
)  # fmt: skip
def test_every_format_round_trips(tmp_path, fmt, ext, kw):
    src = tmp_path / f"in.{ext}"
    src.write_bytes(encoded(photo(), fmt, **kw))
    original = src.read_bytes()
    result = quantize(src, 16, device="cpu")
    out = tmp_path / "out.png"
    n = result.save(out)
    data = out.read_bytes()
    assert n == len(data) and src.read_bytes() == original  # the input is untouched
    info = png_info(data)
    assert info["color_type"] == 3 and info["bit_depth"] == 4 and info["palette_len"] <= 16
    with Image.open(out) as im:
        assert im.mode == "P" and im.size == (96, 64)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), result.reconstruct())


def test_rgba_alpha_is_clustered_and_round_trips(tmp_path):
    src = tmp_path / "a.png"
    with_alpha(photo()).save(src)
    result = quantize(src, 32, device="cpu")
    assert result.palette.shape[1] == 4
    out = tmp_path / "o.png"
    result.save(out)
    info = png_info(out.read_bytes())
    assert "tRNS" in info["chunks"] and info["trns_len"] <= info["palette_len"] <= 32
    with Image.open(out) as im:
        decoded = np.asarray(im.convert("RGBA"))
    np.testing.assert_array_equal(decoded, result.reconstruct())
    original = np.asarray(Image.open(src))
    assert np.all(decoded[:, :24, 3] == 0)  # the transparent band stays transparent
    # Better than Pillow's RGBA quantizer over the visible pixels, alpha included.
    with Image.open(src) as im:
        pillow = np.asarray(im.quantize(32, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).convert("RGBA"))
    visible = original[:, :, 3] > 0
    assert psnr(original[visible], decoded[visible]) > psnr(original[visible], pillow[visible])


def test_la_grayscale_with_alpha(tmp_path):
    src = tmp_path / "la.png"
    with_alpha(photo()).convert("LA").save(src)
    result = quantize(src, 8, device="cpu")
    assert result.source.mode == "LA" and result.palette.shape == (8, 2)
    out = tmp_path / "o.png"
    result.save(out)
    with Image.open(out) as im:
        rgba = np.asarray(im.convert("RGBA"))
    assert np.all(rgba[:, :, 0] == rgba[:, :, 1])
    np.testing.assert_array_equal(rgba[:, :, [0, 3]], result.reconstruct())


def test_opaque_alpha_is_dropped():
    loaded = quantize(np.dstack([np.asarray(photo()), np.full((64, 96), 255, np.uint8)]), 4, device="cpu")
    assert loaded.source.mode == "RGB" and loaded.palette.shape[1] == 3


@pytest.mark.parametrize(
    "make, mode",
    [
        (lambda im: im.convert("P", palette=Image.Palette.ADAPTIVE, colors=100), "RGB"),
        (lambda im: im.convert("CMYK"), "RGB"),
        (lambda im: im.convert("YCbCr"), "RGB"),
        (lambda im: im.convert("1"), "L"),
        (lambda im: im.convert("L"), "L"),
    ],
)
def test_modes_are_converted(make, mode):
    result = quantize(make(photo()), 16, device="cpu")
    assert result.source.mode == mode
    assert result.psnr > 20


def test_cmyk_jpeg_file(tmp_path):
    src = tmp_path / "c.jpg"
    photo().convert("CMYK").save(src, quality=95)
    loaded = load_image(src)
    assert loaded.mode == "RGB"
    ref = np.asarray(photo()).astype(int)
    assert np.abs(loaded.pixels.astype(int) - ref).mean() < 12


def test_one_bit_keeps_black_and_white():
    result = quantize(photo().convert("1"), 2, device="cpu")
    assert sorted(result.palette[:, 0].tolist()) == [0, 255] and result.psnr == float("inf")


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_is_scaled_not_clipped(tmp_path, fmt):
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    src = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(levels).save(src, format=fmt)
    loaded = load_image(src)
    assert loaded.mode == "L"
    assert loaded.pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "rot.png"
    upright = exif_rotated_png(src)
    result = quantize(src, 4, device="cpu")
    assert result.indices.shape == (20, 10)
    np.testing.assert_array_equal(result.reconstruct(), np.asarray(upright))


def test_icc_profile_is_carried_and_srgb_is_said_in_a_byte(tmp_path):
    """A profile that is not sRGB (the rocket sample's Adobe RGB) goes into the output byte for byte; an sRGB
    one becomes an sRGB chunk, which says the same in 13 bytes."""
    with Image.open(SAMPLES / "rocket.jpg") as im:
        adobe = im.info["icc_profile"]
    for icc, name in ((adobe, "adobe"), (srgb_icc(), "srgb")):
        src = tmp_path / f"{name}.png"
        photo().save(src, icc_profile=icc)
        out = tmp_path / f"{name}-out.png"
        quantize(src, 16, device="cpu").save(out)
        with Image.open(out) as im:
            if name == "adobe":
                assert im.info.get("icc_profile") == icc and "srgb" not in im.info
            else:
                assert im.info.get("icc_profile") is None and im.info.get("srgb") == 0


def test_a_profile_that_cannot_be_carried_is_dropped_with_a_note_that_says_why(tmp_path):
    """A gray profile cannot tag a palette PNG; an RGB profile on gray pixels (what Pillow's convert("L") keeps)
    is one viewers ignore there, so the output is not tagged with it either. Each note says which."""
    from PIL import ImageCms

    gray_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not RGB
    with Image.open(SAMPLES / "rocket.jpg") as im:
        adobe = im.info["icc_profile"]
    cases = {"gray.jpg": (gray_icc, "is not an RGB profile"), "rgb-on-gray.png": (adobe, "RGB profile on gray")}
    for name, (icc, says) in cases.items():
        src = tmp_path / name
        photo().convert("L").save(src, icc_profile=icc)
        result = quantize(src, 8, device="cpu")
        (note,) = result.source.notes
        assert says in note and note.endswith("was not carried over"), note
        out = tmp_path / f"{name}.out.png"
        result.save(out)
        with Image.open(out) as im:
            assert im.mode == "P" and "icc_profile" not in im.info and "srgb" not in im.info


def test_animated_gif_uses_first_frame_and_says_so(tmp_path):
    first = photo()
    second = Image.fromarray(255 - np.asarray(first))
    src = tmp_path / "anim.gif"
    first.save(src, save_all=True, append_images=[second], duration=100)
    result = quantize(src, 64, device="cpu")
    assert any("first of 2 frames" in note for note in result.source.notes)
    with Image.open(src) as im:
        frame0 = np.asarray(im.convert("RGB"))
    assert result.psnr > 30 and np.abs(result.reconstruct().astype(int) - frame0).mean() < 4


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (encoded(photo(), "PNG")[:300], "corrupt or truncated"),
        (encoded(photo(), "JPEG")[:400], "corrupt or truncated"),
    ],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    src = tmp_path / "bad.jpg"
    src.write_bytes(content)
    with pytest.raises(ImageReadError, match=message) as info:
        load_image(src)
    text = str(info.value)
    assert text.startswith(str(src)) and "\n" not in text


def test_an_avif_this_pillow_cannot_read_says_why(tmp_path, monkeypatch):
    """Pillow reads AVIF only where it was built with libavif: without it, the reason is that, not 'not an image'."""
    from PIL import features

    src = tmp_path / "photo.avif"
    src.write_bytes(b"\x00\x00\x00\x1cftypavif" + bytes(64))  # an AVIF's first box, and nothing after
    with pytest.raises(ImageReadError) as info:
        load_image(src)
    assert "libavif" not in str(info.value)  # this Pillow either reads AVIF or the file is no image
    real_check = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "avif" else real_check(name))
    with pytest.raises(ImageReadError, match="AVIF, which this Pillow .* built without libavif") as info:
        load_image(src)
    assert str(info.value).startswith(str(src)) and "\n" not in str(info.value)
    other = tmp_path / "photo.jpg"
    other.write_bytes(src.read_bytes())
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(other)


def test_a_pipe_is_refused_without_waiting_on_it(tmp_path):
    """Reading a named pipe would wait for a writer forever; it is refused, as is any file that is not regular."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(fifo)


def test_pixel_limit_refuses_before_decoding(tmp_path):
    src = tmp_path / "big.png"
    photo().save(src)
    with pytest.raises(ImageReadError, match="96x64 is 6,144 pixels, above the limit of 6,000"):
        load_image(src, max_pixels=6000)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path)


def test_save_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "same.png"
    photo().save(src)
    before = src.read_bytes()
    result = quantize(src, 8, device="cpu")
    with pytest.raises(ValueError, match="would overwrite the input"):
        result.save(src)
    assert src.read_bytes() == before


def test_array_and_tensor_inputs_agree():
    import torch

    a = np.asarray(photo()).copy()
    from_array = quantize(a, 16, device="cpu")
    from_tensor = quantize(torch.from_numpy(a).permute(2, 0, 1), 16, device="cpu")
    from_pil = quantize(Image.fromarray(a), 16, device="cpu")
    for other in (from_tensor, from_pil):
        np.testing.assert_array_equal(other.palette, from_array.palette)
        np.testing.assert_array_equal(other.indices, from_array.indices)
    with pytest.raises(ValueError, match="must be uint8"):
        quantize(a.astype(np.float32), 16)
    assert from_array.to_pil().mode == "P"
    assert io.BytesIO(from_array.png_bytes()).getvalue()[:4] == b"\x89PNG"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, mask):
    """Atomic writes go through a 0600 temporary: the output must not keep its mode (a web server could not read it)."""
    old_mask = os.umask(mask)
    try:
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")
        write_atomic(tmp_path / "new" / "a.png", b"data")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "new" / "a.png").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    assert write_atomic(kept, b"new data") == 8
    assert kept.read_bytes() == b"new data" and stat.S_IMODE(kept.stat().st_mode) == 0o640

"""kmgpu.pngread: the fast PNG reader gives Pillow's pixels and profile, or steps aside for Pillow."""

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kmgpu import cpu_kernels, pngread
from kmgpu.imageio import from_pil, load_image

from .conftest import SAMPLES
from .images import exif_rotated_png, photo, srgb_icc, with_alpha

pytestmark = pytest.mark.skipif(
    not cpu_kernels.compiled(), reason="the compiled CPU kernels are off here (no numba, or KMGPU_NUMBA=0)"
)

BIG = 10**9
COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG color type


def spec_paeth(a, b, c):
    """PNG 1.2, section 6.6, as written there."""
    a, b, c = (np.asarray(v, dtype=np.int32) for v in (a, b, c))
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered(pixels: np.ndarray, kinds) -> bytes:
    """The scanlines of ``pixels`` (H, W, C) uint8, row r filtered with type kinds[r], by the spec."""
    h, w, ch = pixels.shape
    rows = pixels.reshape(h, w * ch).astype(np.int32)
    out = []
    for r, kind in enumerate(kinds):
        x, up = rows[r], rows[r - 1] if r else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(ch, np.int32), x[:-ch]])
        up_left = np.concatenate([np.zeros(ch, np.int32), up[:-ch]])
        predicted = [0, left, up, (left + up) // 2, spec_paeth(left, up, up_left)][kind]
        out.append(bytes([kind]) + ((x - predicted) % 256).astype(np.uint8).tobytes())
    return b"".join(out)


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png(pixels, kinds=None, *, pieces=1, before=(), after=(), depth=8, interlace=0, stream=None) -> bytes:
    """A PNG of ``pixels`` with the given filter types, its zlib stream cut into ``pieces`` IDAT chunks,
    and extra chunks before and after them."""
    h, w, ch = pixels.shape
    kinds = [4] * h if kinds is None else kinds
    ihdr = struct.pack(">IIBBBBB", w, h, depth, COLOR_TYPE[ch], 0, 0, interlace)
    data = zlib.compress(filtered(pixels, kinds)) if stream is None else stream
    cut = [len(data) * i // pieces for i in range(pieces + 1)]
    idat = [chunk(b"IDAT", data[a:b]) for a, b in zip(cut, cut[1:])]
    return b"".join([pngread.SIGNATURE, chunk(b"IHDR", ihdr), *before, *idat, *after, chunk(b"IEND", b"")])


def pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def test_paeth_is_the_spec_for_every_triple():
    # A 2-row, 1-byte-a-pixel image holds 2**21 of the 2**24 (a, b, c), eight images all of them:
    # row 0 is c, b, c, b, ...; in row 1 the even bytes are set to make the left neighbour a, and the
    # odd bytes are 0, so that each odd pixel of row 1 comes out as the kernel's predictor of (a, b, c).
    levels = np.arange(256, dtype=np.int32)
    for block in np.split(levels, 8):
        a, b, c = (v.ravel() for v in np.meshgrid(block, levels, levels, indexing="ij"))
        n = a.size
        top = np.empty(2 * n, np.int32)
        top[0::2], top[1::2] = c, b
        predicted = spec_paeth(a, b, c)
        # The even pixel 2j of row 1 is predicted from (pixel 2j-1 of row 1, top[2j], top[2j-1]); the
        # first, with no left neighbour, from the byte above it.
        left = np.concatenate([[0], predicted[:-1]])
        up_left = np.concatenate([[0], top[1::2][:-1]])
        first = np.where(np.arange(n) == 0, top[0], spec_paeth(left, top[0::2], up_left))
        second = np.zeros(2 * n, np.int32)
        second[0::2] = (a - first) % 256
        raw = np.concatenate([[0], top, [4], second]).astype(np.uint8)
        out = cpu_kernels.unfilter(raw, 2, 2 * n, 1)
        assert out is not None
        np.testing.assert_array_equal(out[1, 0::2], a)
        np.testing.assert_array_equal(out[1, 1::2], predicted)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    ch=st.sampled_from([1, 2, 3, 4]),
    levels=st.sampled_from([2, 5, 256]),  # few levels: many ties in the predictors
    seed=st.integers(0, 2**32 - 1),
    pieces=st.integers(1, 3),
)
def test_every_filter_and_layout_is_pillows(h, w, ch, levels, seed, pieces):
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, levels, (h, w, ch)) * (255 // max(levels - 1, 1))).astype(np.uint8)
    data = png(pixels, rng.integers(0, 5, h).tolist(), pieces=pieces)
    decoded = pngread.decode(data, BIG)
    assert decoded is not None
    np.testing.assert_array_equal(decoded[0], pixels)
    np.testing.assert_array_equal(decoded[0], pillow_pixels(data))
    assert decoded[1] is None


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("kw", [{}, {"optimize": True}, {"compress_level": 1}])
def test_pillows_own_files_and_load_image_agree(tmp_path, mode, kw):
    im = photo((160, 120))
    im = with_alpha(im).convert(mode) if "A" in mode else im.convert(mode)
    path = tmp_path / "a.png"
    im.save(path, **kw)
    assert pngread.decode(path.read_bytes(), BIG) is not None
    fast = load_image(path)
    with Image.open(path) as ref:
        slow = from_pil(ref)
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    assert fast.pixels.flags.c_contiguous and fast.pixels.flags.writeable
    assert (fast.icc_profile, fast.notes, fast.bytes_in) == (slow.icc_profile, slow.notes, path.stat().st_size)


def test_the_samples_are_pillows():
    for path in sorted(SAMPLES.glob("*.png")):
        data = path.read_bytes()
        decoded = pngread.decode(data, BIG)
        assert decoded is not None, path.name
        np.testing.assert_array_equal(decoded[0], pillow_pixels(data))


def test_profiles_and_harmless_chunks(tmp_path):
    rgb = np.asarray(photo((40, 30)))
    icc = srgb_icc()
    path = tmp_path / "icc.png"
    Image.fromarray(rgb).save(path, icc_profile=icc, dpi=(300, 300), pnginfo=_text("Software", "kmgpu"))
    decoded = pngread.decode(path.read_bytes(), BIG)
    assert decoded is not None and decoded[1] == icc
    assert load_image(path).icc_profile == icc
    # A gray image's RGB profile is not carried over, with the note Pillow's path gives.
    gray = tmp_path / "gray.png"
    Image.fromarray(rgb[:, :, 0]).save(gray, icc_profile=icc)
    loaded = load_image(gray)
    with Image.open(gray) as ref:
        slow = from_pil(ref)
    assert pngread.decode(gray.read_bytes(), BIG) is not None
    assert loaded.icc_profile is None and loaded.notes == slow.notes and loaded.notes
    extras = [chunk(kind, body) for kind, body in [(b"gAMA", struct.pack(">I", 45455)), (b"sRGB", b"\0")]]
    # ImageMagick's vpAg: an ancillary chunk Pillow does not read, and skips.
    after = [chunk(b"tEXt", b"date:create\x002026-11-24"), chunk(b"vpAg", struct.pack(">IIB", 40, 30, 0))]
    data = png(rgb, before=extras, after=after)
    decoded = pngread.decode(data, BIG)
    assert decoded is not None
    np.testing.assert_array_equal(decoded[0], pillow_pixels(data))


def _text(key, value):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


def _fallbacks():
    px = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    stream = zlib.compress(filtered(px, [1] * 4))
    raw = zlib.decompress(stream)
    yield "16-bit", png(px, depth=16, stream=zlib.compress(b"\0" * 4 * 37))
    yield "interlaced", png(px, interlace=1)
    yield "tRNS", png(px, before=[chunk(b"tRNS", b"\0\0\0\0\0\0")])
    exif = Image.Exif()
    exif[0x0112] = 1
    yield "eXIf", png(px, before=[chunk(b"eXIf", exif.tobytes()[6:])])
    yield "EXIF in text", png(px, before=[chunk(b"tEXt", b"Raw profile type exif\0\nexif\n0\n")])
    exif[0x0112] = 6
    yield "EXIF as tEXt 'exif'", png(px, after=[chunk(b"tEXt", b"exif\0" + exif.tobytes())])
    yield "a profile as tEXt", png(px, before=[chunk(b"tEXt", b"icc_profile\0not one")])
    yield "XMP", png(px, after=[chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>")])
    yield "compressed text", png(px, before=[chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"hi"))])
    yield "animation", png(px, before=[chunk(b"acTL", struct.pack(">II", 1, 0))])
    yield "unknown critical chunk", png(px, before=[chunk(b"ABCD", b"")])
    yield "PLTE", png(px, before=[chunk(b"PLTE", b"\0\0\0")])
    yield "bad CRC in IDAT", png(px, stream=stream).replace(chunk(b"IDAT", stream), chunk(b"IDAT", stream, crc=1))
    yield "bad CRC in IHDR", png(px)[:29] + b"\0\0\0\0" + png(px)[33:]
    yield "short stream", png(px, stream=zlib.compress(raw[:-1]))
    yield "long stream", png(px, stream=zlib.compress(raw + b"\0"))
    yield "broken stream", png(px, stream=stream[:-6] + b"\xff" * 6)
    yield "filter type 5", png(px, stream=zlib.compress(raw[:19] + b"\x05" + raw[20:]))
    yield "no IEND", png(px)[:-12]
    two = png(px, pieces=2)
    cut = two.index(b"IDAT") + 8 + struct.unpack(">I", two[two.index(b"IDAT") - 4 : two.index(b"IDAT")])[0]
    yield "chunk between IDATs", two[:cut] + chunk(b"gAMA", struct.pack(">I", 45455)) + two[cut:]
    yield "palette", _palette_png()


def _palette_png():
    buf = io.BytesIO()
    photo((20, 10)).quantize(16).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, data", list(_fallbacks()), ids=[name for name, _ in _fallbacks()])
def test_anything_else_is_left_to_pillow(tmp_path, name, data):
    assert pngread.decode(data, BIG) is None
    # and load_image gives what Pillow gives: the same pixels, or the same one-line error
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        with Image.open(path) as ref:
            expected = from_pil(ref).pixels
    except Exception:
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match="x.png"):
            load_image(path)
    else:
        np.testing.assert_array_equal(load_image(path).pixels, expected)


def test_orientation_and_limits_still_apply(tmp_path):
    path = tmp_path / "turned.png"
    upright = exif_rotated_png(path)
    assert pngread.decode(path.read_bytes(), BIG) is None  # eXIf: Pillow's
    np.testing.assert_array_equal(load_image(path).pixels, np.asarray(upright))
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(plain)
    assert pngread.eligible_header(plain.read_bytes()[: pngread.HEADER_BYTES], 199) is None
    with pytest.raises(ValueError, match="above the limit of 199"):
        load_image(plain, max_pixels=199)


def test_off_without_the_kernels(monkeypatch, tmp_path):
    path = tmp_path / "a.png"
    photo((30, 20)).save(path)
    data = path.read_bytes()
    monkeypatch.setattr(cpu_kernels, "compiled", lambda note=None: False)
    assert pngread.decode(data, BIG) is None
    np.testing.assert_array_equal(load_image(path).pixels, pillow_pixels(data))


def test_a_jpeg_or_a_palette_png_loads_neither_torch_nor_numba(tmp_path):
    """Only a PNG this reader takes loads the kernels: load_image of anything else stays as light as Pillow."""
    photo((30, 20)).save(tmp_path / "a.jpg")
    photo((30, 20)).quantize(8).save(tmp_path / "p.png")
    photo((30, 20)).save(tmp_path / "rgb.png")
    probe = (
        "import sys\n"
        "from kmgpu.imageio import load_image\n"
        "light = [load_image(p).pixels.shape for p in sys.argv[1:3]]\n"
        "before = sorted(m for m in ('torch', 'numba') if m in sys.modules)\n"
        "load_image(sys.argv[3])\n"
        "print(light, before, 'numba' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [str(tmp_path / n) for n in ("a.jpg", "p.png", "rgb.png")]
    done = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(20, 30, 3), (20, 30, 3)] [] True"


def test_off_without_libdeflate(monkeypatch, tmp_path):
    path = tmp_path / "a.png"
    photo((30, 20)).save(path)
    monkeypatch.setitem(sys.modules, "deflate", None)  # as if it were not installed
    assert not pngread.usable() and pngread.decode(path.read_bytes(), BIG) is None
    np.testing.assert_array_equal(load_image(path).pixels, pillow_pixels(path.read_bytes()))

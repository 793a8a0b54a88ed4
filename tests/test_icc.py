import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kmgpu.icc import srgb_intent
from kmgpu.png import encode_palette_png
from kmgpu.quantize import quantize

from .conftest import SAMPLES
from .images import png_info, srgb_icc


def sample_profile(name: str) -> bytes:
    with Image.open(SAMPLES / name) as im:
        return im.info["icc_profile"]


def tags(profile: bytes) -> dict[bytes, tuple[int, int]]:
    (count,) = struct.unpack_from(">I", profile, 128)
    return {
        sig: (offset, size)
        for sig, offset, size in (struct.unpack_from(">4sII", profile, 132 + 12 * i) for i in range(count))
    }


def with_colorant(profile: bytes, sig: bytes, xyz) -> bytes:
    offset, _ = tags(profile)[sig]
    out = bytearray(profile)
    struct.pack_into(">3i", out, offset + 8, *(round(v * 65536) for v in xyz))
    return bytes(out)


def with_gamma_curves(profile: bytes, gamma: float) -> bytes:
    """The profile with its three tone curves made a plain power law (a 'para' of function 0, in place)."""
    out = bytearray(profile)
    for sig in (b"rTRC", b"gTRC", b"bTRC"):
        offset, size = tags(profile)[sig]
        out[offset : offset + size] = bytes(size)
        struct.pack_into(">4s4xH2xi", out, offset, b"para", 0, round(gamma * 65536))
    return bytes(out)


def test_srgb_profiles_are_known_by_their_colors():
    """Photoshop's sRGB IEC61966-2.1 (the astronaut sample: v2, 1024-entry curves) and lcms's own (v4,
    parametric curves) are sRGB; the rocket sample's Adobe RGB is not."""
    assert srgb_intent(sample_profile("astronaut.png")) == 0
    assert srgb_intent(srgb_icc()) == 0
    assert srgb_intent(sample_profile("rocket.jpg")) is None


def test_near_srgb_is_not_srgb():
    """Another red primary, a gamma 2.2 curve (sRGB's differs by 0.3% of full scale in the shadows) or a
    lookup table beside the matrix, which a color manager would use first: each keeps its profile."""
    srgb = srgb_icc()
    assert srgb_intent(with_colorant(srgb, b"rXYZ", (0.4360747, 0.2225045, 0.0139322))) == 0
    assert srgb_intent(with_colorant(srgb, b"rXYZ", (0.4460747, 0.2225045, 0.0139322))) is None
    assert srgb_intent(with_colorant(srgb, b"gXYZ", (0.3850649, 0.7128786, 0.0971045))) is None
    assert srgb_intent(with_gamma_curves(srgb, 2.2)) is None
    assert srgb_intent(with_gamma_curves(srgb, 1.0)) is None
    table = bytearray(srgb)
    entry = 132 + 12 * list(tags(srgb)).index(b"cprt")
    table[entry : entry + 4] = b"A2B0"
    assert srgb_intent(bytes(table)) is None


def test_the_rendering_intent_comes_from_the_header():
    profile = bytearray(srgb_icc())
    struct.pack_into(">I", profile, 64, 1)  # relative colorimetric
    assert srgb_intent(bytes(profile)) == 1
    struct.pack_into(">I", profile, 64, 77)  # nonsense: perceptual
    assert srgb_intent(bytes(profile)) == 0


@pytest.mark.parametrize("cut", [0, 10, 131, 200, 400])
def test_broken_profiles_are_kept_not_fatal(cut):
    """A truncated or garbled profile is not sRGB as far as anyone can tell: it is carried, and nothing raises."""
    srgb = srgb_icc()
    assert srgb_intent(srgb[:cut]) is None
    garbled = bytearray(srgb)
    garbled[cut : cut + 64] = np.random.default_rng(cut).integers(0, 256, 64, dtype=np.uint8).tobytes()
    assert srgb_intent(bytes(garbled)) in (None, 0)
    assert srgb_intent(b"\x00" * 132) is None


def test_the_srgb_sample_is_written_with_an_srgb_chunk():
    """The astronaut sample's profile is sRGB: its PNG says so in 13 bytes instead of a 2.6 KB iCCP chunk, and
    decodes to the same pixels; with the Adobe RGB of the rocket sample the profile is written whole."""
    result = quantize(SAMPLES / "astronaut.png", 64, device="cpu")
    data = result.png_bytes()
    info = png_info(data)
    assert "sRGB" in info["chunks"] and "iCCP" not in info["chunks"]
    with_iccp = encode_palette_png(result.indices, result.palette, icc_profile=sample_profile("rocket.jpg"))
    assert "iCCP" in png_info(with_iccp)["chunks"] and "sRGB" not in png_info(with_iccp)["chunks"]
    plain = encode_palette_png(result.indices, result.palette)
    assert len(data) == len(plain) + 13
    iccp = 12 + len(b"ICC Profile\x00\x00") + len(zlib.compress(sample_profile("astronaut.png"), 9))
    assert iccp > 2500  # what the chunk would have cost
    with Image.open(io.BytesIO(data)) as im:
        assert im.info.get("srgb") == 0
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), result.palette[result.indices])

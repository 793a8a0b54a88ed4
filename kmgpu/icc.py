"""Whether an ICC profile describes sRGB, so that a PNG can say so in 13 bytes.

Many photos carry an sRGB profile (Photoshop's "sRGB IEC61966-2.1", 3,144
bytes; lcms's own, 588): deflated into an iCCP chunk Photoshop's still takes
2.6 KB, 3.5% of the astronaut sample's palette PNG at k=64 and about what a
whole 64x64 thumbnail does. An ``sRGB`` chunk says the same to a color-managed viewer, and
an untagged PNG is read as sRGB by every other one. So a profile is replaced
when its colors are sRGB's: a matrix/TRC RGB profile (no lookup tables, which
a color manager would use in place of the matrix) whose colorants are sRGB's
adapted to D50 within 0.003 and whose tone curves give sRGB's within 0.002 of
full scale at every 8-bit level. Anything else (Adobe RGB, Display P3, a
monitor's own profile, a gamma 2.2 curve) is carried as it is. This is what
libpng and oxipng do with the profiles they know by checksum, by colorimetry
here, so that every variant of sRGB counts.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["srgb_intent"]

# sRGB's colorants adapted to D50 (IEC 61966-2-1 through the Bradford transform, as the ICC's own sRGB
# profiles hold them).
_SRGB_COLORANTS = {
    b"rXYZ": (0.4360747, 0.2225045, 0.0139322),
    b"gXYZ": (0.3850649, 0.7168786, 0.0971045),
    b"bXYZ": (0.1430804, 0.0606169, 0.7141733),
}
_COLORANT_TOLERANCE = 0.003
_CURVE_TOLERANCE = 0.002
_LEVELS = np.arange(256) / 255.0
_SRGB_CURVE = np.where(_LEVELS <= 0.04045, _LEVELS / 12.92, ((_LEVELS + 0.055) / 1.055) ** 2.4)
_LOOKUP_TABLES = (b"A2B0", b"A2B1", b"A2B2", b"B2A0", b"B2A1", b"B2A2")


def srgb_intent(profile: bytes) -> int | None:
    """The rendering intent (0-3) to write in an ``sRGB`` chunk in place of ``profile``, or None when the
    profile is not sRGB's (or cannot be read: then it is kept as it is)."""
    try:
        with np.errstate(all="ignore"):  # a curve of nonsense parameters gives NaN, which compares unequal
            return _srgb_intent(profile)
    except (struct.error, ValueError, IndexError, OverflowError):
        return None


def _srgb_intent(profile: bytes) -> int | None:
    if len(profile) < 132 or profile[36:40] != b"acsp" or profile[16:20] != b"RGB " or profile[20:24] != b"XYZ ":
        return None
    (count,) = struct.unpack_from(">I", profile, 128)
    if count > 1000 or 132 + 12 * count > len(profile):
        return None
    tags = {}
    for i in range(count):
        sig, offset, size = struct.unpack_from(">4sII", profile, 132 + 12 * i)
        if offset + size > len(profile):
            return None
        tags[sig] = profile[offset : offset + size]
    if any(sig in tags for sig in _LOOKUP_TABLES):
        return None
    for sig, expected in _SRGB_COLORANTS.items():
        body = tags.get(sig)
        if body is None or len(body) < 20 or body[:4] != b"XYZ ":
            return None
        xyz = np.array(struct.unpack_from(">3i", body, 8)) / 65536.0
        if not np.abs(xyz - expected).max() <= _COLORANT_TOLERANCE:
            return None
    for sig in (b"rTRC", b"gTRC", b"bTRC"):
        body = tags.get(sig)
        curve = None if body is None else _curve(body)
        if curve is None or not np.abs(curve - _SRGB_CURVE).max() <= _CURVE_TOLERANCE:
            return None
    (intent,) = struct.unpack_from(">I", profile, 64)
    return intent if intent <= 3 else 0


def _curve(body: bytes) -> np.ndarray | None:
    """A tone curve tag ('curv' or 'para') evaluated at the 256 8-bit levels, or None if it is neither."""
    kind = body[:4]
    if kind == b"curv":
        (n,) = struct.unpack_from(">I", body, 8)
        if n == 0:
            return _LEVELS.copy()
        if n == 1:
            (gamma,) = struct.unpack_from(">H", body, 12)
            return _LEVELS ** (gamma / 256.0)
        table = np.array(struct.unpack_from(f">{n}H", body, 12)) / 65535.0
        return np.interp(_LEVELS * (n - 1), np.arange(n), table)
    if kind == b"para":
        (function,) = struct.unpack_from(">H", body, 8)
        n = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}.get(function)
        if n is None:
            return None
        g, a, b, c, d, e, f = (list(np.array(struct.unpack_from(f">{n}i", body, 12)) / 65536.0) + [0.0] * 7)[:7]
        x = _LEVELS
        if function == 0:
            return x**g
        if function == 1:  # (ax + b)^g above -b/a, else 0
            return np.where(x >= -b / a, np.abs(a * x + b) ** g, 0.0)
        if function == 2:  # (ax + b)^g + c above -b/a, else c
            return np.where(x >= -b / a, np.abs(a * x + b) ** g + c, c)
        if function == 3:  # (ax + b)^g from d on, else cx
            return np.where(x >= d, np.abs(a * x + b) ** g, c * x)
        return np.where(x >= d, np.abs(a * x + b) ** g + e, c * x + f)  # 4
    return None

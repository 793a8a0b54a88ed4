"""A faster reader for the PNGs that most folders hold: 8-bit, not interlaced, gray or RGB, with or
without alpha, and no chunk that changes what Pillow would make of them.

Through Pillow, ``load_image`` of such a PNG took 32 ms of CPU a megapixel on the 2-core VM (its
``load()`` 29: zlib's inflate about 12 of it, the filters most of the rest; then two copies into
NumPy): on the CUDA path more of the CPU's work per image than the encoder's 28. Here libdeflate
inflates the scanlines (as it already deflates the output's) into one buffer, 6 ms a megapixel,
and a compiled kernel (``cpu_kernels.unfilter``) undoes the filters straight into the array kmgpu
works on, 7: 15 ms a megapixel in all (BENCHMARKS.md).

The result is Pillow's, pixel for pixel and profile for profile (the tests compare them on every
filter type, layout and chunk this reader takes). Anything else returns None, and Pillow reads
the file as before: other bit depths, palettes, interlacing, transparency chunks (tRNS), EXIF
(eXIf, or the text chunks from which Pillow reads an orientation), animation, compressed text,
critical chunks not named here, a bad CRC, a stream that does not inflate to exactly the image's
scanlines, an unknown filter type. So every error message, and every file Pillow rejects, stays
Pillow's.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .png import SIGNATURE

__all__ = ["SIGNATURE", "HEADER_BYTES", "usable", "eligible_header", "decode"]

# The signature and the IHDR chunk: enough to tell whether the rest is worth reading.
HEADER_BYTES = 8 + 8 + 13 + 4
# Bytes a pixel by PNG color type at 8 bits: gray, gray and alpha, RGB, RGBA.
_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}
# Chunks whose contents Pillow keeps only in ``info`` (gamma, chromaticity, rendering intent,
# density, time, significant bits, background): they change neither the pixels nor the profile.
_IGNORED = frozenset((b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"sBIT", b"bKGD"))
# Every chunk Pillow (10 to 13) reads: an ancillary chunk not among them, such as ImageMagick's
# vpAg, Pillow skips unread, and so does this reader; the ones among them not taken here go to it.
_READ_BY_PILLOW = frozenset(
    (b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"iCCP", b"tEXt", b"zTXt",
     b"iTXt", b"eXIf", b"acTL", b"fcTL", b"fdAT")
)  # fmt: skip
# A tEXt chunk's keyword becomes a key of Pillow's ``info``: those that getexif() reads (EXIF or
# XMP, and so an orientation) or kmgpu does (the profile), in any case, and the prefixes of the
# first two, go to Pillow.
_KEYWORDS_READ = frozenset((b"exif", b"xmp", b"icc_profile", b"transparency"))
_KEYWORD_PREFIXES_READ = (b"raw profile type", b"xml:com.adobe.xmp")
# Pillow refuses text and profiles that inflate beyond this (PngImagePlugin.MAX_TEXT_CHUNK).
_MAX_TEXT = 1024 * 1024


def usable() -> bool:
    """Whether this reader runs here: it needs libdeflate's package (a dependency, which a checkout run
    from its folder may lack) and the compiled kernels (``KMGPU_NUMBA=0`` turns it off too), which the
    first call loads (torch and numba with them: :func:`eligible_header` does not)."""
    try:
        import deflate  # noqa: F401
    except ImportError:
        return False
    from . import cpu_kernels

    return cpu_kernels.compiled()


def eligible_header(head: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, channels) where the first :data:`HEADER_BYTES` of a file are those of a PNG this
    reader takes, with 1 to ``max_pixels`` pixels; None otherwise (Pillow's to read, or to refuse)."""
    if len(head) < HEADER_BYTES or head[:8] != SIGNATURE or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if (
        depth != 8
        or color not in _CHANNELS
        or compression
        or filtering
        or interlace
        or not 0 < width * height <= max_pixels
        or zlib.crc32(head[12:29]) != struct.unpack(">I", head[29:33])[0]
    ):
        return None
    return width, height, _CHANNELS[color]


def _icc_profile(body: memoryview) -> bytes | None:
    """An iCCP chunk's profile as Pillow inflates it (at most 1 MiB, a truncated stream as far as it
    goes); None where Pillow would do anything else with it."""
    raw = bytes(body)
    name_end = raw.find(b"\0")
    if not 0 < name_end < 80 or name_end + 2 > len(raw) or raw[name_end + 1] != 0:
        return None
    inflate = zlib.decompressobj()
    try:
        profile = inflate.decompress(raw[name_end + 2 :], _MAX_TEXT)
    except zlib.error:
        return None
    return None if inflate.unconsumed_tail or not profile else profile


def decode(data: bytes | bytearray | memoryview, max_pixels: int) -> tuple[np.ndarray, bytes | None] | None:
    """The pixels and ICC profile of a PNG file's bytes ``data``, as Pillow reads them, where this reader
    takes the file (see the module's notes); else None.

    Returns
    -------
    pixels : ndarray of shape (H, W, C), uint8
        C = 1, 2, 3 or 4 for L, LA, RGB, RGBA, in the file's own layout (alpha not yet normalised).
    icc_profile : bytes or None
        The profile of the iCCP chunk, whatever its color space.
    """
    if not usable():
        return None
    import deflate  # a dependency (the PNG writer's); here, as the kernels are

    from . import cpu_kernels

    view = memoryview(data)
    shape = eligible_header(bytes(view[:HEADER_BYTES]), max_pixels)
    if shape is None:
        return None
    width, height, channels = shape
    pos, end = HEADER_BYTES, len(view)
    idat: list[memoryview] = []
    after_idat = 0
    icc = None
    text_bytes = 0
    ended = False
    while pos + 12 <= end:
        length = struct.unpack_from(">I", view, pos)[0]
        kind = bytes(view[pos + 4 : pos + 8])
        body_end = pos + 8 + length
        if body_end + 4 > end or zlib.crc32(view[pos + 4 : body_end]) != struct.unpack_from(">I", view, body_end)[0]:
            return None
        body = view[pos + 8 : body_end]
        if kind == b"IDAT":
            if idat and pos != after_idat:  # IDAT chunks must follow one another
                return None
            idat.append(body)
            after_idat = body_end + 4
        elif kind == b"IEND":
            ended = True
            break
        elif kind == b"iCCP":
            if idat or icc is not None:
                return None
            icc = _icc_profile(body)
            if icc is None:
                return None
        elif kind == b"tEXt":
            keyword = bytes(body[:80]).split(b"\0", 1)[0].lower()
            text_bytes += length
            if keyword in _KEYWORDS_READ or keyword.startswith(_KEYWORD_PREFIXES_READ) or text_bytes > _MAX_TEXT:
                return None
        elif kind not in _IGNORED and (kind in _READ_BY_PILLOW or not kind[0] & 0x20):  # 0x20: ancillary
            return None
        pos = body_end + 4
    if not ended or not idat:
        return None
    stride = width * channels
    size = height * (stride + 1)
    stream = idat[0] if len(idat) == 1 else b"".join(idat)
    try:
        # Exactly the scanlines, or an error: libdeflate stops with one where the stream holds more.
        scanlines = deflate.zlib_decompress(stream, size)
    except deflate.DeflateError:
        return None
    if len(scanlines) != size:
        return None
    pixels = cpu_kernels.unfilter(np.frombuffer(scanlines, dtype=np.uint8), height, stride, channels)
    if pixels is None:
        return None
    return pixels.reshape(height, width, channels), icc

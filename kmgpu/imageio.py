"""Reading every image a user has into 8-bit pixels, and writing palette PNGs atomically.

The K-means core never touches files; this module is the only one that does
image I/O (the PNG byte encoding itself is in :mod:`kmgpu.png`).

Every input becomes one of four pixel layouts, ``L``, ``LA``, ``RGB`` or
``RGBA``, as uint8:

- 1-bit and 8-bit grayscale -> L; 16-bit and 32-bit grayscale (PNG, TIFF) are
  scaled to 8 bits (v / 257, rounded), not clipped;
- palette images are expanded (to RGBA when they carry transparency);
- CMYK, YCbCr, LAB and HSV -> RGB;
- an alpha channel that is fully opaque is dropped;
- fully transparent pixels have an invisible color, which is set to 0 so
  that they share one palette entry instead of wasting several.

EXIF orientation is applied, an RGB ICC profile is kept for the output, and
animated images give their first frame with a note.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from . import pngread
from .png import DEFAULT_LEVEL, encode_palette_png, writer_order

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "LoadedImage",
    "load_image",
    "from_pil",
    "normalize_alpha",
    "write_atomic",
    "atomic_file",
    "os_reason",
    "sample_paths",
    "SAMPLES_DIR",
]

SAMPLES_DIR = Path(__file__).with_name("samples")
# Pillow's own hard limit against decompression bombs (twice MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 178_956_970

_MODES_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_pillow_limit_lock = threading.Lock()


class ImageReadError(ValueError):
    """A file that is not a readable image, or one above the pixel limit."""


@dataclass
class LoadedImage:
    """Decoded 8-bit pixels of one image.

    Attributes
    ----------
    pixels : ndarray of shape (H, W, C), uint8
        C = 1, 2, 3 or 4 for L, LA, RGB, RGBA.
    icc_profile : bytes or None
        An RGB ICC profile to carry into the output.
    path : Path or None
    bytes_in : int
        Size of the source file; 0 when the image did not come from a file.
    mtime_ns : int
        The source file's modification time (ns since the epoch) when it was
        read; 0 when the image did not come from a file.
    notes : list of str
        What was changed on the way that a user should know.
    """

    pixels: np.ndarray
    icc_profile: bytes | None = None
    path: Path | None = None
    bytes_in: int = 0
    mtime_ns: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return _MODES_BY_CHANNELS[self.pixels.shape[2]]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def _scale_to_8bit(a: np.ndarray) -> np.ndarray:
    """Deep grayscale (uint16, int32, float) -> uint8 by scaling, never by clipping."""
    if a.dtype.kind == "f":
        top = float(np.nanmax(a)) if a.size else 0.0
        a = np.nan_to_num(a, nan=0.0) * (255.0 if top <= 1.0 else 1.0)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    wide = a.astype(np.int64)
    if a.dtype == np.uint8 or (a.dtype != np.uint16 and wide.max(initial=0) <= 255 and wide.min(initial=0) >= 0):
        return np.clip(wide, 0, 255).astype(np.uint8)
    return np.rint(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)


def _pixels_of(im: Image.Image) -> np.ndarray:
    """Pillow image in any mode -> (H, W, C) uint8 in L, LA, RGB or RGBA."""
    mode = im.mode

    def as_mode(target: str) -> np.ndarray:  # convert() copies even to its own mode: a large image's memory
        return np.asarray(im if mode == target else im.convert(target))

    if mode in ("1", "L"):
        a = as_mode("L")
    elif mode.startswith("I") or mode == "F":
        a = _scale_to_8bit(np.asarray(im))
    elif mode in ("LA", "La"):
        a = as_mode("LA")
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and ("transparency" in im.info or im.palette.mode == "RGBA")):
        a = as_mode("RGBA")
    else:
        a = as_mode("RGB")
    if a.ndim == 2:
        a = a[:, :, None]
    return normalize_alpha(np.array(a, dtype=np.uint8, copy=True))


def normalize_alpha(a: np.ndarray) -> np.ndarray:
    """Drop an alpha channel that is all opaque; zero the invisible color of transparent pixels."""
    if a.shape[2] in (2, 4):
        alpha = a[:, :, -1]
        if bool((alpha == 255).all()):
            return np.ascontiguousarray(a[:, :, :-1])
        a[alpha == 0] = 0
    return a


def _rgb_icc(icc: bytes | None) -> bytes | None:
    """The profile if it describes RGB data (what a palette PNG's iCCP must hold), else None."""
    if icc and len(icc) >= 20 and icc[16:20] == b"RGB ":
        return icc
    return None


_ORIENTATION = 0x0112  # the EXIF tag


def from_pil(im: Image.Image) -> LoadedImage:
    """An already opened Pillow image -> :class:`LoadedImage` (EXIF orientation applied)."""
    notes = []
    if getattr(im, "is_animated", False):
        notes.append(f"animated image: only the first of {im.n_frames} frames is used")
        im.seek(0)
    icc_source = im.info.get("icc_profile")
    # exif_transpose copies the image even when it is upright already: only where it turns it.
    upright = ImageOps.exif_transpose(im) if im.getexif().get(_ORIENTATION, 1) != 1 else im
    return _loaded(_pixels_of(upright), icc_source, notes)


def _loaded(pixels: np.ndarray, icc_source: bytes | None, notes: list[str]) -> LoadedImage:
    """The image of normalised ``pixels``, with the source's profile where it can be carried over."""
    rgb = _rgb_icc(icc_source)
    # Gray pixels under an RGB profile (Pillow's convert("L") keeps the RGB image's): viewers ignore
    # it there, and so does kmgpu, so that the output looks as the input did.
    icc = rgb if pixels.shape[2] >= 3 else None
    if icc_source and icc is None:
        what = "is not an RGB profile" if rgb is None else "is an RGB profile on gray pixels (viewers ignore it)"
        notes.append(f"its ICC profile {what} and was not carried over")
    return LoadedImage(pixels, icc, notes=notes)


def _read_plain_png(p: Path, max_pixels: int) -> LoadedImage | None:
    """``p`` through :mod:`kmgpu.pngread` where it is a PNG that reader takes, else None (Pillow's to read)."""
    with open(p, "rb") as f:
        head = f.read(pngread.HEADER_BYTES)
        # The header first: a JPEG need not load the kernels (nor torch and numba with them).
        if pngread.eligible_header(head, max_pixels) is None or not pngread.usable():
            return None
        f.seek(0)
        decoded = pngread.decode(f.read(), max_pixels)
    if decoded is None:
        return None
    pixels, icc_source = decoded
    return _loaded(normalize_alpha(pixels), icc_source, [])


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode an image file into 8-bit pixels, upright.

    Parameters
    ----------
    path : str or PathLike
        Any format Pillow reads: JPEG, PNG, WebP, TIFF, BMP, GIF and more.
    max_pixels : int
        Larger images are refused before they are decoded (decompression bombs).

    Raises
    ------
    ImageReadError
        With a one-line reason that starts with the path.
    """
    p = Path(path)
    try:
        info = p.stat()
        size = info.st_size
        if p.is_dir():
            raise ImageReadError(f"{p}: is a folder, not an image (kmgpu run takes folders)")
        if not stat.S_ISREG(info.st_mode):  # a pipe or a device: reading it could wait forever
            raise ImageReadError(f"{p}: not a regular file")
        if size == 0:
            raise ImageReadError(f"{p}: empty file")
        loaded = _read_plain_png(p, max_pixels)
        if loaded is not None:
            loaded.path, loaded.bytes_in, loaded.mtime_ns = p, size, info.st_mtime_ns
            return loaded
        with _pillow_limit_lock, warnings.catch_warnings():
            # Our own limit governs; Pillow's is lifted while the header is read.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                im = Image.open(p)
            finally:
                Image.MAX_IMAGE_PIXELS = before
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(
                    f"{p}: {w}x{h} is {w * h:,} pixels, above the limit of {max_pixels:,} (see --max-pixels)"
                )
            if w * h == 0:
                raise ImageReadError(f"{p}: image has no pixels ({w}x{h})")
            im.load()
            loaded = from_pil(im)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such file") from None
    except PermissionError:
        raise ImageReadError(f"{p}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: {_unidentified(p)}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError) as err:
        raise ImageReadError(f"{p}: corrupt or truncated image ({err})") from None
    loaded.path, loaded.bytes_in, loaded.mtime_ns = p, size, info.st_mtime_ns
    return loaded


def _unidentified(p: Path) -> str:
    """Why Pillow recognised no image in ``p``: an AVIF where this Pillow has no AVIF codec, or not an image."""
    if p.suffix.lower() in (".avif", ".avifs"):
        from PIL import features

        if not features.check("avif"):
            return f"AVIF, which this Pillow ({PIL.__version__}) cannot read: it was built without libavif"
    return "not an image (no reader recognises its contents)"


_fallback_umask: int | None = None


def _umask() -> int:
    """The process's umask: read from /proc where there is one (os.umask sets it, for every
    thread at once, so elsewhere it is asked once and remembered)."""
    global _fallback_umask
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if _fallback_umask is None:
        _fallback_umask = os.umask(0o022)
        os.umask(_fallback_umask)
    return _fallback_umask


def write_atomic(path: str | os.PathLike, data: bytes) -> int:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never half of one.
    The file gets the permissions open() would give a new one (or keeps
    those of the file it replaces), not the temporary's 0600.
    Returns the number of bytes written.
    """
    with atomic_file(path) as f:
        f.write(data)
    return len(data)


def os_reason(err: OSError) -> str:
    """An OSError in a few words: its reason and, where it names one, the path (no errno number)."""
    reason = err.strerror or str(err)
    return f"{reason} ({err.filename})" if err.filename else reason


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, text: bool = False) -> Iterator[IO]:
    """A file to write ``path`` through, in pieces: :func:`write_atomic` for what does not fit in memory.

    Written to a temporary file beside ``path`` and renamed into place when the
    block ends; if it raises, ``path`` is left as it was and the temporary removed.
    ``text``: a UTF-8 text file (newlines as written), else binary.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(dest.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()  # as open() would make it; mkstemp's temporaries are 0600
    # Hidden and ending .tmp, which a resumed run removes; the name cut short so that the temporary's
    # stays within the 255 bytes a file name may have wherever the file's own does.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name[:100]}.", suffix=".tmp", dir=dest.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") if text else os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_palette(palette: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """A palette (k, C), C = 1 to 4 channels, as a PNG stores it: RGB (k, 3), and alpha (k,) or None."""
    c = palette.shape[1]
    rgb = np.repeat(palette[:, :1], 3, axis=1) if c in (1, 2) else palette[:, :3]
    return rgb, (palette[:, -1] if c in (2, 4) else None)


def in_png_order(palette: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The palette (k, C) in the order the PNG writer stores it (:func:`kmgpu.png.writer_order`), indices to match.

    A palette already in that order goes into the file as it is (the
    writer does not work the order out again).
    """
    permutation = writer_order(*png_palette(palette))
    if permutation is None:
        return palette, indices
    order, rank = permutation
    return palette[order], rank[indices]


def palette_png_bytes(
    indices: np.ndarray,
    palette: np.ndarray,
    *,
    icc_profile: bytes | None = None,
    level: int = DEFAULT_LEVEL,
    in_writer_order: bool = False,
) -> bytes:
    """Encode an index map (H, W) and a palette (k, C), C = 1 to 4 channels, as palette PNG bytes.

    ``in_writer_order``: the palette is known to be in the order the writer
    would give it (as :func:`in_png_order` leaves it), which is then not
    worked out again (k^2 distances: 2 ms at k=256).
    """
    k = palette.shape[0]
    if not 1 <= k <= 256:
        raise ValueError(f"a palette PNG holds 1 to 256 colors, got {k}")
    rgb, alpha = png_palette(palette)
    return encode_palette_png(
        indices, rgb, alpha=alpha, icc_profile=icc_profile, level=level, reorder=not in_writer_order
    )


def sample_paths() -> list[Path]:
    """The public-domain photos shipped with the package (see samples/SOURCES.md)."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

"""Keep freed memory for reuse: glibc's allocator, told not to hand it back to the kernel at once.

Every image passes through tensors of a few hundred kilobytes to a few tens
of megabytes (pixels, distinct colors, labels, PNG rows), allocated and freed
image after image. glibc serves an allocation that size from ``mmap`` (above
a threshold that starts at 128 KiB and rises only to the largest block freed
so far), or from the top of its heap, which it trims back to the kernel as
soon as more than twice that threshold lies free there. Either way the next
image's buffers come back as fresh pages, and the kernel zeroes each one on
its first touch: about 700,000 page faults and 2 s of system time for 300
fits of bench-folder images on the 2-core VM, 6% of the work
(BENCHMARKS.md, session 13).

With blocks below 32 MiB taken from the heap and up to 128 MiB of free heap
kept, those pages are reused: 113,000 faults and 0.7 s. Larger blocks (the
pixels of images above about 10 megapixels) still come from ``mmap`` and go
back when freed, so what is kept is bounded, and the memory of a run stays
flat however many images it holds.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
# glibc reads these at start-up; where the user has set one, their choice stands.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (and the workers it forks).

    Returns whether they were set: not on another C library, nor where the
    environment already sets glibc's malloc options (``MALLOC_*_`` or
    ``GLIBC_TUNABLES``).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

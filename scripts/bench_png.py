#!/usr/bin/env python
"""The palette PNG encoder's settings, measured: total bytes and encode time per setting.

Each image is quantized once per k; then every setting encodes the same index maps, in
turns (setting after setting, ``--repeats`` rounds, the fastest round kept), so that a
slow minute of the machine does not fall on one setting only. Settings:

- ``default``: what ``kmgpu.png.encode_palette_png`` does (the smaller of an unfiltered
  stream at zlib level 6 and an adaptively filtered one);
- ``filtered@L``: the same, with the filtered stream deflated at zlib level L;
- ``level L``: ``encode_palette_png(level=L)``: zlib's 9, and libdeflate's 10 to 12
  (every stream at that level).

    python scripts/bench_png.py            # the bundled samples, k = 16, 64, 256
    python scripts/bench_png.py --extra    # also the images bench_compress.py --extra uses
"""

from __future__ import annotations

import argparse
import time
import zlib
from contextlib import contextmanager

from bench_compress import extra_images

from kmgpu import png, quantize
from kmgpu.imageio import SAMPLES_DIR


@contextmanager
def filtered_level(level: int | None = None):
    """Patch the encoder's deflate so that the filtered stream (Z_FILTERED) uses ``level``."""
    real = png._deflate

    def deflate(scanlines, lvl, strategy):
        return real(scanlines, level if (strategy == zlib.Z_FILTERED and level is not None) else lvl, strategy)

    png._deflate = deflate
    try:
        yield
    finally:
        png._deflate = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256")
    ap.add_argument("--extra", action="store_true", help="also the images of bench_compress.EXTRA")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".png", ".jpg"))
    if args.extra:
        paths += extra_images()
    ks = [int(v) for v in args.k.split(",")]
    maps = [(q.indices, q.palette) for p in paths for k in ks for q in [quantize(p, k, device="cpu")]]
    # name: (the encoder's level, the filtered stream's zlib level when patched)
    settings = {
        "default": (6, None),
        "filtered@4": (6, 4),
        "filtered@6": (6, 6),
        **{f"level {level}": (level, None) for level in (9, 10, 11, 12)},
    }
    best = {name: float("inf") for name in settings}
    sizes = {}
    for _ in range(args.repeats):
        for name, (level, filtered) in settings.items():
            with filtered_level(filtered):
                t0 = time.perf_counter()
                sizes[name] = sum(len(png.encode_palette_png(i, p, level=level)) for i, p in maps)
                best[name] = min(best[name], time.perf_counter() - t0)
    print(f"{len(paths)} images x k = {args.k}: {len(maps)} index maps; fastest of {args.repeats} rounds")
    print(f"{'setting':<18}{'bytes':>12}{'vs default':>12}{'encode s':>10}{'vs default':>12}")
    for name in settings:
        print(
            f"{name:<18}{sizes[name]:>12,}{sizes[name] / sizes['default']:>12.4f}"
            f"{best[name]:>10.3f}{best[name] / best['default']:>12.2f}"
        )


if __name__ == "__main__":
    main()

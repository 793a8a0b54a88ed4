#!/usr/bin/env python
"""The palette PNG encoder's settings, measured: total bytes and encode time per setting.

Each image is quantized once per k; then every setting encodes the same index maps, in
turns (setting after setting, ``--repeats`` rounds, the fastest round kept), so that a
slow minute of the machine does not fall on one setting only. Settings:

- ``default``: what ``kmgpu.png.encode_palette_png`` does (the smallest of an unfiltered
  stream at zlib level 6 and adaptively filtered ones, the smooth order's with Z_RLE);
- ``filtered@L``: the same, with the smooth order's filtered stream deflated with
  Z_FILTERED at zlib level L (at 8 bits, level 5 was the default until session 18);
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
    """Patch the encoder's deflate so that the smooth order's filtered stream (Z_RLE) is deflated with
    Z_FILTERED at ``level`` (None: as the encoder does)."""
    real = png._deflate

    def deflate(scanlines, lvl, strategy):
        if strategy == zlib.Z_RLE and level is not None and lvl <= 9:
            return real(scanlines, level, zlib.Z_FILTERED)
        return real(scanlines, lvl, strategy)

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
        "filtered@5": (6, 5),
        "filtered@6": (6, 6),
        **{f"level {level}": (level, None) for level in (9, 10, 11, 12)},
    }
    best = {name: float("inf") for name in settings}
    cpu = dict(best)  # the candidates run side by side: the wall time hides what the second one costs
    sizes = {}
    for _ in range(args.repeats):
        for name, (level, filtered) in settings.items():
            with filtered_level(filtered):
                t0, c0 = time.perf_counter(), time.process_time()
                sizes[name] = sum(len(png.encode_palette_png(i, p, level=level)) for i, p in maps)
                best[name] = min(best[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
    rounds = f"fastest of {args.repeats} rounds (wall and CPU)"
    print(f"{len(paths)} images x k = {args.k}: {len(maps)} index maps; {rounds}")
    head = f"{'bytes':>12}{'vs default':>12}{'encode s':>10}{'vs default':>12}{'CPU s':>8}{'vs default':>12}"
    print(f"{'setting':<18}{head}")
    for name in settings:
        print(
            f"{name:<18}{sizes[name]:>12,}{sizes[name] / sizes['default']:>12.4f}"
            f"{best[name]:>10.3f}{best[name] / best['default']:>12.2f}"
            f"{cpu[name]:>8.3f}{cpu[name] / cpu['default']:>12.2f}"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The palette PNG encoder's settings, measured: total bytes and encode time per setting.

Each image is quantized once per k; then every setting encodes the same index maps, in
turns (setting after setting, ``--repeats`` rounds, the fastest round kept), so that a
slow minute of the machine does not fall on one setting only. Settings:

- ``default``: what ``kmgpu.png.encode_palette_png`` does (the smallest of an unfiltered
  stream at libdeflate's level 7 and adaptively filtered ones with zlib's Z_RLE);
- ``zlib 6``: the same with the unfiltered stream at zlib's level 6 (the default until
  session 19; at 8 bits Pillow's own stream);
- ``zlib 6, filtered@5``: that, with the filtered stream deflated with Z_FILTERED at zlib
  level 5 in place of Z_RLE (the default until session 18);
- ``level L``: ``encode_palette_png(level=L)``: libdeflate's 6, zlib's 9, and libdeflate's
  10 to 12 (every stream at that level).

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
def earlier_encoder(zlib_plain: bool = False, filtered_level: int | None = None):
    """Patch the encoder as it was: ``zlib_plain``, the unfiltered stream at zlib's level 6 (not
    libdeflate's); ``filtered_level``, the filtered stream deflated with Z_FILTERED at that zlib level
    (not Z_RLE). Neither: as the encoder is."""
    real, zlib_levels = png._deflate, png._ZLIB_LEVELS

    def deflate(scanlines, lvl, strategy):
        if strategy == zlib.Z_RLE and filtered_level is not None and lvl <= 9:
            return real(scanlines, filtered_level, zlib.Z_FILTERED)
        return real(scanlines, lvl, strategy)

    png._deflate = deflate
    png._ZLIB_LEVELS = (6, *zlib_levels) if zlib_plain else zlib_levels
    try:
        yield
    finally:
        png._deflate, png._ZLIB_LEVELS = real, zlib_levels


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
    # name: (the encoder's level, earlier_encoder's arguments)
    settings = {
        "default": (png.DEFAULT_LEVEL, {}),
        "zlib 6": (6, {"zlib_plain": True}),
        "zlib 6, filtered@5": (6, {"zlib_plain": True, "filtered_level": 5}),
        **{f"level {level}": (level, {}) for level in (6, 9, 10, 11, 12)},
    }
    best = {name: float("inf") for name in settings}
    cpu = dict(best)  # the candidates run side by side: the wall time hides what the second one costs
    sizes = {}
    for _ in range(args.repeats):
        for name, (level, patch) in settings.items():
            with earlier_encoder(**patch):
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

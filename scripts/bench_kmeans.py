#!/usr/bin/env python
"""Benchmark the K-means engine on real photo pixels, beside scikit-learn, in one run.

For each photo and k it times, with the same seeds:

- ``sklearn``: scikit-learn ``KMeans(n_init=1)`` on all pixels (the quality leader);
- ``engine``: kmgpu's ``kmeans`` on all pixels, the same algorithm as scikit-learn;
- ``palette``: kmgpu's image path (``fit_palette``): K-means on the color histogram,
  coarse to fine, then every pixel assigned to its nearest stored palette color.

PSNR is that of the image rebuilt from the uint8 palette that would be stored, every
pixel given its nearest palette color, averaged over the seeds; times are medians.
On CUDA it also times one batched call on many one-megapixel photos.

    python scripts/bench_kmeans.py                   # k = 16, 64, 256 on the samples
    python scripts/bench_kmeans.py --quick           # one photo, k = 64, one repeat
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from PIL import Image

from kmgpu import KMeansWarning, bench, kmeans
from kmgpu.imageio import SAMPLES_DIR
from kmgpu.kmeans import assign
from kmgpu.metrics import psnr
from kmgpu.quantize import fit_palette, fit_palettes


def load_rgb(name: str) -> np.ndarray:
    with Image.open(SAMPLES_DIR / name) as im:
        return np.asarray(im.convert("RGB")).reshape(-1, 3).copy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stored_psnr(pixels: torch.Tensor, centers: torch.Tensor) -> float:
    """PSNR with the uint8 palette that would be stored, each pixel on its nearest entry."""
    palette = centers.round().clamp(0, 255).to(torch.uint8)
    labels, _ = assign(pixels.float(), palette.float())
    return psnr(pixels.cpu().numpy(), palette[labels].cpu().numpy())


def run_sklearn(pixels: np.ndarray, k: int, seeds: list[int]) -> dict:
    from sklearn.cluster import KMeans as SKKMeans

    times, quality, iters = [], [], []
    x = pixels.astype(np.float32)
    for seed in seeds:
        t0 = time.perf_counter()
        model = SKKMeans(k, n_init=1, random_state=seed).fit(x)
        times.append(time.perf_counter() - t0)
        iters.append(model.n_iter_)
        quality.append(stored_psnr(torch.from_numpy(pixels), torch.from_numpy(model.cluster_centers_)))
    return summarize("sklearn", "cpu", len(pixels), times, quality, iters)


def run_engine(pixels: np.ndarray, k: int, seeds: list[int], device: torch.device) -> dict:
    x = torch.from_numpy(pixels).to(device)
    times, quality, iters = [], [], []
    kmeans(x[:4096], min(k, 64), seed=0, device=device)  # warm-up
    for seed in seeds:
        sync(device)
        t0 = time.perf_counter()
        r = kmeans(x, k, seed=seed, device=device)
        sync(device)
        times.append(time.perf_counter() - t0)
        iters.append(int(r.n_iter))
        quality.append(stored_psnr(x, r.centers))
    return summarize("engine", device.type, len(pixels), times, quality, iters)


def run_palette(pixels: np.ndarray, k: int, seeds: list[int], device: torch.device) -> dict:
    x = torch.from_numpy(pixels)
    fit_palette(x[:4096], min(k, 64), device=device)  # warm-up
    times, quality, iters = [], [], []
    for seed in seeds:
        sync(device)
        t0 = time.perf_counter()
        pal = fit_palette(x, k, seed=seed, device=device)
        indices = pal.indices.cpu()
        times.append(time.perf_counter() - t0)
        iters.append(pal.n_iter)
        quality.append(psnr(pixels, pal.colors.cpu()[indices.long()].numpy()))
    return summarize("palette", device.type, len(pixels), times, quality, iters)


def summarize(method, device, n, times, quality, iters) -> dict:
    t = statistics.median(times)
    it = statistics.mean(iters)
    return {
        "method": method,
        "device": device,
        "seconds": t,
        "spread": (max(times) - min(times)) / 2,
        "iters": it,
        "pix_iter_per_s": n * it / t,
        "psnr": statistics.mean(quality),
    }


def batched_photos(count: int, megapixels: float = 1.0) -> list[torch.Tensor]:
    """``count`` distinct photos of about ``megapixels``: the samples scaled and cropped."""
    side = int((megapixels * 1e6) ** 0.5)
    out = []
    names = ["astronaut.png", "coffee.png", "rocket.jpg"]
    for i in range(count):
        with Image.open(SAMPLES_DIR / names[i % 3]) as im:
            im = im.convert("RGB")
            scale = 1.0 + 0.05 * (i // 3)
            big = im.resize((int(side * scale * im.width / min(im.size)), int(side * scale * im.height / min(im.size))))
            left, top = (big.width - side) // 2, (big.height - side) // 2
            crop = big.crop((left, top, left + side, top + side))
        out.append(torch.from_numpy(np.asarray(crop).reshape(-1, 3).copy()))
    return out


def run_batched(device: torch.device, count: int, k: int, repeats: int) -> dict:
    photos = batched_photos(count)
    if device.type == "cuda":
        photos = [p.pin_memory() for p in photos]
    fit_palettes(photos[:2], k, device=device)  # warm-up
    times = []
    for seed in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        palettes = fit_palettes(photos, k, seed=seed, device=device)
        sync(device)
        times.append(time.perf_counter() - t0)
    mean_psnr = statistics.mean(
        psnr(p.numpy(), pal.colors.cpu()[pal.indices.cpu().long()].numpy()) for p, pal in zip(photos, palettes)
    )
    pixels = sum(p.shape[0] for p in photos)
    t = statistics.median(times)
    return {"device": device.type, "images": count, "megapixels": pixels / 1e6, "seconds": t, "psnr": mean_psnr}


def machine() -> str:
    m = bench.machine()
    text = f"{m['cpu']}, {m['torch_threads']} torch threads; torch {m['torch']}"
    for gpu in m["gpus"]:
        text += f"; {gpu['name']}, {gpu['memory_gib']:.0f} GiB, CUDA {m['cuda']}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256", help="comma-separated palette sizes")
    ap.add_argument("--images", default="astronaut.png,coffee.png,rocket.jpg", help="bundled photos to use")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per measurement (median time, mean PSNR)")
    ap.add_argument("--device", default="cpu,cuda", help="kmgpu devices; cuda is skipped where there is none")
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn")
    ap.add_argument("--no-engine", action="store_true", help="skip the all-pixel engine rows")
    ap.add_argument("--batch", type=int, default=64, help="photos of 1 MP in the batched CUDA call")
    ap.add_argument("--quick", action="store_true", help="one photo, k=64, one repeat")
    args = ap.parse_args()
    if args.quick:
        args.k, args.images, args.repeats = "64", "coffee.png", 1
    ks = [int(v) for v in args.k.split(",")]
    seeds = list(range(args.repeats))
    devices = [torch.device(d) for d in args.device.split(",") if d != "cuda" or torch.cuda.is_available()]
    warnings.simplefilter("ignore", KMeansWarning)

    print(f"machine: {machine()}")
    print(f"seeds {seeds}: median time, mean PSNR (dB) of the stored uint8 palette\n")
    head = f"{'photo':<14}{'MP':>5}{'k':>5}  {'method':<8}{'device':<7}{'time s':>9}{'±':>7}"
    head += f"{'iters':>7}{'Mpix-it/s':>11}{'PSNR':>8}{'vs sk':>8}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    for name in args.images.split(","):
        pixels = load_rgb(name)
        for k in ks:
            rows = []
            if not args.no_sklearn:
                rows.append(run_sklearn(pixels, k, seeds))
            for dev in devices:
                if not args.no_engine:
                    rows.append(run_engine(pixels, k, seeds, dev))
                rows.append(run_palette(pixels, k, seeds, dev))
            ref = rows[0] if not args.no_sklearn else None
            for r in rows:
                vs = f"{r['psnr'] - ref['psnr']:+.3f}" if ref else ""
                speed = f"{ref['seconds'] / r['seconds']:.1f}x" if ref else ""
                print(
                    f"{name:<14}{len(pixels) / 1e6:>5.2f}{k:>5}  {r['method']:<8}{r['device']:<7}"
                    f"{r['seconds']:>9.3f}{r['spread']:>7.3f}{r['iters']:>7.0f}"
                    f"{r['pix_iter_per_s'] / 1e6:>11.1f}{r['psnr']:>8.2f}{vs:>8}{speed:>9}"
                )
    for dev in devices:
        if dev.type == "cuda":
            b = run_batched(dev, args.batch, 64, max(3, args.repeats))
            print(
                f"\nbatched: {b['images']} photos, {b['megapixels']:.1f} MP, k=64 on {dev}: "
                f"{b['seconds'] * 1e3:.1f} ms in one fit_palettes call ({b['megapixels'] / b['seconds']:.0f} MP/s), "
                f"mean PSNR {b['psnr']:.2f}"
            )


if __name__ == "__main__":
    main()

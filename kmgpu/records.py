"""The records of a run: ``manifest.jsonl`` (a line per image) and ``summary.json``.

Reading them needs neither torch nor numba, so ``kmgpu report`` answers at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MANIFEST", "SUMMARY", "read_manifest", "summarize"]

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"


def read_manifest(path: Path) -> Iterator[dict]:
    """The records of a manifest; a torn last line (a killed run) is skipped."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "output" in record:
                yield record


def summarize(manifest: Path) -> dict:
    """Totals over a manifest, in one streaming pass."""
    done = failed = pixels = bytes_in = bytes_out = larger = 0
    psnr_sum = ssim_sum = 0.0
    worst_ratio, worst_ratio_of = math.inf, None
    n_psnr = lossless = 0
    worst_psnr = worst_ssim = math.inf
    worst_psnr_of = worst_ssim_of = None
    for r in read_manifest(manifest):
        if r.get("status") != "ok":
            failed += 1
            continue
        done += 1
        pixels += r["width"] * r["height"]
        bytes_in += r["bytes_in"]
        bytes_out += r["bytes_out"]
        if r["bytes_out"] > r["bytes_in"]:  # a JPEG, say, that its palette PNG outweighs
            larger += 1
            ratio = r["bytes_in"] / r["bytes_out"]
            if ratio < worst_ratio:
                worst_ratio, worst_ratio_of = ratio, r["source"]
        if r["psnr"] is None:
            lossless += 1
        else:
            psnr_sum += r["psnr"]
            n_psnr += 1
            if r["psnr"] < worst_psnr:
                worst_psnr, worst_psnr_of = r["psnr"], r["source"]
        ssim_sum += r["ssim"]
        if r["ssim"] < worst_ssim:
            worst_ssim, worst_ssim_of = r["ssim"], r["source"]
    return {
        "images_done": done,
        "images_failed": failed,
        "megapixels": pixels / 1e6,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "ratio": bytes_in / bytes_out if bytes_out else None,
        "bits_per_pixel": 8 * bytes_out / pixels if pixels else None,
        "images_larger": larger,
        "ratio_worst": worst_ratio if larger else None,
        "ratio_worst_image": worst_ratio_of,
        "psnr_mean": psnr_sum / n_psnr if n_psnr else None,
        "psnr_worst": worst_psnr if n_psnr else None,
        "psnr_worst_image": worst_psnr_of,
        "lossless_images": lossless,
        "ssim_mean": ssim_sum / done if done else None,
        "ssim_worst": worst_ssim if done else None,
        "ssim_worst_image": worst_ssim_of,
    }

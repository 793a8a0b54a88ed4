"""The records of a run: ``manifest.jsonl`` (a line per image) and ``summary.json``.

Reading them needs neither torch nor numba, so ``kmgpu report`` answers at once.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "SUMMARY",
    "SETTINGS",
    "OUTPUT_SETTINGS",
    "is_output_folder",
    "in_order",
    "read_manifest",
    "sorted_records",
    "summarize",
]

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
SETTINGS = "run.json"
# The settings that shape the output files: a run may only resume one made with the same.
OUTPUT_SETTINGS = ("k", "seed", "dither", "level", "refine_iter", "starts", "coarse_bits", "max_iter", "tol")


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a kmgpu run: its ``run.json`` (written before anything else) holds a run's
    settings. A ``run.json`` of anything else (an experiment's, say) does not, nor one that is not a
    regular file (a pipe would block the walk)."""
    path = folder / SETTINGS
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            text = f.read(1 << 16)
        settings = json.loads(text)
    except (OSError, ValueError):  # none, unreadable, or not JSON (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(settings, dict) and set(OUTPUT_SETTINGS) <= settings.keys()


def read_manifest(path: Path) -> Iterator[dict]:
    """The records of a manifest; a torn last line (a killed run) is skipped."""
    for _line, record in _manifest_lines(path):
        yield record


def _manifest_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """Each record of a manifest with its line (newline ended), as :func:`read_manifest` reads them."""
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
                yield (line if line.endswith("\n") else line + "\n"), record


# A manifest longer than this many records is sorted in runs of it (their lines and keys, about
# 40 MB, in memory), spilled beside it and merged, so that sorting the manifest of millions of
# images takes no more memory than that.
SORT_CHUNK = 50_000
# Runs merged at most at once (open files); more are first merged into one.
_MAX_SPILLS = 64


def sorted_records(path: Path, key: Callable[[dict], Any]) -> Iterator[dict]:
    """The records of a manifest sorted by ``key``, records of equal keys in file order.

    A manifest already in order (one run, interrupted once) is read as it
    is. Otherwise one of up to :data:`SORT_CHUNK` records is sorted in
    memory; a longer one in sorted runs of that many, written beside it as
    hidden ``.tmp`` files (which the next run removes, should this one be
    killed) and merged as they are read back.
    """
    if in_order(path, key):
        yield from read_manifest(path)
        return
    spills: list[Path] = []
    try:
        chunk: list[tuple[Any, str]] = []
        for line, record in _manifest_lines(path):
            chunk.append((key(record), line))
            if len(chunk) == SORT_CHUNK:
                chunk.sort(key=_first)  # stable: equal keys stay in file order
                _spill((line for _, line in chunk), path, spills)
                chunk = []
                if len(spills) == _MAX_SPILLS:
                    _merge_spills(spills, path, key)
        chunk.sort(key=_first)
        if not spills:
            for _, line in chunk:
                yield json.loads(line)
            return
        _spill((line for _, line in chunk), path, spills)
        del chunk
        with contextlib.ExitStack() as files:
            for _, record, _ in _merged(spills, key, files):
                yield record
    finally:
        for spilled in spills:
            spilled.unlink(missing_ok=True)


def in_order(path: Path, key: Callable[[dict], Any], strict: bool = False) -> bool:
    """Whether the records of a manifest come in order of ``key`` (``strict``: and no two keys equal),
    in one streaming pass."""
    previous = None
    for record in read_manifest(path):
        at = key(record)
        if previous is not None and (at <= previous if strict else at < previous):
            return False
        previous = at
    return True


def _first(pair: tuple) -> Any:
    return pair[0]


def _merged(spills: list[Path], key: Callable[[dict], Any], files: contextlib.ExitStack) -> Iterator[tuple]:
    """(key, record, line) of the sorted spill files, merged in order; ties: the earlier file first."""

    def read(spilled: Path) -> Iterator[tuple]:
        for line in files.enter_context(open(spilled, encoding="utf-8")):
            record = json.loads(line)
            yield key(record), record, line

    return heapq.merge(*map(read, spills), key=_first)


def _spill(lines: Iterable[str], path: Path, spills: list[Path]) -> None:
    """Write sorted manifest ``lines`` to the next spill file of ``path``'s sort, listed in ``spills``."""
    spilled = path.with_name(f".{path.name}.{id(spills)}.{len(spills)}.tmp")
    spills.append(spilled)
    with open(spilled, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _merge_spills(spills: list[Path], path: Path, key: Callable[[dict], Any]) -> None:
    """Merge every spill file into one, in order, which takes their place in ``spills``."""
    merged: list[Path] = []
    with contextlib.ExitStack() as files:
        _spill((line for _, _, line in _merged(spills, key, files)), path, merged)
    for spilled in spills:
        spilled.unlink(missing_ok=True)
    spills[:] = merged


def summarize(manifest: Path) -> dict:
    """Totals over a manifest, in one streaming pass."""
    done = failed = pixels = bytes_in = bytes_out = larger = noted = 0
    first_note = None
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
        if r.get("notes"):  # an animated image's first frame, a profile not carried over, ...
            noted += 1
            first_note = first_note or f"{r['source']}: {r['notes'][0]}"
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
        "images_noted": noted,
        "first_note": first_note,
        "psnr_mean": psnr_sum / n_psnr if n_psnr else None,
        "psnr_worst": worst_psnr if n_psnr else None,
        "psnr_worst_image": worst_psnr_of,
        "lossless_images": lossless,
        "ssim_mean": ssim_sum / done if done else None,
        "ssim_worst": worst_ssim if done else None,
        "ssim_worst_image": worst_ssim_of,
    }

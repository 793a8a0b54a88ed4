"""The run loop of ``kmgpu run``: DataLoader -> batched fit on the device -> writer pool -> records.

- DataLoader worker processes walk the sources in sorted order and decode the
  images still to do; the main process groups them into batches capped by
  count and by pixels, and fits each batch in one batched engine call, on
  the device, every pixel assigned there. On the CPU the workers fit and
  encode too, each its own images in small groups (:func:`quantize_in_worker`).
- A pool of writer threads encodes the PNGs (zlib releases the GIL), writes
  them atomically and measures PSNR and SSIM, so the device does not wait for
  zlib; results are taken back in input order, with a bounded number in
  flight, so memory stays flat however many images there are.
- Every image gets one line in ``manifest.jsonl`` (appended and flushed as
  soon as the image is done) and the run ends with ``summary.json``.
- Resume: a rerun skips what the manifest records as ok and whose output
  exists, from a source of the size and modification time recorded;
  everything else (errors, half-written or missing outputs, sources changed
  since) is done again. Each image's random stream comes from its own path,
  so its output is the same bytes whatever batch it lands in.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__, cpu_kernels
from .config import RunConfig
from .data import (
    IMAGE_SUFFIXES,
    Batcher,
    DecodeDataset,
    DoneSet,
    Item,
    Sample,
    identity_collate,
    init_worker,
    item_key,
    scan,
)
from .device import resolve_device
from .distributed import from_environment, pixel_shard
from .imageio import atomic_file, os_reason, write_atomic
from .metrics import bits_per_pixel
from .quantize import QuantizedImage, quantize_batch
from .records import MANIFEST, OUTPUT_SETTINGS, SETTINGS, SUMMARY, in_order, read_manifest, sorted_records, summarize
from .threads import available_cores
from .timing import StageClock

__all__ = [
    "MANIFEST",
    "SUMMARY",
    "RunError",
    "RunResult",
    "WorkerDied",
    "map_in_workers",
    "run",
    "check_sources",
    "default_output",
    "summarize",
    "read_manifest",
]


class RunError(ValueError):
    """The run cannot start: bad sources, or an output folder it must not touch.

    ``every_rank``: under torchrun, every rank raises this same error (the
    ranks agreed on it), so rank 0 alone needs to say it.
    """

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class WorkerDied(RuntimeError):
    """A DataLoader worker process died mid-run (the kernel's out-of-memory killer, most often)."""


def _from_workers(samples: Iterator, less: str = "a smaller --batch-pixels or a lower --max-pixels") -> Iterator:
    """The DataLoader's samples; a worker's death (torch's RuntimeError) as a :class:`WorkerDied`."""
    try:
        yield from samples
    except RuntimeError as err:
        if not str(err).startswith("DataLoader worker (pid"):  # not "Caught ... in DataLoader worker process"
            raise
        raise WorkerDied(
            f"{' '.join(str(err).split())}, killed for memory most often: fewer --workers, {less} take less"
        ) from None


class _Calls(torch.utils.data.Dataset):
    """Item i is ``work(*jobs[i])``, computed in whichever DataLoader worker asks for it."""

    def __init__(self, jobs: list[tuple], work: Callable):
        self.jobs, self.work = jobs, work

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        return self.work(*self.jobs[i])


def map_in_workers(work: Callable, jobs: list[tuple], workers: int) -> Iterator:
    """``work(*job)`` of each job, in order, computed in ``workers`` DataLoader worker processes (inline for 0).

    What ``kmgpu compress`` does with many images on the CPU: one image per
    process, on every core, as the workers of ``kmgpu run`` do. ``work`` runs
    in forked children: it returns what the main process needs (a record, not
    pixels). At most two jobs a worker are done ahead of the one awaited.
    """
    if workers <= 0:
        yield from (work(*job) for job in jobs)
        return
    yield from _loaded(_Calls(jobs, work), workers, prefetch=2, less="a lower --max-pixels")


# The workers are forked on Linux whatever Python's default start method (forkserver from Python
# 3.14 on): a forked worker shares the command's loaded torch and compiled kernels, where one started
# afresh imports torch and loads the kernels again (the 4 samples took 6.0 s instead of 2.5 on 2
# cores). Elsewhere (macOS: spawn) torch's default.
_WORKER_START = "fork" if sys.platform.startswith("linux") else None


def _forking_parent() -> int | None:
    """This process, where it forks its workers itself (Linux), so that each can die with it (see init_worker)."""
    return os.getpid() if _WORKER_START == "fork" else None


def _loaded(dataset: torch.utils.data.Dataset, workers: int, *, prefetch: int, **advice) -> Iterator:
    """The items of ``dataset``, one at a time, from a DataLoader of ``workers`` worker processes (0: inline)."""
    with warnings.catch_warnings():
        if workers <= available_cores() + 1:
            # kmgpu's own choice on the CPU (see RunConfig.worker_count): not torch's concern.
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=identity_collate,
            worker_init_fn=functools.partial(init_worker, parent=_forking_parent()) if workers else None,
            prefetch_factor=prefetch if workers else None,
            multiprocessing_context=_WORKER_START if workers else None,
        )
        items = iter(loader)  # torch checks the worker count again here
    return _from_workers(items, **advice)


@dataclass
class RunResult:
    """What ``run`` did: the summary written to summary.json, and the exit code."""

    summary: dict
    exit_code: int
    notes: list[str] = field(default_factory=list)
    is_main: bool = True


def default_output(sources: list[Path]) -> Path:
    """SRC_kmgpu beside SRC; several sources need an explicit --out."""
    if len(sources) != 1:
        raise RunError("several sources need --out DIR (each goes to DIR/<its name>)")
    src = sources[0].resolve()
    return src.parent / f"{src.name if src.is_dir() else src.stem}_kmgpu"


def check_sources(sources: list[Path], out: Path | None) -> Path:
    """The output folder of a run of ``sources`` into ``out`` (None: the default beside the source).

    Raises RunError where the run cannot start: a source missing, given twice or
    inside another, or an output folder inside a source. It looks at the paths
    alone (no file is opened), so a launcher can check them before it starts any process.
    """
    out = out if out is not None else default_output(sources)
    for src in sources:
        if not src.exists():
            raise RunError(f"{src}: no such file or folder")
    resolved = [src.resolve() for src in sources]
    seen: dict[Path, Path] = {}
    for src, src_r in zip(sources, resolved):  # every image once: no source twice, none inside another
        if src_r in seen:
            also = f" (also as {seen[src_r]})" if str(seen[src_r]) != str(src) else ""
            raise RunError(f"{src}: given twice{also}: each image is done once")
        for other_r, other in seen.items():
            if other_r.is_dir() and other_r in src_r.parents:
                raise RunError(f"{src}: inside {other}, which is walked already: give one of them")
            if src_r.is_dir() and src_r in other_r.parents:
                raise RunError(f"{other}: inside {src}, which is walked already: give one of them")
        seen[src_r] = src
    out_r = out.resolve()
    for src, src_r in zip(sources, resolved):
        if src_r.is_dir() and (out_r == src_r or src_r in out_r.parents):
            raise RunError(f"--out {out} is inside the source {src}: choose a folder outside it")
        if src_r.is_file() and out_r == src_r:
            raise RunError(f"--out {out} is the source file itself")
    return out


def _order_key(record: dict) -> tuple:
    return (record.get("src", 0), *str(record.get("input", "")).split("/"))


def _remove_stray_temporaries(out: Path) -> int:
    """Delete the temporary files of writes that a killed run left half done."""
    removed = 0
    for folder, _dirs, files in os.walk(out):
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


# The descriptors of the folders this process holds (see _exclusive). A forked child (a DataLoader
# worker) closes its copies, so that the lock goes with this process alone: its workers, which outlive
# a SIGKILL by a few seconds, do not keep the resume out.
_held_folders: set[int] = set()


def _close_held_folders() -> None:
    for fd in _held_folders:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_folders.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_folders)


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold the folder ``out`` for this run alone.

    A second run into the same folder while this one lives is refused, where it
    would delete this one's temporaries and rewrite its manifest under it. The
    lock is the kernel's (``flock`` on the folder), so it goes with the process,
    even one killed with SIGKILL; where the file system takes no such locks
    (some network ones), or there is no ``fcntl``, the run goes on without one.
    """
    try:
        import fcntl

        fd = os.open(out, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunError(f"{out} is in use by another kmgpu run: let it finish, or choose another --out") from None
    except OSError:
        pass  # this file system takes no locks
    _held_folders.add(fd)
    try:
        yield
    finally:
        if fd in _held_folders:  # not closed already, as a forked child does
            _held_folders.discard(fd)
            os.close(fd)


def _prepare_output(
    out: Path, config: RunConfig, *, resume: bool, overwrite: bool, held: contextlib.ExitStack
) -> DoneSet:
    """Make ``out`` ready, record the settings, and return what is already done there.

    ``out`` is held for this run (:func:`_exclusive`) until ``held`` closes, from before anything in it changes.
    """
    manifest = out / MANIFEST
    settings = {key: getattr(config, key) for key in OUTPUT_SETTINGS}
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    # A run leaves its settings first, its manifest as images are done: either marks a kmgpu run
    # (one killed before its first image has only the settings).
    if manifest.exists() or (out / SETTINGS).exists():
        if not resume:
            if not overwrite:
                raise RunError(f"{out} holds a previous run: --resume finishes it, --overwrite starts over")
        else:
            try:
                before = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                before = None
            if isinstance(before, dict) and before != settings:
                changed = ", ".join(
                    f"{key}={before.get(key)!r}" for key in OUTPUT_SETTINGS if before.get(key) != settings[key]
                )
                raise RunError(
                    f"{out} was made with other settings ({changed}): rerun with them to resume, "
                    "or pass --no-resume --overwrite to start over"
                )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise RunError(f"{out} is not empty and holds no kmgpu run: choose another --out, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    held.enter_context(_exclusive(out))
    if not resume:  # starting over: the previous run's records go, its files are written again
        manifest.unlink(missing_ok=True)
        for part in out.glob("manifest.rank*.jsonl"):
            part.unlink()
    write_atomic(out / SETTINGS, (json.dumps(settings, indent=2) + "\n").encode())
    _remove_stray_temporaries(out)
    _fold_rank_parts(out)
    if not manifest.exists():
        return DoneSet()
    # Keep the lines of the images that are done (recorded ok, output present), once each (the
    # last), in walk order; streamed, so memory does not grow with the number of images.
    moved: list[str] = []
    with atomic_file(manifest, text=True) as f:

        def kept() -> Iterator[dict]:
            for record in _latest(sorted_records(manifest, _order_key), lambda r: _is_done(out, r), moved):
                f.write(json.dumps(record) + "\n")
                yield record

        keys = array("q")
        done = _done_set(kept(), keys)
    if done.keys.size < len(keys) and _one_record_per_output(out, keys):  # an output named twice
        done = _load_done(out)
    _remove_moved(out, moved)
    return done


def _done_set(records: Iterator[dict], keys: array | None = None) -> DoneSet:
    """The outputs of ``records`` (each done) and their sources' sizes and times, as a :class:`DoneSet`.

    ``keys``, when given, is left holding each record's output key, in the records' order.
    """
    keys = array("q") if keys is None else keys
    sizes, mtimes = array("q"), array("q")
    for record in records:
        keys.append(item_key(record["output"]))
        sizes.append(_stamp(record, "bytes_in"))
        mtimes.append(_stamp(record, "mtime_ns"))
    return DoneSet(keys, sizes, mtimes)


def _stamp(record: dict, field: str) -> int:
    """A record's source size or modification time, -1 where it holds none (a manifest of an older kmgpu)."""
    value = record.get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1


def _rank_part(out: Path, rank: int) -> Path:
    return out / f"manifest.rank{rank}.jsonl"


def _fold_rank_parts(out: Path) -> None:
    """Append the records of each torchrun rank's part to the manifest, then remove the parts."""
    parts = sorted(out.glob("manifest.rank*.jsonl"), key=lambda p: int(p.name[13:-6] or 0))
    if not parts:
        return
    with open(out / MANIFEST, "a", encoding="utf-8") as whole:
        for part in parts:
            for record in read_manifest(part):
                whole.write(json.dumps(record) + "\n")
    for part in parts:
        part.unlink()


def _latest(records: Iterator[dict], keep: Callable[[dict], bool], moved: list[str]) -> Iterator[dict]:
    """Each image's last record that ``keep`` takes, from ``records`` sorted by :func:`_order_key`.

    Where that record is ok and an earlier ok one of the same image names
    another output, the image's output has moved: a new input beside it
    clashed with its name (``b.png``, alone, wrote ``b.png``; beside a new
    ``b.jpg`` it writes ``b.png.png``). The earlier output's path goes to
    ``moved``, for :func:`_remove_moved`.
    """
    group: list[dict] = []
    at = None
    for record in itertools.chain(records, (None,)):
        key = None if record is None else _order_key(record)
        if group and (record is None or key != at):
            taken = [r for r in group if keep(r)]
            if taken:
                last = taken[-1]
                if last.get("status") == "ok":
                    moved.extend(
                        r["output"] for r in group if r.get("status") == "ok" and r.get("output") != last.get("output")
                    )
                yield last
            group = []
        if record is not None:
            at = key
            group.append(record)


def _remove_moved(out: Path, moved: list[str]) -> None:
    """Delete the outputs in ``moved`` (see :func:`_latest`) that no record of the manifest names.

    Each is a file this folder's own manifest recorded as an output, left by
    the image's earlier name; one that a record names (the numbered names of
    another clash can take it) stays.
    """
    left = {rel for rel in moved if _own_output(rel)}
    if not left:
        return
    for record in read_manifest(out / MANIFEST):
        left.discard(record.get("output"))
    for rel in sorted(left):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: it stays
            (out / rel).unlink()


def _one_record_per_output(out: Path, keys: array) -> bool:
    """Where ok records of several images name one output, keep the one that describes the file there.

    ``keys`` holds the output key of each ok record of the manifest, one
    record an image (its outputs are unique unless stated twice). Two images
    share an output when one took the other's name on a later run: ``b.png``
    wrote ``b.png``, was removed, and a new ``b.jpg`` wrote ``b.png`` over
    it. The record whose ``bytes_out`` is the file's size stays, the others
    go; where that does not tell them apart, all stay. Returns whether any
    record went. Memory: the keys, and the records of shared outputs.
    """
    if len(keys) < 2:
        return False
    ordered = np.sort(np.frombuffer(keys, dtype=np.int64))
    shared = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not shared:
        return False
    manifest = out / MANIFEST
    naming: dict[str, list[dict]] = {}
    for record in read_manifest(manifest):
        if record.get("status") == "ok" and item_key(record["output"]) in shared:
            naming.setdefault(record["output"], []).append(record)
    stale = set()
    for rel, named in naming.items():
        size = _size(out / rel)
        fits = [r for r in named if r.get("bytes_out") == size]
        if len(fits) == 1:
            stale.update(_order_key(r) for r in named if r is not fits[0])
    if not stale:
        return False
    with atomic_file(manifest, text=True) as f:
        for record in read_manifest(manifest):
            if record.get("status") != "ok" or _order_key(record) not in stale:
                f.write(json.dumps(record) + "\n")
    return True


def _own_output(rel: object) -> bool:
    """Whether ``rel``, a manifest's output field, is a palette PNG's path inside the output folder."""
    if not isinstance(rel, str) or not rel.endswith(".png"):
        return False
    path = PurePosixPath(rel)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def _is_done(out: Path, record: dict) -> bool:
    """An image is done when its record says ok and its output is there."""
    return record.get("status") == "ok" and (out / record["output"]).is_file()


def _load_done(out: Path) -> DoneSet:
    """What the manifest records as done: read-only, for ranks other than 0."""
    return _done_set(r for r in read_manifest(out / MANIFEST) if _is_done(out, r))


def _finalize_manifest(manifest: Path, replaced: bool = False) -> None:
    """Leave one line per image, in walk order: what an uninterrupted run writes.

    An uninterrupted run already appends in order, and is checked in one
    streaming pass; a resumed run is sorted (in runs on disk, when long: see
    :func:`kmgpu.records.sorted_records`), each image's last record kept;
    where an image's output moved to a new name, the old file goes (:func:`_latest`).
    ``replaced``: this run wrote over outputs recorded as done (their sources
    changed, or an input of another name took theirs), so records of two
    images may name one file (:func:`_one_record_per_output`).
    """
    out, moved, keys = manifest.parent, [], array("q")
    if in_order(manifest, _order_key, strict=True):
        if replaced:
            keys.extend(item_key(r["output"]) for r in read_manifest(manifest) if r.get("status") == "ok")
    else:
        with atomic_file(manifest, text=True) as f:
            for record in _latest(sorted_records(manifest, _order_key), lambda r: True, moved):
                f.write(json.dumps(record) + "\n")
                if replaced and record.get("status") == "ok":
                    keys.append(item_key(record["output"]))
    _one_record_per_output(out, keys)
    _remove_moved(out, moved)


def _versions(device: torch.device) -> dict:
    out = {
        "kmgpu": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def _about(item: Item) -> dict:
    """The fields of a record that say which image it is (and its place in the walk)."""
    return {"source": str(item.path), "output": item.rel, "src": item.source, "input": "/".join(item.order[1:])}


def _error_record(item: Item, message: str, ms: float, k: int) -> dict:
    return {
        **_about(item),
        "width": None,
        "height": None,
        "k": k,
        "bytes_in": _size(item.path),
        "bytes_out": None,
        "ratio": None,
        "psnr": None,
        "ssim": None,
        "ms": round(ms, 2),
        "status": "error",
        "error": " ".join(message.split()),
    }


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _encode(result: QuantizedImage, item: Item, level: int, ms_before: float, clock: StageClock) -> tuple[bytes, dict]:
    """Encode the PNG and measure it: the record of an image, but for the write."""
    t0 = time.perf_counter()
    with clock.stage("encode"):
        data = result.png_bytes(level=level)
    with clock.stage("metrics"):
        quality, similarity = result.psnr, result.ssim
    src = result.source
    record = {
        **_about(item),
        "width": src.width,
        "height": src.height,
        "k": result.k,
        "colors": len(result.palette),
        "bytes_in": src.bytes_in,
        "mtime_ns": src.mtime_ns,
        "bytes_out": len(data),
        "ratio": round(src.bytes_in / len(data), 4),
        "bpp": round(bits_per_pixel(len(data), src.width, src.height), 4),
        "psnr": None if math.isinf(quality) else round(quality, 4),
        "ssim": round(similarity, 6),
        "ms": round(ms_before + 1e3 * (time.perf_counter() - t0), 2),
        "status": "ok",
        "error": None,
        "notes": src.notes or None,
    }
    return data, record


# Write errors that say the output folder takes no more files (no space, over quota, read-only):
# every later image would fail the same way after all its work, so the run stops instead.
_OUTPUT_FULL = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, name))


def _write(out: Path, item: Item, data: bytes, record: dict, clock: StageClock) -> dict:
    """Write one encoded image atomically; its record, or an error record if the write failed.

    Raises OSError (naming ``out``) where the output folder takes no more files.
    """
    try:
        with clock.stage("write"):
            write_atomic(out / item.rel, data)
    except OSError as err:
        if err.errno in _OUTPUT_FULL:
            raise OSError(err.errno, err.strerror, str(out)) from err
        reason = f"{item.path}: cannot write {item.rel}: {err.strerror or err}"
        return _error_record(item, reason, record["ms"], record["k"])
    return record


def _encode_and_write(
    result: QuantizedImage, item: Item, out: Path, level: int, ms_before: float, clock: StageClock
) -> dict:
    """Encode, measure, write: runs on a writer thread."""
    try:
        data, record = _encode(result, item, level, ms_before, clock)
    except (ValueError, RuntimeError, MemoryError) as err:
        return _error_record(item, _encode_failed(item, err), ms_before, result.k)
    return _write(out, item, data, record, clock)


# A worker fits its images in groups of at most this many pixels (and --batch-size images): the
# batched call shares its fixed costs, which dominate small images (1,920 crops of 32 to 64 px:
# 3.8 ms an image one by one, 2.7 in groups of 16), while a photo, over the cap, ends its group
# and is fitted by itself within the call (quantize's size groups), as before.
_WORKER_GROUP_PIXELS = 1 << 20


def quantize_in_worker(samples: list[Sample], config: RunConfig) -> list[Sample]:
    """The whole per-image work but the write, in a DataLoader worker (the CPU path), for a few images.

    On a CPU the batched call of large images does not pay (padding, and
    problems that wait for the slowest of their batch); what pays is a
    process on every core, each fitting its small images together and its
    large ones alone. Each image seeds from its own path, so the bytes are
    those of any other batching. A group whose fit fails is fitted again
    image by image, so that one image's failure is its own. The stage
    times travel back in the first sample's ``stages``.
    """
    good = [s for s in samples if s.image is not None]
    if not good:
        return samples
    clock = StageClock()
    t0 = time.perf_counter()
    try:
        fitted = _fit(good, config, torch.device("cpu"), clock)
    except (RuntimeError, ValueError, MemoryError) as err:
        if len(good) > 1:
            return [s for one in samples for s in quantize_in_worker([one], config)]
        good[0].error, fitted = _fit_failed(good[0].item, err), []
    share = 1e3 * (time.perf_counter() - t0) / len(good)
    for sample, result in zip(good, fitted):
        try:
            sample.encoded = _encode(result, sample.item, config.level, sample.decode_ms + share, clock)
        except (RuntimeError, ValueError, MemoryError) as err:
            sample.error = _encode_failed(sample.item, err)
    for sample in good:
        sample.image = None  # the pixels need not travel back
    samples[0].stages = clock.seconds
    return samples


class _OrderedSink:
    """Takes records (or futures of records) and appends them to the manifest in input order."""

    def __init__(self, manifest: Path, limit: int, on_record: Callable[[dict], None]):
        self.file = open(manifest, "a", encoding="utf-8")
        self.queue: deque[Future | dict] = deque()
        self.limit = limit
        self.on_record = on_record

    def add(self, entry: Future | dict) -> None:
        self.queue.append(entry)
        self.drain(block=False)
        while len(self.queue) > self.limit:
            self._pop()

    def drain(self, block: bool = True) -> None:
        while self.queue and (block or not isinstance(self.queue[0], Future) or self.queue[0].done()):
            self._pop()

    def _pop(self) -> None:
        head = self.queue.popleft()
        self._record(head.result() if isinstance(head, Future) else head)

    def _record(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.on_record(record)

    def settle(self) -> None:
        """Record what is done, once the writers have stopped, leaving out any write that raised.

        After a run that stopped on an error: the images whose writes failed
        are not recorded, so the same command resumes with them.
        """
        while self.queue:
            head = self.queue.popleft()
            if isinstance(head, Future):
                if head.exception() is not None:
                    continue
                head = head.result()
            self._record(head)

    def close(self) -> None:
        self.file.close()


@dataclass
class _Counters:
    processed: int = 0
    failed: int = 0
    megapixels: float = 0.0


def run(
    sources: list[Path],
    out: Path | None,
    config: RunConfig,
    *,
    resume: bool = True,
    overwrite: bool = False,
    fail_fast: bool = False,
    progress: bool = True,
    note: Callable[[str], None] = lambda message: print(f"kmgpu: note: {message}", file=sys.stderr),
) -> RunResult:
    """Compress every image under ``sources`` into a mirrored tree under ``out``.

    Parameters
    ----------
    sources : list of Path
        Folders (walked recursively, sorted) or files.
    out : Path or None
        The output root; default SRC_kmgpu beside the single source.
    config : RunConfig
    resume : bool
        Skip the images that a previous run in ``out`` finished.
    overwrite : bool
        Allow an ``out`` that holds files of something else, or start over.
    fail_fast : bool
        Stop at the first image that fails.
    progress : bool
        Show a tqdm progress bar on stderr.

    Returns
    -------
    RunResult
        exit_code 0 when every image is done, 1 when any failed.

    Raises
    ------
    RunError
        When the run cannot start.
    """

    started = time.time()
    t_start = time.perf_counter()
    ctx = from_environment()
    device = resolve_device(ctx.device(config.device))
    config = config.effective(device.type)  # automatic counts resolved, as summary.json records them
    ctx.start(device)
    try:
        with contextlib.ExitStack() as held:
            args = (config, ctx, device, resume, overwrite, fail_fast, progress, note, started, t_start, held)
            return _run(sources, out, *args)
    finally:
        ctx.stop()


def _run(sources, out, config, ctx, device, resume, overwrite, fail_fast, progress, note, started, t_start, held):
    from tqdm import tqdm

    # Rank 0 prepares the output folder; every rank learns whether it could.
    problem, done = None, DoneSet()
    try:
        out = check_sources(sources, out)
        if ctx.is_main:
            done = _prepare_output(out, config, resume=resume, overwrite=overwrite, held=held)
    except RunError as err:
        problem = str(err)
    except OSError as err:  # a path that cannot be a folder, no permission, no space
        problem = f"--out {out}: cannot be written: {os_reason(err)}"
    problems = [p for p in ctx.gather(problem) if p]
    if problems:
        raise RunError(problems[0], every_rank=ctx.active)
    if not ctx.is_main:
        done = _load_done(out)
    several = len(sources) > 1

    folders_skipped: list[str] = []
    listed = skipped = changed = 0
    for item in scan(sources, prefix_sources=several, on_skip=folders_skipped.append):
        listed += 1
        state = done.recheck(item.rel, item.path)  # False: edited or replaced since, so done again
        skipped += state is True
        changed += state is False
    if ctx.is_main:
        for message in folders_skipped:
            note(message)
        if changed:
            note(f"{changed} input(s) changed since they were done: doing them again")
    if listed == 0 and ctx.is_main:
        names = " ".join(sorted(IMAGE_SUFFIXES))
        note(f"no images found in {', '.join(map(str, sources))} (looked for {names})")
    shard = None
    if ctx.active:
        todo = (item for item in scan(sources, prefix_sources=several) if item.rel not in done)
        shard = pixel_shard(todo, ctx.rank, ctx.world)
    mine = listed - skipped if shard is None else int(shard.sum())

    workers = config.worker_count(device.type)
    # On the CPU with worker processes, the workers fit and encode too (see quantize_in_worker).
    in_workers = device.type == "cpu" and workers > 0
    # The compiled kernels, loaded once here and not once per worker (on any device: the workers'
    # PNG reader, the PNG writer and the metrics use them), and compiled first where numba has not
    # cached them yet; the dithering one only where it runs.
    cpu_kernels.compiled(note, without=cpu_kernels.unused_groups(config.dither))
    dataset = DecodeDataset(
        sources,
        done,
        max_pixels=config.max_pixels,
        prefix_sources=several,
        shard=shard,
        work=functools.partial(quantize_in_worker, config=config) if in_workers else None,
        group_size=config.batch_size,
        group_pixels=min(config.batch_pixels, _WORKER_GROUP_PIXELS),
        group_cap=config.batch_pixels,
    )
    samples = _loaded(dataset, workers, prefetch=4)
    counters = _Counters()
    clock = StageClock(device)
    bar = tqdm(
        total=mine,
        unit="img",
        disable=not progress or not ctx.is_main or mine == 0,  # nothing to do: no empty bar
        dynamic_ncols=True,
        file=sys.stderr,
        desc=f"rank 0 of {ctx.world}" if ctx.active else None,
    )
    t_loop = time.perf_counter()

    def on_record(record: dict) -> None:
        counters.processed += 1
        if record["status"] == "ok":
            counters.megapixels += record["width"] * record["height"] / 1e6
        else:
            counters.failed += 1
        bar.update(1)
        elapsed = max(time.perf_counter() - t_loop, 1e-9)
        bar.set_postfix_str(f"{counters.megapixels / elapsed:.2f} MP/s, {counters.failed} failed", refresh=False)

    records_to = _rank_part(out, ctx.rank) if ctx.active else out / MANIFEST
    sink = _OrderedSink(records_to, limit=2 * config.writers + config.batch_size, on_record=on_record)
    pool = ThreadPoolExecutor(max_workers=config.writers, thread_name_prefix="kmgpu-writer")
    stopped = False
    try:
        batches = Batcher(config.batch_size, config.batch_pixels, config.batch_pixels)
        for sample in samples:
            clock.add({"decode": sample.decode_ms / 1e3})
            if sample.encoded is not None or (in_workers and sample.error is not None):
                # done in a worker: flush what waits before it, to keep the order
                waiting = batches.take()
                if waiting:
                    stopped |= _flush(waiting, config, device, out, pool, sink, fail_fast, clock)
                clock.add(sample.stages)
                if sample.encoded is not None:
                    sink.add(pool.submit(_write, out, sample.item, *sample.encoded, clock))
                else:
                    sink.add(_error_record(sample.item, sample.error, sample.decode_ms, config.k))
                    stopped |= fail_fast
                if stopped:
                    break
                continue
            for batch in batches.add(sample):
                stopped |= _flush(batch, config, device, out, pool, sink, fail_fast, clock)
                if stopped:
                    break
            if fail_fast and sample.image is None and not stopped:  # its record (and those before), then stop
                _flush(batches.take(), config, device, out, pool, sink, fail_fast, clock)
                stopped = True
            if stopped:
                break
        rest = batches.take()
        if rest and not stopped:
            _flush(rest, config, device, out, pool, sink, fail_fast, clock)
        sink.drain()
    finally:
        pool.shutdown(wait=True)
        try:
            sink.settle()  # after an error, what was done is kept; a write that raised is redone by a resume
        finally:
            sink.close()
            bar.close()

    loop = max(time.perf_counter() - t_loop, 1e-9)
    mine_stats = {
        "rank": ctx.rank,
        "device": str(device),
        "images_processed": counters.processed,
        "images_failed": counters.failed,
        "megapixels": round(counters.megapixels, 3),
        "seconds": round(loop, 3),
        "images_per_second": round(counters.processed / loop, 3),
        "megapixels_per_second": round(counters.megapixels / loop, 3),
        "stopped_early": stopped,
        "stage_seconds": {name: round(value, 3) for name, value in sorted(clock.seconds.items())},
    }
    ranks = ctx.gather(mine_stats)  # also the barrier: every part is complete after it
    summary = None
    if ctx.is_main:
        _fold_rank_parts(out)
        _finalize_manifest(out / MANIFEST, replaced=changed > 0)
        totals = summarize(out / MANIFEST)
        slowest = max(r["seconds"] for r in ranks)
        processed = sum(r["images_processed"] for r in ranks)
        megapixels = sum(r["megapixels"] for r in ranks)
        summary = {
            **totals,
            "images_listed": listed,
            "images_skipped": skipped,
            "images_processed": processed,
            "stopped_early": any(r["stopped_early"] for r in ranks),
            "wall_seconds": round(time.perf_counter() - t_start, 3),
            "images_per_second": round(processed / slowest, 3),
            "megapixels_per_second": round(megapixels / slowest, 3),
            "stage_seconds": _sum_stages(r["stage_seconds"] for r in ranks),
            "processes": ctx.world,
            "ranks": ranks if ctx.active else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "sources": [str(s) for s in sources],
            "output": str(out),
            "config": config.as_dict(),
            "versions": _versions(device),
        }
        write_atomic(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    summary = ctx.gather(summary)[0]
    failed = summary["images_failed"] > 0 or summary["stopped_early"]
    return RunResult(summary, 1 if failed else 0, folders_skipped, is_main=ctx.is_main)


def _sum_stages(parts) -> dict:
    """Stage seconds added over ranks: time spent per stage, over all processes and threads."""
    total: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            total[name] = round(total.get(name, 0.0) + value, 3)
    return total


def _flush(
    batch: list[Sample], config: RunConfig, device, out: Path, pool, sink: _OrderedSink, fail_fast, clock: StageClock
) -> bool:
    """Fit the decoded images of ``batch`` in one batched call and hand them to the writers, in order.

    Returns True when ``fail_fast`` and something failed.
    """
    good = [s for s in batch if s.image is not None]
    results: dict[int, QuantizedImage | str] = {}
    t0 = time.perf_counter()
    if good:
        try:
            fitted = _fit(good, config, device, clock)
            results = {id(s): r for s, r in zip(good, fitted)}
        except (RuntimeError, ValueError, MemoryError) as err:
            results = {id(s): _fit_failed(s.item, err) for s in good}
    share = 1e3 * (time.perf_counter() - t0) / max(1, len(good))
    failed = False
    for s in batch:
        if s.image is None:
            sink.add(_error_record(s.item, s.error or "unknown error", s.decode_ms, config.k))
            failed = True
            continue
        r = results[id(s)]
        if isinstance(r, str):
            sink.add(_error_record(s.item, r, s.decode_ms + share, config.k))
            failed = True
        else:
            sink.add(pool.submit(_encode_and_write, r, s.item, out, config.level, s.decode_ms + share, clock))
    return fail_fast and failed


def _fit_failed(item: Item, err: Exception) -> str:
    return f"{item.path}: the fit failed ({' '.join(str(err).split())[:300]})"


def _encode_failed(item: Item, err: Exception) -> str:
    return f"{item.path}: cannot encode: {err}"


def _fit(samples: list[Sample], config: RunConfig, device, clock: StageClock) -> list[QuantizedImage]:
    """One batched engine call; on CUDA out of memory, the batch is split in halves."""
    try:
        return quantize_batch(
            [s.image for s in samples],
            config.k,
            seed=config.seed,
            device=device,
            dither=config.dither,
            keys=[item_key(s.item.rel) for s in samples],
            clock=clock,
            **config.fit_options(),
        )
    except torch.cuda.OutOfMemoryError:
        if len(samples) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(samples) // 2
        return _fit(samples[:half], config, device, clock) + _fit(samples[half:], config, device, clock)

"""One dataclass of run settings, loaded from ``configs/*.toml`` and overridden by CLI flags.

Precedence, lowest first: the defaults below, the config file, the flags given.
An unknown key in a file is an error that names it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .imageio import DEFAULT_MAX_PIXELS
from .png import DEFAULT_LEVEL, level_error, palette_size_error
from .threads import available_cores

__all__ = ["ConfigError", "RunConfig", "load_config", "DITHER_MODES", "default_workers", "dither_error"]

DITHER_MODES = ("none", "fs")


def dither_error(dither: str) -> str | None:
    """Why ``dither`` is not a dithering mode, or None when it is one."""
    return None if dither in DITHER_MODES else f"dither={dither!r} is not a dithering mode: use none or fs"


def rank_cores() -> int:
    """The cores of this process: those it may run on, shared among the ranks torchrun started on this
    machine (LOCAL_WORLD_SIZE; 8 ranks of a 16-core host get 2 each, not 16 each), at least 1."""
    try:
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    return max(1, available_cores() // ranks)


def default_workers(device_type: str) -> int:
    """The DataLoader workers of ``kmgpu run`` (and ``kmgpu compress``) on a device of this type, by default."""
    cores = rank_cores()
    # On the CPU each worker fits and encodes its images on one thread; one more worker
    # than cores fills the moments a worker waits (for the main process's writes, for a
    # pipe): on 2 cores, 3 workers ran the bench_run folder 1.15-1.2x faster than 2, and 4
    # no faster than 3.
    return min(cores + 1, 8) if device_type == "cpu" else min(cores, 4)


_AUTO_OR_POSITIVE = "must be -1 (automatic) or 1 or more"


class ConfigError(ValueError):
    """A config file or a setting that cannot be used."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of ``kmgpu run``; each is also a config-file key and a CLI flag.

    Attributes
    ----------
    k : int
        Palette colors per image, 2 to 256.
    device : str
        auto, cpu, cuda or cuda:N.
    seed : int
        Seed of the K-means initialisation; each image's stream also depends on
        its path relative to its source folder, so its output does not depend
        on batching, resuming or the number of processes.
    dither : str
        none or fs (Floyd-Steinberg).
    batch_size : int
        Images fitted together in one batched engine call, at most; -1
        chooses: 16 on the CPU (where each worker process fits its own
        images in groups of at most this many and about 1 MP), 64 on CUDA,
        where a batch's fixed cost (kernel launches, a few host
        synchronisations per Lloyd step) is spread over more images.
    batch_pixels : int
        Pixels in one batch, at most (a larger single image goes alone).
    workers : int
        DataLoader processes that decode images (and, on the CPU, fit them); 0
        decodes in the main process; -1 chooses: one more than the CPU cores (8
        at most) on the CPU device, where the workers do the fitting, 4 at most
        on CUDA.
    writers : int
        Threads that encode and write PNGs (and, but on CUDA, measure
        PSNR/SSIM); -1 chooses: 2 on the CPU, where the worker processes
        encode, and on CUDA half the cores, 8 at most (zlib releases the GIL).
    level : int
        Compression level of the PNGs, 0 to 12 (:func:`kmgpu.png.encode_palette_png`):
        7, libdeflate's, as small as zlib's 6 in half its time; 8-9 zlib's
        (9: 0.2% smaller than 7, 5x the time); 10-12 libdeflate's near-optimal
        parsing (files 4.0-4.6% smaller than at 7, 8-18x the encoding time).
    max_pixels : int
        Images above this are refused before decoding.
    refine_iter, starts, coarse_bits, max_iter, tol
        Engine knobs (see :func:`kmgpu.quantize.fit_palettes`); starts 0 means
        the default (3 for k <= 32, else 1), max_iter 0 the default (20, but
        10 steps on the coarse grid above k=128).
    """

    k: int = 64
    device: str = "auto"
    seed: int = 0
    dither: str = "none"
    batch_size: int = -1
    batch_pixels: int = 16_000_000
    workers: int = -1
    writers: int = -1
    level: int = DEFAULT_LEVEL
    max_pixels: int = DEFAULT_MAX_PIXELS
    refine_iter: int = 10
    starts: int = 0
    coarse_bits: int = 6
    max_iter: int = 0
    tol: float = 1e-4

    def __post_init__(self) -> None:
        problem = palette_size_error(self.k)
        if problem:
            raise ConfigError(problem)
        checks = [
            (dither_error(self.dither) is None, dither_error(self.dither)),
            (self.batch_size >= 1 or self.batch_size == -1, f"batch_size={self.batch_size} {_AUTO_OR_POSITIVE}"),
            (self.batch_pixels >= 1, f"batch_pixels={self.batch_pixels} must be at least 1"),
            (self.workers >= -1, f"workers={self.workers} must be -1 (automatic), 0 or more"),
            (self.writers >= 1 or self.writers == -1, f"writers={self.writers} {_AUTO_OR_POSITIVE}"),
            (level_error(self.level) is None, level_error(self.level)),
            (self.max_pixels >= 1, f"max_pixels={self.max_pixels} must be at least 1"),
            (self.refine_iter >= 0, f"refine_iter={self.refine_iter} must be 0 or more"),
            (self.starts >= 0, f"starts={self.starts} must be 0 (automatic) or more"),
            (1 <= self.coarse_bits <= 8, f"coarse_bits={self.coarse_bits} is out of range: 1 to 8"),
            (self.max_iter >= 0, f"max_iter={self.max_iter} must be 0 (automatic) or more"),
            (self.tol >= 0, f"tol={self.tol} must be 0 or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def fit_options(self) -> dict[str, Any]:
        """The engine knobs, as :func:`kmgpu.quantize.fit_palettes` takes them."""
        return {
            "refine_iter": self.refine_iter,
            "coarse_n_init": self.starts or None,
            "coarse_bits": self.coarse_bits,
            "max_iter": self.max_iter or None,
            "tol": self.tol,
        }

    def worker_count(self, device_type: str) -> int:
        """The number of DataLoader workers to start on a device of this type."""
        return self.workers if self.workers >= 0 else default_workers(device_type)

    def writer_count(self, device_type: str) -> int:
        """The number of PNG writer threads on a device of this type."""
        if self.writers >= 1:
            return self.writers
        return 2 if device_type == "cpu" else max(2, min(8, rank_cores() // 2))

    def batch_count(self, device_type: str) -> int:
        """The most images in one batched fit on a device of this type."""
        if self.batch_size >= 1:
            return self.batch_size
        return 16 if device_type == "cpu" else 64

    def effective(self, device_type: str) -> RunConfig:
        """These settings with every automatic count (-1) resolved for a device of this type."""
        return dataclasses.replace(
            self,
            workers=self.worker_count(device_type),
            writers=self.writer_count(device_type),
            batch_size=self.batch_count(device_type),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} = {value!r} must be of type {kind.__name__}")
    return value


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> RunConfig:
    """Defaults, then the TOML file (if any), then the ``overrides`` that are not None."""
    types = {f.name: type(f.default) for f in fields(RunConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {p} cannot be read: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {p} is not valid TOML: {err}") from None
        for key, value in data.items():
            if key not in types:
                known = ", ".join(sorted(types))
                raise ConfigError(f"config file {p}: unknown key {key!r} (known keys: {known})")
            values[key] = _coerce(f"{p}: {key}", value, types[key])
    for key, value in overrides.items():
        if key not in types:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _coerce(key, value, types[key])
    return RunConfig(**values)

"""The ``kmgpu`` command line: parses, calls the library, prints.

Exit codes: 0 success; 1 some image failed (each failure is one line on
stderr, and the others are still done); 2 bad usage (one line on stderr).
"""

from __future__ import annotations

import codecs
import collections
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from . import __version__
from .allocator import keep_freed_memory
from .config import default_workers, dither_error
from .imageio import DEFAULT_MAX_PIXELS
from .png import DEFAULT_LEVEL, level_error, palette_size_error


@contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    """A usage error (an unknown option or command, a missing argument, a value of the wrong type) as one
    line, ``kmgpu: error: <what> (see kmgpu run --help)``, exit 2: not typer's box of usage and message."""
    try:
        yield
    except Exception as err:
        # click's ClickException (typer 0.12 to 0.15) or typer's own copy of it (later), by its methods;
        # no arguments at all still print the help, as typer does.
        if type(err).__name__ == "NoArgsIsHelpError" or not callable(getattr(err, "format_message", None)):
            raise
        ctx = getattr(err, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _fail(f"{err.format_message().rstrip('.')}{hint}", getattr(err, "exit_code", 2))


class _Commands(TyperGroup):
    """kmgpu's commands, with usage errors in one line (see :func:`_usage_errors_in_one_line`)."""

    def make_context(self, *args, **kwargs):
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


app = typer.Typer(
    name="kmgpu",
    cls=_Commands,
    help="Compress images by K-means color quantization on the GPU (CPU when there is none).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        import torch  # its own __version__ says the build (+cpu, +cu130), which the package metadata does not

        typer.echo(f"kmgpu {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kmgpu: palette PNGs from K-means on the GPU, with the numbers to prove it."""
    keep_freed_memory()  # image after image reuses its buffers' pages (see kmgpu/allocator.py)


def _folder_error(folder: Path, what: str) -> str | None:
    """Why ``folder`` (made if missing) cannot take a command's outputs, or None when it can; ``what``:
    the option and value that named it."""
    from .imageio import os_reason

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{what}: cannot be written: {folder} is not a folder"
    except OSError as err:
        return f"{what}: cannot be written: {os_reason(err)}"
    return None


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"kmgpu: error: {message}", err=True)
    raise typer.Exit(code)


# What a run that stops early has kept (every output is written whole, and recorded).
_KEPT = "the images done so far are kept, the same command resumes"


class _Said(typer.Exit):
    """An exit whose reason the command has printed already (see :func:`console`)."""


class _Stopped(KeyboardInterrupt):
    """A SIGTERM, raised where a Ctrl-C's KeyboardInterrupt would be (see :func:`_stop_on_sigterm`)."""


def _stop_on_sigterm() -> None:
    """Let SIGTERM (``kill``, ``timeout``, a scheduler's stop) end the command as a Ctrl-C does.

    Its default ended a run at once, in silence, its exit status -15, where a Ctrl-C says in one
    line what was kept. Now both stop the same way: the images done are recorded, the workers
    end (they end quietly on a SIGTERM of their own, when the whole group is signalled: see
    ``data.init_worker``) and the command says so; a second SIGTERM ends the process at once.
    Not under torchrun: there the launcher speaks for the job, and torchrun stops ranks with SIGTERM.
    """
    if "WORLD_SIZE" in os.environ:
        return

    def stop(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Stopped

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (the app called from a library's thread): leave it be
        pass


def _interrupted(err: BaseException | None) -> signal.Signals | None:
    """The signal that stopped the command, where ``err`` is how it surfaced: a KeyboardInterrupt
    (SIGINT, a Ctrl-C; SIGTERM as :class:`_Stopped`), or the SystemError ("returned a result with an
    exception set") that a compiled numba kernel's call raises, with the KeyboardInterrupt as its cause,
    when the signal arrives while the kernel runs. None for any other error."""
    while err is not None:
        if isinstance(err, KeyboardInterrupt):
            return signal.SIGTERM if isinstance(err, _Stopped) else signal.SIGINT
        err = err.__cause__ or err.__context__
    return None


def _note(message: str) -> None:
    typer.echo(f"kmgpu: note: {message}", err=True)


def _load_kernels(dither: str | None = None) -> None:
    """Load the compiled CPU kernels (compiling them first, with a note, where numba has not cached
    them), so that the first image's milliseconds are its own; with ``dither`` ``"none"``, all but
    the dithering one."""
    from . import cpu_kernels

    cpu_kernels.compiled(_note, without=None if dither is None else cpu_kernels.unused_groups(dither))


def _check(problem: str | None) -> None:
    """Exit with ``problem`` (from ``palette_size_error``, ``level_error``), if there is one."""
    if problem:
        _fail(problem)


def _device(spec: str):
    from .device import DeviceError, resolve_device

    try:
        return resolve_device(spec)
    except DeviceError as err:
        _fail(str(err))


# Options shared by the commands that quantize.
KOpt = Annotated[int, typer.Option("--k", "-k", help="Palette colors per image, 2 to 256.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the K-means initialisation: same seed, same bytes.")]
# A plain string checked by kmgpu (dither_error) rather than an Enum: typer's message for a bad Enum
# value varies by version.
DitherOpt = Annotated[str, typer.Option(help="none, or fs: Floyd-Steinberg error diffusion (smoother, larger).")]

_LEVEL_HELP = "PNG compression, 0 to 12: 7 as small as zlib's 6 in half its time; 8-9 zlib's; 10-12 slow, 4% smaller."
LevelOpt = Annotated[int, typer.Option("--level", help=_LEVEL_HELP)]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse larger images (decompression bombs).", min=1)]
RefineOpt = Annotated[int, typer.Option(help="Lloyd steps on the exact colors after the coarse fit.", min=0)]
StartsOpt = Annotated[
    int | None, typer.Option(help="Starts of the coarse fit (default: 3 for k <= 32, else 1).", min=1)
]


def _fit_options(refine_iter: int, starts: int | None) -> dict:
    return {"refine_iter": refine_iter, "coarse_n_init": starts}


@app.command()
def compress(
    inputs: Annotated[list[Path], typer.Argument(help="Images to compress.", show_default=False, metavar="IMAGE")],
    k: KOpt = 64,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output file (one input only).", dir_okay=False)
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Folder for the outputs, named INPUT_STEM.png.", file_okay=False)
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    dither: DitherOpt = "none",
    overwrite: Annotated[bool, typer.Option(help="Replace outputs that already exist.")] = False,
    level: LevelOpt = DEFAULT_LEVEL,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    refine_iter: RefineOpt = 10,
    starts: StartsOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Processes compressing several images side by side on the CPU, one image each; 0 inline; "
            "-1: cores + 1 (8 at most).",
            min=-1,
        ),
    ] = -1,
) -> None:
    """Compress images to palette PNGs; one line per image: sizes, ratio, PSNR, SSIM, time.

    Without -o or --out-dir, each output goes beside its input as STEM-kK.png.
    """
    from .pipeline import WorkerDied, map_in_workers
    from .report import Table

    _check(palette_size_error(k))
    _check(level_error(level))
    _check(dither_error(dither))
    dev = _device(device)
    if output is not None and (out_dir is not None or len(inputs) != 1):
        _fail("-o/--output takes exactly one input and no --out-dir")
    targets = _output_paths(inputs, k, output, out_dir)
    _load_kernels(dither)

    table = Table([("image", 18, "s"), ("size", 11, "s"), ("bytes in", 12, ",d"), ("bytes out", 11, ",d")])
    table.columns += [("ratio", 7, ".2f"), ("bpp", 6, ".2f"), ("PSNR", 7, ".2f"), ("SSIM", 8, ".4f"), ("ms", 7, ".0f")]
    work = functools.partial(
        _compress_one, k=k, seed=seed, device=dev, dither=dither, max_pixels=max_pixels, level=level,
        overwrite=overwrite, fit_options=_fit_options(refine_iter, starts),
    )  # fmt: skip
    if dev.type != "cpu" or len(inputs) == 1:
        workers = 0  # forked children could not use CUDA; one image gains nothing from a fork
    elif workers < 0:
        workers = default_workers("cpu")
    workers = min(workers, len(inputs))
    failed, records = 0, []
    try:
        for src, (rec, notes, error) in zip(inputs, map_in_workers(work, list(zip(inputs, targets)), workers)):
            if error is not None:
                failed += 1
                typer.echo(f"kmgpu: error: {error}", err=True)
                continue
            for note in notes:
                _note(f"{src}: {note}")
            if not records:  # no header above nothing: inputs that all fail print their errors alone
                typer.echo(table.header())
            records.append(rec)
            typer.echo(table.row(src.name, f"{rec.width}x{rec.height}", rec.bytes_in, rec.bytes_out, rec.ratio,
                                 rec.bpp, rec.psnr, rec.ssim, rec.ms))  # fmt: skip
    except WorkerDied as err:
        _fail(f"{err}; the images printed above are written", code=1)
    if len(records) > 1:
        total_in = sum(r.bytes_in for r in records)
        total_out = sum(r.bytes_out for r in records)
        typer.echo(table.row("total", "", total_in, total_out, total_in / total_out))
    if failed:
        raise typer.Exit(1)


def _compress_one(src: Path, dest: Path, *, k, seed, device, dither, max_pixels, level, overwrite, fit_options):
    """One image of ``kmgpu compress``, written to ``dest``: (its record, its notes, None) or (None, (), one line).

    Runs in the command's process or in a DataLoader worker, which sends back the record alone.
    """
    from .imageio import ImageReadError
    from .quantize import quantize
    from .report import ImageRecord

    try:
        if dest.exists() and not overwrite:
            raise ValueError(f"{dest}: exists (use --overwrite to replace it)")
        t0 = time.perf_counter()
        result = quantize(src, k, seed=seed, device=device, dither=dither, max_pixels=max_pixels, **fit_options)
        n_out = result.save(dest, level=level)
        ms = 1e3 * (time.perf_counter() - t0)
    except (ImageReadError, ValueError, OSError) as err:
        return None, (), _one_line(err, src)
    except MemoryError:
        return None, (), f"{src}: out of memory (a lower --max-pixels refuses such images, fewer --workers take less)"
    return ImageRecord.of(result, str(dest), n_out, ms), tuple(result.source.notes), None


def _one_line(err: Exception, src: Path) -> str:
    if isinstance(err, OSError) and err.strerror:  # an output that could not be written
        from .imageio import os_reason

        return f"{src}: cannot write: {os_reason(err)}"
    text = " ".join(str(err).split())
    return text if text.startswith(str(src)) or text.startswith(str(src.name)) else f"{src}: {text}"


def _output_paths(inputs: list[Path], k: int, output: Path | None, out_dir: Path | None) -> list[Path]:
    """Where each input's PNG goes; refuses any output that is an input."""
    if output is not None:
        paths = [output]
    elif out_dir is not None:
        stems = collections.Counter(p.stem for p in inputs)  # not list.count: 20,000 inputs took 7 s
        paths = [out_dir / (p.name + ".png" if stems[p.stem] > 1 else p.stem + ".png") for p in inputs]
    else:
        paths = [p.with_name(f"{p.stem}-k{k}.png") for p in inputs]
    resolved_inputs = {p.resolve() for p in inputs}
    resolved = [dest.resolve() for dest in paths]
    for dest, key in zip(paths, resolved):
        if key in resolved_inputs:
            _fail(f"{dest}: the output would overwrite an input")
    first_of: dict[Path, Path] = {}
    for src, dest, key in zip(inputs, paths, resolved):
        if key in first_of:
            _fail(f"{first_of[key]} and {src} would both write {dest}: give them in separate commands or rename one")
        first_of[key] = src
    return paths


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        _fail(f"--k {text!r} is not a comma-separated list of integers")
    if not ks:
        _fail("--k needs at least one value")
    for k in ks:
        _check(palette_size_error(k))
    return ks


@app.command()
def sweep(
    image: Annotated[Path, typer.Argument(help="The image to sweep.", show_default=False, metavar="IMAGE")],
    k: Annotated[str, typer.Option("--k", "-k", help="Comma-separated palette sizes.")] = "2,4,8,16,32,64,128,256",
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Folder for the results. Default: ./STEM-sweep.")
    ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    dither: DitherOpt = "none",
    level: LevelOpt = DEFAULT_LEVEL,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    refine_iter: RefineOpt = 10,
    starts: StartsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace files of these names that already exist.")] = False,
) -> None:
    """Quantize one image at several k: a table, sweep.csv, a side-by-side sheet.png and chart.png."""
    from .imageio import ImageReadError, load_image
    from .metrics import bits_per_pixel, lossless_png_bytes
    from .quantize import quantize
    from .report import Table, contact_sheet, save_image, sweep_chart, write_csv

    ks = _parse_ks(k)
    _check(level_error(level))
    _check(dither_error(dither))
    dev = _device(device)
    out = out_dir if out_dir is not None else Path(f"{image.stem}-sweep")
    targets = [out / f"{image.stem}-k{kk}.png" for kk in ks] + [
        out / n for n in ("sweep.csv", "sheet.png", "chart.png")
    ]
    for target in targets:  # before any work: never the input, and nothing of the user's unasked
        if target.resolve() == image.resolve():
            _fail(f"{target}: the output would overwrite the input; choose another --out-dir")
    existing = [target for target in targets if target.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        _fail(f"{existing[0]}{more}: exists (use --overwrite to replace it)")
    try:
        src = load_image(image, max_pixels=max_pixels)
    except ImageReadError as err:
        _fail(str(err), code=1)
    for note in src.notes:
        _note(f"{image}: {note}")
    _check(_folder_error(out, f"--out-dir {out}"))
    _load_kernels()
    lossless = lossless_png_bytes(src.pixels)
    typer.echo(
        f"{image.name}: {src.width}x{src.height} {src.mode}, {src.bytes_in:,} bytes "
        f"({lossless:,} as lossless PNG); writing to {out}/"
    )
    table = Table([("k", 5, "d"), ("bytes", 10, ",d"), ("ratio", 7, ".2f"), ("vs PNG", 8, ".2f"), ("bpp", 6, ".2f")])
    table.columns += [("PSNR", 7, ".2f"), ("SSIM", 8, ".4f"), ("ms", 7, ".0f")]
    typer.echo(table.header())
    rows, tiles = [], [(src.pixels, f"original  {src.bytes_in:,} B")]
    for kk, target in zip(ks, targets):  # the PNGs' names, checked above, come first in targets
        t0 = time.perf_counter()
        result = quantize(src, kk, seed=seed, device=dev, dither=dither, **_fit_options(refine_iter, starts))
        n_out = result.save(target, level=level)
        ms = 1e3 * (time.perf_counter() - t0)
        quality = result.psnr
        row = {
            "k": kk,
            "colors": len(result.palette),
            "bytes": n_out,
            "ratio": src.bytes_in / n_out,
            "ratio_vs_png": lossless / n_out,
            "bpp": bits_per_pixel(n_out, src.width, src.height),
            "psnr": quality,
            "ssim": result.ssim,
            "ms": ms,
        }
        rows.append(row)
        typer.echo(table.row(kk, n_out, row["ratio"], row["ratio_vs_png"], row["bpp"], quality, row["ssim"], ms))
        tiles.append((result.reconstruct(), f"k={kk}  {n_out:,} B  {_db(quality)}"))
    write_csv(out / "sweep.csv", rows)
    save_image(contact_sheet(tiles), out / "sheet.png")
    written = ["sweep.csv", "sheet.png"]
    if sweep_chart(rows, f"{_shown(image.name)}: PSNR and size against k", out / "chart.png"):
        written.append("chart.png")
    else:
        _note("matplotlib is not installed, so chart.png was not drawn: pip install 'kmgpu[plot]'")
    typer.echo(f"wrote {', '.join(written)} and {len(ks)} PNGs to {out}/")


def _shown(name: str) -> str:
    """A file name fit to draw: bytes that are not UTF-8 (surrogates from the OS) as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _db(value: float) -> str:
    return "lossless" if math.isinf(value) else f"{value:.2f} dB"


@app.command("run")
def run_command(
    sources: Annotated[
        list[Path],
        typer.Argument(help="Folders (walked recursively) or image files.", show_default=False, metavar="SRC"),
    ],
    k: Annotated[int | None, typer.Option("--k", "-k", help="Palette colors per image, 2 to 256. Default: 64.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder. Default: SRC_kmgpu beside SRC.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A TOML file of settings (see configs/).", dir_okay=False)
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N. Default: auto.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batched fit, at most; -1: 16 on the CPU, 64 on CUDA. Default: -1.")
    ] = None,
    batch_pixels: Annotated[int | None, typer.Option(help="Pixels per batch, at most. Default: 16000000.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Decoding processes; 0 inline; -1: cores + 1 on the CPU (8 at most), 4 on CUDA. Default: -1."
        ),
    ] = None,
    writers: Annotated[
        int | None, typer.Option(help="PNG encoding threads; -1: 2 on the CPU, half the cores on CUDA. Default: -1.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Skip images done in --out whose source is unchanged.")] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Start over, or write into a folder that is not a kmgpu run.")
    ] = False,
    dither: Annotated[str | None, typer.Option(help="none or fs (Floyd-Steinberg). Default: none.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the K-means initialisation. Default: 0.")] = None,
    level: Annotated[
        int | None,
        typer.Option(help=f"{_LEVEL_HELP} Default: {DEFAULT_LEVEL}."),
    ] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Refuse larger images. Default: 178956970.")] = None,
    refine_iter: Annotated[int | None, typer.Option(help="Lloyd steps on the exact colors. Default: 10.")] = None,
    starts: Annotated[int | None, typer.Option(help="Starts of the coarse fit; 0 automatic. Default: 0.")] = None,
    fail_fast: Annotated[bool, typer.Option(help="Stop at the first image that fails.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    images: Annotated[bool, typer.Option("--images", help="Also print one line per image at the end.")] = False,
    nproc: Annotated[
        int, typer.Option(help="Processes on this machine (one per GPU): runs itself under torchrun.", min=1)
    ] = 1,
) -> None:
    """Compress every image under SRC into a mirrored tree of palette PNGs, with a record of each.

    Writes OUT/manifest.jsonl (one line per image) and OUT/summary.json; the same command resumes.

    Exit codes: 0 all done, 1 some failed (in the manifest), 2 bad usage, 130 interrupted, 143 stopped by SIGTERM.
    """
    from .config import ConfigError, load_config
    from .device import DeviceError, check_device
    from .distributed import from_environment
    from .imageio import os_reason
    from .pipeline import RunError, WorkerDied, check_sources, run

    try:
        cfg = load_config(
            config, k=k, device=device, batch_size=batch_size, batch_pixels=batch_pixels, workers=workers,
            writers=writers, dither=dither, seed=seed, level=level, max_pixels=max_pixels,
            refine_iter=refine_iter, starts=starts,
        )  # fmt: skip
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            # What every rank would refuse alike is said once, here, before any process starts.
            check_device(cfg.device)
            check_sources(sources, out)
            from . import cpu_kernels

            cpu_kernels.fill_cache(_note, without=cpu_kernels.unused_groups(cfg.dither))  # once, not per rank
            _relaunch_under_torchrun(nproc)
        _bars_drawn_here()
        result = run(sources, out, cfg, resume=resume, overwrite=overwrite, fail_fast=fail_fast, progress=progress)
    except (ConfigError, DeviceError, RunError) as err:
        if getattr(err, "every_rank", False) and not from_environment().is_main:
            raise typer.Exit(2) from None  # rank 0 says it for the job
        _fail(str(err))
    except WorkerDied as err:
        _fail(f"{err}; {_KEPT}", code=1)
    except OSError as err:  # the output folder, mid-run: no space left, gone, read-only
        _fail(f"cannot write: {os_reason(err)}; {_KEPT}", code=1)
    except (KeyboardInterrupt, SystemError) as err:
        sig = _interrupted(err)
        if sig is None:
            raise
        # The manifest holds every image finished so far, each output complete (written atomically).
        said = "interrupted: the images done so far are kept; the same command resumes from there"
        if sig != signal.SIGINT:  # as `--nproc` says it
            said = f"stopped by {sig.name}; {_KEPT}"
        typer.echo(f"kmgpu: error: {said}", err=True)
        raise _Said(128 + sig) from None
    if not result.is_main:  # under torchrun, rank 0 speaks (and exits) for the job
        raise typer.Exit(0)
    _print_failures(Path(result.summary["output"]))
    if images:
        _print_images(Path(result.summary["output"]))
    _print_summary(result.summary)
    raise typer.Exit(result.exit_code)


def _relaunch_under_torchrun(nproc: int) -> None:
    """``kmgpu run ... --nproc N`` is ``torchrun --standalone --nproc_per_node=N -m kmgpu run ...``.

    Exits with the code of the rank that ended first with an error (rank 0's
    1 when images failed, 2 for bad usage, 130 when interrupted), as a single
    ``kmgpu run`` would. The ranks say what went wrong themselves, so
    torchrun's own notices are kept quiet (its OMP_NUM_THREADS banner, a line
    per rank that failed); a rank killed by a signal gets one line here.
    """
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    # torchrun's modules set their loggers' levels as they load (all of them by now, with its main).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "kmgpu", *args])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode > 0:
            raise _Said(failure.exitcode) from None
        _fail(f"rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}; {_KEPT}", code=1)
    except SignalException as err:  # torchrun has passed the signal on to the ranks, and they have ended
        if err.sigval == signal.SIGINT:  # a Ctrl-C: each rank has said what it kept
            raise _Said(130) from None
        _fail(f"stopped by {err.sigval.name}; {_KEPT}", code=128 + err.sigval.value)
    raise typer.Exit(0)


def _print_failures(out_dir: Path, most: int = 20) -> None:
    """One line on stderr per image that failed, the first ``most`` of them."""
    from .records import MANIFEST, read_manifest

    count = 0
    for r in read_manifest(out_dir / MANIFEST):
        if r.get("status") != "ok":
            count += 1
            if count <= most:
                typer.echo(f"kmgpu: error: {r['error']}", err=True)
    if count > most:
        typer.echo(f"kmgpu: error: ... and {count - most} more (see {out_dir / MANIFEST})", err=True)


def _print_images(out_dir: Path) -> None:
    """One line per image of a run, from its manifest."""
    from .records import MANIFEST, read_manifest
    from .report import Table

    table = Table([("image", 30, "s"), ("size", 11, "s"), ("bytes in", 12, ",d"), ("bytes out", 11, ",d")])
    table.columns += [("ratio", 7, ".2f"), ("bpp", 6, ".2f"), ("PSNR", 7, ".2f"), ("SSIM", 8, ".4f"), ("ms", 7, ".0f")]
    typer.echo(table.header())
    for r in read_manifest(out_dir / MANIFEST):
        if r.get("status") == "ok":
            quality = math.inf if r["psnr"] is None else r["psnr"]
            typer.echo(table.row(r["output"], f"{r['width']}x{r['height']}", r["bytes_in"], r["bytes_out"],
                                 r["ratio"], r["bpp"], quality, r["ssim"], r["ms"]))  # fmt: skip
        else:
            typer.echo(f"{r['output']:<29} failed: {r['error']}")
    typer.echo()


def _psnr_line(s: dict) -> str:
    lossless = s.get("lossless_images") or 0
    if s["psnr_mean"] is None:  # no image done, or each reproduced exactly (no finite PSNR)
        return f"every image reproduced exactly ({lossless:,} lossless)" if lossless else "n/a"
    return (f"mean {s['psnr_mean']:.2f} dB, worst {s['psnr_worst']:.2f} dB"
            + (f" ({s['psnr_worst_image']})" if s.get("psnr_worst_image") else "")
            + (f", {lossless:,} lossless" if lossless else ""))  # fmt: skip


def _print_summary(s: dict) -> None:
    def num(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = [
        ("images", f"{s['images_done']:,} done, {s['images_failed']:,} failed" + (" so far" if s.get("unfinished") else
         f", {s.get('images_skipped', 0):,} skipped (already done), {s.get('images_listed', 0):,} listed")),
        ("bytes", f"{s['bytes_in']:,} in, {s['bytes_out']:,} out, ratio {num(s['ratio'], '.2f')},"
         f" {num(s['bits_per_pixel'], '.2f')} bits per pixel"),
        *([("larger", f"{s['images_larger']:,} {'image' if s['images_larger'] == 1 else 'images'} came out larger"
           f" than {'its' if s['images_larger'] == 1 else 'their'} input, worst ratio {s['ratio_worst']:.2f}"
           f" ({s['ratio_worst_image']})")] if s.get("images_larger") else []),
        *([("notes", f"{s['images_noted']:,} {'image has a note' if s['images_noted'] == 1 else 'images have notes'}"
           f" in the manifest, the first: {s['first_note']}")] if s.get("images_noted") else []),
        ("PSNR", _psnr_line(s)),
        ("SSIM", f"mean {num(s['ssim_mean'], '.4f')}, worst {num(s['ssim_worst'], '.4f')}"
         + (f" ({s['ssim_worst_image']})" if s.get("ssim_worst_image") else "")),
        *([("run", "not finished (stopped, or still going): no summary.json yet; the same command resumes"),
           ("output", f"{s['output']}  (manifest.jsonl)")] if s.get("unfinished") else [
          ("time", f"{s.get('wall_seconds', 0):.1f} s wall, {s.get('images_per_second', 0):.2f} images/s,"
           f" {s.get('megapixels_per_second', 0):.2f} MP/s this run"),
          ("device", f"{s['versions']['device']}" + (f" ({s['versions']['device_name']})"
                                                      if s["versions"].get("device_name") else "")
           + (f", {s['processes']} processes" if (s.get("processes") or 1) > 1 else "")),
          ("output", f"{s['output']}  (manifest.jsonl, summary.json)")]),
    ]  # fmt: skip
    for name, text in lines:
        typer.echo(f"{name:<8}{text}")


@app.command()
def report(
    out_dir: Annotated[
        Path, typer.Argument(help="The output folder of a kmgpu run.", show_default=False, metavar="OUT_DIR")
    ],
    images: Annotated[bool, typer.Option("--images", help="Also print one line per image.")] = False,
) -> None:
    """Print the summary of an existing run (and, with --images, a line per image)."""
    import json

    from .records import MANIFEST, SUMMARY, summarize

    if not out_dir.is_dir():
        _fail(f"{out_dir}: {'not a folder' if out_dir.exists() else 'no such folder'}")
    path = out_dir / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not (out_dir / MANIFEST).exists():
            _fail(f"{out_dir}: no {SUMMARY} or {MANIFEST} here: not the output folder of a kmgpu run")
        summary = {**summarize(out_dir / MANIFEST), "output": str(out_dir), "unfinished": True}
    except OSError as err:
        _fail(f"{path}: cannot be read ({err.strerror or err})")
    except json.JSONDecodeError as err:
        _fail(f"{path}: cannot be read ({err})")
    if images:
        _print_images(out_dir)
    _print_summary(summary)
    raise typer.Exit(1 if summary.get("images_failed") else 0)


@app.command()
def bench(
    device: Annotated[str, typer.Option(help="Comma-separated devices; cuda is skipped where there is none.")] = (
        "cpu,cuda"
    ),
    k: Annotated[str, typer.Option("--k", "-k", help="Comma-separated palette sizes.")] = "16,64,256",
    images: Annotated[
        Path | None, typer.Option(help="A folder of images. Default: the samples, cut into a few hundred.")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Small shapes, few images and repeats: under a minute.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Measure the engine, the whole run and the peers, on CPU and GPU, in one process."""
    import torch

    from .bench import format_report, run_bench, to_json
    from .imageio import os_reason, write_atomic

    ks = _parse_ks(k)
    devices = []
    for name in (d.strip() for d in device.split(",") if d.strip()):
        if name.startswith("cuda") and not torch.cuda.is_available():
            _note(f"{name}: no CUDA GPU here, skipped")
            continue
        devices.append(_device(name))
    if not devices:
        _fail(f"--device {device!r}: no device to measure")
    if images is not None and not images.is_dir():
        _fail(f"--images {images}: not a folder")
    if json_path is not None:
        _check(_folder_error(json_path.parent, f"--json {json_path}"))
    _load_kernels()  # a first run's compiling is not the CPU's speed
    _bars_drawn_here()
    result = run_bench(devices, ks, images=images, quick=quick, progress=progress)
    typer.echo(format_report(result))
    if json_path is not None:
        try:
            write_atomic(json_path, to_json(result).encode())
        except OSError as err:
            _fail(f"--json {json_path}: cannot write: {os_reason(err)}", code=1)
        typer.echo(f"\nwrote {json_path}")


def _paths_print_as_named() -> None:
    """Let stdout and stderr print any file name. A name that is not UTF-8 reaches Python with its
    bytes as lone surrogates, which a strict UTF-8 stream (an en_US.UTF-8 locale, PYTHONIOENCODING)
    refuses with a traceback: on UTF-8 streams they go out as the bytes they were, as ``ls`` shows
    them; on others, unprintable characters become ``?``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"  # whatever the spelling: UTF8, utf_8
            stream.reconfigure(errors="surrogateescape" if utf8 else "replace")
        except (AttributeError, LookupError, TypeError, ValueError):  # not a TextIOWrapper: leave it be
            pass


def _bars_drawn_here() -> None:
    """Give tqdm a thread lock: only this process draws progress bars. Its own is a multiprocessing lock,
    which under a start method other than fork (forkserver is Python 3.14's default) registers a
    semaphore that the command, ending in os._exit, never frees, and Python warned at every exit of
    "leaked semaphore objects"."""
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _say_stopped(sig: signal.Signals) -> int:
    """One line for a command that ``sig`` stopped; its exit code, as a shell gives a command the signal ends."""
    said = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
    print(f"kmgpu: error: {said}", file=sys.stderr)
    return 128 + sig


def console() -> None:
    """The ``kmgpu`` command: the app, then a direct exit, without the interpreter's teardown.

    With torch and numba's LLVM both loaded, tearing the interpreter down took 0.6 to 1 s
    after the last line was printed (measured on 2 cores; either library alone: 0.1-0.2 s),
    a quarter of a small run's wall time. By then every file kmgpu writes is closed and its
    workers have exited, so the streams are flushed and the process ends with the app's exit
    code. An OSError a command does not handle (an output it could not write) is one line
    and exit 1; other errors the app does not handle still raise, with a traceback.

    A Ctrl-C ends any command with exit 130 and one line: typer turns a plain one into a
    silent exit 130, a compiled kernel's call returns it as a SystemError (see
    :func:`_interrupted`), and ``kmgpu run`` says itself what it kept. A SIGTERM does the
    same, with exit 143 (:func:`_stop_on_sigterm`).
    """
    _paths_print_as_named()
    _stop_on_sigterm()
    # torch's intra-op threads are OpenMP's, which spin after each parallel region until told to
    # sleep, taking a core from the threads that encode: `kmgpu run --workers 0` on 2 cores spent
    # 25.0 CPU s where 16.9 did, and ran 20% slower. Set before torch loads libgomp (the commands
    # import it); the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app(prog_name="kmgpu")
        code = 0
    except SystemExit as done:
        code = done.code
        sig = _interrupted(done.__context__)
        if sig is not None and not isinstance(done.__context__, _Said):
            code = _say_stopped(sig)
    except (KeyboardInterrupt, SystemError) as err:
        sig = _interrupted(err)
        if sig is None:
            raise
        code = _say_stopped(sig)
    except OSError as err:  # an output a command could not write (a full disk, a folder gone), say
        from .imageio import os_reason

        print(f"kmgpu: error: {os_reason(err)}", file=sys.stderr)
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

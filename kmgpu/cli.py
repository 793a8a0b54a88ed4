"""The ``kmgpu`` command line: parses, calls the library, prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(
    name="kmgpu",
    help="Compress images by K-means color quantization on the GPU (CPU when there is none).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"kmgpu {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kmgpu: palette PNGs from K-means on the GPU, with the numbers to prove it."""


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"kmgpu: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the palette PNGs.")] = Path(
        "kmgpu_demo"
    ),
    k: Annotated[int, typer.Option("--k", "-k", help="Colors per image, 2 to 256.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the K-means initialisation.")] = 0,
) -> None:
    """Quantize the bundled sample photos and print sizes and PSNR."""
    from .device import DeviceError, resolve_device
    from .imageio import load_image, sample_paths, save_palette_png
    from .metrics import bits_per_pixel, psnr
    from .quantize import quantize_pixels

    if not 2 <= k <= 256:
        _fail(f"k={k} is out of range: palette PNGs hold 2 to 256 colors")
    try:
        dev = resolve_device(device)
    except DeviceError as err:
        _fail(str(err))
    typer.echo(f"kmgpu {__version__}: k={k} on {dev}, writing to {out}/")
    columns = ("size", 10), ("bytes in", 11), ("bytes out", 11), ("ratio", 7), ("bpp", 6), ("PSNR", 8), ("ms", 7)
    typer.echo(f"{'image':<16}" + "".join(f"{name:>{width}}" for name, width in columns))
    total_in = total_out = 0
    for path in sample_paths():
        img = load_image(path)
        t0 = time.perf_counter()
        palette, indices, _ = quantize_pixels(img.pixels, k, seed=seed, device=dev)
        ms = 1e3 * (time.perf_counter() - t0)
        n_out = save_palette_png(out / f"{path.stem}.png", indices, palette)
        quality = psnr(img.pixels, palette[indices])
        total_in += img.bytes_in
        total_out += n_out
        typer.echo(
            f"{path.name:<16}{f'{img.width}x{img.height}':>10}{img.bytes_in:>11,}{n_out:>11,}"
            f"{img.bytes_in / n_out:>7.2f}{bits_per_pixel(n_out, img.width, img.height):>6.2f}"
            f"{quality:>8.2f}{ms:>7.0f}"
        )
    typer.echo(f"{'total':<26}{total_in:>11,}{total_out:>11,}{total_in / total_out:>7.2f}")

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kmgpu import __version__
from kmgpu.cli import app
from kmgpu.imageio import load_image, sample_paths
from kmgpu.metrics import psnr

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"kmgpu {__version__} (torch ")


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.output


def test_demo_writes_decodable_palette_pngs(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--k", "16", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split() for line in result.output.splitlines()[2:]}
    for src in sample_paths():
        written = out / f"{src.stem}.png"
        with Image.open(written) as im:
            assert im.format == "PNG" and im.mode == "P"
            assert len(im.getcolors()) <= 16
            decoded = np.asarray(im.convert("RGB"))
        original = load_image(src).pixels
        if original.shape[2] == 1:
            assert np.all(decoded == decoded[:, :, :1])
            decoded = decoded[:, :, :1]
        row = lines[src.name]
        assert int(row[3].replace(",", "")) == written.stat().st_size
        assert float(row[6]) == pytest.approx(psnr(original, decoded), abs=0.006)
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "300"], "k=300 is out of range: palette PNGs hold 2 to 256 colors"),
        (["--device", "gpu"], "device='gpu' is not a device"),
    ],
)
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmgpu: error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()

"""kmgpu: K-means color quantization of images and image datasets, on the GPU.

The names below load on first use (PEP 562), so that ``import kmgpu`` (and the
command line's ``--help``, ``--version`` and ``report``) do not pay for torch.
"""

import sys
import types
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("kmgpu")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "KMeans": "kmeans",
    "KMeansResult": "kmeans",
    "KMeansWarning": "kmeans",
    "kmeans": "kmeans",
    "QuantizedImage": "quantize",
    "quantize": "quantize",
    "quantize_batch": "quantize",
}

if TYPE_CHECKING:
    from .kmeans import KMeans, KMeansResult, KMeansWarning, kmeans
    from .quantize import QuantizedImage, quantize, quantize_batch


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``kmgpu.quantize`` and ``kmgpu.kmeans`` the functions, as the eager imports did.

    Importing a submodule sets it as an attribute of its package, and two
    submodules share their names with the functions exported here.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "KMeans",
    "KMeansResult",
    "KMeansWarning",
    "QuantizedImage",
    "kmeans",
    "quantize",
    "quantize_batch",
    "__version__",
]

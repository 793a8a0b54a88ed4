"""kmgpu: K-means color quantization of images and image datasets, on the GPU."""

from importlib.metadata import PackageNotFoundError, version

from .kmeans import KMeans, KMeansResult, KMeansWarning, kmeans
from .quantize import QuantizedImage, quantize, quantize_batch

try:
    __version__ = version("kmgpu")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

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

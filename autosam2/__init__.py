"""AutoSAM2: SAM2 with a learned prompt encoder for colon-polyp video segmentation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autosam2")  # setup.cfg's, as installed
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

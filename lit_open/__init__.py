"""lit-open: an open trainer for large language models (Lightning, Hydra recipes, litdata)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lit-open")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

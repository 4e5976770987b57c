"""Stage one of zeroseg: image sources, crop geometry, the CLIP teacher and the feature store."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeroseg")
except PackageNotFoundError:
    __version__ = "0.0.0+local"

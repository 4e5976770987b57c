"""zeroseg: ZeroSeg (ICCV 2023) distilled from a CLIP image encoder, without labels.

Three stages, imported as subpackages: zeroseg.pipeline (stage one, the teacher feature store),
zeroseg.trainer (stage two, the student) and zeroseg.evaluation (zero-shot mIoU and segmentation).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zeroseg")
except PackageNotFoundError:
    __version__ = "0.0.0+local"

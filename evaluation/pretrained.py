"""The Python API for notebooks: load a trained ZeroSeg once, segment images into any classes.

    from zeroseg.evaluation.pretrained import Segmenter

    segmenter = Segmenter.from_pretrained("export-dir", device="auto")   # or a .pt, a run folder, "org/repo" (Hub)
    result = segmenter(image, classes=["cat", "dog", "grass"])           # every pixel gets one of the classes
    result = segmenter(image, classes=["cat", "dog"], background=0.5)    # below score 0.5: background
    result.labels        # [H, W] int64 at the image's size: 0 background, k = classes[k - 1]
    result.class_names   # ("background", "cat", "dog")
    result.segments      # one dict per class present: class, index, pixel_share, score

The labeling rule is zs-segment's and zs-eval's (evaluation.segmenter.LabelingRule). Background is explicit:
`classes` are all foreground, and label 0 occurs only when a `background` threshold is given.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zeroseg.evaluation.loading import HUB_PREFIX, LoadedModel, ModelOptions, load_eval_model
from zeroseg.evaluation.segmenter import WindowSegmenter, describe_segments
from zeroseg.evaluation.windows import Geometry
from zeroseg.pipeline.images import decode_image
from zeroseg.pipeline.options import DEFAULT_MAX_PIXELS
from zeroseg.runtime import resolve_device


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [H, W] int64: 0 background, k = class_names[k]
    scores: np.ndarray  # [H, W] float32: each pixel's winning class score
    class_names: tuple[str, ...]  # ("background", *classes)
    segments: list[dict]  # per class present, largest first: class, index, pixel_share, score


class Segmenter:
    """A trained ZeroSeg with its teacher CLIP's text tower: `segmenter(image, classes=[...], background=None)`."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._vocabularies: dict[tuple[tuple[str, ...], float | None], WindowSegmenter] = {}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        *,
        teacher: str | None = None,
        pretrained: str | None = None,
        templates: str = "single",
        text_cache: str | Path | None = None,
        geometry: Geometry | None = None,
        keep_best_group: bool = False,
        rule: str | None = None,
        top_k: int = 5,
    ) -> "Segmenter":
        """path: a folder written by `zs-train export`, a checkpoint .pt, a run folder (its latest checkpoint), or
        an export on the Hugging Face Hub, "ORG/REPO" (when no such local path exists) or "hf-hub:ORG/REPO", read
        from the Hub cache (HF_HUB_OFFLINE=1: offline).
        teacher / pretrained override the CLIP recorded for the text side (needed when its weights file is not
        on this machine); text_cache: the text-embedding cache folder (default ~/.cache/zeroseg/text);
        geometry: evaluation.windows.Geometry (default: whole image, short side 448); rule, top_k: the labeling
        rule (evaluation.labeling_rule.RULES: groupvit, GroupViT's with its top-k image prior, the default, or
        softmax)."""
        on_hub = not Path(path).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) is not None
        options = ModelOptions(
            "zeroseg", f"{HUB_PREFIX}{path}" if on_hub else str(path), teacher, pretrained, templates=templates,
            text_cache=str(text_cache) if text_cache else None, geometry=vars(geometry or Geometry()),
            keep_best_group=keep_best_group, rule=rule, top_k=top_k,
        )  # fmt: skip
        chosen = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(load_eval_model(options, chosen))

    def __call__(
        self, image: Image.Image | np.ndarray | str | Path, classes: Sequence[str], background: float | None = None
    ) -> SegmentationResult:
        """Segment one image (PIL image, [H, W, 3] uint8 array, or a file path) into `classes` (all foreground).
        background: None, every pixel takes its best class; a score threshold T, pixels below T are label 0
        (under the groupvit rule: below min(T, the best segment's score), so the best segment never is)."""
        names = tuple(classes)
        if not names or any(not isinstance(name, str) or not name.strip() for name in names):
            raise ValueError(f"classes must be non-empty class names, got {list(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"classes must be distinct, got {list(names)}")
        class_names = ("background", *names)
        key = (names, background)
        if key not in self._vocabularies:
            self._vocabularies[key] = self.loaded.segmenter(class_names, background)
        picture = _as_image(image)
        segmentation = self._vocabularies[key].segment(picture)
        return SegmentationResult(
            segmentation.labels, segmentation.scores, class_names, describe_segments(segmentation, class_names)
        )


def _as_image(image: Image.Image | np.ndarray | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array is [H, W, 3] uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    return decode_image(Path(image).read_bytes(), DEFAULT_MAX_PIXELS)  # a decompression bomb is an ImageDecodeError

"""Each training-free method's own evaluation settings, from its paper's public code (configs/cfg_*.py of
SCLIP, ClearCLIP and NACLIP; all three follow SCLIP's mmseg protocol). zs-eval uses them as that method's
defaults; every one is an option (--rule, --temperature, --bg-threshold, --background-names, --templates,
--mode, --short-side, --crop-size, --stride; NACLIP's Gaussian std, dense_clip.NACLIP_GAUSSIAN_STD:
--gaussian-std).

- rule: the labeling rule (evaluation.labeling_rule). The training-free methods threshold every pixel
  alone, as their code does: `softmax`, without keep-best-group (the `groupvit` rule would always keep
  each window's best patch as foreground).

- temperature: cosines are multiplied by it before the softmax over classes (the "logit_scale" of their code).
- bg_threshold: a pixel whose best class probability is below it is background ("prob_thd").
- background_names: names whose text embeddings together make the background class (its probability is
  the highest of theirs, as their name files `cls_<dataset>.txt` give it); empty = no background class.
- geometry: short side of the resize ("Resize scale=(2048, S)"), whole image or slide crop / stride.
zeroseg: GroupViT's protocol (the groupvit rule, the CLIP's own logit scale, the dataset's paper threshold,
one prompt, slide 448 / 224 at short side 448). MaskCLIP keeps that protocol but its own per-patch rule,
softmax.
"""

from dataclasses import dataclass

# SCLIP's and NACLIP's background class on VOC and COCO-Object (first line of their cls_voc21.txt).
STUFF_BACKGROUND = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed", "building",
    "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair", "floor", "hill", "rail",
    "fence",
)  # fmt: skip


@dataclass(frozen=True)
class MethodSettings:
    """None = zeroseg's own choice (the CLIP's logit scale, the dataset's paper threshold)."""

    rule: str = "groupvit"
    temperature: float | None = None
    bg_threshold: float | None = None
    background_names: tuple[str, ...] = ()
    templates: str = "single"
    mode: str = "slide"
    short_side: int = 448
    crop_size: int = 448
    stride: int = 224

    def geometry(self) -> dict:
        return {"mode": self.mode, "short_side": self.short_side, "crop_size": self.crop_size, "stride": self.stride}


def method_settings(method: str, dataset: str | None) -> MethodSettings:
    """The settings of `method` on `dataset` (voc, context, coco; None: the method's code defaults)."""
    if method == "sclip":
        temperature = {"voc": 65.0, "context": 50.0, "coco": 50.0}.get(dataset, 40.0)
        return MethodSettings(
            "softmax", temperature, 0.1, _sclip_background(dataset), "openai80", "slide", 336, 224, 112
        )  # fmt: skip
    if method == "clearclip":
        threshold = {"voc": 0.5, "context": 0.15, "coco": 0.4}.get(dataset, 0.0)
        return MethodSettings("softmax", 50.0, threshold, ("background",), "openai80", "slide", 448, 448, 224)
    if method == "naclip":
        mode = "whole" if dataset == "voc" else "slide"
        return MethodSettings("softmax", 40.0, 0.1, _sclip_background(dataset), "openai80", mode, 336, 224, 112)
    if method == "maskclip":
        return MethodSettings(rule="softmax")
    return MethodSettings()


def _sclip_background(dataset: str | None) -> tuple[str, ...]:
    """SCLIP's (and NACLIP's) background names: the stuff list on VOC / COCO-Object, 'background' on Context."""
    if dataset in ("voc", "coco"):
        return STUFF_BACKGROUND
    return ("background",) if dataset == "context" else ()

"""The methods zs-eval and zs-segment segment with, one row of METHODS each: the ZeroSeg student of a checkpoint,
and the training-free dense CLIP methods, each with its changed last image block (run by evaluation.dense_clip)
and its own evaluation settings. Adding a method is one row here. zs-eval's help is generated from this table,
so it is light to import (no torch: the last blocks use tensor methods only).

Last blocks. With x the last block's input [B, 1+h*w, width], y = ln_1(x), per head q, k, v the block's own
in-projections of y (head_dim d, scale = d^-1/2) and Attn(A) = out_proj(heads of A @ v concatenated):
- maskclip (Zhou et al., ECCV 2022): A = I (each token keeps its own value); residual and MLP kept:
  x' = x + Attn(I), out = x' + mlp(ln_2(x')).
- sclip (Wang et al., 2024, correlative self-attention): A = softmax(q q^T * scale) + softmax(k k^T * scale);
  residual and MLP kept as in maskclip.
- clearclip (Lan et al., ECCV 2024): A = softmax(q q^T * scale); no residual, no MLP: out = Attn(A). The
  default follows the paper's block (q q^T); its released configs/base_config.py sets model_type='vanilla',
  A = softmax(q k^T * scale): the row clearclip-qk, all other settings ClearCLIP's.
- naclip (Hajimiri et al., WACV 2025): A = softmax(k k^T * scale + G), G the Gaussian neighbourhood prior
  (dense_clip.gaussian_prior, std gaussian_std patches); no residual, no MLP: out = Attn(A).

Settings, from each paper's public code (configs/cfg_*.py of SCLIP, ClearCLIP and NACLIP; all three follow
SCLIP's mmseg protocol); zs-eval uses them as the method's defaults, every one is an option (--rule,
--temperature, --bg-threshold, --background-names, --templates, --mode, --short-side, --max-long-side,
--crop-size, --stride, --gaussian-std, --area-filter, --pamr). A setting that differs per benchmark is a
PerDataset.
- rule: the labeling rule (evaluation.labeling_rule). The training-free methods threshold every pixel
  alone, as their code does: `softmax`, without keep-best-group (the `groupvit` rule would always keep
  each window's best patch as foreground).
- temperature: cosines are multiplied by it before the softmax over classes (the "logit_scale" of their code);
  None: the CLIP's own logit scale.
- bg_threshold: a pixel whose best class probability is below it is background ("prob_thd"); None: the
  dataset's (the ZeroSeg paper's).
- names: the method's own name file (evaluation/names/<file>.txt, copied from its repository's
  configs/cls_<dataset>.txt): one line per class of the benchmark, in its class order, line k class k's
  names separated by ', ' (a class scores the max over its names). On a benchmark with background (its
  DatasetSpec has a threshold) line 0 is the background class's names and line k class k; on one without,
  there is no background line: line 0 is the first class. So the line count is the benchmark's class count
  (len(class_names)) either way; a file of another count is refused (one line naming it). None: the names of
  evaluation.datasets and background_names (names whose embeddings together make the background class;
  empty = none).
- area_threshold: SCLIP's area_thd (VOC: 0.1); pamr_steps: NACLIP's PAMR (its main-results command
  `test_all.sh reduced naclip 5 on` runs 10 steps on every benchmark); pad_windows: ClearCLIP's forward_slide
  pads a window to the patch grid (evaluation.refinement, evaluation.segmenter).
- geometry: short side of the resize ("Resize scale=(2048, S)"), whole image or slide crop / stride.
On the benchmarks without background (voc20, context59, coco-stuff, cityscapes, ade20k) their configs set no
threshold and their name files no background entry: every pixel takes a class (zs-eval applies neither), and
their settings are the segmentor's defaults but for the resize (SCLIP: 336, coco-stuff 448, cityscapes 560;
NACLIP: 336, cityscapes 560; ClearCLIP: 448), ClearCLIP's 224 crop on cityscapes and NACLIP's whole image on voc20.
zeroseg: GroupViT's protocol (the groupvit rule, the CLIP's own logit scale, the dataset's paper threshold,
one prompt, slide 448 / 224 at short side 448), on every benchmark (GroupViT has no configs for the five
without background). maskclip keeps that protocol's geometry and thresholds with the dense methods' softmax
order; maskclip-own is MaskCLIP's own protocol (MASKCLIP_PROTOCOL_NOTE).
"""

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any


class PerDataset:
    """A setting that differs per benchmark: its value by dataset name, `otherwise` on the others (and in
    zs-segment, which has no dataset)."""

    def __init__(self, otherwise: Any, **by_dataset: Any):
        self.otherwise = otherwise
        self.by_dataset = by_dataset

    def on(self, dataset: str | None) -> Any:
        return self.by_dataset.get(dataset, self.otherwise)

    def describe(self) -> str:
        """'65 (voc), 50 (context, coco), else 40': datasets of equal value together."""
        together: dict[str, list[str]] = {}
        for dataset, value in self.by_dataset.items():
            together.setdefault(_shown(value), []).append(dataset)
        shown = [f"{value} ({', '.join(datasets)})" for value, datasets in together.items()]
        return ", ".join([*shown, f"else {_shown(self.otherwise)}"])


@dataclass(frozen=True)
class LastBlock:
    """How a training-free method changes the CLIP's last image block: its attention weights A
    [B, heads, N, N] from the heads' q, k [B, heads, N, d] and the neighbourhood prior [N, N] (None
    unless the method has a gaussian_std), or None for A = I; whether the block's residual and MLP stay;
    the formula, as the method's reports record it."""

    attention: Callable | None
    residual_and_mlp: bool
    formula: str


@dataclass(frozen=True)
class Method:
    """A row of METHODS. Every setting is a value or a PerDataset; `on(dataset)` gives the values."""

    last_block: LastBlock | None = None  # None: the ZeroSeg student of a checkpoint
    rule: str = "groupvit"
    temperature: float | None | PerDataset = None
    bg_threshold: float | None | PerDataset = None
    background_names: tuple[str, ...] | PerDataset = ()
    templates: str = "single"
    mode: str | PerDataset = "slide"
    short_side: int | PerDataset = 448
    crop_size: int | PerDataset = 448
    stride: int = 224
    max_long_side: int | PerDataset = 2048
    gaussian_std: float | None = None  # patches: the neighbourhood prior's width (NACLIP)
    names: str | None | PerDataset = None  # file of evaluation/names (line k: class k's names); None: GroupViT's
    area_threshold: float | None | PerDataset = None  # SCLIP's area_thd (evaluation.refinement)
    pamr_steps: int | PerDataset = 0  # NACLIP's PAMR iterations (evaluation.refinement); 0: off
    pad_windows: bool = False  # ClearCLIP's forward_slide pads a window to the patch grid (evaluation.segmenter)
    note: str = ""  # a line for its reports

    def on(self, dataset: str | None) -> "Method":
        """The settings on `dataset` (a DATASETS name; None: the method's code defaults)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: v.on(dataset) for name, v in values.items() if isinstance(v, PerDataset)})

    def geometry(self) -> dict:
        names = ("mode", "short_side", "max_long_side", "crop_size", "stride")
        return {name: getattr(self, name) for name in names}

    def describe(self) -> str:
        """The settings in one line, as zs-eval --help lists them."""
        parts = [
            f"rule {self.rule}",
            "temperature " + _shown(self.temperature, none="the CLIP's logit scale"),
            "threshold " + _shown(self.bg_threshold, none="the dataset's"),
            f"background names {_shown(self.background_names)}" if self.names is None else "",
            f"templates {self.templates}",
            f"short side {_shown(self.short_side)} (long side at most {_shown(self.max_long_side)})",
            f"mode {_shown(self.mode)} (crop {_shown(self.crop_size)}, stride {self.stride})",
        ]
        if self.gaussian_std is not None:
            parts.append(f"Gaussian std {_shown(self.gaussian_std)} patches")
        if self.names is not None:
            parts.append(f"names {_shown(self.names)} (line 0: the background class where the benchmark has one)")
        if self.area_threshold is not None:
            parts.append(f"area threshold {_shown(self.area_threshold)}")
        if self.pamr_steps:
            parts.append(f"PAMR {_shown(self.pamr_steps)} steps")
        return "; ".join(part for part in parts if part)


def _shown(value: Any, none: str = "none") -> str:
    if isinstance(value, PerDataset):
        return value.describe()
    if isinstance(value, tuple):
        quoted = [f"'{name}'" for name in value]
        if len(quoted) > 3:
            return f"{', '.join(quoted[:3])} and {len(quoted) - 3} more"
        return ", ".join(quoted) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return none if value is None else str(value)


def _similarity(a, b=None, prior=None):
    """softmax(a b^T * scale (+ prior)) over the last axis, b = a unless given: a, b [B, heads, N, d] ->
    [B, heads, N, N]."""
    logits = (a @ (a if b is None else b).transpose(-1, -2)) * a.shape[-1] ** -0.5
    return (logits if prior is None else logits + prior).softmax(-1)


def correlative(q, k, prior):  # SCLIP
    return _similarity(q) + _similarity(k)


def query_query(q, k, prior):  # ClearCLIP
    return _similarity(q)


def query_key(q, k, prior):  # ClearCLIP's released configs/base_config.py (model_type='vanilla')
    return _similarity(q, k)


def key_key_neighbourhood(q, k, prior):  # NACLIP
    return _similarity(k, prior=prior)


# Each method's own name files (configs/cls_<file>.txt of its repository: voc21, context60, coco_object with a
# background line 0; voc20, context59, coco_stuff, city_scapes, ade20k without). NACLIP's are SCLIP's, byte for
# byte; ClearCLIP's are SCLIP's but for voc21, coco_object and voc20 (no synonyms for person and tvmonitor).
_SHARED_NAMES = {
    "context": "sclip_context", "context59": "sclip_context59", "coco-stuff": "sclip_coco_stuff",
    "cityscapes": "sclip_cityscapes", "ade20k": "sclip_ade20k",
}  # fmt: skip
SCLIP_NAMES = PerDataset(None, voc="sclip_voc", voc20="sclip_voc20", coco="sclip_coco", **_SHARED_NAMES)
CLEARCLIP_NAMES = PerDataset(None, voc="clearclip_voc", voc20="clearclip_voc20", coco="clearclip_coco", **_SHARED_NAMES)
# MaskCLIP's own protocol (configs/maskclip/maskclip_vit16_512x512_voc12aug_20.py and _520x520_pascal_context_59.py
# with configs/_base_/models/maskclip_vit16.py): whole image, keep-ratio resize to img_scale (2048, 512) on VOC-20
# and (520, 520) on Context-59, no background class, the argmax of the raw cosines.
MASKCLIP_PROTOCOL_NOTE = (
    "MaskCLIP (Zhou et al.) under its own protocol: whole image at 512 (context59: 520 x 520), raw cosine argmax,"
    " no background; its benchmarks are voc20 and context59"
)
MASKCLIP_NOTE = (
    "MaskCLIP of Zhou et al., ECCV 2022 (Extract Free Dense Labels from CLIP); not the 'MaskCLIP' row of the"
    " ZeroSeg paper's Table 1, which is Dong et al.'s masked self-distillation"
)

CLEARCLIP = Method(
    LastBlock(query_query, False, "Attn(softmax(q q^T * scale)); no residual, no mlp"),
    "softmax", 50.0, PerDataset(0.0, voc=0.5, context=0.15, coco=0.4), ("background",), "openai80",
    "slide", 448, PerDataset(448, cityscapes=224), 224, names=CLEARCLIP_NAMES, pad_windows=True,
)  # fmt: skip
METHODS = {
    "zeroseg": Method(),
    "maskclip": Method(
        LastBlock(None, True, "x + Attn(I), then + mlp(ln_2(.))"), rule="softmax", note=MASKCLIP_NOTE
    ),
    "maskclip-own": Method(
        LastBlock(None, True, "x + Attn(I), then + mlp(ln_2(.))"), rule="softmax", bg_threshold=0.0, mode="whole",
        short_side=PerDataset(512, context59=520), max_long_side=PerDataset(2048, context59=520),
        note=MASKCLIP_PROTOCOL_NOTE,
    ),
    "sclip": Method(
        LastBlock(correlative, True, "x + Attn(softmax(q q^T * scale) + softmax(k k^T * scale)), then + mlp(ln_2(.))"),
        "softmax", PerDataset(40.0, voc=65.0, context=50.0, coco=50.0), 0.1, (), "openai80",
        "slide", PerDataset(336, **{"coco-stuff": 448, "cityscapes": 560}), 224, 112, names=SCLIP_NAMES,
        area_threshold=PerDataset(None, voc=0.1),
    ),
    "clearclip": CLEARCLIP,
    "clearclip-qk": replace(
        CLEARCLIP, last_block=LastBlock(query_key, False, "Attn(softmax(q k^T * scale)); no residual, no mlp"),
        note="ClearCLIP as its released configs/base_config.py runs it (model_type='vanilla': q k^T attention)",
    ),
    "naclip": Method(
        LastBlock(key_key_neighbourhood, False, "Attn(softmax(k k^T * scale + gaussian_prior)); no residual, no mlp"),
        "softmax", 40.0, 0.1, (), "openai80", PerDataset("slide", voc="whole", voc20="whole"),
        PerDataset(336, cityscapes=560), 224, 112, gaussian_std=5.0, names=SCLIP_NAMES, pamr_steps=10,
    ),
}  # fmt: skip
TRAINING_FREE = tuple(name for name, method in METHODS.items() if method.last_block is not None)

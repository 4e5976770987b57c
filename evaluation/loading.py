"""From command-line choices to segmenters: the student checkpoint (or a training-free dense CLIP method),
the teacher CLIP whose text tower and logit_scale label the segments, and the class text embeddings of a
vocabulary. Settings left unset take the method's own (its row of evaluation.methods.METHODS)."""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from zeroseg.errors import UserError, first_line, require
from zeroseg.evaluation.datasets import GROUPVIT_THRESHOLDS, THRESHOLD_SETS
from zeroseg.evaluation.labeling_rule import RULES, LabelingRule
from zeroseg.evaluation.methods import METHODS, TRAINING_FREE
from zeroseg.evaluation.segmenter import DenseClipScorer, Scorer, WindowSegmenter, ZeroSegScorer
from zeroseg.evaluation.text import TEMPLATE_SETS, class_text_embeddings
from zeroseg.evaluation.windows import Geometry
from zeroseg.pipeline.teacher import create_clip, register_config, resolve_identity
from zeroseg.pipeline.teacher_identity import HF_HUB, TeacherIdentity

HUB_PREFIX = f"{HF_HUB}:"  # --checkpoint hf-hub:ORG/REPO: an export on the Hugging Face Hub


@dataclass
class ModelOptions:
    """What to segment with, and how pixels are labelled: the zs-eval / zs-segment options, checked when made
    (UserError naming the --flag). teacher / pretrained / quick_gelu None = as recorded in the checkpoint;
    templates, geometry fields absent from `geometry`, temperature, background_names, gaussian_std None = the
    method's (evaluation.methods). predictions: zs-eval --predictions, label maps saved before, scored instead of
    loading a model."""

    model: str = "zeroseg"
    checkpoint: str | None = None
    teacher: str | None = None
    pretrained: str | None = None
    quick_gelu: bool | None = None
    templates: str | None = None
    text_cache: str | None = None
    geometry: dict = field(default_factory=dict)  # Geometry fields given on the command line
    keep_best_group: bool = False
    window_batch: int = 8
    rule: str | None = None  # evaluation.labeling_rule.RULES
    top_k: int = 5
    temperature: float | None = None  # cosines are multiplied by it before the softmax (CLIP: exp(logit_scale))
    background_names: str | None = None  # comma-separated names of a background class, or 'none'
    gaussian_std: float | None = None  # NACLIP's neighbourhood prior, in patches
    bg_threshold: float | None = None  # None: zs-eval the method's per dataset, zs-segment no background
    thresholds: str = "paper"  # the datasets' background thresholds: paper (ZeroSeg's) or groupvit (its configs')
    area_filter: bool = True  # SCLIP's area_thd where the method's settings have one
    pamr: bool = True  # NACLIP's PAMR where the method's settings run it
    predictions: str | None = None

    def __post_init__(self) -> None:
        model = self.model
        require(model in METHODS, f"unknown --model '{model}' (choose from {', '.join(METHODS)})")
        if self.predictions is not None:
            require(self.checkpoint is None, "--predictions scores saved label maps; it takes no --checkpoint")
        elif model == "zeroseg":
            require(self.checkpoint is not None,
                    "--checkpoint is required for --model zeroseg (MaskCLIP needs none: --model maskclip)")
        else:
            require(self.checkpoint is None,
                    f"--model {model} is training-free: it takes no --checkpoint, only --teacher/--pretrained")
            require(self.teacher is not None,
                    f"--model {model} needs --teacher (an open_clip ViT name or config JSON) and --pretrained")
        Geometry(**self.geometry)  # checks the given fields (the others: defaults, valid)
        require(self.rule is None or self.rule in RULES, f"--rule '{self.rule}' is not one of {', '.join(RULES)}")
        require(self.top_k >= 1, f"--top-k must be positive, got {self.top_k}")
        require(self.window_batch >= 1, f"--window-batch must be positive, got {self.window_batch}")
        require(self.temperature is None or 0 < self.temperature <= 100,
                f"--temperature must be in (0, 100] (scores cap it at 100), got {self.temperature}")
        require(self.gaussian_std is None or (METHODS[model].gaussian_std is not None and self.gaussian_std > 0),
                "--gaussian-std is NACLIP's neighbourhood width (--model naclip), a positive number of patches")
        require(self.background_names is None or model in TRAINING_FREE,
                f"--background-names is for the dense CLIP models ({', '.join(TRAINING_FREE)})")
        require(self.background_names is None or any(name.strip() for name in self.background_names.split(",")),
                "--background-names needs comma-separated names, or 'none'")
        require(self.thresholds in THRESHOLD_SETS,
                f"--thresholds '{self.thresholds}' is not one of {', '.join(THRESHOLD_SETS)}")
        require((self.rule or METHODS[model].rule) == "softmax" or model == "zeroseg",
                f"--model {model} labels pixels by its own softmax order; --rule groupvit is ZeroSeg's")
        require(self.bg_threshold is None or math.isfinite(self.bg_threshold),
                f"--bg-threshold must be a finite number, got {self.bg_threshold}")


@dataclass
class LoadedModel:
    """A scorer with its input normalisation, and the teacher CLIP that embeds class names."""

    scorer: Scorer
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip: torch.nn.Module
    identity: TeacherIdentity
    templates: tuple[str, ...]
    options: ModelOptions
    device: torch.device
    description: dict  # what was loaded, for the results' config

    def segmenter(
        self, class_names: Sequence[str], bg_threshold: float | None, dataset: str | None = None,
        background: bool = True,
    ) -> WindowSegmenter:
        """A segmenter for a vocabulary whose index 0 is background (only names 1.. go through CLIP), or with
        background=False one without (every name goes through CLIP, every pixel takes a class: no threshold, no
        background names), with the method's settings for `dataset` (a DATASETS name) where the options leave
        them unset."""
        if background and (not class_names or class_names[0] != "background"):
            raise ValueError(f"a vocabulary starts with 'background' (label 0), got {list(class_names[:1])}")
        if not background and bg_threshold is not None:
            raise ValueError("a vocabulary without background has no background threshold")
        options = self.options
        settings = METHODS[options.model].on(dataset)
        geometry = Geometry(**{**settings.geometry(), **options.geometry})
        temperature = options.temperature or settings.temperature
        logit_scale = float(self.clip.logit_scale.item()) if temperature is None else math.log(temperature)
        names, query_class = list(class_names[1:] if background else class_names), None
        background_names = settings.background_names if background else ()
        if settings.names is not None:
            lines = read_names_file(settings.names, len(class_names))
            if background:
                background_names, lines = tuple(lines[0]), lines[1:]
            names = [name for line in lines for name in line]
            query_class = tuple(index for index, line in enumerate(lines, 1) for _ in line)
        if options.background_names is not None and background:
            background_names = _background_names(options.background_names)
        rule = LabelingRule(
            self._embed(names), logit_scale, bg_threshold, options.keep_best_group, options.rule or settings.rule,
            options.top_k, background_names, self._embed(background_names) if background_names else None,
            query_class, settings.area_threshold if options.area_filter else None,
            settings.pamr_steps if options.pamr else 0, background,
        )  # fmt: skip
        scorer = self.scorer
        if isinstance(scorer, DenseClipScorer):  # ClearCLIP pads windows in its forward_slide only
            pad = settings.pad_windows and geometry.mode == "slide"
            scorer = DenseClipScorer(scorer.visual, scorer.method, scorer.gaussian_std, pad)
        return WindowSegmenter(scorer, rule, geometry, self.mean, self.std, self.device, options.window_batch)

    def default_bg_threshold(self, dataset) -> float | None:
        """The method's background threshold on a SegmentationDataset, else the dataset's: the ZeroSeg paper's,
        or with --thresholds groupvit GroupViT's configs' (evaluation.datasets.GROUPVIT_THRESHOLDS); None on a
        dataset without background class."""
        if not dataset.has_background:
            return None
        threshold = METHODS[self.options.model].on(dataset.name).bg_threshold
        if threshold is not None:
            return threshold
        groupvit = GROUPVIT_THRESHOLDS.get(dataset.name, dataset.bg_threshold)
        return groupvit if self.options.thresholds == "groupvit" else dataset.bg_threshold

    def _embed(self, names: Sequence[str]):
        return class_text_embeddings(self.clip, self.identity, list(names), self.templates, self.options.text_cache)


def read_templates(choice: str) -> tuple[str, ...]:
    """A named template set (single, openai80) or a text file of templates, one per line, each with {}."""
    if choice in TEMPLATE_SETS:
        return TEMPLATE_SETS[choice]
    path = Path(choice)
    if not path.is_file():
        raise UserError(f"--templates '{choice}' is neither {' nor '.join(TEMPLATE_SETS)} nor a file")
    templates = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    bad = next((line for line in templates if line.count("{}") != 1), None)
    if not templates or bad is not None:
        raise UserError(f"template file {path}: every line needs exactly one {{}}, got '{bad or ''}'")
    return templates


def hub_export_folder(checkpoint: str) -> str:
    """--checkpoint hf-hub:ORG/REPO: the folder of that export (`zs-train export`) in the Hugging Face cache,
    fetched when missing (HF_HUB_OFFLINE=1: the cache only, HF_HUB_CACHE: where it lies); any other value as given."""
    if not checkpoint.startswith(HUB_PREFIX):
        return checkpoint
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(checkpoint.removeprefix(HUB_PREFIX))
    except (OSError, ValueError) as exc:  # not cached offline, unknown repo, no network, a malformed repo id
        raise UserError(f"--checkpoint {checkpoint}: {first_line(exc)}") from None


def load_eval_model(options: ModelOptions, device: torch.device) -> LoadedModel:
    templates = read_templates(options.templates or METHODS[options.model].templates)
    if options.model in TRAINING_FREE:
        return _load_dense_clip(options, templates, device)
    return _load_zeroseg(options, templates, device)


def _load_zeroseg(options: ModelOptions, templates: tuple[str, ...], device: torch.device) -> LoadedModel:
    from zeroseg.trainer.export import load_trained_model

    model, meta = load_trained_model(hub_export_folder(options.checkpoint), device)
    recorded = TeacherIdentity.from_dict(meta["store"]["teacher"], f"checkpoint '{meta['path']}': store.teacher")
    identity = _text_teacher(recorded, options)
    clip = create_clip(identity, device)
    preprocessing = meta["store"]["preprocessing"]  # the mean/std zs-cache normalised the teacher's views with
    description = {
        "model": "zeroseg",
        "checkpoint": str(Path(meta["path"]).resolve()),
        "step": meta["step"],
        "model_config": model.cfg.to_dict(),
        "teacher_recorded": recorded.to_dict(),
        "teacher": identity.to_dict(),
        "teacher_matches_checkpoint": identity.same_teacher(recorded),
    }
    mean, std = tuple(preprocessing["mean"]), tuple(preprocessing["std"])
    return LoadedModel(ZeroSegScorer(model), mean, std, clip, identity, templates, options, device, description)


def _load_dense_clip(options: ModelOptions, templates: tuple[str, ...], device: torch.device) -> LoadedModel:
    method = METHODS[options.model]
    identity = resolve_identity(options.teacher, options.pretrained, options.quick_gelu)
    clip = create_clip(identity, device)
    config = clip.visual.preprocess_cfg
    description = {"model": options.model, "teacher": identity.to_dict(), "last_block": method.last_block.formula}
    if method.note:
        description["method"] = method.note
    gaussian_std = options.gaussian_std or method.gaussian_std
    if gaussian_std is not None:
        description["gaussian_std"] = gaussian_std
    return LoadedModel(
        DenseClipScorer(clip.visual, options.model, gaussian_std),
        tuple(config["mean"]), tuple(config["std"]), clip, identity, templates, options, device, description,
    )  # fmt: skip


def read_names_file(stem: str, count: int) -> list[list[str]]:
    """A names file of evaluation/names for a vocabulary of `count` classes (background included where the
    benchmark has one: evaluation.methods' rule): line k holds class k's names, split on ', ' as SCLIP's
    get_cls_idx does -> `count` lists of names; UserError naming the file when its line count differs."""
    path = resources.files("zeroseg.evaluation") / "names" / f"{stem}.txt"
    lines = path.read_text().splitlines()
    if len(lines) != count:
        raise UserError(f"names file {path}: {len(lines)} lines, but the benchmark has {count} classes")
    return [line.split(", ") for line in lines]


def _background_names(choice: str) -> tuple[str, ...]:
    """'none' -> no background class; else the comma-separated names."""
    if choice.strip().lower() == "none":
        return ()
    return tuple(name.strip() for name in choice.split(",") if name.strip())


def _text_teacher(recorded: TeacherIdentity, options: ModelOptions) -> TeacherIdentity:
    """The checkpoint's teacher (a config-JSON one rebuilt from the config it records), or the --teacher /
    --pretrained / --quick-gelu overrides (a --teacher config path wins over the recorded config)."""
    weights = recorded.pretrained
    if options.teacher is None and options.pretrained is None:
        if not recorded.brings_weights and weights and Path(weights).is_absolute() and not Path(weights).is_file():
            raise UserError(
                f"teacher weights {weights} recorded in the checkpoint are not on this machine; "
                "pass --pretrained (and --teacher) to say where they are"
            )
        if options.quick_gelu is None or options.quick_gelu == recorded.quick_gelu:
            return recorded
    if recorded.config:
        register_config(recorded.model, recorded.config)
    model = options.teacher or recorded.model
    pretrained = options.pretrained
    if pretrained is None and options.teacher is None and not recorded.brings_weights:
        pretrained = weights or "none"
    quick_gelu = options.quick_gelu
    if quick_gelu is None and options.teacher is None:
        quick_gelu = recorded.quick_gelu
    try:
        return resolve_identity(model, pretrained, quick_gelu)
    except UserError as exc:
        if options.teacher is None:
            raise UserError(f"the checkpoint's teacher: {exc}; pass --teacher / --pretrained") from None
        raise

"""The CLIP teacher: loading an open_clip model (name or config JSON; tag, weights file or none) and
turning batches of centre crops into the (B, V, D) grid-view features of the store."""

import hashlib
import logging
import os
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

from zeroseg.pipeline.crops import grid_views
from zeroseg.pipeline.errors import UserError
from zeroseg.pipeline.runtime import first_line

RANDOM_TEACHER_SEED = 0


@dataclass(frozen=True)
class TeacherIdentity:
    """What a store records about its teacher; two builds must agree on it to share a store."""

    model: str
    pretrained: str | None  # open_clip tag, absolute weights path, or None for random weights
    weights_sha256: str | None
    quick_gelu: bool
    config: str | None = None  # absolute path of the model-config JSON when the model is not built in

    def to_dict(self) -> dict:
        return asdict(self)

    def same_teacher(self, other: "TeacherIdentity") -> bool:
        """Weights files are compared by content, so a moved file is still the same teacher."""
        if self.weights_sha256 or other.weights_sha256:
            same_weights = self.weights_sha256 == other.weights_sha256
        else:
            same_weights = self.pretrained == other.pretrained
        return self.model == other.model and same_weights and self.quick_gelu == other.quick_gelu



def teacher_config_file(teacher: str) -> Path | None:
    """The model-config JSON a --teacher names: a path, or a config shipped with zeroseg (zs-tiny-clip) by its
    name; None for an open_clip model name."""
    from zeroseg.configs import TEACHER_SUFFIXES, shipped_config

    if teacher.endswith(".json") or os.sep in teacher:
        path = Path(teacher)
        if not path.is_file():
            raise UserError(f"teacher config '{teacher}' does not exist")
        return path
    return shipped_config(teacher, TEACHER_SUFFIXES)


def resolve_model_name(teacher: str) -> str:
    """An open_clip model name, or a model-config JSON (a path or a shipped name; registered under its stem)."""
    config = teacher_config_file(teacher)
    if config is not None:
        open_clip.add_model_config(config)
        teacher = config.stem
    if teacher not in open_clip.list_models():
        raise UserError(f"unknown teacher '{teacher}': not an open_clip model name nor a config JSON path")
    return teacher


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_openai_archive(path: str | Path) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (their code under */code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def resolve_identity(teacher: str, pretrained: str, quick_gelu: bool | None = None) -> TeacherIdentity:
    """Work out which weights and activation the teacher will use, before loading anything.

    pretrained: 'none' (random weights, real architecture), a weights file, or an open_clip tag.
    quick_gelu: None = automatic (the model name ends in -quickgelu, the tag was trained with
    QuickGELU as OpenAI's were, or the file is an OpenAI TorchScript archive).
    """
    model = resolve_model_name(teacher)
    config_file = teacher_config_file(teacher)
    config = str(config_file.resolve()) if config_file is not None else None
    auto_quick_gelu = model.endswith("-quickgelu")
    if pretrained.lower() in ("none", ""):
        tag, sha = None, None
    elif Path(pretrained).is_file():
        tag, sha = str(Path(pretrained).resolve()), sha256_file(pretrained)
        auto_quick_gelu = auto_quick_gelu or is_openai_archive(pretrained)
    elif get_pretrained_cfg(model, pretrained):
        tag, sha = pretrained, None
        auto_quick_gelu = auto_quick_gelu or bool(get_pretrained_cfg(model, pretrained).get("quick_gelu"))
    else:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none known"
        raise UserError(
            f"--pretrained '{pretrained}' is neither a weights file nor an open_clip tag of {model} ({known})"
        )
    return TeacherIdentity(model, tag, sha, auto_quick_gelu if quick_gelu is None else quick_gelu, config)


def create_clip(identity: TeacherIdentity, device: torch.device) -> torch.nn.Module:
    """The whole open_clip model (image and text towers) in eval mode, fp32, on `device`.

    Random weights (pretrained None) are drawn from a fixed seed, so every process that asks for
    the same random teacher (a resumed build, a Dask worker, a test) gets the same one.
    """
    if identity.model not in open_clip.list_models():
        if not identity.config or not Path(identity.config).is_file():
            raise UserError(
                f"teacher '{identity.model}' is not an open_clip model and its config JSON "
                f"'{identity.config}' is not reachable: pass --teacher CONFIG.json"
            )
        open_clip.add_model_config(identity.config)
    logging.disable(logging.ERROR)  # open_clip logs what we report as one line below, and its info chatter
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model = open_clip.create_model(
                identity.model,
                pretrained=identity.pretrained,
                force_quick_gelu=identity.quick_gelu,
                device=device,
            )
    except Exception as exc:  # a missing download, a corrupt file or another architecture's weights
        reason = first_line(exc) or type(exc).__name__
        hint = "" if Path(str(identity.pretrained)).is_file() else " (offline? pass a local weights file)"
        raise UserError(
            f"could not load teacher weights '{identity.pretrained}' into {identity.model}{hint}: {reason}"
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    return model.eval().requires_grad_(False)


class Teacher:
    """The image tower of a CLIP model, turning centre crops into grid-view embeddings.

    On CUDA the tower runs in bfloat16 (weights cast, as measured fastest); on CPU in float32.
    Features are the raw projected embeddings (not L2-normalised), returned as float16.
    """

    def __init__(self, identity: TeacherIdentity, device: torch.device, compile: bool = False):
        clip = create_clip(identity, device)
        self.identity = identity
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tower = clip.visual.to(self.dtype)
        cfg = clip.visual.preprocess_cfg
        self.view_size = int(cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"])
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.embed_dim = int(clip.visual.output_dim)
        self.forward = torch.compile(self.tower) if compile and device.type == "cuda" else self.tower

    def preprocessing(self) -> dict:
        return {"view_size": self.view_size, "mean": list(self.mean), "std": list(self.std)}

    @torch.inference_mode()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """views: (N, 3, T, T) normalised float on the device -> (N, D) float16 on the device."""
        return self.forward(views.to(self.dtype)).to(torch.float16)

    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
        """crops: (B, S, S, 3) uint8 (any device) -> (B, V, D) float16 on the CPU; all B * V views in one pass."""
        crops = crops.to(self.device, non_blocking=True)
        views = grid_views(crops, grids, self.view_size, self.mean, self.std)  # (B, V, 3, T, T)
        batch, num_views = views.shape[:2]
        embeddings = self.encode_views(views.flatten(0, 1))  # (B * V, D)
        return embeddings.view(batch, num_views, -1).cpu()

"""The CLIP teacher: a --teacher name, parsed into (schema, id) by pipeline.teacher_identity, resolved by its
schema's loader (LOADERS) into the identity a store records (which model, weights and activation); the open_clip
model built from that identity; and the Teacher turning batches of centre crops into the (B, V, D) grid-view
features of the store."""

import json
import logging
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg

from zeroseg.errors import UserError, first_line
from zeroseg.io import canonical_json, sha256_file
from zeroseg.pipeline.crops import grid_views
from zeroseg.pipeline.teacher_identity import (
    CONFIG,
    HF_HUB,
    LOCAL_DIR,
    OPEN_CLIP,
    TeacherIdentity,
    parse_teacher_name,
)

RANDOM_TEACHER_SEED = 0
# Architectures OpenAI released QuickGELU weights for, which others also trained with GELU: a bare
# weights file for one of them can be either kind.
BOTH_KINDS = frozenset(
    model for model, tag in open_clip.list_pretrained() if tag == "openai" and not model.endswith("-quickgelu")
)
# The weights file of a local-dir: folder, as open_clip's factory picks it: the first of these names present, else
# the first file with a weights suffix, .safetensors before the others, by name.
FOLDER_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)  # fmt: skip
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pth")
_REGISTERED: dict[str, str] = {}  # config-JSON teachers registered with open_clip here: name -> canonical JSON


@dataclass(frozen=True)
class TeacherFormat:
    """A loaded teacher's input and output, as a new store records them: square views of view_size px,
    normalised with mean and std (0..1 units), give embed_dim-dim embeddings; computed on device_type (a store
    of decode "device" records it as its decoder's)."""

    view_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int
    device_type: str  # cpu, cuda


def resolve_identity(teacher: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> TeacherIdentity:
    """Work out which model, weights and activation the teacher will use, before loading its weights.

    teacher: an open_clip name, hf-hub:ORG/REPO, local-dir:FOLDER, or a model-config JSON (a path or a
    shipped name). pretrained: None (the 'openai' tag; hub and folder teachers bring their own weights),
    'none' (random weights, real architecture), a weights file, or an open_clip tag.
    quick_gelu: None = automatic where it is certain: the model config says so (-quickgelu names, hub
    configs), the tag was trained with QuickGELU, the hub repo's tag is openai, or the file is an OpenAI
    TorchScript archive. A bare weights file for an architecture OpenAI released (BOTH_KINDS) can be
    either kind: refused unless quick_gelu is given.
    """
    schema, identifier = parse_teacher_name(teacher)
    return LOADERS[schema](identifier, pretrained, quick_gelu)


def _hub_teacher(repo: str, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """hf-hub:ORG/REPO: its open_clip_config.json and weights from the Hugging Face cache (HF_HUB_CACHE)."""
    model = f"{HF_HUB}:{repo}"
    try:
        open_clip.get_model_config(model)
    except Exception as exc:
        raise UserError(
            f"teacher '{model}': its open_clip_config.json is not in the Hugging Face cache "
            f"(HF_HUB_CACHE; offline?): {first_line(exc)}"
        ) from None
    try:
        weights = download_pretrained_from_hf(repo)
    except Exception as exc:
        raise UserError(f"teacher '{model}': no weights in the Hugging Face cache: {first_line(exc)}") from None
    return _bundled_identity(model, weights, pretrained, quick_gelu)


def _folder_teacher(folder: str, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """local-dir:FOLDER: open_clip_config.json and the weights file (FOLDER_WEIGHTS) in FOLDER."""
    path = Path(folder).expanduser().resolve()
    model = f"{LOCAL_DIR}:{path}"
    if not (path / "open_clip_config.json").is_file():
        raise UserError(f"teacher '{LOCAL_DIR}:{folder}': no open_clip_config.json in {path}")
    rank = {name: index for index, name in enumerate(FOLDER_WEIGHTS)}
    found = sorted(
        (file for file in path.iterdir() if file.suffix in WEIGHTS_SUFFIXES and file.is_file()),
        key=lambda file: (rank.get(file.name, len(rank)), file.suffix != ".safetensors", file.name),
    )
    if not found:
        raise UserError(f"teacher '{model}': no weights (*{', *'.join(WEIGHTS_SUFFIXES)}) in the folder")
    return _bundled_identity(model, str(found[0].resolve()), pretrained, quick_gelu)


def _bundled_identity(model: str, weights: str, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """A hub or folder teacher, which brings its own weights file: recorded by path and content."""
    if pretrained is not None:
        raise UserError(f"--pretrained does not apply to '{model}', which brings its own weights: leave it out")
    automatic = _config_says_quick_gelu(model) or model.lower().endswith(".openai")
    return TeacherIdentity(model, weights, sha256_file(weights), automatic if quick_gelu is None else quick_gelu)


def _config_teacher(name: str, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """A model-config JSON file: registered with open_clip under its file stem, its content recorded (later
    stages rebuild the model from that, without the file)."""
    path = Path(name)
    if not path.is_file():
        raise UserError(f"teacher config '{name}' does not exist")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"teacher config '{name}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
        raise UserError(f"teacher config '{name}' is not an open_clip config (embed_dim, vision_cfg, text_cfg)")
    register_config(path.stem, canonical_json(config))
    return _chosen_weights(path.stem, _REGISTERED[path.stem], pretrained, quick_gelu)


def _open_clip_teacher(name: str, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """A model open_clip knows by name (a config registered here before under that name included)."""
    if name not in open_clip.list_models():
        raise UserError(f"unknown teacher '{name}': not an open_clip name, hf-hub:, local-dir: nor a config JSON")
    return _chosen_weights(name, _REGISTERED.get(name), pretrained, quick_gelu)


def _chosen_weights(model: str, config: str | None, pretrained: str | None, quick_gelu: bool | None) -> TeacherIdentity:
    """A named or config teacher with the weights --pretrained chooses: none, a file, or a tag ('openai')."""
    automatic = _config_says_quick_gelu(model)
    if pretrained is not None and pretrained.lower() in ("none", ""):
        tag, sha = None, None
    elif pretrained is not None and Path(pretrained).is_file():
        tag, sha = str(Path(pretrained).resolve()), sha256_file(pretrained)
        openai_archive = is_openai_archive(pretrained)
        if quick_gelu is None and model in BOTH_KINDS and not openai_archive:
            raise UserError(
                f"--pretrained {pretrained}: {model} weights exist with QuickGELU (OpenAI's, also as "
                f"open_clip_pytorch_model.bin on the hub) and with GELU (LAION, DataComp, ...): pass --quick-gelu "
                f"for OpenAI weights, --no-quick-gelu for the others"
            )
        automatic = automatic or openai_archive
    else:
        pretrained = pretrained or "openai"
        tag_cfg = get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none known"
            raise UserError(
                f"--pretrained '{pretrained}' is neither a weights file nor an open_clip tag of {model} ({known})"
            )
        tag, sha = pretrained, None
        automatic = automatic or bool(tag_cfg.get("quick_gelu"))
    return TeacherIdentity(model, tag, sha, automatic if quick_gelu is None else quick_gelu, config)


LOADERS = {HF_HUB: _hub_teacher, LOCAL_DIR: _folder_teacher, CONFIG: _config_teacher, OPEN_CLIP: _open_clip_teacher}


def _config_says_quick_gelu(model: str) -> bool:
    return bool((open_clip.get_model_config(model) or {}).get("quick_gelu", False))


def register_config(name: str, config: str) -> None:
    """Make a config-JSON teacher known to open_clip under `name`, from its content (no file needed)."""
    if _REGISTERED.get(name) == config:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(config)
        open_clip.add_model_config(path)  # open_clip keeps the parsed config after the file is gone
    _REGISTERED[name] = config


def is_openai_archive(path: str | Path) -> bool:
    """OpenAI's original CLIP checkpoints are TorchScript archives (their code under */code/)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def create_clip(identity: TeacherIdentity, device: torch.device) -> torch.nn.Module:
    """The whole open_clip model (image and text towers) in eval mode, fp32, on `device`.

    A config-JSON teacher is rebuilt from the config content the identity holds; a hub or folder teacher
    from its own config and weights. Random weights (pretrained None) are drawn from a fixed seed, so every
    process that asks for the same random teacher (a resumed build, a Dask worker, a test) gets the same one.
    """
    if identity.config:
        register_config(identity.model, identity.config)
    elif not identity.brings_weights and identity.model not in open_clip.list_models():
        raise UserError(
            f"teacher '{identity.model}' is not an open_clip model and no config was recorded with it: "
            "pass --teacher CONFIG.json"
        )
    pretrained = None if identity.brings_weights else identity.pretrained
    logging.disable(logging.ERROR)  # open_clip logs what we report as one line below, and its info chatter
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_TEACHER_SEED)
            model = open_clip.create_model(
                identity.model, pretrained=pretrained, device=device, quick_gelu=identity.quick_gelu
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
        cfg = clip.visual.preprocess_cfg  # set by open_clip for every tower, timm ones included
        height, width = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
        if height != width:
            raise UserError(f"teacher {identity.model} takes {height}x{width} images; zs-cache feeds square views")
        self.view_size = int(height)
        self.mean = tuple(float(m) for m in cfg["mean"])
        self.std = tuple(float(s) for s in cfg["std"])
        self.embed_dim = self._output_size()
        self.forward = torch.compile(self.tower) if compile and device.type == "cuda" else self.tower

    @torch.inference_mode()
    def _output_size(self) -> int:
        """The embedding size, from one forward pass: only some towers have an output_dim attribute."""
        probe = torch.zeros(1, 3, self.view_size, self.view_size, device=self.device, dtype=self.dtype)
        try:
            output = self.tower(probe)  # (1, D)
        except Exception as exc:  # e.g. a timm trunk built for another input size than the config's image_size
            raise UserError(
                f"teacher {self.identity.model}: its image tower fails on {self.view_size}px input, the size its "
                f"preprocess config gives: {first_line(exc)}"
            ) from None
        return int(output.shape[-1])

    def format(self) -> TeacherFormat:
        return TeacherFormat(self.view_size, self.mean, self.std, self.embed_dim, self.device.type)

    @torch.inference_mode()
    def views(self, crops: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
        """crops: (B, S, S, 3) uint8 on the device -> (B, V, 3, T, T) normalised views in the tower's dtype."""
        return grid_views(crops, grids, self.view_size, self.mean, self.std, self.dtype)

    @torch.inference_mode()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """views: (N, 3, T, T) normalised, in the tower's dtype, on the device -> (N, D) float16 on the device."""
        return self.forward(views.to(self.dtype)).to(torch.float16)

    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
        """crops: (B, S, S, 3) uint8 (any device) -> (B, V, D) float16 on the CPU; all B * V views in one pass."""
        crops = crops.to(self.device, non_blocking=True)
        views = self.views(crops, grids)  # (B, V, 3, T, T)
        batch, num_views = views.shape[:2]
        embeddings = self.encode_views(views.flatten(0, 1))  # (B * V, D)
        return embeddings.view(batch, num_views, -1).cpu()

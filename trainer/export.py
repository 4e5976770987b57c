"""A trained model, loaded from wherever it lies (`load_trained_model`: a checkpoint, a run folder, an export
folder), and the export that lets it leave zeroseg: `zs-train export` writes DIR/model.safetensors,
DIR/config.json and DIR/README.md (the model card, trainer.model_card) — the files the Hugging Face Hub serves, so
an export pushed there (`--push-to-hub REPO`) loads by `Segmenter.from_pretrained("ORG/REPO")`.

model.safetensors holds the weights only: the state dict of ZeroSeg (trainer.model), float tensors as trained.
config.json holds no absolute path:

    format          EXPORT_FORMAT ("zeroseg-export-1"); a folder of another format is refused in one line
    model_config    ModelConfig dict (rebuilds the architecture)
    teacher         the CLIP whose space g and z live in, whose text tower labels segments: open_clip model
                    name, pretrained tag (None for random weights or a weights file), weights_file (the file's
                    name) and weights_sha256 when trained from a file, quick_gelu, and config: "teacher/<model>.json" (a
                    copy, named so open_clip registers it under the same model name) when the teacher is a
                    model-config JSON rather than a built-in open_clip name (the content the checkpoint recorded)
    preprocessing   the input normalisation (mean, std) and image_size of training
    step            optimizer steps of the checkpoint exported; source: that checkpoint's file name
    architecture,   what timm needs to build the encoder: a timm model name, and the arguments that make it this
    model_args,     encoder (VisionTransformer: sizes, no class token, no learned positions, no head), and timm's
    pretrained_cfg  input_size, mean/std, interpolation (the weights file also holds the decoder and grouping
                    head, so load the encoder keys as below rather than with timm.create_model(pretrained=True))
    files           sha256 of the files it loads (model.safetensors, the teacher config copy; not the model card)
    checksum        sha256 of this document's canonical JSON, itself left out (`document_digest`)

A flipped bit in a weight or an edited pixel mean, which would load without a word, makes the export "damaged"
(one line naming the file). Paths in config.json are resolved inside the export folder, refused otherwise.

Encoder key layout. The keys `patch_embed.proj.*`, `blocks.<i>.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`
and `norm.*` are a plain pre-norm ViT without class token: they load with strict=True into
`timm.models.vision_transformer.VisionTransformer(patch_size=p, embed_dim=D, depth=L, num_heads=H,
class_token=False, pos_embed="none", global_pool="", num_classes=0)`. The positional embedding is the fixed
2-D sin-cos of trainer.vit.sincos_pos_embed_2d over the training grid (image_size / patch_size square; not a
weight); at any other input size zeroseg resizes that table bicubically (trainer.vit.interpolate_pos_embed:
align_corners=False, no antialias), which is timm's `resample_abs_pos_embed(table, new_size, old_size,
num_prefix_tokens=0, interpolation="bicubic", antialias=False)`, never a sin-cos table of the new grid. Add it
to timm's patch_embed output. The other keys
are the reconstruction decoder (decoder_*, mask_token), the grouping head (seg_embed, grouping_stages,
segment_blocks, seg_norm) and the projections into the teacher's space (segment_proj, global_*).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from zeroseg.errors import DAMAGED, UserError, first_line
from zeroseg.io import atomic_path, canonical_sha256, inside, remove_dead_partials, sha256_file, write_atomically
from zeroseg.pipeline.teacher_identity import TeacherIdentity
from zeroseg.trainer.checkpoint import read_checkpoint, read_newest_checkpoint
from zeroseg.trainer.model import ZeroSeg
from zeroseg.trainer.model_card import CARD_FILE, model_card
from zeroseg.trainer.model_config import ModelConfig

EXPORT_FORMAT = "zeroseg-export-1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEACHER_DIR = "teacher"
DOCUMENT_KEYS = ("model_config", "teacher", "preprocessing", "step", "source", "files", "checksum")


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ZeroSeg, dict[str, Any]]:
    """A trained ZeroSeg in eval mode on `device`, and its metadata.

    path: a checkpoint file, a run directory (its latest checkpoint) or an export folder (`export_model`). The
    metadata dict holds step, model_config, store and path (the file read), and for a checkpoint also
    effective_batch, world_size, config and loss_config.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():  # an export folder
        return load_export(path, device)
    path, payload = read_newest_checkpoint(path) if path.is_dir() else (path, read_checkpoint(path))
    model = ZeroSeg(ModelConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    metadata = {key: value for key, value in payload.items() if key not in ("model", "optimizer", "rng", "format")}
    return model, {**metadata, "path": str(path)}


def export_model(source: str | Path, out_dir: str | Path) -> Path:
    """Write the model of a checkpoint (or a run folder's latest one) to out_dir; returns out_dir."""
    model, meta = load_trained_model(source, "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / TEACHER_DIR):  # what a killed export was writing
        remove_dead_partials(folder)
    teacher = dict(meta["store"]["teacher"])
    config = TeacherIdentity.from_dict(teacher, f"checkpoint '{source}': store.teacher").config  # canonical JSON
    config_copy = f"{TEACHER_DIR}/{teacher['model']}.json"
    if teacher["config"] and config is None:
        raise UserError(f"the teacher's model config {teacher['config']} recorded in the checkpoint is not here")
    if config:
        (out / config_copy).parent.mkdir(exist_ok=True)
        write_atomically(out / config_copy, json.dumps(json.loads(config), indent=1) + "\n")
    pretrained = teacher["pretrained"]
    from_file = pretrained is not None and Path(pretrained).is_absolute()
    document = {
        "format": EXPORT_FORMAT,
        "model_config": model.cfg.to_dict(),
        "teacher": {
            "model": teacher["model"],
            "pretrained": None if from_file else pretrained,
            "weights_file": Path(pretrained).name if from_file else None,
            "weights_sha256": teacher["weights_sha256"],
            "quick_gelu": teacher["quick_gelu"],
            "config": config_copy if config else None,
        },
        "preprocessing": {**meta["store"]["preprocessing"], "image_size": model.cfg.image_size},
        "step": meta["step"],
        "source": Path(meta["path"]).name,
        **timm_fields(model.cfg, meta["store"]["preprocessing"]),
    }
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    try:
        with atomic_path(out / WEIGHTS_FILE) as partial:
            save_file(state, str(partial), metadata={"format": EXPORT_FORMAT})
    except SafetensorError as exc:  # a full disk among them
        raise UserError(f"exported weights {out / WEIGHTS_FILE} could not be written: {first_line(exc)}") from None
    files = [WEIGHTS_FILE, config_copy] if config else [WEIGHTS_FILE]
    document["files"] = {name: sha256_file(out / name) for name in files}
    document["checksum"] = document_digest(document)
    write_atomically(out / CONFIG_FILE, json.dumps(document, indent=1) + "\n")
    write_atomically(out / CARD_FILE, model_card(document, meta))
    return out


def document_digest(document: dict[str, Any]) -> str:
    """sha256 of config.json's content (canonical JSON, its "checksum" left out): an edited mean is damage."""
    return canonical_sha256({k: v for k, v in document.items() if k != "checksum"})


def timm_fields(cfg: ModelConfig, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """config.json's architecture, model_args and pretrained_cfg: timm.create_model(architecture, **model_args)
    builds a VisionTransformer that takes the encoder keys with strict=True."""
    model_args = {
        "img_size": cfg.image_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans, "embed_dim": cfg.embed_dim,
        "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio, "class_token": False,
        "pos_embed": "none", "global_pool": "", "num_classes": 0,
    }  # fmt: skip
    pretrained_cfg = {
        "input_size": [cfg.in_chans, cfg.image_size, cfg.image_size], "interpolation": "bicubic", "crop_pct": 1.0,
        "mean": list(preprocessing["mean"]), "std": list(preprocessing["std"]), "num_classes": 0,
        "first_conv": "patch_embed.proj",
    }  # fmt: skip
    return {"architecture": "vit_base_patch16_224", "model_args": model_args, "pretrained_cfg": pretrained_cfg}


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[ZeroSeg, dict[str, Any]]:
    """An exported ZeroSeg in eval mode, and metadata shaped like load_trained_model's of a checkpoint: step, path,
    model_config and store (teacher identity with paths resolved inside the export folder, preprocessing)."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        document = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"exported model config {config_file} cannot be read: {exc}") from None
    if not isinstance(document, dict) or "format" not in document:
        raise UserError(f"{config_file} is not a zeroseg export: it has no format")
    if document["format"] != EXPORT_FORMAT:
        raise UserError(
            f"{config_file} is an export of format {document['format']!r}; this zeroseg reads format {EXPORT_FORMAT}"
        )
    missing = [key for key in DOCUMENT_KEYS if key not in document]
    if missing:
        raise UserError(f"{config_file} has no key '{missing[0]}' ({DAMAGED})")
    if document["checksum"] != document_digest(document):
        raise UserError(f"exported model config {config_file} is damaged: its contents do not match its checksum")
    for name, sha256 in document["files"].items():
        file = inside(path, name, config_file)
        try:
            intact = sha256_file(file) == sha256
        except OSError as exc:
            raise UserError(f"exported file {path / name} cannot be read: {exc.strerror}") from None
        if not intact:
            raise UserError(f"exported file {path / name} is damaged: its sha256 differs from the one in {config_file}")
    try:
        state = load_file(str(weights_file))
    except (OSError, SafetensorError) as exc:
        raise UserError(f"exported weights {weights_file} cannot be read: {exc}") from None
    model = ZeroSeg(ModelConfig.from_dict(document["model_config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"exported weights {weights_file} do not fit its config.json: {first}") from None
    model.to(device).eval()
    exported = document["teacher"]
    weights = exported["weights_file"]
    teacher = {
        "model": exported["model"],
        "pretrained": str(inside(path, weights, config_file)) if weights else exported["pretrained"],
        "weights_sha256": exported["weights_sha256"],
        "quick_gelu": exported["quick_gelu"],
        "config": _read_teacher_config(inside(path, exported["config"], config_file)) if exported["config"] else None,
    }
    preprocessing = {key: value for key, value in document["preprocessing"].items() if key != "image_size"}
    store = {"teacher": teacher, "preprocessing": preprocessing}
    return model, {"step": document["step"], "model_config": document["model_config"], "store": store,
                   "path": str(path)}


def _read_teacher_config(config_file: Path) -> dict:
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"exported teacher config {config_file} cannot be read: {exc}") from None

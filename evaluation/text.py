"""Class text embeddings from the CLIP text tower, cached on disk.

A class's embedding is the mean over the prompt templates of the L2-normalised embeddings of
template.format(name), L2-normalised again. The cache file (<key>.pt in the cache directory) is keyed
by a hash of the teacher identity, a fingerprint of the text projection's weights (so weights that
differ under one identity, e.g. random ones, never share an entry), the class names and the templates.
"""

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from zeroseg.io import atomic_path
from zeroseg.pipeline.teacher_identity import TeacherIdentity

DEFAULT_TEMPLATES = ("a photo of a {}.",)
OPENAI_TEMPLATES = tuple(template("{}") for template in open_clip.OPENAI_IMAGENET_TEMPLATES)  # 80
TEMPLATE_SETS = {"single": DEFAULT_TEMPLATES, "openai80": OPENAI_TEMPLATES}  # the names --templates accepts


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zeroseg" / "text"


def text_cache_key(
    identity: TeacherIdentity, weights_fingerprint: str, class_names: Sequence[str], templates: Sequence[str]
) -> str:
    payload = {
        "model": identity.model,
        "weights": identity.weights_sha256 or identity.pretrained,
        "quick_gelu": identity.quick_gelu,
        "weights_fingerprint": weights_fingerprint,
        "class_names": list(class_names),
        "templates": list(templates),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def class_text_embeddings(
    model: torch.nn.Module,
    identity: TeacherIdentity,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    cache_dir: str | Path | None = None,
    prompts_per_batch: int = 1024,
) -> torch.Tensor:
    """[C, D] float32 unit-norm class embeddings on the CPU, from `model.encode_text` (an open_clip model).

    Read from cache_dir (default ~/.cache/zeroseg/text) when present, else computed and stored.
    """
    key = text_cache_key(identity, _weights_fingerprint(model), class_names, templates)
    path = Path(cache_dir or default_cache_dir()) / f"{key}.pt"
    cached = _read_cache(path, class_names, templates)
    if cached is not None:
        return cached
    embeddings = _encode(model, identity.model, class_names, templates, prompts_per_batch)
    entry = {"embeddings": embeddings, "class_names": list(class_names), "templates": list(templates)}
    _write_cache(path, entry)
    return embeddings


@torch.inference_mode()
def _encode(
    model: torch.nn.Module, model_name: str, class_names: Sequence[str], templates: Sequence[str], step: int
) -> torch.Tensor:
    tokenizer = open_clip.get_tokenizer(model_name)
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]  # class-major
    per_prompt = torch.cat(
        [
            F.normalize(model.encode_text(tokenizer(prompts[i : i + step]).to(device)).float(), dim=-1)
            for i in range(0, len(prompts), step)
        ]
    )  # [C * T, D]
    per_class = per_prompt.view(len(class_names), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(per_class, dim=-1).cpu()


def _weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the text projection weights (empty when the model has none by that name)."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if name.endswith("text_projection"):
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: Path, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a zip, not a pickle: any damage means recompute and overwrite
        warnings.warn(f"text-embedding cache '{path}' is damaged ({type(exc).__name__}): rebuilding it", stacklevel=3)
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("embeddings"), torch.Tensor):
        warnings.warn(f"text-embedding cache '{path}' is not a cache entry: rebuilding it", stacklevel=3)
        return None
    if entry.get("class_names") != list(class_names) or entry.get("templates") != list(templates):
        return None
    return entry["embeddings"]


def _write_cache(path: Path, entry: dict) -> None:
    """Atomic (temporary file + rename); a cache that cannot be written only costs a warning."""
    try:
        with atomic_path(path) as partial:
            torch.save(entry, partial)
    except OSError as exc:
        warnings.warn(f"text embeddings not cached: {exc}", stacklevel=3)

"""A teacher, named and recorded: a --teacher string parsed once into (schema, id), as open_clip's
factory.parse_model_name splits its names, and what a store and a checkpoint record about the teacher it
became (pipeline.teacher holds one loader per schema). Light to import, so that reading a store's metadata or
printing --help needs neither torch nor open_clip."""

import json
import os
from dataclasses import asdict, dataclass

from zeroseg.configs import TEACHER_SUFFIXES, shipped_config
from zeroseg.errors import DAMAGED, UserError, recorded_fields
from zeroseg.io import canonical_json

HF_HUB = "hf-hub"  # hf-hub:ORG/REPO: open_clip_config.json and weights in the Hugging Face cache
LOCAL_DIR = "local-dir"  # local-dir:FOLDER: open_clip_config.json and a weights file in FOLDER
CONFIG = "config"  # a model-config JSON's path (*.json, or with a folder); a shipped one's name names its file
OPEN_CLIP = "open_clip"  # a model open_clip knows by name, e.g. ViT-L-14
BUNDLED = (HF_HUB, LOCAL_DIR)  # written as a prefix; they bring their own weights, which open_clip finds


def parse_teacher_name(name: str) -> tuple[str, str]:
    """(schema, id): ('hf-hub', 'ORG/REPO'), ('local-dir', 'FOLDER'), ('config', a path; for the name of a
    config shipped with zeroseg, its file) or ('open_clip', name)."""
    for schema in BUNDLED:
        if name.startswith(f"{schema}:"):
            identifier = name.removeprefix(f"{schema}:")
            if not identifier:
                raise UserError(f"teacher '{name}' names nothing after '{schema}:'")
            return schema, identifier
    if name.endswith(".json") or os.sep in name:
        return CONFIG, name
    shipped = shipped_config(name, TEACHER_SUFFIXES)
    return (CONFIG, str(shipped)) if shipped else (OPEN_CLIP, name)


@dataclass(frozen=True)
class TeacherIdentity:
    """What a store records about its teacher; two builds must agree on it to share a store."""

    model: str  # the name open_clip builds: its own, a config's stem, hf-hub:ORG/REPO or local-dir:/ABSOLUTE/FOLDER
    pretrained: str | None  # open_clip tag, absolute weights path, or None for random weights
    weights_sha256: str | None
    quick_gelu: bool
    config: str | None = None  # canonical JSON of the model config when it came from a config file

    @property
    def brings_weights(self) -> bool:
        """A hub or folder teacher: open_clip finds its weights where it lives, on any machine."""
        return parse_teacher_name(self.model)[0] in BUNDLED

    def to_dict(self) -> dict:
        """As stores and checkpoints record it: the config as a JSON object."""
        return {**asdict(self), "config": json.loads(self.config) if self.config else None}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "TeacherIdentity":
        """From to_dict's layout, as read back from a store or checkpoint (`where` names it in a UserError)."""
        values = recorded_fields(cls, values, where)
        config = values.get("config", "absent")
        if not (config is None or isinstance(config, dict)):
            raise UserError(f"{where}: 'config' is not a model config (a JSON object) nor null ({DAMAGED})")
        values["config"] = canonical_json(config) if config else None
        return cls(**values)

    def same_teacher(self, other: "TeacherIdentity") -> bool:
        """Weights files are compared by content, so a moved file is still the same teacher."""
        if self.weights_sha256 or other.weights_sha256:
            same_weights = self.weights_sha256 == other.weights_sha256
        else:
            same_weights = self.pretrained == other.pretrained
        same_model = (self.model, self.quick_gelu, self.config) == (other.model, other.quick_gelu, other.config)
        return same_model and same_weights

    def describe(self) -> str:
        """One line for logs: model, weights and activation."""
        weights = self.pretrained or "none (random weights)"
        return f"{self.model} pretrained={weights} quick_gelu={self.quick_gelu}"


"""What a store and a checkpoint record about the CLIP teacher (pipeline.teacher loads it): light to import, so
that reading a store's metadata needs neither torch nor open_clip."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from zeroseg.errors import recorded_fields


@dataclass(frozen=True)
class TeacherIdentity:
    """What a store records about its teacher; two builds must agree on it to share a store."""

    model: str  # open_clip name, config stem, hf-hub:ORG/REPO or local-dir:/ABSOLUTE/FOLDER
    pretrained: str | None  # open_clip tag, absolute weights path, or None for random weights
    weights_sha256: str | None
    quick_gelu: bool
    config: str | None = None  # canonical JSON of the model config when it came from a config file

    def to_dict(self) -> dict:
        """As stores and checkpoints record it: the config as a JSON object."""
        return {**asdict(self), "config": json.loads(self.config) if self.config else None}

    @classmethod
    def from_dict(cls, values: dict, where: str) -> "TeacherIdentity":
        """From to_dict's layout, as read back from a store or checkpoint (`where` names it in a UserError). Stores
        made before the config was recorded lack it; older ones recorded the config file's path, read here."""
        values = recorded_fields(cls, values, where)
        config = values.get("config")
        if isinstance(config, dict):
            values["config"] = canonical_json(config)
        elif isinstance(config, str) and not config.startswith("{"):
            legacy = Path(config)
            values["config"] = canonical_json(json.loads(legacy.read_text())) if legacy.is_file() else None
        return cls(**values)

    def same_teacher(self, other: "TeacherIdentity") -> bool:
        """Weights files are compared by content, so a moved file is still the same teacher."""
        if self.weights_sha256 or other.weights_sha256:
            same_weights = self.weights_sha256 == other.weights_sha256
        else:
            same_weights = self.pretrained == other.pretrained
        same_config = self.config == other.config or None in (self.config, other.config)
        return self.model == other.model and same_weights and self.quick_gelu == other.quick_gelu and same_config

    def describe(self) -> str:
        """One line for logs: model, weights and activation."""
        weights = self.pretrained or "none (random weights)"
        return f"{self.model} pretrained={weights} quick_gelu={self.quick_gelu}"


def canonical_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))

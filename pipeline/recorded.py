"""Reading back the plain dicts that stores and checkpoints record: the fields of one of our frozen
dataclasses, their keys checked, so that an old or damaged record is one line naming it (not a TypeError)."""

from dataclasses import MISSING, fields
from typing import Any

from zeroseg.pipeline.errors import UserError

DAMAGED = "damaged, or written by another zeroseg version"


def recorded_fields(cls: type, values: Any, where: str) -> dict[str, Any]:
    """`values` as keyword arguments of dataclass `cls`: a dict holding every field without a default and no
    other key; UserError naming `where` (e.g. "store 'x': attribute zeroseg.teacher") otherwise."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: a {type(values).__name__}, not a JSON object ({DAMAGED})")
    known = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    unknown = sorted(set(values) - set(known), key=str)
    missing = [name for name in required if name not in values]
    if unknown or missing:
        problem = f"unknown key '{unknown[0]}'" if unknown else f"no key '{missing[0]}'"
        raise UserError(f"{where}: {problem} ({DAMAGED}; its keys are {', '.join(known)})")
    return dict(values)

"""The one exception type that the command-line tools turn into a one-line message and exit code 2, the helper
with which every options and config dataclass checks its fields in `__post_init__`, and the reading back of the
plain dicts that stores, checkpoints and exports record (an old or damaged record is one line naming it)."""

from dataclasses import MISSING, fields
from typing import Any

DAMAGED = "damaged, or written by another zeroseg version"


class UserError(Exception):
    """A mistake in the user's arguments or inputs (not a bug): printed as one line, exit code 2."""


def require(condition: object, message: str) -> None:
    """UserError(message) unless `condition` holds; the message names the field as the user spells it
    (`--batch-size` for a command-line option, `data.batch_size` for a config key)."""
    if not condition:
        raise UserError(message)


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message ("" when it has none)."""
    return (str(exc).strip().splitlines() or [""])[0]


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

"""The one exception type that the command-line tools turn into a one-line message and exit code 2, and the
helper with which every options and config dataclass checks its fields in `__post_init__`."""


class UserError(Exception):
    """A mistake in the user's arguments or inputs (not a bug): printed as one line, exit code 2."""


def require(condition: object, message: str) -> None:
    """UserError(message) unless `condition` holds; the message names the field as the user spells it
    (`--batch-size` for a command-line option, `data.batch_size` for a config key)."""
    if not condition:
        raise UserError(message)

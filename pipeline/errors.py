"""The one exception type that the command-line tools turn into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in the user's arguments or inputs (not a bug): printed as one line, exit code 2."""

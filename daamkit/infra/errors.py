"""The one exception type that means "the user gave bad input"; the CLI prints it as one line."""


class DaamkitError(Exception):
    """A user-facing error: bad path, bad option, missing weights. Message is shown as-is, no traceback."""

"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class BitbenchError(Exception):
    """A user-facing error: bad input, a missing file or package, a failed check. Its message is one line."""

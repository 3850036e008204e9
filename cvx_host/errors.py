"""The pack's user-facing error type."""


class PatchError(ValueError):
    """A user-facing error: names the node and input, says what was given and what to do."""

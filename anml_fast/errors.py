"""Errors that are the user's to fix (bad path, flag, file), reported as one line by the CLI."""


class AnmlFastError(Exception):
    """A problem with the user's input or files: the CLI prints its message alone and exits 2."""


class DataError(AnmlFastError):
    """The Omniglot folders or the prepared cache are missing or malformed."""


class CheckpointError(AnmlFastError):
    """A checkpoint or reference file cannot be read or does not hold what it should."""

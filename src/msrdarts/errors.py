"""The exception users see as a one-line message (the CLI prints it without a traceback)."""


class MsrdartsError(Exception):
    """A problem with the user's input or files, explained in one line."""


class ConfigError(MsrdartsError, ValueError):
    """An invalid setting: names the field and the allowed values."""


class DataError(MsrdartsError):
    """A data set that is missing or unreadable: names the file or folder."""


class CheckpointError(MsrdartsError):
    """A checkpoint or run folder that cannot be used: names the file and the mismatch."""

"""Every exception msrdarts raises on purpose. Users see each as one line (the CLI prints it without a
traceback); ``RunInterrupted`` also carries the exit status."""


class MsrdartsError(Exception):
    """A problem with the user's input or files, explained in one line."""


class ConfigError(MsrdartsError, ValueError):
    """An invalid setting: names the field and the allowed values."""


class DataError(MsrdartsError):
    """A data set that is missing or unreadable: names the file or folder."""


class CheckpointError(MsrdartsError):
    """A checkpoint or run folder that cannot be used: names the file and the mismatch."""


class WriteError(MsrdartsError):
    """A file could not be written (a full disk, a file-size limit, a read-only folder); the file it
    would have replaced is untouched."""


class GenotypeError(ConfigError):
    """A malformed genotype: the message names the field and the problem."""


class RunInterrupted(MsrdartsError):
    """The run stopped on request after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(MsrdartsError):
    """The loss or gradient became NaN or infinite."""


class NonFiniteLoss(RuntimeError):
    """Inside the epoch loop: the loss or the gradient norm became NaN or infinite (the run turns it
    into :class:`Diverged` with a resume hint)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most ``limit`` characters), or its type's name when
    the message is empty: what a one-line message quotes of an underlying error."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__

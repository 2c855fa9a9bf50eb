"""The one exception type for mistakes a user can make.

The CLI prints its message as one paragraph and exits with code 1 (no traceback unless
``--debug``). Library code raises it for bad input; programming errors stay ordinary
exceptions.
"""


class Bd3Error(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; exit with ``exit_code``
    (130 for SIGINT / Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cannot_write(path, error: Exception, advice: str = "choose a writable folder") -> Bd3Error:
    """The one-line error for a failed write to ``path``: an ``OSError`` (permissions, a
    read-only or full disk, a path the system refuses), or safetensors' ``SafetensorError``,
    which carries the OS error in its text. ``advice`` says what to do; a full disk always
    asks for space."""
    import errno
    import re

    code = getattr(error, "errno", None)
    reason = getattr(error, "strerror", None)
    if code is None:  # SafetensorError: '... I/O error: No space left on device (os error 28) ...'
        found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(error))
        code, reason = (int(found.group(2)), found.group(1)) if found else (None, str(error))
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = f"free some space there or {advice}"
    return Bd3Error(f"Could not write {path}: {reason or error}; {advice}.")

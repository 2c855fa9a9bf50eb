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

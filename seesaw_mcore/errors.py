"""Error types: problems a user can fix (bad config, bad checkpoint, bad input) and a stop
requested by a signal."""

import signal


class SeesawError(ValueError):
    """A user-facing error: its message is one line that says what to change.

    Entry points print ``error: <message>`` and exit non-zero instead of a traceback.
    """


class Interrupted(SeesawError):
    """A stop requested by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + self.signum

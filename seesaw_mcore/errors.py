"""Error type for problems a user can fix (bad config, bad checkpoint, bad input)."""


class SeesawError(ValueError):
    """A user-facing error: its message is one line that says what to change.

    Entry points print ``error: <message>`` and exit non-zero instead of a traceback.
    """

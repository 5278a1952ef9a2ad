"""User-facing errors.

Anything the user can fix (a bad config key, a missing prompt file, an unknown reward name,
a model id that is not available offline) is raised as :class:`GenrewardError`. The CLI prints
its message as one line and exits non-zero, instead of a traceback from deep inside a library.
"""

from __future__ import annotations


class GenrewardError(Exception):
    """An error caused by user input; its message is shown as one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(GenrewardError):
    """A config file or override is invalid (unknown key, wrong type, missing value)."""


class OfflineModelError(GenrewardError):
    """A model id is neither a local folder, a built-in tiny spec, nor in the local hub cache."""


class RunInterrupted(GenrewardError):
    """SIGINT/SIGTERM reached a trainer: it saved a checkpoint and stopped; the CLI exits with 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)

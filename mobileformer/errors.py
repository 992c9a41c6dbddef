"""The errors a user can fix: every command prints them as one line (mobileformer.cli)."""
from __future__ import annotations

USAGE_ERROR = 2  # the exit status of a problem the user can fix


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


class TrainingStopped(Exception):
    """Training ended early for a reason the message explains (divergence, a signal, a failed
    checkpoint write); `exit_code` is the process status."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code

"""The one error-handling entry point of every command (train, eval, export, predict, convert, reparam).

A problem the user can fix (a bad config value, a missing or corrupt file, a full disk, a diverged
run) is printed as one line `error: <sentence>` on stderr and the command exits with status 2 (an
interrupted training run: 130 for SIGINT, 143 for SIGTERM), never with a traceback. The traceback is
shown with `--debug` anywhere on the command line or with MOBILEFORMER_DEBUG=1 in the environment.
An exception of any other type is a bug: it keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional, Sequence

DEBUG_FLAG = '--debug'
DEBUG_ENV = 'MOBILEFORMER_DEBUG'
USAGE_ERROR = 2


class TrainingStopped(Exception):
    """Training ended early for a reason the message explains (divergence, a signal, a failed
    checkpoint write); `exit_code` is the process status."""

    def __init__(self, message: str, exit_code: int = USAGE_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# errors whose message is the whole story: ValueError covers ConfigError, OSError covers
# FileNotFoundError, PermissionError and a full disk (ENOSPC)
USER_ERRORS = (ValueError, OSError, TrainingStopped)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (worker errors arrive with several)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text += f" ('{error.filename}')"
    return text


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Calls `main(argv without --debug)`; returns its status (0 for None). A user error is printed
    as one line and raises SystemExit with its status, unless debugging is on (then it re-raises)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    try:
        return main([a for a in argv if a != DEBUG_FLAG]) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
        raise SystemExit(getattr(e, 'exit_code', USAGE_ERROR)) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print('error: interrupted (Ctrl-C)', file=sys.stderr, flush=True)
        raise SystemExit(130) from None

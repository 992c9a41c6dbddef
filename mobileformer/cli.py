"""The one error-handling entry point and the one argument parser of every command (train, eval,
export, predict, convert, reparam, flops, the benchmarks).

`CommandParser` gives every command the same flag style: each option is defined once, with one
dash (`-epochs`, `-data_path`), and is accepted as `-epochs`, `--epochs`, `-data_path`,
`--data_path` and `--data-path` alike.

A problem the user can fix (a bad config value, a missing or corrupt file, a full disk, a diverged
run) is printed as one line `error: <sentence>` on stderr and the command exits with status 2 (an
interrupted training run: 130 for SIGINT, 143 for SIGTERM), never with a traceback. The traceback is
shown with `--debug` (or `-debug`) anywhere on the command line or with MOBILEFORMER_DEBUG=1 in the environment.
An exception of any other type is a bug: it keeps its traceback.

In a `paddle.distributed.launch` run, a rank that fails writes its error to
<log_dir>/rank_failures.<launcher pid>.log. Every other rank on the machine watches that file and,
as soon as the error appears, prints `error: rank R: ... (this rank stopped because of it; see
that rank's workerlog)` and exits with status 2: it would otherwise wait in a collective until
gloo or NCCL times out and aborts the process, and the log the launcher points to would not name
the cause.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from typing import Callable, List, Optional, Sequence

from mobileformer.engine.distributed import rank
from mobileformer.errors import USAGE_ERROR, TrainingStopped

DEBUG_FLAGS = ('--debug', '-debug')
DEBUG_ENV = 'MOBILEFORMER_DEBUG'
FLAG_STYLE = 'Every option is accepted with one or two dashes (-data_path, --data_path, --data-path).'


def summary(doc: str) -> str:
    """The first paragraph of a module docstring on one line: a command's -h description."""
    return ' '.join(doc.strip().split('\n\n')[0].split())


class CommandParser(argparse.ArgumentParser):
    """argparse with the project's flag style (see the module docstring); its -h ends with a
    sentence saying so. Options are defined with one dash; two dashes are mapped to them before
    parsing, so help lists each option once."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault('epilog', FLAG_STYLE)
        super().__init__(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index('--') if '--' in args else len(args)  # after '--' every word is a value
        return super().parse_known_args([self._one_dash(a) for a in args[:end]] + args[end:], namespace)

    def _one_dash(self, arg: str) -> str:
        """`--name[=value]` (or `--na-me`) -> `-name[=value]` (`-na_me`) when that is an option."""
        if not arg.startswith('--'):
            return arg
        name, equals, value = arg[2:].partition('=')
        for candidate in ('-' + name, '-' + name.replace('-', '_')):
            if candidate in self._option_string_actions:
                return candidate + equals + value
        return arg


# errors whose message is the whole story: ValueError covers ConfigError, OSError covers
# FileNotFoundError, PermissionError and a full disk (ENOSPC)
USER_ERRORS = (ValueError, OSError, TrainingStopped)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return any(flag in argv for flag in DEBUG_FLAGS) or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (worker errors arrive with several)."""
    text = ' '.join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text += f" ('{error.filename}')"
    return text


def _failures_path() -> Optional[str]:
    """<log_dir>/rank_failures.<launcher pid>.log in a multi-process launch, else None: the ranks
    of one machine are children of one launcher, and a later launch never reads this one's file."""
    folder = os.environ.get('PADDLE_LOG_DIR')
    ranks = int(os.environ.get('PADDLE_TRAINERS_NUM', '1') or 1)
    return os.path.join(folder, f'rank_failures.{os.getppid()}.log') if folder and ranks > 1 else None


def _share_failure(error: BaseException) -> List[str]:
    """Records this rank's error for the other ranks; returns the errors other ranks recorded."""
    path = _failures_path()
    if path is None:
        return []
    others = _other_failures(path)
    try:
        with open(path, 'a', encoding='utf-8') as f:
            f.write(f'rank {rank()}: {type(error).__name__}: {one_line(error)}\n')
    except OSError:  # reporting must never hide the error itself
        pass
    return others


def _other_failures(path: str) -> List[str]:
    try:
        with open(path, encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if not line.startswith(f'rank {rank()}:')]
    except OSError:
        return []


def _stop_because_of_another_rank(other: str) -> str:
    return f"error: {other} (this rank stopped because of it; see that rank's workerlog)"


FAILURE_POLL_SECONDS = 0.2


def _watch_other_ranks() -> None:
    """Ends this process as soon as another rank records a failure (see the module docstring).
    A thread, because the main thread may be blocked inside a collective, which no Python signal
    handler or exception can interrupt."""
    path = _failures_path()
    if path is None:
        return

    def watch() -> None:
        while not os.path.exists(path) or not _other_failures(path):
            time.sleep(FAILURE_POLL_SECONDS)
        sys.stderr.write(_stop_because_of_another_rank(_other_failures(path)[0]) + '\n')
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(USAGE_ERROR)

    threading.Thread(target=watch, name='mobileformer-rank-watch', daemon=True).start()


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Calls `main(argv without --debug)`; returns its status (0 for None). A user error is printed
    as one line and raises SystemExit with its status, unless debugging is on (then it re-raises)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    _watch_other_ranks()
    try:
        return main([a for a in argv if a not in DEBUG_FLAGS]) or 0
    except Exception as e:
        others = _share_failure(e)
        if debug or not isinstance(e, USER_ERRORS):
            if not others:
                raise
            traceback.print_exc()
            code = 1
        else:
            print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
            code = getattr(e, 'exit_code', USAGE_ERROR)
        for other in others:  # last, where the launcher's tail of this log shows it
            print(_stop_because_of_another_rank(other), file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print('error: interrupted (Ctrl-C)', file=sys.stderr, flush=True)
        raise SystemExit(130) from None

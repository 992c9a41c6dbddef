"""One run per output folder: train.py and export.py hold an exclusive lock on the folder they write
for as long as they run, and a second run into it is refused in one sentence before it writes.

The lock is the kernel's (flock) on the file `.lock` in the folder, so it ends with its process
however that ends, SIGKILL and a crash included: a lock left by a dead process never stands in the
way. The file records who holds it (process id, host, start time, command) for the refusal, and is
deleted when the run ends normally. A process forked while the lock is held (a data-loader worker)
closes its copy at once, so a worker that outlives its parent for a moment does not keep the folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from typing import Iterator, Set

from mobileformer.checkpoint import check_writable

LOCK_FILE = '.lock'
_held: Set[int] = set()  # the descriptors of the locks this process holds


def _forget_in_child() -> None:
    # close, never unlock: the lock belongs to the open file the parent shares, and unlocking any
    # copy of it would release the parent's lock too
    for descriptor in _held:
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _describe_holder(text: str) -> str:
    """The holder a lock file's `text` records, as the refusal names it."""
    try:
        holder = json.loads(text)
        started = time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(holder['started']))
        return f"process {holder['pid']} on {holder['host']}, started {started}: {holder['command']}"
    except (ValueError, KeyError, TypeError):  # it has just taken the lock and not written yet
        return 'a process that has not recorded itself yet'


def _refusal(folder: str, holder: str) -> str:
    """The one sentence that refuses a run into `folder` while `holder` (_describe_holder) runs."""
    return (f"the output folder '{folder}' is in use by another run ({holder}); wait for it to end, stop it, "
            'or pass another -output')


def _record_holder(descriptor: int) -> None:
    record = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time(),
              'command': shlex.join([os.path.basename(sys.executable), *sys.argv])}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(record).encode(), 0)


def _lock(path: str, folder: str) -> int:
    """A descriptor of `path` holding its exclusive lock; OSError (the refusal) when another holds it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):  # e.g. a network disk without locks
                os.close(descriptor)
                raise OSError(f"cannot lock the output folder '{folder}' ({error.strerror}); pass -output with a "
                              'folder on a local disk') from None
            holder = _describe_holder(os.pread(descriptor, 65536, 0).decode(errors='replace'))
            os.close(descriptor)
            raise OSError(_refusal(folder, holder)) from None
        # the holder before us deletes the file on its way out: a lock on a deleted file guards nothing
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        os.close(descriptor)


@contextlib.contextmanager
def hold(folder: str) -> Iterator[None]:
    """Holds the lock of `folder` inside the block. Raises OSError with one sentence when another run
    holds it, or when `folder` cannot be written (checkpoint.check_writable, which creates it)."""
    check_writable(folder)
    path = os.path.join(folder, LOCK_FILE)
    descriptor = _lock(path, folder)
    _held.add(descriptor)
    try:
        _record_holder(descriptor)
        yield
    finally:
        _held.discard(descriptor)
        with contextlib.suppress(OSError):  # a lock file left behind is harmless: nobody holds its lock
            os.remove(path)  # while locked: a run that opened this file then retries on a new one
        os.close(descriptor)

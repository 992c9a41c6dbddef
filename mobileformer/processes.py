"""Child processes that end with the process that started them, however it ends (SIGKILL and the
kernel's out-of-memory killer included): nothing else would stop a data-loader worker whose parent
vanished, since the workers ignore the group's SIGINT/SIGTERM and Paddle's worker loop can block
for good reading a queue only the parent writes to; nor a compiler that Paddle's build starts
(through a shell and setup.py), which would go on writing into the build cache a new run uses.

The kernel's parent-death signal reaches a direct child only, so a child that starts a tree of its
own (`run_in_group`) leads a process group and ends the whole group when orphaned."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Sequence

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 1.0


def request_parent_death_signal(signum: int) -> bool:
    """Asks the kernel to send `signum` to this process when its parent ends, by any means
    (Linux's prctl); False where the platform has no such request."""
    if not sys.platform.startswith('linux'):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def end_when_orphaned(parent_pid: int, signum: int, end: Callable[[], None]) -> None:
    """Makes this process call `end` (which must end it) within moments of process `parent_pid`
    ending. `signum` becomes the parent-death signal where the kernel offers one; its handler acts
    only once the parent is gone, so the same signal sent to the whole group (a scheduler's
    SIGTERM) is still left to the parent. Elsewhere a thread polls the parent."""
    def orphaned() -> bool:
        return os.getppid() != parent_pid  # an orphan is adopted by init or a subreaper

    def on_signal(number: int, frame) -> None:
        if orphaned():
            end()

    signal.signal(signum, on_signal)
    if not request_parent_death_signal(signum):
        threading.Thread(target=_poll_parent, args=(orphaned, end), name='mobileformer-parent-watch',
                         daemon=True).start()
    if orphaned():  # the parent ended before the kernel knew whom to signal
        end()


def _poll_parent(orphaned: Callable[[], bool], end: Callable[[], None]) -> None:
    while not orphaned():
        time.sleep(PARENT_POLL_SECONDS)
    end()


def run_in_group(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Runs `command`, a Python process that calls `end_group_when_orphaned(<this process id>)`
    first, as the leader of a new process group, and returns its exit status. The group ends with
    this process: the child sees to that when this process dies, and this process when it is
    interrupted while waiting (a terminal's Ctrl-C no longer reaches the group)."""
    child = subprocess.Popen(list(command), env=dict(env), start_new_session=True)
    try:
        return child.wait()
    except BaseException:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise


def end_group_when_orphaned(parent_pid: int) -> None:
    """Called first by a child of `run_in_group`: when process `parent_pid` ends, by any means, this
    process ends its whole group, itself and every process it started and theirs."""
    end_when_orphaned(parent_pid, signal.SIGTERM, lambda: os.killpg(0, signal.SIGKILL))

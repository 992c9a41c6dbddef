"""Child processes that end with the process that started them, however it ends (SIGKILL and the
kernel's out-of-memory killer included): nothing else would stop a data-loader worker whose parent
vanished, since the workers ignore the group's SIGINT/SIGTERM and Paddle's worker loop can block
for good reading a queue only the parent writes to."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable

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

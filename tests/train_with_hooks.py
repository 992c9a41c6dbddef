"""Runs train.py's main() with test hooks installed, for the tests that need a separate process.

    PYTHONPATH=<repo> python tests/train_with_hooks.py HOOK [HOOK ...] -- TRAIN.PY ARGUMENTS
    PYTHONPATH=<repo> python -m paddle.distributed.launch ... tests/train_with_hooks.py HOOK -- ...

The production code carries no test switches: every fault and probe is installed here, through
the seams the code offers (train.main's extra callbacks, checkpoint.write_together's before_commit).

    fail_rank=R             rank R raises at its second training step
    hold=E:S:FILE           after batch S (1-based) of epoch E, create FILE (holding the process id;
                            {rank} in FILE becomes the rank), then wait until the run has received
                            SIGINT or SIGTERM (the test sends it, or SIGKILLs)
    hold_commit=N:FILE      the N-th checkpoint commit creates FILE with every temporary written,
                            then waits forever before its commit point (the test SIGKILLs)
    save_rank_weights=DIR   at the end of training, each rank saves its weights as DIR/rank<R>.pdparams
    digits_subset=N         the digits splits hold their first N images only (a shorter epoch)
"""
import os
import signal
import sys
import threading
from typing import List, Sequence

import train  # first: through mobileformer, it filters notices Paddle prints when imported
from mobileformer import checkpoint, engine
from mobileformer.data import sources

import paddle

SIGNAL_WAIT_SECONDS = 120


class FailOnRank(paddle.callbacks.Callback):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def on_train_batch_end(self, step: int, logs=None) -> None:
        if step == 1 and engine.rank() == self.rank:
            raise ValueError(f'test failure injected on rank {self.rank} at step {step}')


def touch(path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(str(os.getpid()))


def announce_and_wait_for_interrupt(path: str, seconds: float) -> bool:
    """Creates `path`, then blocks until SIGINT or SIGTERM has reached the run's own handler (the
    graceful stop), at most `seconds`; True if one did. The handlers are chained, so the run reacts
    exactly as it would, and chained before `path` exists: the test signals as soon as it sees it."""
    arrived = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        def chained(number, frame, run_handler=signal.getsignal(signum)):
            run_handler(number, frame)
            arrived.set()
        signal.signal(signum, chained)
    touch(path)
    return arrived.wait(seconds)  # a signal's handler runs while the main thread waits here


class HoldAt(paddle.callbacks.Callback):
    """Stops the run after a given batch until a signal arrives, so the test signals at a known step."""

    def __init__(self, epoch: int, step: int, path: str) -> None:
        super().__init__()
        self.epoch, self.step, self.current_epoch = epoch, step, 0
        self.path = path.replace('{rank}', str(engine.rank()))

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.current_epoch += 1

    def on_train_batch_end(self, step: int, logs=None) -> None:
        if (self.current_epoch, step + 1) != (self.epoch, self.step):
            return
        if not announce_and_wait_for_interrupt(self.path, SIGNAL_WAIT_SECONDS):
            raise RuntimeError(f'no signal arrived within {SIGNAL_WAIT_SECONDS} s of {self.path}')


def hold_commit(number: int, path: str) -> None:
    commits = [0]
    write_together = checkpoint.write_together

    def hold() -> None:
        touch(path)
        threading.Event().wait()

    def counting(items, before_commit=None):
        commits[0] += 1
        write_together(items, hold if commits[0] == number else before_commit)

    checkpoint.write_together = counting


class SaveRankWeights(paddle.callbacks.Callback):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def on_train_end(self, logs=None) -> None:
        paddle.save(self.model.network.state_dict(), os.path.join(self.folder, f'rank{engine.rank()}.pdparams'))


def digits_subset(size: int) -> None:
    load_digits = sources.load_digits

    def first(mode: str) -> sources.ArraySource:
        full = load_digits(mode)
        return sources.ArraySource(full.images[:size], full.labels[:size], full.classes)

    sources.load_digits = first


def install(faults: Sequence[str]) -> List[paddle.callbacks.Callback]:
    callbacks = []
    for fault in faults:
        name, _, value = fault.partition('=')
        if name == 'fail_rank':
            callbacks.append(FailOnRank(int(value)))
        elif name == 'hold':
            epoch, step, path = value.split(':', 2)
            callbacks.append(HoldAt(int(epoch), int(step), path))
        elif name == 'hold_commit':
            number, path = value.split(':', 1)
            hold_commit(int(number), path)
        elif name == 'digits_subset':
            digits_subset(int(value))
        elif name == 'save_rank_weights':
            callbacks.append(SaveRankWeights(value))
        else:
            raise SystemExit(f'unknown hook {fault!r}')
    return callbacks


if __name__ == '__main__':
    split = sys.argv.index('--')
    sys.exit(train.main(sys.argv[split + 1:], install(sys.argv[1:split])))

"""Data loaders: distributed samplers (never a plain DataLoader: each rank reads its own shard) that
resume mid-epoch, and loaders that survive bad samples, dying workers and signals."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import weakref
from typing import Callable, List, Optional

import numpy as np
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from paddle.io.multiprocess_utils import _cleanup_mmap

from mobileformer.engine.distributed import derived_seed, world_size
from mobileformer.errors import TrainingStopped
from mobileformer.processes import end_when_orphaned

INTERRUPTS = (signal.SIGTERM, signal.SIGINT)


class ResumableBatchSampler(DistributedBatchSampler):
    """A DistributedBatchSampler that leaves out `skip` batches at the start of the next epoch only
    (a run resumed from a mid-epoch checkpoint); `offset` is how many the running epoch left out."""

    skip, offset = 0, 0

    def __iter__(self):
        self.offset, self.skip = self.skip, 0
        batches = super().__iter__()
        for _ in range(self.offset):
            next(batches, None)
        yield from batches

    def __len__(self) -> int:
        return super().__len__() - (self.skip or self.offset)


class GuardedDataset(Dataset):
    """Wraps a dataset so that reading a sample never raises inside the DataLoader (an exception
    there hangs paddle's single-process loader and turns into an anonymous SystemError with
    workers). A sample that fails is replaced by the next readable one and flagged with its index
    + 1 in a third field, which `SafeLoader` turns into a skip notice or a clear error.

    Python's `random` (every per-sample augmentation draws from it) is seeded from (`seed`, index)
    before each sample: its augmentation depends on neither the worker that reads it nor the
    samples read before it, so a run resumed mid-epoch (which skips the epoch's first batches)
    augments the rest exactly as an uninterrupted run does. `seed` is the sampler's epoch seed."""

    seed = 0

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        random.seed(derived_seed(self.seed, index))
        for attempt in range(len(self.dataset)):
            try:
                image, label = self.dataset[(index + attempt) % len(self.dataset)]
                return image, label, np.int64(index + 1 if attempt else 0)
            except Exception:  # reported by SafeLoader in the main process, with the file's path
                continue
        raise RuntimeError('no sample of the dataset can be read')


def sample_path(dataset: Dataset, index: int) -> Optional[str]:
    """The sample's file when the dataset reads files (ImageFiles), else None."""
    paths = getattr(dataset, 'paths', None)
    return str(paths[index]) if paths is not None else None


def sample_error(dataset: Dataset, index: int) -> str:
    """Why sample `index` cannot be read, by reading it again in this process."""
    try:
        dataset[index]
    except Exception as e:  # any failure of a user's file or dataset code is reported as text
        return ' '.join(str(e).split()) or type(e).__name__
    return 'it failed in a worker process only'


def _end_worker() -> None:
    """Ends a worker whose main process is gone, after Paddle's own worker clean-up (the
    shared-memory files of its batches), at once: a normal exit would wait for queue threads that
    can no longer deliver."""
    _cleanup_mmap()
    os._exit(1)


def start_worker(worker_id: int) -> None:
    """worker_init_fn. Ctrl-C and cluster schedulers signal every process of the group or job, and
    a worker killed by SIGINT/SIGTERM makes paddle abort the main process mid-step: workers leave
    both to the main process (GracefulStop saves a checkpoint), which stops them when it is done.
    A worker whose main process died (SIGKILL, out of memory) ends by itself within moments."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_when_orphaned(multiprocessing.parent_process().pid, signal.SIGTERM, _end_worker)


class SafeLoader(DataLoader):
    """DataLoader over a GuardedDataset: a bad sample is skipped with a notice (skip_bad) or stops
    the run with its path; a worker that dies becomes one clear error instead of a SystemError."""

    def __init__(self, dataset: Dataset, batch_sampler: DistributedBatchSampler, num_workers: int,
                 skip_bad: bool, log: Callable[[str], None]) -> None:
        super().__init__(GuardedDataset(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                         return_list=True, worker_init_fn=start_worker)
        self.samples, self.skip_bad, self.log = dataset, skip_bad, log
        self.skipped: List[int] = []
        self._passes: 'weakref.WeakSet' = weakref.WeakSet()

    def __iter__(self):
        batches = self._batches()
        self._passes.add(batches)
        return batches

    def stop_workers(self) -> None:
        """Ends every unfinished pass over the data and its worker processes. Call it when the
        consumer stopped early (an exception, a signal): the workers ignore SIGTERM, so exiting
        with them alive would wait for them forever."""
        for batches in list(self._passes):
            batches.close()

    def _batches(self):
        self.dataset.seed = self.batch_sampler.epoch  # before super().__iter__() copies it into the workers
        batches = super().__iter__()
        try:
            while True:
                try:
                    images, labels, failed = next(batches)
                except StopIteration:
                    return
                except SystemError:  # paddle's only sign that a worker process exited
                    raise TrainingStopped('a data loader worker process died (often killed for lack of memory); '
                                          'lower DATA.NUM_WORKERS or the batch size, then resume with -resume '
                                          'auto') from None
                for index in sorted({int(i) - 1 for i in failed.numpy() if i}):
                    self._bad_sample(index)
                yield [images, labels]
        finally:
            # at once, not when the garbage collector finds the iterator (its reader thread keeps
            # it alive); single-process iterators have nothing to stop
            getattr(batches, '_try_shutdown_all', lambda: None)()

    def _bad_sample(self, index: int) -> None:
        path, why = sample_path(self.samples, index), sample_error(self.samples, index)
        what = f"image '{path}'" if path else f'sample {index}'
        problem = why if path and path in why else f'cannot read {what} ({why})'
        if not self.skip_bad:
            raise ValueError(f'{problem}; or set DATA.SKIP_BAD_IMAGES True to skip unreadable images')
        if index not in self.skipped:
            self.skipped.append(index)
            self.log(f'Skipped: {problem}; {len(self.skipped)} skipped so far (DATA.SKIP_BAD_IMAGES).')


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool, skip_bad: bool = False,
                 log: Callable[[str], None] = print) -> SafeLoader:
    if train and len(dataset) < batch_size * world_size():
        raise ValueError(f'the training set has {len(dataset)} samples, fewer than one global batch '
                         f'({world_size()} x {batch_size}); lower -batch_size')
    sampler = ResumableBatchSampler(dataset, batch_size=batch_size, shuffle=train, drop_last=train)
    return SafeLoader(dataset, sampler, num_workers, skip_bad, log)


def batch_offset(sampler: Optional['ResumableBatchSampler']) -> int:
    """Batches the running epoch left out (resumed mid-epoch): step + offset is the batch's index."""
    return sampler.offset if sampler is not None else 0

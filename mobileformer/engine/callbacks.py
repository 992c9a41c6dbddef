"""The callbacks of a training run: progress, the schedule stepped per update, epoch seeding, EMA,
evaluation and checkpoints, divergence and graceful stops, logs and curves."""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
from paddle.callbacks import Callback, ProgBarLogger
from paddle.io import DataLoader, DistributedBatchSampler
from yacs.config import CfgNode

from mobileformer import checkpoint
from mobileformer.engine.data import INTERRUPTS, ResumableBatchSampler, batch_offset
from mobileformer.engine.distributed import derived_seed, is_main_process, rank, seed_everything
from mobileformer.engine.evaluation import evaluate_model
from mobileformer.engine.optim import is_update_step
from mobileformer.engine.resume import optimizer_state
from mobileformer.errors import TrainingStopped


# What the step lines call paddle.Model's log keys: `loss` is the objective minimised (label
# smoothing, Mixup targets, the teacher term), `ce` the plain cross-entropy against the labels.
STEP_LINE_NAMES = {'loss': 'objective', 'acc_top1': 'top1'}


def step_line_name(key: str) -> str:
    return STEP_LINE_NAMES.get(key, key[len('acc_'):] if key.startswith('acc_top') else key)


class EpochProgBar(ProgBarLogger):
    """Progress bar that counts epochs from the resumed one (fit() itself restarts at 0) and names
    its numbers as the epoch lines do (`step_line_name`)."""

    def __init__(self, start_epoch: int, total_epochs: int, log_freq: int, verbose: int = 2) -> None:
        super().__init__(log_freq, verbose=verbose)
        self.start_epoch, self.total_epochs = start_epoch, total_epochs

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self.epochs = self.total_epochs
        self.train_metrics = [step_line_name(k) for k in self.train_metrics]

    def _updates(self, logs, mode) -> None:
        super()._updates({step_line_name(k): v for k, v in (logs or {}).items()}, mode)

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        super().on_epoch_begin(self.start_epoch + epoch, logs)


class StepLROnUpdate(paddle.callbacks.LRScheduler):
    """Steps the schedule after each optimizer update (paddle's default steps after every batch,
    which runs the schedule ACCUM_ITER times too fast with gradient accumulation)."""

    def __init__(self, accum_iter: int, batches_per_epoch: int,
                 sampler: Optional[ResumableBatchSampler] = None) -> None:
        super().__init__(by_step=True)
        self.accum_iter, self.batches_per_epoch, self.sampler = accum_iter, batches_per_epoch, sampler

    def on_train_batch_end(self, step: int, logs=None) -> None:
        if is_update_step(step + batch_offset(self.sampler), self.accum_iter, self.batches_per_epoch):
            super().on_train_batch_end(step, logs)


class EpochSeeder(Callback):
    """Sets the sampler's shuffle to (SEED, epoch), which also keys every sample's augmentation
    (SafeLoader), and seeds the main process's generators from (SEED, epoch, batch, rank) before
    every batch: the dropout / drop-path masks and Mixup draws of batch b depend on nothing else,
    so a run resumed at any batch draws exactly the numbers an uninterrupted run draws there
    without storing generator states."""

    def __init__(self, seed: int, start_epoch: int, sampler: ResumableBatchSampler) -> None:
        super().__init__()
        self.seed, self.start_epoch, self.sampler = seed, start_epoch, sampler
        self.epoch = start_epoch

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch = epoch + self.start_epoch
        seed_everything(derived_seed(self.seed, self.epoch, rank()))
        self.sampler.set_epoch(derived_seed(self.seed, self.epoch))

    def on_train_batch_begin(self, step: int, logs=None) -> None:
        seed_everything(derived_seed(self.seed, self.epoch, step + batch_offset(self.sampler), rank()))


class ExponentialMovingAverage(Callback):
    """EMA of every floating-point weight (parameters and norm statistics), updated after each
    optimizer step; `swapped_in()` puts it into the network for evaluation and saving."""

    def __init__(self, network: nn.Layer, decay: float, accum_iter: int, steps_per_epoch: int,
                 sampler: Optional[ResumableBatchSampler] = None) -> None:
        super().__init__()
        self.network, self.decay = network, decay
        self.accum_iter, self.steps_per_epoch, self.sampler = accum_iter, steps_per_epoch, sampler
        self.shadow = {k: v.numpy().copy() for k, v in network.state_dict().items() if v.is_floating_point()}

    def on_train_batch_end(self, step: int, logs=None) -> None:
        if not is_update_step(step + batch_offset(self.sampler), self.accum_iter, self.steps_per_epoch):
            return
        for key, value in self.network.state_dict().items():
            if key in self.shadow:
                self.shadow[key] = self.decay * self.shadow[key] + (1 - self.decay) * value.numpy()

    def state_dict(self) -> Dict[str, np.ndarray]:
        return dict(self.shadow)

    def set_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.shadow = {k: np.asarray(v) for k, v in state.items()}

    def swap(self) -> None:
        """Exchanges network weights and EMA weights (call twice to restore)."""
        current = {k: v.numpy().copy() for k, v in self.network.state_dict().items() if k in self.shadow}
        self.network.set_state_dict(self.shadow)
        self.shadow = current


class EvaluateAndCheckpoint(Callback):
    """After each epoch: evaluate (EMA weights when on), log one line, write `last.*` (and
    `best.pdparams` on a new best val top-1) atomically; at the end draw the curves."""

    def __init__(self, config: CfgNode, eval_loader: DataLoader, output: str, start_epoch: int,
                 history: List[dict], best_top1: float, ema: Optional[ExponentialMovingAverage],
                 log: Callable[[str], None]) -> None:
        super().__init__()
        self.config, self.eval_loader, self.output = config, eval_loader, output
        self.start_epoch, self.history, self.best_top1 = start_epoch, history, best_top1
        self.ema, self.log = ema, log
        self.epoch_start_time = time.time()

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch_start_time = time.time()
        self.epoch_start_lr = float(self.model._optimizer.get_lr())
        self.model.reset_objective()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        epoch += self.start_epoch + 1  # epochs completed
        # train_*: means over the epoch's batches; objective is the loss minimised, ce the plain
        # cross-entropy against the (mixed) labels
        record = {'epoch': epoch, 'lr': self.epoch_start_lr,  # at the epoch's first update
                  'train_objective': self.model.objective(), 'train_ce': float(logs['ce']),
                  'train_top1': float(logs['acc_top1'])}
        record.update({f'train_{key}': float(logs[key]) for key in ('teacher_loss', 'agreement') if key in logs})
        last_epoch = epoch == self.config.TRAIN.EPOCHS
        if epoch % self.config.TRAIN.EVAL_FREQ == 0 or last_epoch:
            record.update(self._evaluate())
        record['time'] = round(time.time() - self.epoch_start_time, 2)
        self.history.append(record)
        self.log(' '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items()))
        if is_main_process():
            self._save(epoch, record)

    def _evaluate(self) -> dict:
        if self.ema is not None:
            self.ema.swap()
        result = evaluate_model(self.model, self.eval_loader, verbose=0)
        if self.ema is not None:
            self.ema.swap()
        return {f'val_{k}': v for k, v in result.items() if k != 'samples'}

    def _save(self, epoch: int, record: dict) -> None:
        files = {}
        weights = self.ema.state_dict() if self.ema is not None else self.model.network.state_dict()
        best_top1 = self.best_top1
        if 'val_top1' in record and record['val_top1'] > best_top1:
            best_top1 = record['val_top1']
            files['best.pdparams'] = weights
            files['best.json'] = {'epoch': epoch, 'metrics': record, 'config': self.config.dump()}
        save_freq = self.config.TRAIN.SAVE_FREQ
        if save_freq and epoch % save_freq == 0:
            files[f'epoch_{epoch}.pdparams'] = weights
        files.update(self._last_files({'epoch': epoch, 'metrics': record, 'best_top1': best_top1}))
        self._commit(files, f'epoch {epoch}')
        self.best_top1 = best_top1

    def save_mid_epoch(self, epochs_done: int, batches_done: int) -> None:
        """A checkpoint inside epoch `epochs_done + 1` after `batches_done` of its batches."""
        self._commit(self._last_files({'epoch': epochs_done, 'step': batches_done, 'best_top1': self.best_top1}),
                     f'epoch {epochs_done + 1} step {batches_done}')

    def _last_files(self, record: dict) -> dict:
        files = {'last.pdparams': self.model.network.state_dict(),
                 'last.pdopt': optimizer_state(self.model._optimizer, self.model.network),
                 'last.json': dict(record, history=self.history, config=self.config.dump())}
        if self.ema is not None:
            files['last.pdema'] = self.ema.state_dict()
        return files

    def _commit(self, files: dict, when: str) -> None:
        """Writes every file of the checkpoint at once (mobileformer.checkpoint); a failed write (e.g. a
        full disk) stops training with the previous checkpoint intact."""
        try:
            checkpoint.write_together({os.path.join(self.output, name): obj for name, obj in files.items()})
        except OSError as e:
            raise TrainingStopped(f"could not write the checkpoint of {when} to '{self.output}' "
                                  f'({e.strerror or e}); the previous checkpoint there is intact: free disk '
                                  'space, then continue with -resume auto') from None

    def on_train_end(self, logs=None) -> None:
        if is_main_process():
            plot_curves(self.history, os.path.join(self.output, 'curves.png'))


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or Inf loss, before any checkpoint of the diverged weights
    is written, naming the step and the last good checkpoint (left untouched)."""

    def __init__(self, output: str, start_epoch: int, sampler: Optional[ResumableBatchSampler] = None) -> None:
        super().__init__()
        self.output, self.start_epoch, self.sampler = output, start_epoch, sampler

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epoch = self.start_epoch + epoch + 1

    def on_train_batch_end(self, step: int, logs=None) -> None:
        losses = np.asarray((logs or {}).get('loss', []), dtype=np.float64)
        if np.isfinite(losses).all():
            return
        raise TrainingStopped(f'the loss is {losses[~np.isfinite(losses)][0]} at epoch {self.epoch} step '
                              f'{step + batch_offset(self.sampler) + 1}: training diverged; {after_divergence(self.output)}')


def after_divergence(output: str) -> str:
    """What is left and what to do after a diverged run, naming the last complete checkpoint."""
    remedy = 'lower TRAIN.BASE_LR or set TRAIN.GRAD_CLIP'
    path = os.path.join(output, 'last.json')
    if not os.path.exists(path):
        return f'no checkpoint was written yet: {remedy}, then start again'
    info = checkpoint.read_file(path)
    where = f"epoch {info['epoch'] + 1} step {info['step']}" if info.get('step') else f"epoch {info['epoch']}"
    return (f"the last good checkpoint {os.path.join(output, 'last')}.* (after {where}) is untouched: "
            f'{remedy}, then resume from it')


class GracefulStop(Callback):
    """On SIGTERM or SIGINT (preemption, Ctrl-C) training finishes the running optimizer update,
    writes a checkpoint at that point and exits with 128 + the signal number; -resume auto
    continues the epoch where it stopped. Put it after EvaluateAndCheckpoint (it saves through it)."""

    SIGNALS = INTERRUPTS

    def __init__(self, checkpoint: 'EvaluateAndCheckpoint', accum_iter: int, batches_per_epoch: int,
                 sampler: Optional[ResumableBatchSampler] = None) -> None:
        super().__init__()
        self.checkpoint, self.accum_iter, self.batches_per_epoch = checkpoint, accum_iter, batches_per_epoch
        self.sampler, self.received, self.previous = sampler, None, {}

    def _receive(self, signum: int, frame) -> None:
        self.received = signum

    def on_train_begin(self, logs=None) -> None:
        self.previous = {s: signal.signal(s, self._receive) for s in self.SIGNALS}

    def on_train_end(self, logs=None) -> None:
        """Restores the previous handlers (train.py also calls it when fit() raises)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.epochs_done = self.checkpoint.start_epoch + epoch

    def on_train_batch_end(self, step: int, logs=None) -> None:
        batches_done = step + batch_offset(self.sampler) + 1
        if self.received is None or batches_done == self.batches_per_epoch:  # the epoch end saves
            return
        if is_update_step(batches_done - 1, self.accum_iter, self.batches_per_epoch):
            if is_main_process():
                self.checkpoint.save_mid_epoch(self.epochs_done, batches_done)
            self._stop(f'epoch {self.epochs_done + 1} step {batches_done}')

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.received is not None:
            self._stop(f'the end of epoch {self.epochs_done + 1}')

    def _stop(self, where: str) -> None:
        self.on_train_end()
        name = signal.Signals(self.received).name
        raise TrainingStopped(f"stopped by {name}; saved a checkpoint at {where} in '{self.checkpoint.output}': "
                              'continue with -resume auto', exit_code=128 + self.received)


def visualdl_callback(output: str) -> Optional[Callback]:
    """VisualDL scalars under <output>/vdl when visualdl is installed (rank 0 only)."""
    try:
        import visualdl  # noqa: F401
    except ImportError:
        return None
    return paddle.callbacks.VisualDL(log_dir=os.path.join(output, 'vdl')) if is_main_process() else None


def plot_curves(history: List[dict], path: str) -> bool:
    """Plain cross-entropy and top-1 per epoch as a PNG; skipped (False) when matplotlib is not installed."""
    # matplotlib announces at INFO that it built its font cache (the first plot on a machine), and
    # Paddle's logging setup prints INFO records: a user needs neither
    logging.getLogger('matplotlib').setLevel(logging.WARNING)
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, 'ce', 'cross-entropy'), (ax_acc, 'top1', 'top-1 accuracy')):
        for split in ('train', 'val'):
            points = [(r['epoch'], r[f'{split}_{key}']) for r in history if f'{split}_{key}' in r]
            if points:
                ax.plot(*zip(*points), marker='.', label=split)
        ax.set_xlabel('epoch')
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    tmp = f'{path}.tmp{os.getpid()}.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True

"""Training engine shared by every model family, built on `paddle.Model`.

Optimizer with structured no-decay groups, per-iteration warm-up + cosine schedule, the training
step (mixup, gradient accumulation as a mean), callbacks (epoch seeding, EMA, evaluation,
checkpoints, logs, curves) and checkpoint I/O. `train.py` and `eval.py` only wire these together.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import weakref
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.callbacks import Callback, ProgBarLogger
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from yacs.config import CfgNode

from mobileformer import atomic
from mobileformer.weights import classifier_keys, classifier_to_drop
from mobileformer.cli import TrainingStopped


# ---------------------------------------------------------------------------------------------
# processes and seeds
# ---------------------------------------------------------------------------------------------
def rank() -> int:
    return paddle.distributed.ParallelEnv().rank


def world_size() -> int:
    return paddle.distributed.ParallelEnv().world_size


def is_main_process() -> bool:
    """Only the global rank 0 prints summaries and writes files."""
    return rank() == 0


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (e.g. SEED, epoch, rank) without collisions."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------
# optimizer and learning-rate schedule
# ---------------------------------------------------------------------------------------------
def no_decay_names(model: nn.Layer) -> set:
    """Structured names of trainable parameters exempt from weight decay: 1-D ones (norm weights
    and biases, layer scales) and every bias. Token tables and other 2-D+ weights do decay."""
    return {name for name, p in model.named_parameters()
            if not p.stop_gradient and (p.ndim <= 1 or name.endswith('bias'))}


def build_optimizer(config: CfgNode, model: nn.Layer,
                    learning_rate: paddle.optimizer.lr.LRScheduler) -> paddle.optimizer.Optimizer:
    train = config.TRAIN
    params = [p for p in model.parameters() if not p.stop_gradient]
    skip = no_decay_names(model)
    # Paddle hands apply_decay_param_fun the unique tensor name (e.g. `linear_3.w_0`), not the
    # structured one, so the decision is looked up through this map.
    structured = {p.name: name for name, p in model.named_parameters()}
    grad_clip = nn.ClipGradByGlobalNorm(train.GRAD_CLIP) if train.GRAD_CLIP > 0 else None
    if train.OPTIMIZER == 'adamw':
        beta1, beta2 = train.BETAS
        return paddle.optimizer.AdamW(
            learning_rate=learning_rate, beta1=beta1, beta2=beta2, epsilon=train.EPS,
            parameters=params, weight_decay=train.WEIGHT_DECAY, grad_clip=grad_clip,
            apply_decay_param_fun=lambda tensor_name: structured[tensor_name] not in skip)
    if train.OPTIMIZER == 'momentum':
        # paddle.Model calls minimize(), which rejects parameter groups: decay is set per tensor
        for name, p in model.named_parameters():
            p.regularizer = None if name in skip else paddle.regularizer.L2Decay(train.WEIGHT_DECAY)
        return paddle.optimizer.Momentum(learning_rate=learning_rate, momentum=train.MOMENTUM,
                                         parameters=params, grad_clip=grad_clip)
    raise ValueError(f"TRAIN.OPTIMIZER must be 'adamw' or 'momentum', got {train.OPTIMIZER!r}")


class WarmupCosineLR(paddle.optimizer.lr.LRScheduler):
    """Per-iteration schedule: linear warm-up, cosine decay to `end_lr`, then `end_lr` (cool-down).

    Update i (0-based) uses lr(i); the StepLROnUpdate callback steps it after every update.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start_lr: float = 0.0, end_lr: float = 0.0, cooldown_steps: int = 0,
                 last_epoch: int = -1) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = warmup_start_lr
        self.end_lr = end_lr
        self.cosine_steps = max(total_steps - warmup_steps - cooldown_steps, 1)
        super().__init__(base_lr, last_epoch)

    def get_lr(self) -> float:
        step = self.last_epoch
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * step / self.warmup_steps
        progress = min(step - self.warmup_steps, self.cosine_steps) / self.cosine_steps
        return self.end_lr + 0.5 * (self.base_lr - self.end_lr) * (1 + math.cos(math.pi * progress))


def updates_per_epoch(batches_per_epoch: int, accum_iter: int) -> int:
    return math.ceil(batches_per_epoch / accum_iter)


def batch_offset(sampler: Optional['ResumableBatchSampler']) -> int:
    """Batches the running epoch left out (resumed mid-epoch): step + offset is the batch's index."""
    return sampler.offset if sampler is not None else 0


def is_update_step(step: int, accum_iter: int, batches_per_epoch: int) -> bool:
    """Whether paddle.Model updates the weights after batch `step` (see Model._run_one_epoch)."""
    return (step + 1) % accum_iter == 0 or step + 1 == batches_per_epoch


def build_lr_schedule(config: CfgNode, batches_per_epoch: int) -> WarmupCosineLR:
    """The schedule counts optimizer updates, so ACCUM_ITER x batch b follows the same curve as
    one batch of ACCUM_ITER x b (or ACCUM_ITER cards)."""
    train = config.TRAIN
    steps = updates_per_epoch(batches_per_epoch, train.ACCUM_ITER)
    return WarmupCosineLR(train.BASE_LR, train.EPOCHS * steps,
                          warmup_steps=round(train.WARMUP_EPOCHS * steps),
                          warmup_start_lr=train.WARMUP_START_LR, end_lr=train.END_LR,
                          cooldown_steps=round(train.COOLDOWN_EPOCHS * steps))


# ---------------------------------------------------------------------------------------------
# losses, metrics and the training step
# ---------------------------------------------------------------------------------------------
class SoftTargetCrossEntropy(nn.Layer):
    """Cross-entropy against a distribution per sample (mixup targets), averaged over the batch."""

    def forward(self, logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return (-target * F.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


def build_criterion(config: CfgNode, mixup: Optional[Callable]) -> nn.Layer:
    """Soft-target loss when mixup makes the targets, else cross-entropy with label smoothing."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=config.AUG.LABEL_SMOOTHING)


class MeanCrossEntropy(paddle.metric.Metric):
    """Plain cross-entropy averaged over every sample seen (exact across ranks: paddle.Model
    gathers and trims eval outputs before metrics see them)."""

    def __init__(self, name: str = 'ce') -> None:
        super().__init__()
        self._name = name
        self.reset()

    def compute(self, logits: paddle.Tensor, label: paddle.Tensor, *args) -> paddle.Tensor:
        if label.ndim == 2 and label.shape[-1] > 1:
            return (-label * F.log_softmax(logits, axis=-1)).sum(axis=-1)
        return F.cross_entropy(logits, label.reshape([-1, 1]), reduction='none').reshape([-1])

    def update(self, losses: np.ndarray, *args) -> float:
        losses = np.asarray(losses, dtype=np.float64)
        self.total += float(losses.sum())
        self.count += losses.size
        return float(losses.mean())

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def accumulate(self) -> float:
        return self.total / max(self.count, 1)

    def name(self) -> List[str]:
        return [self._name]


def build_metrics(num_classes: int) -> list:
    return [paddle.metric.Accuracy(topk=(1, min(5, num_classes))), MeanCrossEntropy()]


class TrainingModel(paddle.Model):
    """`paddle.Model` whose training step mixes each batch (when mixup is on) and scales the loss
    by 1/ACCUM_ITER, so accumulated gradients are the mean over the micro-batches: ACCUM_ITER x
    batch b on one card equals b on ACCUM_ITER cards. Evaluation uses plain cross-entropy.

    The adapter reads `self._loss` in both steps, so each step installs its own criterion.
    """

    def __init__(self, network: nn.Layer, train_loss: nn.Layer,
                 mixup: Optional[Callable] = None, accum_iter: int = 1) -> None:
        super().__init__(network)
        self._train_loss = train_loss
        self._eval_loss = nn.CrossEntropyLoss()
        self._mixup = mixup
        self._accum_iter = accum_iter

    def train_loss(self, logits: paddle.Tensor, target: paddle.Tensor) -> paddle.Tensor:
        return self._train_loss(logits, target) / self._accum_iter

    def train_batch(self, inputs, labels=None, update: bool = True):
        if self._mixup is not None:
            images, targets = self._mixup(inputs[0], labels[0])
            inputs, labels = [images], [targets]
        self._loss = self.train_loss
        losses, metrics = super().train_batch(inputs, labels, update)
        return [loss * self._accum_iter for loss in losses], metrics

    def eval_batch(self, inputs, labels=None):
        self._loss = self._eval_loss
        return super().eval_batch(inputs, labels)


# ---------------------------------------------------------------------------------------------
# data loaders (distributed samplers, never a plain DataLoader: each rank reads its own shard)
# ---------------------------------------------------------------------------------------------
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
    + 1 in a third field, which `SafeLoader` turns into a skip notice or a clear error."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
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


def leave_interrupts_to_the_main_process(worker_id: int) -> None:
    """worker_init_fn: Ctrl-C and cluster schedulers signal every process of the group or job, and
    a worker killed by SIGINT/SIGTERM makes paddle abort the main process mid-step. Workers ignore
    both, so the main process alone decides (GracefulStop saves a checkpoint); they still exit when
    the loader shuts them down or the main process is gone."""
    for signum in GracefulStop.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class SafeLoader(DataLoader):
    """DataLoader over a GuardedDataset: a bad sample is skipped with a notice (skip_bad) or stops
    the run with its path; a worker that dies becomes one clear error instead of a SystemError."""

    def __init__(self, dataset: Dataset, batch_sampler: DistributedBatchSampler, num_workers: int,
                 skip_bad: bool, log: Callable[[str], None]) -> None:
        super().__init__(GuardedDataset(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                         return_list=True, worker_init_fn=leave_interrupts_to_the_main_process)
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


# ---------------------------------------------------------------------------------------------
# checkpoint I/O
# ---------------------------------------------------------------------------------------------
def read_checkpoint_file(path: str, **kwargs):
    """paddle.load (or json for .json) with one clear sentence for a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file '{path}' does not exist; pass an existing checkpoint "
                         '(-resume auto finds <output>/last)')
    try:
        if path.endswith('.json'):
            with open(path, encoding='utf-8') as f:
                return json.load(f)
        return paddle.load(path, **kwargs)
    except Exception as e:  # paddle raises assorted types on a truncated or foreign file
        raise ValueError(f"checkpoint file '{path}' is truncated or corrupt ({type(e).__name__}); "
                         'replace it or start from another checkpoint') from None


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads a `.pdparams` (a state dict, or a dict holding one under 'model'/'state_dict')."""
    if not path.endswith('.pdparams') and os.path.exists(path + '.pdparams'):
        path += '.pdparams'
    if not os.path.isfile(path):
        raise ValueError(f"weights file '{path}' does not exist; pass the path of a .pdparams file")
    state = read_checkpoint_file(path, return_numpy=True)
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict of weights; pass a .pdparams file")
    return state


def match_state_dict(network: nn.Layer, state: Dict[str, np.ndarray], path: str) -> tuple:
    """Returns (state without a classifier trained for another class count, the names left out,
    that class count); raises naming the tensor and both shapes on any other mismatch."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"'{path}' does not fit this model ({len(missing)} missing entries, e.g. "
                         f"{(missing or unexpected)[0]!r}); check -cfg matches the checkpoint")
    head, other_classes = classifier_to_drop(state, network)
    for key, value in own.items():
        model_shape, file_shape = list(value.shape), list(np.shape(state[key]))
        if model_shape != file_shape and key not in head:
            raise ValueError(f"'{path}' does not fit this model: {key} has shape {file_shape}, the "
                             f"model expects {model_shape}; check -cfg matches the checkpoint "
                             f"(only the classifier, {', '.join(classifier_keys(network))}, may differ)")
    return {k: v for k, v in state.items() if k not in head}, head, other_classes


def load_pretrained(network: nn.Layer, path: str, num_classes: int) -> List[str]:
    """Loads weights for fine-tuning; a classifier for another class count is left at its
    initialization, with a one-line notice. Returns the dropped entries."""
    state, head, other_classes = match_state_dict(network, load_state_dict(path), path)
    network.set_state_dict(state)
    if head and is_main_process():
        print(f"Notice: '{path}' was trained for {other_classes} classes, the model has {num_classes}: "
              f"the classifier ({', '.join(head)}) starts from scratch (fine-tuning).")
    return head


def load_for_evaluation(network: nn.Layer, path: str, num_classes: int) -> None:
    """Loads every weight; a checkpoint for another class count is an error."""
    state, head, other_classes = match_state_dict(network, load_state_dict(path), path)
    if head:
        raise ValueError(f"'{path}' was trained for {other_classes} classes but MODEL.NUM_CLASSES is "
                         f"{num_classes}; pass -opts MODEL.NUM_CLASSES {other_classes} or a matching checkpoint")
    network.set_state_dict(state)


def resolve_resume(arg: str, output: str) -> Optional[str]:
    """Checkpoint prefix to resume from: `auto` means `<output>/last` if it exists."""
    if not arg:
        return None
    if arg == 'auto':
        prefix = os.path.join(output, 'last')
        return prefix if os.path.exists(prefix + '.json') else None
    prefix = arg[:-len('.pdparams')] if arg.endswith('.pdparams') else arg
    prefix = prefix[:-len('.json')] if prefix.endswith('.json') else prefix
    if not os.path.exists(prefix + '.json'):
        raise ValueError(f"cannot resume from '{arg}': '{prefix}.json' does not exist; pass "
                         f"<output>/last or -resume auto")
    return prefix


def _rename_optimizer_state(state: dict, names: Dict[str, str]) -> dict:
    """Renames accumulator keys `<param name>_<accumulator>` (and master weights) by `names`."""
    def rename(key: str) -> str:
        for cut in [i for i, c in enumerate(key) if c == '_'][::-1] + [len(key)]:
            if key[:cut] in names:
                return names[key[:cut]] + key[cut:]
        return key
    renamed = {}
    for key, value in state.items():
        if key == 'master_weights':
            value = {rename(k): v for k, v in value.items()}
        renamed[key if key in ('LR_Scheduler', 'master_weights') else rename(key)] = value
    return renamed


def optimizer_state(optimizer: paddle.optimizer.Optimizer, network: nn.Layer) -> dict:
    """The optimizer state keyed by structured parameter names: Paddle keys it by unique tensor
    names (`linear_3.w_0_moment1_0`), which change with how many layers a process has built."""
    names = {p.name: name for name, p in network.named_parameters()}
    return _rename_optimizer_state(optimizer.state_dict(), names)


def set_optimizer_state(optimizer: paddle.optimizer.Optimizer, network: nn.Layer, state: dict) -> None:
    names = {name: p.name for name, p in network.named_parameters()}
    optimizer.set_state_dict(_rename_optimizer_state(state, names))


def load_checkpoint(prefix: str, network: nn.Layer, optimizer: paddle.optimizer.Optimizer,
                    ema: Optional['ExponentialMovingAverage'] = None, num_classes: int = 0) -> dict:
    """Restores weights, optimizer state (with the LR schedule position) and EMA from
    `<prefix>.*`; returns the `<prefix>.json` record (epoch, history, best_top1)."""
    info = read_checkpoint_file(prefix + '.json')
    load_for_evaluation(network, prefix + '.pdparams', num_classes)
    set_optimizer_state(optimizer, network, read_checkpoint_file(prefix + '.pdopt'))
    if ema is not None:
        if not os.path.exists(prefix + '.pdema'):
            raise ValueError(f"'{prefix}' was trained without TRAIN.EMA; resume with TRAIN.EMA False")
        ema.set_state_dict(read_checkpoint_file(prefix + '.pdema', return_numpy=True))
    return info


# ---------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------
class EpochProgBar(ProgBarLogger):
    """Progress bar that counts epochs from the resumed one (fit() itself restarts at 0)."""

    def __init__(self, start_epoch: int, total_epochs: int, log_freq: int, verbose: int = 2) -> None:
        super().__init__(log_freq, verbose=verbose)
        self.start_epoch, self.total_epochs = start_epoch, total_epochs

    def on_train_begin(self, logs=None) -> None:
        super().on_train_begin(logs)
        self.epochs = self.total_epochs

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
    """Seeds every epoch from (SEED, epoch, rank) and sets the sampler's shuffle to (SEED, epoch):
    a run resumed at epoch k draws exactly the numbers an uninterrupted run draws at epoch k
    (data order, worker augmentation, dropout, mixup) without storing generator states."""

    def __init__(self, seed: int, start_epoch: int, sampler: DistributedBatchSampler) -> None:
        super().__init__()
        self.seed, self.start_epoch, self.sampler = seed, start_epoch, sampler

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        epoch += self.start_epoch
        seed_everything(derived_seed(self.seed, epoch, rank()))
        self.sampler.set_epoch(derived_seed(self.seed, epoch))


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

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        epoch += self.start_epoch + 1  # epochs completed
        record = {'epoch': epoch, 'lr': self.epoch_start_lr,  # at the epoch's first update
                  'train_loss': float(logs['ce']), 'train_top1': float(logs['acc_top1'])}
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
        """Writes every file of the checkpoint at once (mobileformer.atomic); a failed write (e.g. a
        full disk) stops training with the previous checkpoint intact."""
        try:
            atomic.write_together({os.path.join(self.output, name): obj for name, obj in files.items()})
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
    info = read_checkpoint_file(path)
    where = f"epoch {info['epoch'] + 1} step {info['step']}" if info.get('step') else f"epoch {info['epoch']}"
    return (f"the last good checkpoint {os.path.join(output, 'last')}.* (after {where}) is untouched: "
            f'{remedy}, then resume from it')


class GracefulStop(Callback):
    """On SIGTERM or SIGINT (preemption, Ctrl-C) training finishes the running optimizer update,
    writes a checkpoint at that point and exits with 128 + the signal number; -resume auto
    continues the epoch where it stopped. Put it after EvaluateAndCheckpoint (it saves through it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

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
    """Loss and top-1 per epoch as a PNG; skipped (False) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, 'loss', 'loss'), (ax_acc, 'top1', 'top-1 accuracy')):
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


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def evaluate_model(model: paddle.Model, loader: SafeLoader, verbose: int = 0) -> dict:
    """Top-1, top-5 and mean cross-entropy over the whole dataset (all ranks together)."""
    try:
        result = model.evaluate(loader, verbose=verbose)
    finally:
        loader.stop_workers()
    top1_name, top5_name = model._metrics[0].name()  # acc_top1, acc_top5 (top-k for < 5 classes)
    return {'top1': float(result[top1_name]), 'top5': float(result[top5_name]), 'loss': float(result['ce']),
            'samples': len(loader.dataset)}

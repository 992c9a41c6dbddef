"""Training engine shared by every model family, built on `paddle.Model`; `train.py` and `eval.py`
only wire these parts together:

- `distributed`: ranks and seeds;
- `optim`: optimizer with structured no-decay groups, per-update warm-up + cosine schedule;
- `step`: losses, metrics and the training step (mixup, gradient accumulation as a mean);
- `distill`: knowledge distillation (the teacher, its input, the losses);
- `data`: resumable distributed samplers and loaders that survive bad samples and signals;
- `callbacks`: epoch seeding, EMA, evaluation and checkpoints, divergence, graceful stops, curves;
- `resume`: restoring a training checkpoint; `evaluation`: metrics over a whole dataset.
Weights files and crash-safe writes are `mobileformer.checkpoint`'s.
"""
from mobileformer.engine.callbacks import (EpochProgBar, EpochSeeder, EvaluateAndCheckpoint, ExponentialMovingAverage,
                                           GracefulStop, StepLROnUpdate, StopOnNonFiniteLoss, after_divergence,
                                           plot_curves, visualdl_callback)
from mobileformer.engine.data import (GuardedDataset, ResumableBatchSampler, SafeLoader, batch_offset, build_loader,
                                      start_worker)
from mobileformer.engine.distributed import derived_seed, is_main_process, rank, seed_everything, world_size
from mobileformer.engine.evaluation import evaluate_model
from mobileformer.engine.optim import (WarmupCosineLR, build_lr_schedule, build_optimizer, is_update_step,
                                       no_decay_names, updates_per_epoch)
from mobileformer.engine.resume import load_checkpoint, optimizer_state, resolve_resume, set_optimizer_state
from mobileformer.engine.step import (MeanCrossEntropy, SoftTargetCrossEntropy, TrainingModel, build_criterion,
                                      build_metrics, top_k)
from mobileformer.engine.distill import DistillationLoss, Teacher, build_distillation, build_teacher

__all__ = ['EpochProgBar', 'EpochSeeder', 'EvaluateAndCheckpoint', 'ExponentialMovingAverage', 'GracefulStop',
           'StepLROnUpdate', 'StopOnNonFiniteLoss', 'after_divergence', 'plot_curves', 'visualdl_callback',
           'GuardedDataset', 'ResumableBatchSampler', 'SafeLoader', 'batch_offset', 'build_loader',
           'start_worker', 'derived_seed', 'is_main_process', 'rank', 'seed_everything',
           'world_size', 'evaluate_model', 'WarmupCosineLR', 'build_lr_schedule', 'build_optimizer',
           'is_update_step', 'no_decay_names', 'updates_per_epoch', 'load_checkpoint', 'optimizer_state',
           'resolve_resume', 'set_optimizer_state', 'MeanCrossEntropy', 'SoftTargetCrossEntropy', 'TrainingModel',
           'build_criterion', 'build_metrics', 'top_k', 'DistillationLoss', 'Teacher', 'build_distillation',
           'build_teacher']

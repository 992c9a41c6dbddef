"""Optimizer with structured no-decay groups and the per-update warm-up + cosine schedule."""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
from yacs.config import CfgNode


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

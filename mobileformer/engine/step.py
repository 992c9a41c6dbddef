"""Losses, metrics and the training step (mixup, gradient accumulation as a mean)."""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from yacs.config import CfgNode


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
        return float(losses.mean()) if losses.size else 0.0  # evaluation batches of a training-only metric

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def accumulate(self) -> float:
        return self.total / max(self.count, 1)

    def name(self) -> List[str]:
        return [self._name]


def top_k(num_classes: int) -> int:
    """The k of the top-k accuracy every log reports: 5, or the class count when there are fewer."""
    return min(5, num_classes)


def build_metrics(num_classes: int) -> list:
    return [paddle.metric.Accuracy(topk=(1, top_k(num_classes))), MeanCrossEntropy()]


class TrainingModel(paddle.Model):
    """`paddle.Model` whose training step mixes each batch (when mixup is on), asks the teacher
    (when distilling) about exactly that mixed batch, and scales the loss by 1/ACCUM_ITER, so
    accumulated gradients are the mean over the micro-batches: ACCUM_ITER x batch b on one card
    equals b on ACCUM_ITER cards. Evaluation uses plain cross-entropy.

    The teacher's logits travel as a second label, so the training criterion and the metrics see
    (logits, target, teacher logits). The adapter reads `self._loss` in both steps, so each step
    installs its own criterion. `objective()` is the mean training loss over the batches since
    `reset_objective()` (the progress bar shows only the current batch's).
    """

    def __init__(self, network: nn.Layer, train_loss: nn.Layer, mixup: Optional[Callable] = None,
                 accum_iter: int = 1, teacher: Optional[Callable[[paddle.Tensor], paddle.Tensor]] = None) -> None:
        super().__init__(network)
        self._train_loss = train_loss
        self._eval_loss = nn.CrossEntropyLoss()
        self._mixup = mixup
        self._accum_iter = accum_iter
        self._teacher = teacher
        self.reset_objective()

    def train_loss(self, logits: paddle.Tensor, target: paddle.Tensor, *teacher_logits: paddle.Tensor) -> paddle.Tensor:
        return self._train_loss(logits, target, *teacher_logits) / self._accum_iter

    def train_batch(self, inputs, labels=None, update: bool = True):
        if self._mixup is not None:
            images, targets = self._mixup(inputs[0], labels[0])
            inputs, labels = [images], [targets]
        if self._teacher is not None:
            labels = [*labels, self._teacher(inputs[0])]
        self._loss = self.train_loss
        losses, metrics = super().train_batch(inputs, labels, update)
        losses = [loss * self._accum_iter for loss in losses]
        samples = len(inputs[0])
        self._objective_sum += float(np.sum(losses)) * samples
        self._objective_count += samples
        return losses, metrics

    def reset_objective(self) -> None:
        self._objective_sum, self._objective_count = 0.0, 0

    def objective(self) -> float:
        return self._objective_sum / max(self._objective_count, 1)

    def eval_batch(self, inputs, labels=None):
        self._loss = self._eval_loss
        return super().eval_batch(inputs, labels)

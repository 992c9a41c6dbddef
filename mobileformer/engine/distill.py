"""Knowledge distillation (TRAIN.DISTILL): a teacher that sees exactly the student's augmented
(mixed) batch, and the losses that mix its answers with the ground truth.

A teacher is a model of this repository (a YAML and its weights, eval mode, no gradients), a folder
written by export.py (run by `InferenceModel`, the fastest runtime here) or any ONNX classifier file
(onnxruntime). When the teacher's input differs from the student's (size, channels, normalisation)
the batch is un-normalised, converted, resized and normalised again for it.

Losses (`DistillationLoss`): (1 - alpha) x the ground-truth loss (label smoothing / Mixup targets as
without a teacher) + alpha x the teacher term:
- soft: KL(teacher || student) of the softmaxes at temperature tau, times tau^2 (Hinton et al.);
- hard: cross-entropy with the teacher's argmax (DeiT's hard distillation).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from yacs.config import CfgNode

from mobileformer.engine.step import MeanCrossEntropy

KINDS = ('soft', 'hard')
# grey from RGB (ITU-R BT.601 luma), for a one-channel teacher of an RGB student
LUMA = (0.299, 0.587, 0.114)


def teacher_term(logits: paddle.Tensor, teacher_logits: paddle.Tensor, kind: str, tau: float) -> paddle.Tensor:
    """The teacher part of the loss per sample, shape [N]."""
    if kind == 'hard':
        return F.cross_entropy(logits, teacher_logits.argmax(axis=-1, keepdim=True), reduction='none').reshape([-1])
    log_teacher = F.log_softmax(teacher_logits / tau, axis=-1)
    log_student = F.log_softmax(logits / tau, axis=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(axis=-1) * tau * tau


class DistillationLoss(nn.Layer):
    """(1 - alpha) x `base(logits, target)` + alpha x the mean teacher term (see the module docstring)."""

    def __init__(self, base: nn.Layer, kind: str, tau: float, alpha: float) -> None:
        super().__init__()
        self.base, self.kind, self.tau, self.alpha = base, kind, tau, alpha

    def forward(self, logits: paddle.Tensor, target: paddle.Tensor, teacher_logits: paddle.Tensor) -> paddle.Tensor:
        distilled = teacher_term(logits, teacher_logits, self.kind, self.tau).mean()
        if self.alpha == 1.0:  # teacher only: the labels are not read
            return distilled
        return (1 - self.alpha) * self.base(logits, target) + self.alpha * distilled


class MeanTeacherLoss(MeanCrossEntropy):
    """The teacher term (`teacher_term`) averaged over the epoch's training samples (`teacher_loss`);
    evaluation batches carry no teacher answers and add nothing."""

    def __init__(self, kind: str, tau: float) -> None:
        super().__init__('teacher_loss')
        self.kind, self.tau = kind, tau

    def compute(self, logits: paddle.Tensor, label: paddle.Tensor, *teacher: paddle.Tensor) -> paddle.Tensor:
        if not teacher:
            return paddle.zeros([0])
        return teacher_term(logits, teacher[0], self.kind, self.tau)


class TeacherAgreement(MeanCrossEntropy):
    """The fraction of training samples whose student top-1 is the teacher's (`agreement`)."""

    def __init__(self) -> None:
        super().__init__('agreement')

    def compute(self, logits: paddle.Tensor, label: paddle.Tensor, *teacher: paddle.Tensor) -> paddle.Tensor:
        if not teacher:
            return paddle.zeros([0])
        return (logits.argmax(axis=-1) == teacher[0].argmax(axis=-1)).astype('float32')


def build_distillation(config: CfgNode, criterion: nn.Layer) -> Tuple[nn.Layer, list]:
    """The training criterion with the teacher term, and the metrics that log the teacher."""
    distill = config.TRAIN.DISTILL
    return (DistillationLoss(criterion, distill.KIND, distill.TAU, distill.ALPHA),
            [MeanTeacherLoss(distill.KIND, distill.TAU), TeacherAgreement()])


class TeacherInput:
    """Turns the student's normalised batch into the teacher's input: back to [0, 1] pixels, to the
    teacher's channels (grey repeated, or RGB's luma), resized (bilinear) and normalised for it.
    Nothing is done when both inputs are the same."""

    def __init__(self, student_mean: Sequence[float], student_std: Sequence[float], channels: int,
                 size: Optional[Tuple[int, int]], mean: Sequence[float], std: Sequence[float]) -> None:
        self.student_mean, self.student_std = list(student_mean), list(student_std)
        self.channels, self.size, self.mean, self.std = channels, size, list(mean), list(std)

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        same_size = self.size is None or tuple(images.shape[-2:]) == tuple(self.size)
        if (images.shape[1] == self.channels and same_size and self.mean == self.student_mean
                and self.std == self.student_std):
            return images
        pixels = images * _per_channel(self.student_std) + _per_channel(self.student_mean)
        if pixels.shape[1] == 1 and self.channels == 3:
            pixels = pixels.tile([1, 3, 1, 1])
        elif pixels.shape[1] == 3 and self.channels == 1:
            pixels = (pixels * _per_channel(LUMA)).sum(axis=1, keepdim=True)
        if not same_size:
            pixels = F.interpolate(pixels, size=list(self.size), mode='bilinear', align_corners=False)
        return (pixels - _per_channel(self.mean)) / _per_channel(self.std)


def _per_channel(values: Sequence[float]) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(values, np.float32).reshape([1, -1, 1, 1]))


class Teacher:
    """`teacher(images) -> logits` (a paddle tensor without gradient) for the student's batch."""

    def __init__(self, run: Callable[[paddle.Tensor], paddle.Tensor], adapt: TeacherInput, source: str) -> None:
        self.run, self.adapt, self.source = run, adapt, source

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        with paddle.no_grad():
            logits = self.run(self.adapt(paddle.to_tensor(images)))
        logits.stop_gradient = True
        return logits


def _network_runner(network: nn.Layer) -> Callable[[paddle.Tensor], paddle.Tensor]:
    network.eval()
    for parameter in network.parameters():
        parameter.stop_gradient = True
    return network


def _export_runner(engine: Callable[[np.ndarray], object]) -> Callable[[paddle.Tensor], paddle.Tensor]:
    def run(images: paddle.Tensor):
        outputs = engine(images.numpy())
        return [paddle.to_tensor(o) for o in outputs] if isinstance(outputs, list) else paddle.to_tensor(outputs)
    return run


def _yaml_teacher(config: CfgNode, path: str) -> Tuple[Callable, TeacherInput]:
    from mobileformer.config import Overrides, get_config
    from mobileformer.deploy.export import build_for_inference
    distill = config.TRAIN.DISTILL
    if not distill.WEIGHTS:
        raise ValueError(f"the teacher config '{path}' needs its weights: pass -teacher {path} WEIGHTS.pdparams "
                         '(or set TRAIN.DISTILL.WEIGHTS)')
    if distill.MEAN or distill.STD:
        raise ValueError(f"TRAIN.DISTILL.MEAN/STD are for export and ONNX teachers; the teacher config '{path}' "
                         'gives its own DATA.MEAN/STD: leave them empty')
    teacher_config = get_config(path)
    if teacher_config.MODEL.OUT_INDICES:
        raise _not_a_classifier(path, f'feature maps {list(teacher_config.MODEL.OUT_INDICES)} (MODEL.OUT_INDICES)')
    # the teacher's YAML, not -cfg / -opts, is what a user fixes when its weights do not fit
    in_teacher_yaml = Overrides(f"the teacher config '{path}'", f"fix it in '{path}'",
                                lambda key, value: f"{key}: {value} in '{path}'", f"the teacher config '{path}'")
    network = build_for_inference(teacher_config, distill.WEIGHTS, in_teacher_yaml)
    data = teacher_config.DATA
    adapt = TeacherInput(config.DATA.MEAN, config.DATA.STD, data.IN_CHANNELS,
                         (data.IMAGE_SIZE, data.IMAGE_SIZE), data.MEAN, data.STD)
    return _network_runner(network), adapt


def _export_teacher(config: CfgNode, path: str, log: Callable[[str], None]) -> Tuple[Callable, TeacherInput]:
    distill = config.TRAIN.DISTILL
    if distill.WEIGHTS:
        raise ValueError(f"TRAIN.DISTILL.WEIGHTS is for a teacher config (YAML); the teacher '{path}' holds its "
                         'weights already: leave it empty')
    recorded = None  # the normalisation an export folder's config records
    if os.path.isdir(path):
        from mobileformer.deploy.choice import InferenceModel
        engine = InferenceModel(path, log=log)
        shape = engine.small.input_shape
        recorded = engine.config.DATA if engine.config is not None else None
    else:
        from mobileformer.deploy.runtimes import OnnxModel
        try:
            engine = OnnxModel(path)
        except Exception as e:  # onnxruntime's own exception types for an unreadable file
            raise ValueError(f"the teacher '{path}' is not an ONNX model onnxruntime can load "
                             f"({type(e).__name__}); give an ONNX classifier or an export.py folder") from None
        shape = engine.input_shape
    channels, size = _teacher_input(path, shape, config)
    mean = list(distill.MEAN) or _to_channels((recorded or config.DATA).MEAN, channels)
    std = list(distill.STD) or _to_channels((recorded or config.DATA).STD, channels)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"TRAIN.DISTILL.MEAN/STD give {len(mean)}/{len(std)} values but the teacher '{path}' "
                         f'takes {channels} channels; give one value per channel')
    return _export_runner(engine), TeacherInput(config.DATA.MEAN, config.DATA.STD, channels, size, mean, std)


def _teacher_input(path: str, shape: Optional[Sequence[int]], config: CfgNode) -> Tuple[int, Optional[Tuple[int, int]]]:
    """(channels, (height, width) or None for the student's) of an export's input `shape` (-1: any)."""
    if shape is None:  # a legacy Paddle program does not record it: the student's input
        return config.DATA.IN_CHANNELS, None
    if len(shape) != 4 or shape[1] not in (-1, 1, 3):
        shown = ', '.join(str(d) if d >= 0 else 'N' for d in shape)
        raise ValueError(f"the teacher '{path}' takes inputs [{shown}], which a batch of images cannot be "
                         'resized to; give a teacher that takes [N, 1 or 3, H, W] images')
    channels = config.DATA.IN_CHANNELS if shape[1] == -1 else shape[1]
    height, width = shape[2], shape[3]
    return channels, None if height < 0 or width < 0 else (height, width)


def _to_channels(values: Sequence[float], channels: int) -> List[float]:
    values = list(values)
    if len(values) == channels:
        return values
    return values * channels if len(values) == 1 else [float(np.mean(values))]


def build_teacher(config: CfgNode, log: Callable[[str], None] = print) -> Optional[Teacher]:
    """The teacher TRAIN.DISTILL.TEACHER names, checked on a probe batch (a classifier of the
    student's classes that takes the adapted batch), or None without one."""
    path = config.TRAIN.DISTILL.TEACHER
    if not path:
        return None
    if path.endswith(('.yaml', '.yml')) and os.path.isfile(path):
        run, adapt = _yaml_teacher(config, path)
    elif os.path.isdir(path) or (path.endswith('.onnx') and os.path.isfile(path)):
        run, adapt = _export_teacher(config, path, log)
    else:
        raise ValueError(f"the teacher '{path}' is neither a YAML config, an export.py folder nor an .onnx file "
                         'that exists; check TRAIN.DISTILL.TEACHER (or -teacher)')
    teacher = Teacher(run, adapt, path)
    _check_classifier(teacher, config)
    return teacher


def _not_a_classifier(source: str, answers: str) -> ValueError:
    return ValueError(f"the teacher '{source}' is not a classifier: it answers {answers}, not one [batch, classes] "
                      'array of logits (a feature extractor cannot teach); give a classification model')


def _check_classifier(teacher: Teacher, config: CfgNode) -> None:
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    probe = paddle.zeros([2, channels, size, size])
    logits = teacher(probe)
    classes = config.MODEL.NUM_CLASSES
    if isinstance(logits, list) or logits.ndim != 2:
        shapes = [o.shape for o in logits] if isinstance(logits, list) else [logits.shape]
        raise _not_a_classifier(teacher.source, ' and '.join(str(list(s)) for s in shapes))
    if logits.shape[1] != classes:
        raise ValueError(f"the teacher '{teacher.source}' answers {logits.shape[1]} classes but the student has "
                         f'MODEL.NUM_CLASSES {classes}; distill from a teacher of the same classes')

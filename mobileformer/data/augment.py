"""Augmentations of the timm ImageNet recipe: RandAugment, random erasing, Mixup / CutMix.

RandAugment and random erasing act on one sample (PIL image / normalised CHW array) and draw from
Python's `random`; Mixup / CutMix act on a batch of paddle Tensors and draw from numpy's global
generator (both are seeded per DataLoader worker and by the trainer's seeding).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from yacs.config import CfgNode

_MAX_LEVEL = 10.0  # RandAugment magnitudes live in [0, 10]
Fill = Union[int, tuple]


@dataclass(frozen=True)
class _OpContext:
    fill: Fill  # colour of pixels uncovered by geometric ops (the dataset mean)
    resample: int


def _random_sign(value: float) -> float:
    return -value if random.random() < 0.5 else value


def _affine(img: Image.Image, matrix: tuple, ctx: _OpContext) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=ctx.resample, fillcolor=ctx.fill)


def _enhance(enhancer) -> Callable:
    # Factor 0.1 .. 1.9: below 1 weakens (e.g. greyer / darker), above 1 strengthens.
    return lambda img, level, ctx: enhancer(img).enhance(level / _MAX_LEVEL * 1.8 + 0.1)


def _posterize(img: Image.Image, level: float, ctx: _OpContext) -> Image.Image:
    bits = int(level / _MAX_LEVEL * 4)  # keep 0..4 most significant bits
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize_add(img: Image.Image, level: float, ctx: _OpContext) -> Image.Image:
    add = int(level / _MAX_LEVEL * 110)
    lut = [min(255, v + add) if v < 128 else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


def _translate(img: Image.Image, level: float, ctx: _OpContext, axis: int) -> Image.Image:
    pixels = _random_sign(level / _MAX_LEVEL * 0.45) * img.size[axis]
    return _affine(img, (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels), ctx)


def _shear(img: Image.Image, level: float, ctx: _OpContext, axis: int) -> Image.Image:
    factor = _random_sign(level / _MAX_LEVEL * 0.3)
    return _affine(img, (1, factor, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, factor, 1, 0), ctx)


# timm's default RandAugment op set ('rand-m*' without 'inc'); every op maps (img, level, ctx) -> img.
RAND_AUGMENT_OPS: dict[str, Callable[[Image.Image, float, _OpContext], Image.Image]] = {
    'AutoContrast': lambda img, level, ctx: ImageOps.autocontrast(img),
    'Equalize': lambda img, level, ctx: ImageOps.equalize(img),
    'Invert': lambda img, level, ctx: ImageOps.invert(img),
    'Rotate': lambda img, level, ctx: img.rotate(_random_sign(level / _MAX_LEVEL * 30), resample=ctx.resample,
                                                 fillcolor=ctx.fill),
    'Posterize': _posterize,
    'Solarize': lambda img, level, ctx: ImageOps.solarize(img, int(level / _MAX_LEVEL * 256)),
    'SolarizeAdd': _solarize_add,
    'Color': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, level, ctx: _shear(img, level, ctx, axis=0),
    'ShearY': lambda img, level, ctx: _shear(img, level, ctx, axis=1),
    'TranslateXRel': lambda img, level, ctx: _translate(img, level, ctx, axis=0),
    'TranslateYRel': lambda img, level, ctx: _translate(img, level, ctx, axis=1),
}


class RandAugment:
    """Applies `num_ops` ops drawn with replacement, each with probability 0.5 (timm's RandAugment).

    The magnitude is drawn per op from N(magnitude, magnitude_std) when magnitude_std > 0 and
    clipped to [0, 10].
    """

    def __init__(self, num_ops: int, magnitude: float, magnitude_std: float = 0.0, fill: Fill = 128,
                 interpolation: int = Image.Resampling.BILINEAR, op_prob: float = 0.5):
        if not 0 <= magnitude <= _MAX_LEVEL or magnitude_std < 0:
            raise ValueError(f'RandAugment magnitude must be in [0, {_MAX_LEVEL:g}] and its std >= 0, '
                             f'got AUG.RAND_AUGMENT_M={magnitude}, AUG.RAND_AUGMENT_MSTD={magnitude_std}')
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.op_prob = op_prob
        # PIL's rotate/affine support only nearest, bilinear and bicubic.
        geometric = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
        self.ctx = _OpContext(fill, interpolation if interpolation in geometric else Image.Resampling.BICUBIC)
        self.names = list(RAND_AUGMENT_OPS)

    def _level(self) -> float:
        level = random.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
        return min(max(level, 0.0), _MAX_LEVEL)

    def __call__(self, img: Image.Image) -> Image.Image:
        for name in random.choices(self.names, k=self.num_ops):
            if random.random() < self.op_prob:
                img = RAND_AUGMENT_OPS[name](img, self._level(), self.ctx)
        return img


class RandomErasing:
    """Erases `count` random rectangles (2% - 1/3 of the area, aspect 0.3 - 3.3) of a CHW array.

    mode 'pixel': per-pixel N(0, 1) noise, 'rand': one N(0, 1) colour per rectangle and channel,
    'const': zeros (the mean after normalisation). With count > 1 the number of rectangles is drawn
    from 1..count and the area budget is shared among them.
    """

    MODES = ('pixel', 'rand', 'const')

    def __init__(self, prob: float, mode: str = 'pixel', count: int = 1, min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3):
        if not 0 <= prob <= 1 or mode not in self.MODES or count < 1:
            raise ValueError(f"random erasing needs AUG.RE_PROB in [0, 1], AUG.RE_MODE in {self.MODES} and "
                             f"AUG.RE_COUNT >= 1, got {prob}, '{mode}', {count}")
        self.prob, self.mode, self.count = prob, mode, count
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _noise(self, shape: tuple[int, int, int]) -> np.ndarray:
        if self.mode == 'const':
            return np.zeros(shape, np.float32)
        rng = np.random.default_rng(random.getrandbits(64))  # driven by `random` like every per-sample op
        if self.mode == 'rand':
            return rng.standard_normal((shape[0], 1, 1), dtype=np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if random.random() >= self.prob:
            return x
        x = x.copy()
        channels, height, width = x.shape
        count = random.randint(1, self.count)
        for _ in range(count):
            for _attempt in range(10):
                area = random.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(random.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    top, left = random.randint(0, height - h), random.randint(0, width - w)
                    x[:, top:top + h, left:left + w] = self._noise((channels, h, w))
                    break
        return x


def smooth_one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """[B] int labels -> [B, num_classes] float32 targets: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).astype('float32') * (1.0 - smoothing) + off


class Mixup:
    """Batch-level Mixup / CutMix with label smoothing (timm's Mixup in 'batch' mode).

    With probability `prob` a batch is mixed with its reverse: CutMix (chosen with `switch_prob`
    when both are enabled) pastes a box whose area fraction is 1 - lambda, Mixup blends the whole
    images with weight lambda ~ Beta(alpha, alpha). Targets mix the same way, so every row of the
    soft targets sums to 1. After cutting, lambda is recomputed from the clipped box area.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0):
        if min(mixup_alpha, cutmix_alpha) < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1 \
                or not 0 <= label_smoothing < 1 or num_classes < 2:
            raise ValueError('Mixup needs AUG.MIXUP_ALPHA, AUG.CUTMIX_ALPHA >= 0, AUG.MIXUP_PROB and '
                             'AUG.MIXUP_SWITCH_PROB in [0, 1], AUG.LABEL_SMOOTHING in [0, 1) and '
                             f'MODEL.NUM_CLASSES >= 2; got {mixup_alpha}, {cutmix_alpha}, {prob}, '
                             f'{switch_prob}, {label_smoothing}, {num_classes}')
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing = label_smoothing

    def sample(self) -> tuple[float, bool]:
        """Returns (lambda, use_cutmix) for one batch; lambda 1 means no mixing."""
        if np.random.rand() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(np.random.rand() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(np.random.beta(alpha, alpha)), use_cutmix

    @staticmethod
    def cutmix_box(height: int, width: int, lam: float) -> tuple[tuple[int, int, int, int], float]:
        """Box (top, bottom, left, right) of about (1 - lam) of the area, and the lambda it really gives."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = np.random.randint(0, height), np.random.randint(0, width)
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        box = (int(top), int(bottom), int(left), int(right))
        return box, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)

    def _check_labels(self, labels: paddle.Tensor) -> paddle.Tensor:
        labels = labels.reshape([-1])
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(f'label {high if high >= self.num_classes else low} is outside 0..{self.num_classes - 1}; '
                             f'set MODEL.NUM_CLASSES to the number of classes of the dataset')
        return labels

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """images [B, C, H, W], labels [B] int -> (mixed images [B, C, H, W], soft targets [B, K] float32)."""
        targets = smooth_one_hot(self._check_labels(labels), self.num_classes, self.label_smoothing)
        lam, use_cutmix = self.sample()
        if lam == 1.0:
            return images, targets
        partner = paddle.flip(images, axis=[0])  # sample i is mixed with sample B-1-i
        if use_cutmix:
            (top, bottom, left, right), lam = self.cutmix_box(images.shape[-2], images.shape[-1], lam)
            mask = np.zeros([1, 1, images.shape[-2], images.shape[-1]], np.float32)
            mask[..., top:bottom, left:right] = 1.0
            mask = paddle.to_tensor(mask, dtype=images.dtype, place=images.place)
            images = images * (1.0 - mask) + partner * mask
        else:
            images = images * lam + partner * (1.0 - lam)
        return images, targets * lam + paddle.flip(targets, axis=[0]) * (1.0 - lam)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """Mixup/CutMix for config.AUG over config.MODEL.NUM_CLASSES classes, or None when both are off."""
    aug = config.AUG
    if (aug.MIXUP_ALPHA <= 0 and aug.CUTMIX_ALPHA <= 0) or aug.MIXUP_PROB <= 0:
        return None
    return Mixup(config.MODEL.NUM_CLASSES, aug.MIXUP_ALPHA, aug.CUTMIX_ALPHA, aug.MIXUP_PROB,
                 aug.MIXUP_SWITCH_PROB, aug.LABEL_SMOOTHING)

"""Per-sample image transforms (PIL image in, normalised float32 CHW numpy array out).

The training pipeline follows timm's ImageNet recipe: RandomResizedCrop + horizontal flip, then
RandAugment and/or colour jitter on the PIL image, then normalisation, then random erasing on the
normalised array. Evaluation resizes the shorter side to IMAGE_SIZE / CROP_PCT and centre-crops
IMAGE_SIZE. All per-sample randomness comes from Python's `random` module, which the training
loader seeds per sample from (epoch seed, sample index) (mobileformer.engine.data.GuardedDataset).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance
from yacs.config import CfgNode

from mobileformer.data.augment import RandAugment, RandomErasing

INTERPOLATIONS = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
}
# PIL mode the pipeline works in for each DATA.IN_CHANNELS: grey inputs are replicated to RGB.
_MODES = {1: 'L', 3: 'RGB'}

Transform = Callable[[Image.Image], np.ndarray]


class Compose:
    """Applies callables in order."""

    def __init__(self, steps: Sequence[Callable]):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return 'Compose(' + ', '.join(type(s).__name__ for s in self.steps) + ')'


class ConvertMode:
    """Converts any PIL image to the working mode ('L' or 'RGB'); alpha is dropped."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.mode == self.mode:
            return img
        if img.mode in ('P', 'PA', 'LA') or 'transparency' in img.info:
            img = img.convert('RGBA')  # palette / grey+alpha go through RGBA so PIL keeps colours
        return img.convert(self.mode)


class RandomResizedCrop:
    """Crops a random area fraction in `scale` with aspect ratio in `ratio`, resized to `size`."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: int):
        self.size = size
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = tuple(ratio)
        self.interpolation = interpolation

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Returns (left, top, crop_width, crop_height); falls back to a centred crop after 10 tries."""
        area = width * height
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            aspect = math.exp(random.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, width - w), random.randint(0, height - h), w, h
        in_ratio = width / height
        w, h = width, height
        if in_ratio < self.ratio[0]:
            h = int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w = int(round(height * self.ratio[1]))
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, w, h = self.box(*img.size)
        return img.resize((self.size, self.size), self.interpolation, box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.prob else img


class ColorJitter:
    """Brightness, contrast and saturation factors drawn from [1 - s, 1 + s], applied in random order."""

    def __init__(self, strength: float):
        self.low, self.high = max(0.0, 1.0 - strength), 1.0 + strength

    def __call__(self, img: Image.Image) -> Image.Image:
        enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        random.shuffle(enhancers)
        for enhancer in enhancers:
            img = enhancer(img).enhance(random.uniform(self.low, self.high))
        return img


class ResizeShorter:
    """Resizes so the shorter side is `size`, keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: int):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return img if new == (w, h) else img.resize(new, self.interpolation)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left = int(round((w - self.size) / 2.0))
        top = int(round((h - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))


class ToNormalizedArray:
    """PIL image [H, W(, C)] uint8 -> float32 [C, H, W] array, (x / 255 - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        mean = np.asarray(mean, np.float64).reshape(-1, 1, 1)
        std = np.asarray(std, np.float64).reshape(-1, 1, 1)
        # x * scale - offset in place: a tenth of the time of dividing and subtracting on new arrays
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.offset = (mean / std).astype(np.float32)

    def __call__(self, img: Image.Image) -> np.ndarray:
        x = np.asarray(img)
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        x = np.ascontiguousarray(x).astype(np.float32)
        x *= self.scale
        x -= self.offset
        return x


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_data(config: CfgNode) -> None:
    data = config.DATA
    _require(data.IN_CHANNELS in _MODES, f'DATA.IN_CHANNELS must be 1 (grey) or 3 (RGB), got {data.IN_CHANNELS}')
    for key in ('MEAN', 'STD'):
        values = data[key]
        _require(len(values) == data.IN_CHANNELS,
                 f'DATA.{key} has {len(values)} values but DATA.IN_CHANNELS is {data.IN_CHANNELS}; give one per channel')
    _require(all(s > 0 for s in data.STD), f'DATA.STD must be positive, got {list(data.STD)}')
    _require(data.INTERPOLATION in INTERPOLATIONS,
             f"DATA.INTERPOLATION '{data.INTERPOLATION}' is unknown; use one of {', '.join(INTERPOLATIONS)}")
    _require(data.IMAGE_SIZE > 0, f'DATA.IMAGE_SIZE must be positive, got {data.IMAGE_SIZE}')
    _require(0 < data.CROP_PCT <= 1, f'DATA.CROP_PCT must be in (0, 1], got {data.CROP_PCT}')


def _check_range(name: str, values: Sequence[float], low: float, high: float) -> None:
    _require(len(values) == 2 and low < values[0] <= values[1] <= high,
             f'{name} must be [min, max] with {low} < min <= max <= {high}, got {list(values)}')


def _train_steps(config: CfgNode, interpolation: int) -> list:
    aug, data = config.AUG, config.DATA
    _check_range('AUG.RRC_SCALE', aug.RRC_SCALE, 0.0, 1.0)
    _check_range('AUG.RRC_RATIO', aug.RRC_RATIO, 0.0, math.inf)
    _require(0 <= aug.HFLIP <= 1, f'AUG.HFLIP is a probability in [0, 1], got {aug.HFLIP}')
    _require(aug.COLOR_JITTER >= 0, f'AUG.COLOR_JITTER must be >= 0, got {aug.COLOR_JITTER}')
    steps = [RandomResizedCrop(data.IMAGE_SIZE, aug.RRC_SCALE, aug.RRC_RATIO, interpolation)]
    if aug.HFLIP > 0:
        steps.append(RandomHorizontalFlip(aug.HFLIP))
    if aug.RAND_AUGMENT_N > 0:
        fill = tuple(min(255, round(255 * m)) for m in data.MEAN)
        steps.append(RandAugment(aug.RAND_AUGMENT_N, aug.RAND_AUGMENT_M, aug.RAND_AUGMENT_MSTD,
                                 fill=fill[0] if data.IN_CHANNELS == 1 else fill, interpolation=interpolation))
    if aug.COLOR_JITTER > 0:
        steps.append(ColorJitter(aug.COLOR_JITTER))
    return steps


def build_transforms(config: CfgNode, mode: str) -> Transform:
    """Returns the per-sample transform for `mode` ('train' or 'val'): PIL image -> float32 CHW array."""
    _require(mode in ('train', 'val'), f"mode must be 'train' or 'val', got {mode!r}")
    _check_data(config)
    data = config.DATA
    interpolation = INTERPOLATIONS[data.INTERPOLATION]
    steps: list = [ConvertMode(_MODES[data.IN_CHANNELS])]
    if mode == 'train':
        steps += _train_steps(config, interpolation)
    else:
        steps += [ResizeShorter(math.floor(data.IMAGE_SIZE / data.CROP_PCT), interpolation), CenterCrop(data.IMAGE_SIZE)]
    steps.append(ToNormalizedArray(data.MEAN, data.STD))
    if mode == 'train' and config.AUG.RE_PROB > 0:
        steps.append(RandomErasing(config.AUG.RE_PROB, config.AUG.RE_MODE, config.AUG.RE_COUNT))
    return Compose(steps)

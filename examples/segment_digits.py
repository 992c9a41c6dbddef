"""Semantic segmentation of handwritten digits with a feature-extracting backbone and an FPN-lite head.

The task is built from the embedded digits (datasets/data/digits.npz): each canvas holds a few
digits, upscaled and placed in separate cells at random offsets; the mask gives every inked pixel
its digit's class (1..10) and the rest class 0 (background). Canvases of the training digits train,
those of the held-out digits (other writers) are scored by mean IoU over the classes present.

    python examples/segment_digits.py                         # Mobile-Former-26M, 600 steps, ~1 min CPU
    python examples/segment_digits.py -steps 50 -opts MODEL.OUT_INDICES [0,3]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from mobileformer import build_model, cli, get_config
from mobileformer.models.backbone import Backbone
from mobileformer.data.sources import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'digits', 'mobileformer_26m.yaml')
NUM_CLASSES = 11  # background + 10 digits
INK = 64  # of 255: a pixel at least this dark belongs to its digit


def make_canvases(images: np.ndarray, labels: np.ndarray, count: int, size: int, scale: int,
                  rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """`count` canvases [count, 1, size, size] (float32 in [-1, 1]) with masks [count, size, size]
    (int64). The canvas is cut into cells of 8*scale + margin pixels; each cell holds a random digit
    with probability 1/2 (at least one per canvas), at a random offset inside the cell."""
    digit = 8 * scale
    cells = size // (digit + 2)
    if cells < 1:
        raise ValueError(f'a canvas of {size} px cannot hold a {digit} px digit; use a larger -size or smaller -scale')
    cell = size // cells
    canvases = np.zeros((count, size, size), np.float32)
    masks = np.zeros((count, size, size), np.int64)
    for n in range(count):
        occupied = rng.random(cells * cells) < 0.5
        occupied[rng.integers(cells * cells)] = True
        for c in np.flatnonzero(occupied):
            k = rng.integers(len(images))
            ink = np.kron(images[k], np.ones((scale, scale), np.uint8))  # nearest upscaling
            top = (c // cells) * cell + rng.integers(cell - digit + 1)
            left = (c % cells) * cell + rng.integers(cell - digit + 1)
            canvases[n, top:top + digit, left:left + digit] = ink / 255.0
            masks[n, top:top + digit, left:left + digit] = np.where(ink >= INK, labels[k] + 1, 0)
    return (canvases[:, None] * 2.0 - 1.0), masks


class FPNLite(nn.Layer):
    """A minimal dense head: 1x1 laterals to `width` channels, top-down upsample-and-add from the
    coarsest map, one 3x3 conv + BN + ReLU, a 1x1 classifier, bilinear upsampling to the input."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        self.laterals = nn.LayerList([nn.Conv2D(c, width, 1) for c in in_channels])
        self.fuse = nn.Sequential(nn.Conv2D(width, width, 3, padding=1, bias_attr=False), nn.BatchNorm2D(width),
                                  nn.ReLU())
        self.classifier = nn.Conv2D(width, num_classes, 1)

    def forward(self, features: List[paddle.Tensor], size: Sequence[int]) -> paddle.Tensor:
        x = self.laterals[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            # sizes, not a factor of 2: an odd side rounds up at each stride-2 conv
            x = F.interpolate(x, size=features[i].shape[2:], mode='bilinear') + self.laterals[i](features[i])
        return F.interpolate(self.classifier(self.fuse(x)), size=size, mode='bilinear')


class Segmenter(nn.Layer):
    """A feature extractor (mobileformer.models.backbone) and an FPN-lite head: [B, C, H, W] -> logits
    [B, classes, H, W]."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        if any(info.stride == 0 for info in backbone.feature_info):
            raise ValueError('a dense head needs feature maps; leave the tokens out of MODEL.OUT_INDICES')
        self.backbone = backbone
        self.head = FPNLite(backbone.feat_channels, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.backbone(x), x.shape[2:])


def mean_iou(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> float:
    """IoU averaged over the classes present in `target` or `prediction`."""
    confusion = np.bincount(target.ravel() * num_classes + prediction.ravel(),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float((np.diag(confusion)[present] / union[present]).mean())


@dataclass
class Result:
    first_loss: float  # mean of the first tenth of the steps
    last_loss: float   # mean of the last tenth
    miou: float        # on canvases of the held-out digits
    # of a guess that knows where the ink is but not the digit (a random class per digit pixel)
    chance_miou: float


def train_and_evaluate(config_file: str = DEFAULT_CONFIG, opts: Sequence = (), steps: int = 600,
                       batch_size: int = 16, size: int = 40, scale: int = 2, lr: float = 3e-3,
                       eval_canvases: int = 64, seed: int = 0, log=print) -> Result:
    """Trains backbone + head from scratch on fresh canvases each step; returns losses and mIoU."""
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    config = get_config(config_file, ['DATA.IN_CHANNELS', 1, 'DATA.MEAN', [0.5], 'DATA.STD', [0.5]] + list(opts))
    model = Segmenter(build_model(config, features_only=True), NUM_CLASSES)
    log(f'{config.MODEL.NAME} features {[(i.name, i.channels, i.stride) for i in model.backbone.feature_info]}')
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=model.parameters(), weight_decay=1e-4)
    train = load_digits('train')
    losses = []
    model.train()
    for step in range(steps):
        images, masks = make_canvases(train.images, train.labels, batch_size, size, scale, rng)
        loss = F.cross_entropy(model(paddle.to_tensor(images)), paddle.to_tensor(masks), axis=1)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
        if (step + 1) % max(1, steps // 10) == 0:
            log(f'step {step + 1}/{steps} loss {np.mean(losses[-max(1, steps // 10):]):.4f}')
    val = load_digits('val')
    images, masks = make_canvases(val.images, val.labels, eval_canvases, size, scale, rng)
    model.eval()
    with paddle.no_grad():
        prediction = model(paddle.to_tensor(images)).argmax(axis=1).numpy()
    tenth = max(1, steps // 10)
    guess = np.where(masks > 0, rng.integers(1, NUM_CLASSES, masks.shape), 0)
    result = Result(float(np.mean(losses[:tenth])), float(np.mean(losses[-tenth:])),
                    mean_iou(prediction, masks, NUM_CLASSES), mean_iou(guess, masks, NUM_CLASSES))
    log(f'loss {result.first_loss:.4f} -> {result.last_loss:.4f}; held-out mIoU {result.miou:.4f} '
        f'(true ink with random digits: {result.chance_miou:.4f})')
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = cli.CommandParser(description='Segment digits on canvases with a backbone + FPN-lite head.')
    parser.add_argument('-cfg', default=DEFAULT_CONFIG, help='model YAML (the backbone; any family)')
    parser.add_argument('-steps', type=int, default=600)
    parser.add_argument('-batch_size', type=int, default=16)
    parser.add_argument('-size', type=int, default=40, help='canvas side in pixels')
    parser.add_argument('-opts', nargs='+', default=[], help='KEY VALUE pairs, e.g. MODEL.OUT_INDICES [0,3]')

    def run(args: List[str]) -> None:
        options = parser.parse_args(args)
        train_and_evaluate(options.cfg, options.opts, options.steps, options.batch_size, options.size)

    return cli.run(run, argv)


if __name__ == '__main__':
    sys.exit(main())

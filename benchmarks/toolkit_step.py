"""One training step of a backbone inside PaddleSeg's and PaddleDetection's models, beside the same step as a
plain script, timed in alternating blocks.

    python benchmarks/toolkit_step.py -cfg configs/mobileformer_26m.yaml -toolkits seg det -threads 2

Each step is forward, loss, backward and an AdamW step (learning rate 1e-4) on random images:
- `plain`: the classifier of `-cfg` with cross-entropy (the `train` mode of benchmarks/bench.py);
- `features`: the feature extractor the adapters wrap (`feature_backbone`, all four maps) alone, the loss
  the sum of its maps' means: what the backbone costs in the toolkits, without their heads and losses;
- `seg`: PaddleSeg's LRASPP (`-classes` classes) on `feature_backbone` (all four maps; the head reads
  strides 4, 8 and 32), with PaddleSeg's loss computation (`OhemCrossEntropyLoss` keeping every pixel:
  the cross-entropy that runs on Paddle 3) on random masks;
- `det`: PaddleDetection's RetinaNet created by ppdet from a YAML naming `DetBackbone` (strides 8, 16, 32;
  FPN with two extra levels, focal loss, max-IoU assignment), with one random box per image.
The variants run in turn, `-steps` timed steps each, for `-blocks` rounds (one untimed step each first),
so that slow phases of a shared machine hit them alike; each variant's figure is its fastest block
(seconds per step), and `ratio` is that over the plain step's. Neither toolkit is a dependency:
requirements-toolkits.txt installs them (docs/backbones.md).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np
import paddle
import yaml

from benchmarks.bench import _train_runner
from mobileformer import build_model, get_config
from mobileformer.cli import CommandParser, summary
from mobileformer.cpu import cpu_description
from mobileformer.deploy import default_threads
from mobileformer.toolkits import feature_backbone, register_paddledet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLKITS = ('seg', 'det')


def build_parser() -> CommandParser:
    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-cfg', default=os.path.join(ROOT, 'configs', 'mobileformer_26m.yaml'),
                        help='the backbone\'s model YAML (a model with feature maps at strides 4-32)')
    parser.add_argument('-toolkits', nargs='+', default=list(TOOLKITS), choices=TOOLKITS,
                        help='seg: PaddleSeg LRASPP; det: PaddleDetection RetinaNet')
    parser.add_argument('-batch', type=int, default=16, help='images per step')
    parser.add_argument('-image_size', type=int, default=224)
    parser.add_argument('-classes', type=int, default=19, help='classes of the segmentation and detection heads')
    parser.add_argument('-blocks', type=int, default=5, help='alternating blocks; the fastest is reported')
    parser.add_argument('-steps', type=int, default=3, help='timed steps per block')
    parser.add_argument('-threads', type=int, default=default_threads(),
                        help='CPU threads (default: what importing mobileformer sets)')
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('batch', 'image_size', 'classes', 'blocks', 'steps', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'-{name} must be at least 1, got {getattr(args, name)}')
    if args.image_size % 32:
        parser.error(f'-image_size must be a multiple of 32 (the backbone\'s deepest stride), got {args.image_size}')
    if not os.path.isfile(args.cfg):
        parser.error(f'no such file: {args.cfg}')
    return args


def _adamw_step(model: paddle.nn.Layer, loss_of: Callable[[], paddle.Tensor]) -> Callable[[], None]:
    """A training step: forward and loss by `loss_of`, backward, AdamW step (as bench.py's train mode)."""
    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())

    def run():
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # waits for the step
    return run


def features_step(cfg: str, images: np.ndarray) -> Callable[[], None]:
    """`feature_backbone(cfg)` alone; the loss is the sum of its maps' means (no head)."""
    model = feature_backbone(cfg)
    x = paddle.to_tensor(images)
    return _adamw_step(model, lambda: sum(feature_map.mean() for feature_map in model(x)))


def seg_step(cfg: str, images: np.ndarray, classes: int, rng: np.random.Generator) -> Callable[[], None]:
    """PaddleSeg's LRASPP on `feature_backbone(cfg)` with PaddleSeg's loss computation."""
    from paddleseg.core.train import loss_computation
    from paddleseg.models import LRASPP
    from paddleseg.models.losses import OhemCrossEntropyLoss
    count, _, height, width = images.shape
    model = LRASPP(classes, feature_backbone(cfg), backbone_indices=[0, 1, 3])
    # PaddleSeg 2.8's CrossEntropyLoss fails on Paddle 3; OHEM keeping every pixel is the cross-entropy
    losses = {'types': [OhemCrossEntropyLoss(min_kept=count * height * width)], 'coef': [1]}
    x = paddle.to_tensor(images)
    masks = paddle.to_tensor(rng.integers(0, classes, (count, 1, height, width)))
    return _adamw_step(model, lambda: sum(loss_computation(model(x), masks, None, losses)))


def retinanet_yaml(cfg: str, classes: int, width: int = 64, head_convs: int = 2, keep_top_k: int = 100,
                   score_threshold: float = 0.05) -> dict:
    """A PaddleDetection RetinaNet (as in its configs/retinanet, narrower: FPN and head `width` wide,
    `head_convs` head convs) on `DetBackbone(cfg)`'s maps at strides 8, 16, 32."""
    return {
        'architecture': 'RetinaNet',
        'num_classes': classes,
        'RetinaNet': {'backbone': 'DetBackbone', 'neck': 'FPN', 'head': 'RetinaHead'},
        'DetBackbone': {'config': cfg, 'out_indices': [1, 2, 3]},
        'FPN': {'out_channel': width, 'extra_stage': 2, 'has_extra_convs': True, 'use_c5': False},
        'RetinaHead': {
            'conv_feat': {'name': 'RetinaFeat', 'feat_in': width, 'feat_out': width, 'num_convs': head_convs,
                          'norm_type': None, 'use_dcn': False},
            'anchor_generator': {'name': 'RetinaAnchorGenerator', 'octave_base_scale': 4, 'scales_per_octave': 3,
                                 'aspect_ratios': [0.5, 1.0, 2.0], 'strides': [8.0, 16.0, 32.0, 64.0, 128.0]},
            'bbox_assigner': {'name': 'MaxIoUAssigner', 'positive_overlap': 0.5, 'negative_overlap': 0.4,
                              'allow_low_quality': True},
            'loss_class': {'name': 'FocalLoss', 'gamma': 2.0, 'alpha': 0.25, 'loss_weight': 1.0},
            'loss_bbox': {'name': 'SmoothL1Loss', 'beta': 0.0, 'loss_weight': 1.0},
            'nms': {'name': 'MultiClassNMS', 'nms_top_k': 1000, 'keep_top_k': keep_top_k,
                    'score_threshold': score_threshold, 'nms_threshold': 0.5},
        },
    }


def det_step(cfg: str, images: np.ndarray, classes: int, rng: np.random.Generator) -> Callable[[], None]:
    """PaddleDetection's RetinaNet, created by ppdet from `retinanet_yaml`, on one random box per image."""
    from ppdet.core.workspace import create, load_config
    register_paddledet()
    with tempfile.TemporaryDirectory() as workdir:
        path = os.path.join(workdir, 'retinanet.yml')
        with open(path, 'w') as f:
            yaml.safe_dump(retinanet_yaml(cfg, classes), f)
        model = create(load_config(path).architecture)
    count, _, height, width = images.shape
    corners = rng.uniform(0, 0.5, (count, 1, 2)) * [width, height]
    sides = rng.uniform(0.2, 0.5, (count, 1, 2)) * [width, height]
    inputs = {'image': paddle.to_tensor(images),
              'gt_bbox': paddle.to_tensor(np.concatenate([corners, corners + sides], axis=2).astype(np.float32)),
              'gt_class': paddle.to_tensor(rng.integers(0, classes, (count, 1, 1)).astype(np.int32)),
              'im_shape': paddle.full([count, 2], float(height)), 'scale_factor': paddle.ones([count, 2])}
    return _adamw_step(model, lambda: model(inputs)['loss'])


def fastest_blocks(runs: Dict[str, Callable[[], None]], blocks: int, steps: int) -> Dict[str, List[float]]:
    """{variant: seconds per step of each block}: the variants in turn, each block one untimed step
    then `steps` timed ones."""
    seconds = {name: [] for name in runs}
    for _ in range(blocks):
        for name, run in runs.items():
            run()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    if args.threads != default_threads():
        paddle.base.core.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    paddle.seed(0)
    images = rng.standard_normal((args.batch, 3, args.image_size, args.image_size), dtype=np.float32)
    config = get_config(args.cfg, ['DATA.IMAGE_SIZE', args.image_size])
    runs = {'plain': _train_runner(build_model(config), images, config.MODEL.NUM_CLASSES),
            'features': features_step(args.cfg, images)}
    builders = {'seg': seg_step, 'det': det_step}
    for toolkit in args.toolkits:
        runs[toolkit] = builders[toolkit](args.cfg, images, args.classes, rng)
    seconds = fastest_blocks(runs, args.blocks, args.steps)
    machine = {'record': 'machine', 'cpu': cpu_description(), 'threads': args.threads, 'batch': args.batch,
               'image_size': args.image_size, 'blocks': args.blocks, 'steps': args.steps,
               'load_avg_1m': os.getloadavg()[0]}
    results = [{'record': 'result', 'variant': name, 'seconds_per_step': min(times), 'seconds_per_block': times,
                'ratio': min(times) / min(seconds['plain'])} for name, times in seconds.items()]
    for record in [machine] + results:
        print(json.dumps(record))
    print(f'\nCPU: {machine["cpu"]}, {args.threads} threads, batch {args.batch} at {args.image_size} px, fastest of '
          f'{args.blocks} alternating blocks of {args.steps} steps, load {machine["load_avg_1m"]:.1f}\n')
    print('| training step | s/step | ratio to plain |\n|---|---|---|')
    for result in results:
        print(f'| {result["variant"]} | {result["seconds_per_step"]:.3f} | {result["ratio"]:.2f}x |')
    return [machine] + results


if __name__ == '__main__':
    main()

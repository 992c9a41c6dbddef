"""What a teacher adds to the student's training step (docs/distillation.md, Teacher cost).

    python benchmarks/teacher_cost.py -teacher configs/digits/mobileformer_96m_teacher.yaml TEACHER.pdparams \
        -teacher EXPORT_FOLDER

Times train.py's training step (`TrainingModel.train_batch`: the teacher's answer when there is one,
forward, loss, backward, AdamW step) of the `-cfg` student (default: the quickstart) on one batch of
its training size, without a teacher and with each `-teacher` (a YAML and its weights, an export.py
folder or an .onnx file, as train.py -teacher takes them). The variants run in alternating blocks of
`-steps` steps each, so a shared machine's changing speed hits all alike; printed: each variant's
median step time over the blocks, the median (interquartile range) of its per-block ratio to the
student alone, and its fastest block against the student's fastest (the least disturbed figures
on a busy machine).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np
import paddle

from mobileformer import build_model, cpu_ops, engine, get_config
from mobileformer.cli import CommandParser, summary
from mobileformer.cpu import cpu_description
from mobileformer.data import build_mixup
from mobileformer.deploy import default_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'digits', 'mobileformer_26m.yaml')


def build_parser() -> CommandParser:
    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-cfg', default=QUICKSTART, help='the student (default: the quickstart)')
    parser.add_argument('-teacher', nargs='+', action='append', default=[], metavar='PATH',
                        help='a teacher as train.py -teacher takes it; repeat for several')
    parser.add_argument('-blocks', type=int, default=8)
    parser.add_argument('-steps', type=int, default=5, help='training steps of each variant per block')
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.blocks < 4 or args.steps < 1:
        parser.error('-blocks must be at least 4 (for quartiles) and -steps at least 1')
    if any(len(teacher) > 2 for teacher in args.teacher):
        parser.error('each -teacher takes a folder, an .onnx file, or a YAML and its weights')
    return args


def training_step(cfg: str, teacher: Sequence[str]) -> Callable[[], None]:
    """One training step of the student as train.py builds it, on a fixed random batch."""
    opts = ['TRAIN.DISTILL.TEACHER', teacher[0]] if teacher else []
    opts += ['TRAIN.DISTILL.WEIGHTS', teacher[1]] if len(teacher) == 2 else []
    config = get_config(cfg, opts)
    engine.seed_everything(config.SEED)
    network = build_model(config)
    cpu_ops.prepare(network, lambda line: None)
    built_teacher = engine.build_teacher(config, lambda line: None)
    mixup = build_mixup(config)
    criterion, metrics = engine.build_criterion(config, mixup), engine.build_metrics(config.MODEL.NUM_CLASSES)
    if built_teacher is not None:
        criterion, teacher_metrics = engine.build_distillation(config, criterion)
        metrics += teacher_metrics
    model = engine.TrainingModel(network, criterion, mixup, 1, built_teacher)
    optimizer = engine.build_optimizer(config, network, engine.build_lr_schedule(config, 100))
    model.prepare(optimizer, model.train_loss, metrics=metrics)
    size, batch = config.DATA.IMAGE_SIZE, config.DATA.BATCH_SIZE
    rng = np.random.default_rng(0)
    images = paddle.to_tensor(rng.standard_normal((batch, config.DATA.IN_CHANNELS, size, size), dtype=np.float32))
    labels = paddle.to_tensor(rng.integers(0, config.MODEL.NUM_CLASSES, batch))
    network.train()
    return lambda: model.train_batch([images], [labels])


def block_seconds(step: Callable[[], None], steps: int) -> float:
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) / steps


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    variants = {'no teacher': training_step(args.cfg, [])}
    variants.update({' '.join(teacher): training_step(args.cfg, teacher) for teacher in args.teacher})
    for step in variants.values():
        block_seconds(step, 2)  # warm-up: kernel builds, runtime start, allocator
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.blocks):
        for name, step in variants.items():
            times[name].append(block_seconds(step, args.steps))
    print(f'CPU: {cpu_description()}, {default_threads()} threads; student {os.path.relpath(args.cfg, ROOT)}; '
          f'{args.blocks} alternating blocks of {args.steps} steps')
    results = {}
    for name, seconds in times.items():
        ratios = np.asarray(seconds) / np.asarray(times['no teacher'])
        results[name] = {'step_s': float(np.median(seconds)), 'ratio': float(np.median(ratios)),
                         'ratio_iqr': [float(q) for q in np.percentile(ratios, [25, 75])],
                         'fastest_s': min(seconds), 'fastest_ratio': min(seconds) / min(times['no teacher'])}
        result = results[name]
        print(f"{name}: {1000 * result['step_s']:.0f} ms a step, {result['ratio']:.2f}x the student alone "
              f"(IQR {result['ratio_iqr'][0]:.2f}-{result['ratio_iqr'][1]:.2f}); fastest block "
              f"{1000 * result['fastest_s']:.0f} ms, {result['fastest_ratio']:.2f}x", flush=True)
    return results


if __name__ == '__main__':
    main()

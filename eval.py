"""Evaluate weights on a dataset's validation split; the last line printed is

    top1=0.xxxx top5=0.xxxx loss=x.xxxx samples=N

    python eval.py -cfg configs/mobileformer_26m.yaml -pretrained output/mobileformer_26m/best.pdparams -data_path ...
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import sys
from typing import List, Optional

from mobileformer.data import build_dataset
from mobileformer import build_model, get_config
from mobileformer import checkpoint, cli, cpu_ops, engine


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a .pdparams on the validation split.')
    parser.add_argument('-cfg', required=True, help='YAML config of the model')
    parser.add_argument('-pretrained', required=True, help='.pdparams to evaluate (e.g. output/x/best.pdparams)')
    parser.add_argument('-dataset', help='DATA.DATASET')
    parser.add_argument('-data_path', help='DATA.DATA_PATH')
    parser.add_argument('-batch_size', type=int, help='DATA.BATCH_SIZE_EVAL, per card')
    parser.add_argument('-opts', nargs='+', default=[], help='KEY VALUE pairs overriding the config')
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    opts = []
    for flag, key in (('dataset', 'DATA.DATASET'), ('data_path', 'DATA.DATA_PATH'),
                      ('batch_size', 'DATA.BATCH_SIZE_EVAL')):
        if getattr(args, flag) is not None:
            opts += [key, getattr(args, flag)]
    config = get_config(args.cfg, opts + list(args.opts))
    network = build_model(config)
    checkpoint.load_weights(network, args.pretrained)
    cpu_ops.prepare(network, print if engine.is_main_process() else lambda line: None)
    dataset = build_dataset(config, 'val')
    loader = engine.build_loader(dataset, config.DATA.BATCH_SIZE_EVAL, config.DATA.NUM_WORKERS, train=False,
                                skip_bad=config.DATA.SKIP_BAD_IMAGES)
    model = engine.TrainingModel(network, train_loss=None)
    model.prepare(metrics=engine.build_metrics(config.MODEL.NUM_CLASSES))
    return engine.evaluate_model(model, loader, verbose=2 if engine.is_main_process() else 0)


def run(argv: List[str]) -> None:
    result = evaluate(parse_args(argv))
    if engine.is_main_process():
        print(f"top1={result['top1']:.4f} top5={result['top5']:.4f} loss={result['loss']:.4f} "
              f"samples={result['samples']}")


def main(argv: Optional[List[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    sys.exit(main())

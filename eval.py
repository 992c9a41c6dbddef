"""Evaluate weights, or an exported model, on a dataset's validation split; the last line printed is

    top1=0.xxxx top5=0.xxxx loss=x.xxxx samples=N

(top<k> with k = the class count when there are fewer than 5 classes; loss is the plain cross-entropy.)

    python eval.py -cfg configs/mobileformer_26m.yaml -pretrained output/mobileformer_26m/best.pdparams -data_path ...
    python eval.py -cfg configs/mobileformer_26m.yaml -model export/mf26m [-runtime onnxruntime] -data_path ...

`-model` runs the folder written by export.py at the precision it records (fp32, int8 or bf16) in
the fastest runtime for it, or in `-runtime`; the metrics are those of the dygraph evaluation.
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import sys
from typing import List, Optional

import numpy as np

from mobileformer.data import build_dataset
from mobileformer import build_model, get_config
from mobileformer import checkpoint, cli, cpu_ops, engine
from mobileformer.deploy import AUTO, RUNTIMES, InferenceModel


def build_parser() -> cli.CommandParser:
    parser = cli.CommandParser(description='Evaluate weights, or an exported model, on a dataset\'s validation split.')
    parser.add_argument('-cfg', required=True, help='YAML config of the model')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-pretrained', help='.pdparams to evaluate (e.g. output/x/best.pdparams)')
    source.add_argument('-model', help='folder written by export.py, at the precision it records')
    parser.add_argument('-runtime', default=AUTO, choices=(AUTO,) + RUNTIMES,
                        help='runtime for -model (default: the fastest measured on this CPU)')
    parser.add_argument('-retime', action='store_true',
                        help='with -model and -runtime auto: time the runtimes again instead of reading the cached timing')
    parser.add_argument('-dataset', help='DATA.DATASET')
    parser.add_argument('-data_path', help='DATA.DATA_PATH')
    parser.add_argument('-batch_size', type=int, help='DATA.BATCH_SIZE_EVAL, per card')
    parser.add_argument('-opts', nargs='+', default=[], help='KEY VALUE pairs overriding the config')
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    opts = []
    for flag, key in (('dataset', 'DATA.DATASET'), ('data_path', 'DATA.DATA_PATH'),
                      ('batch_size', 'DATA.BATCH_SIZE_EVAL')):
        if getattr(args, flag) is not None:
            opts += [key, getattr(args, flag)]
    config = get_config(args.cfg, opts + list(args.opts))
    if args.model:
        return evaluate_export(config, args.model, args.runtime, args.retime)
    network = build_model(config)
    checkpoint.load_weights(network, args.pretrained)
    cpu_ops.prepare(network, print if engine.is_main_process() else lambda line: None)
    dataset = build_dataset(config, 'val')
    loader = engine.build_loader(dataset, config.DATA.BATCH_SIZE_EVAL, config.DATA.NUM_WORKERS, train=False,
                                skip_bad=config.DATA.SKIP_BAD_IMAGES)
    model = engine.TrainingModel(network, train_loss=None)
    model.prepare(metrics=engine.build_metrics(config.MODEL.NUM_CLASSES))
    return engine.evaluate_model(model, loader, verbose=2 if engine.is_main_process() else 0)


def evaluate_export(config, model_dir: str, runtime: str, retime: bool = False) -> dict:
    """The metrics of `evaluate` for an export run by `InferenceModel`. The batches are read in this
    process: OpenVINO, once loaded, must not be followed by forked data-loader workers."""
    model = InferenceModel(model_dir, runtime=runtime, retime=retime)
    dataset = build_dataset(config, 'val')
    top_k = engine.top_k(config.MODEL.NUM_CLASSES)
    hits1 = hits_k = 0
    loss = 0.0
    for start in range(0, len(dataset), config.DATA.BATCH_SIZE_EVAL):
        samples = [dataset[i] for i in range(start, min(start + config.DATA.BATCH_SIZE_EVAL, len(dataset)))]
        labels = np.array([int(label) for _, label in samples])
        logits = model(np.stack([np.asarray(image, np.float32) for image, _ in samples]))
        if isinstance(logits, list):
            raise ValueError('the model is a feature extractor (MODEL.OUT_INDICES), which has no classes to '
                             'evaluate; export a classifier')
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss -= float(log_probabilities[np.arange(len(labels)), labels].sum())
        best = np.argsort(-logits, axis=1, kind='stable')[:, :top_k]
        hits1 += int((best[:, 0] == labels).sum())
        hits_k += int((best == labels[:, None]).any(axis=1).sum())
    count = len(dataset)
    return {'top1': hits1 / count, f'top{top_k}': hits_k / count, 'ce': loss / count, 'samples': count}


def run(argv: List[str]) -> None:
    result = evaluate(parse_args(argv))
    if engine.is_main_process():
        top_k = next(key for key in result if key.startswith('top') and key != 'top1')
        print(f"top1={result['top1']:.4f} {top_k}={result[top_k]:.4f} loss={result['ce']:.4f} "
              f"samples={result['samples']}")


def main(argv: Optional[List[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    sys.exit(main())

"""Our exported model against another ONNX model (e.g. the reference exported from PyTorch), timed
in alternation so that a shared machine's changing speed hits both alike.

    python benchmarks/paired.py -cfg configs/mobileformer_26m.yaml -compare official_mobile_former_26m.onnx

Each block times ours (`InferenceModel`, the runtime it picks per batch size, or `-runtime`) and then
the other model in each installed ONNX runtime (its best counts; through the same runtime wrappers as
ours unless `-other_as_exported`, which runs it as a plain script runs its file), about BLOCK_S each; the ratio
ours / other's best is taken per block, and its median and interquartile range over `-blocks`
blocks are printed, one line per batch size. `bench.py -compare` reports each figure's median
instead, measured minutes apart: on a shared VM its rounds differed by up to 2x, the ratios of
neighbouring blocks far less.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np

from mobileformer import get_config
from mobileformer.cli import CommandParser, summary
from mobileformer.cpu import cpu_description
from mobileformer.deploy import (AUTO, ONNX_FILE, RUNTIMES, InferenceModel, OnnxModel, OpenVinoModel, build_for_inference,
                                 default_threads, export_inference, export_onnx, installed_runtimes)

BLOCK_S = 0.1  # seconds each model runs per block, at least one run


def _block_seconds(engine: Callable, batch: np.ndarray, iters: int) -> float:
    """The median of `iters` runs after one untimed run."""
    engine(batch)
    times = []
    for _ in range(iters):
        begin = time.perf_counter()
        engine(batch)
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def compare(ours: Callable, others: Dict[str, Callable], batch: np.ndarray, blocks: int) -> Dict:
    """Ratios ours / the fastest of `others`, block by block."""
    probe = {name: _block_seconds(engine, batch, 1) for name, engine in {'ours': ours, **others}.items()}
    iters = {name: max(1, math.ceil(BLOCK_S / seconds)) for name, seconds in probe.items()}
    ours_s, best_s, best_names = [], [], []
    for _ in range(blocks):
        ours_s.append(_block_seconds(ours, batch, iters['ours']))
        seconds = {name: _block_seconds(engine, batch, iters[name]) for name, engine in others.items()}
        best_names.append(min(seconds, key=seconds.get))
        best_s.append(seconds[best_names[-1]])
    ratios = np.array(ours_s) / np.array(best_s)
    return {'batch': len(batch), 'blocks': blocks, 'ours_s': float(np.median(ours_s)),
            'other_best_s': float(np.median(best_s)), 'other_best': max(set(best_names), key=best_names.count),
            'ratio': float(np.median(ratios)), 'ratio_iqr': [float(q) for q in np.percentile(ratios, [25, 75])]}


def build_parser() -> CommandParser:
    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-cfg', required=True, help='config YAML of our model (random weights unless -pretrained)')
    parser.add_argument('-pretrained', help='weights for -cfg')
    parser.add_argument('-compare', required=True, metavar='FILE.onnx', help='the other model')
    parser.add_argument('-runtime', default=AUTO, choices=(AUTO,) + RUNTIMES, help='ours runs in this runtime')
    parser.add_argument('-other_as_exported', action='store_true',
                        help="run the other model as a plain script runs its file (OpenVINO compiled for the file's "
                             'own input shape, every batch whole) instead of through the wrappers ours runs in '
                             '(OpenVINO compiled per input shape, even batches in two streams)')
    parser.add_argument('-batches', type=int, nargs='+', default=[1, 32])
    parser.add_argument('-blocks', type=int, default=20)
    parser.add_argument('-threads', type=int, default=None, help='default: every CPU unless OMP_NUM_THREADS, as importing mobileformer sets')
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.compare):
        parser.error(f"-compare '{args.compare}' does not exist")
    if args.blocks < 4 or min(args.batches) < 1:
        parser.error('-blocks must be at least 4 (for quartiles) and -batches positive')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    config = get_config(args.cfg)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    others = {}
    if 'onnxruntime' in installed_runtimes():
        others['onnxruntime'] = OnnxModel(args.compare, threads)
    if 'openvino' in installed_runtimes():
        others['openvino'] = OpenVinoModel(args.compare, threads, static_shapes=0 if args.other_as_exported else None)
    form = 'as exported' if args.other_as_exported else 'through our runtime wrappers'
    print(f'CPU: {cpu_description()}, {threads} threads; ratio = ours / the other model ({form}) in its fastest '
          f'runtime, per block of about {BLOCK_S} s each')
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        model = build_for_inference(config, args.pretrained)
        export_inference(model, config, workdir)
        export_onnx(model, config, os.path.join(workdir, ONNX_FILE))
        ours = InferenceModel(workdir, runtime=args.runtime, threads=threads, log=lambda line: None)
        rng = np.random.default_rng(0)
        for batch_size in args.batches:
            batch = rng.standard_normal((batch_size, channels, size, size), dtype=np.float32)
            result = {'ours_runtime': ours.engine_for(batch_size).name,
                      **compare(ours, others, batch, args.blocks)}
            results.append(result)
            print(f"batch {batch_size}: ours ({result['ours_runtime']}) {1000 * result['ours_s']:.2f} ms, "
                  f"{os.path.basename(args.compare)} ({result['other_best']}) {1000 * result['other_best_s']:.2f} ms: "
                  f"ratio {result['ratio']:.3f} (IQR {result['ratio_iqr'][0]:.3f}-{result['ratio_iqr'][1]:.3f}, "
                  f"{args.blocks} blocks)", flush=True)
    return results


if __name__ == '__main__':
    main()

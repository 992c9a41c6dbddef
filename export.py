"""Exports a model for deployment: Paddle inference files and ONNX (dynamic batch).

    python export.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams -output export/mf26m [-no_onnx]

Re-parameterisable blocks (RepMLP) are folded first. The export is checked against the dygraph
model on a random batch in every installed runtime (the largest absolute difference of the logits
is printed for each), and the fastest runtime for it on this CPU is measured and cached, so
`InferenceModel` / `predict.py -model` use it from then on.
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import os
from typing import Optional, Sequence

import numpy as np

from mobileformer import cli, get_config
from mobileformer.deploy import (ONNX_FILE, InferenceModel, Outputs, build_for_inference, dygraph_outputs, export_inference,
                                 export_onnx, installed_runtimes, load_runtime)


CHECK_BATCH = 4


def max_difference(outputs: Outputs, reference: Outputs) -> float:
    """The largest absolute difference over every output (a feature extractor has several)."""
    if isinstance(reference, np.ndarray):
        outputs, reference = [outputs], [reference]
    if not isinstance(outputs, list) or len(outputs) != len(reference):
        return float('inf')
    return max(float(np.abs(a - b).max()) for a, b in zip(outputs, reference))


def run(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', required=True, help='model config YAML')
    parser.add_argument('-pretrained', required=True, help='weights (.pdparams)')
    parser.add_argument('-output', '-o', '--output', dest='output', required=True, help='output folder')
    parser.add_argument('-no_onnx', '--no-onnx', dest='no_onnx', action='store_true',
                        help=f'skip {ONNX_FILE} (then only the paddle runtime can run the export)')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    args = parser.parse_args(argv)
    config = get_config(args.cfg, args.opts)
    model = build_for_inference(config, args.pretrained)
    prefix = export_inference(model, config, args.output)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    batch = np.random.default_rng(0).standard_normal((CHECK_BATCH, channels, size, size), dtype=np.float32)
    reference = dygraph_outputs(model, batch)
    written, onnx_file = f'{prefix}.*', os.path.join(args.output, ONNX_FILE)
    if not args.no_onnx:
        written += ' and ' + export_onnx(model, config, onnx_file)
    elif os.path.exists(onnx_file):
        os.remove(onnx_file)  # an earlier export's: the other runtimes would run the old model
    print(f'exported {config.MODEL.NAME} to {written} (input [N, {channels}, {size}, {size}])')
    for runtime in installed_runtimes():
        if runtime != 'paddle' and args.no_onnx:
            continue
        difference = max_difference(load_runtime(runtime, args.output)(batch), reference)
        print(f'max |{runtime} - dygraph| on a batch of {CHECK_BATCH}: {difference:.3g}')
    InferenceModel(args.output)  # measures the runtimes once and prints the fastest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

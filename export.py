"""Exports a model for deployment: Paddle inference files (dynamic batch) and optionally ONNX.

    python export.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams -o export/mf26m [--onnx]

Re-parameterisable blocks (RepMLP) are folded first. The exported model is checked against the
dygraph model on a random batch; the largest absolute difference of the logits is printed.
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import os
from typing import Optional, Sequence

import numpy as np

from mobileformer import cli, get_config
from mobileformer.deploy import (ONNX_FILE, InferenceModel, OnnxModel, build_for_inference, dygraph_logits,
                                 export_inference, export_onnx)

CHECK_BATCH = 4


def run(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', required=True, help='model config YAML')
    parser.add_argument('-pretrained', required=True, help='weights (.pdparams)')
    parser.add_argument('-o', '--output', required=True, help='output folder')
    parser.add_argument('--onnx', action='store_true', help=f'also write {ONNX_FILE} (paddle2onnx) and check it with onnxruntime')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    args = parser.parse_args(argv)
    config = get_config(args.cfg, args.opts)
    model = build_for_inference(config, args.pretrained)
    prefix = export_inference(model, config, args.output)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    batch = np.random.default_rng(0).standard_normal((CHECK_BATCH, channels, size, size), dtype=np.float32)
    reference = dygraph_logits(model, batch)
    exported = InferenceModel(args.output)(batch)
    print(f'exported {config.MODEL.NAME} to {prefix}.* (input [N, {channels}, {size}, {size}]); '
          f'max |paddle.inference - dygraph| on a batch of {CHECK_BATCH}: {np.abs(exported - reference).max():.3g}')
    if args.onnx:
        path = export_onnx(args.output, os.path.join(args.output, ONNX_FILE))
        difference = np.abs(OnnxModel(path)(batch) - reference).max()
        print(f'exported ONNX to {path}; max |onnxruntime - dygraph|: {difference:.3g}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

"""Classifies images: the top-5 classes with their probabilities.

    python predict.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams cat.jpg dog.png
    python predict.py -cfg configs/mobileformer_26m.yaml -model export/mf26m cat.jpg     # exported model
    python predict.py -cfg configs/mobileformer_26m.yaml -model export/mf26m -runtime paddle cat.jpg

An exported model runs at the precision its folder records (export.py -precision: fp32, int8 or
bf16), in the fastest runtime that runs that precision.

Preprocessing is the config's evaluation transform (mobileformer.data.build_transforms 'val': resize to
IMAGE_SIZE / CROP_PCT, center crop, normalise). Class names: the built-in ImageNet-1k names for
`imagenet` with 1000 classes, else the dataset's own (`mobileformer.data.build_dataset(config, 'val').classes`:
0..9 for digits, folder names for folder datasets), else the class index.
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import argparse
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from yacs.config import CfgNode

from mobileformer.data import build_dataset, build_transforms
from mobileformer import cli, get_config
from mobileformer.deploy import AUTO, RUNTIMES, InferenceModel, Outputs, build_for_inference, dygraph_outputs

TOP_K = 5
IMAGENET_NAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mobileformer', 'imagenet_classes.txt')


def class_names(config: CfgNode) -> List[str]:
    """One name per output class (see the module docstring for where they come from)."""
    count = config.MODEL.NUM_CLASSES
    if config.DATA.DATASET == 'imagenet' and count == 1000:
        with open(IMAGENET_NAMES, encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if not line.startswith('#')]
    try:
        names = build_dataset(config, 'val').classes
    except ValueError as e:
        print(f'notice: no class names ({e}); printing class indices')
        names = []
    return names if len(names) == count else [f'class {i}' for i in range(count)]


def load_image(path: str, transform: Callable) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from None
    return transform(image)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict(run: Callable[[np.ndarray], Outputs], images: Sequence[str], config: CfgNode,
            batch_size: int) -> List[List[tuple]]:
    """[(probability, class index), ...] top-5 per image."""
    transform = build_transforms(config, 'val')
    results = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([load_image(p, transform) for p in images[start:start + batch_size]])
        logits = run(batch)
        if isinstance(logits, list):
            raise ValueError(f'the model is a feature extractor ({len(logits)} outputs, from MODEL.OUT_INDICES), '
                             'which predicts no classes; predict with a classifier (no MODEL.OUT_INDICES)')
        probabilities = softmax(logits.astype(np.float64))
        for row in probabilities:
            best = np.argsort(-row)[:TOP_K]
            results.append([(float(row[i]), int(i)) for i in best])
    return results


CONFIG_KEY = re.compile(r'[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*')


def split_opts_and_paths(opts: Sequence[str]) -> Tuple[List[str], List[str]]:
    """`-opts KEY VALUE ... image.jpg ...` (argparse gives `-opts` everything after it): the
    KEY VALUE pairs, then the image paths that follow them."""
    pairs = 0
    while 2 * pairs + 1 < len(opts) and CONFIG_KEY.fullmatch(opts[2 * pairs]):
        pairs += 1
    return list(opts[:2 * pairs]), list(opts[2 * pairs:])


def run(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', required=True, help='model config YAML (preprocessing, classes)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-pretrained', help='weights (.pdparams), run in dygraph')
    source.add_argument('-model', help='folder written by export.py, run at its precision in the fastest runtime for it')
    parser.add_argument('-runtime', default=AUTO, choices=(AUTO,) + RUNTIMES,
                        help='runtime for -model (default: the fastest measured on this CPU)')
    parser.add_argument('-retime', action='store_true',
                        help='with -model and -runtime auto: time the runtimes again instead of reading the cached timing')
    parser.add_argument('-data_path', help='DATA.DATA_PATH, for the class names of a folder dataset')
    parser.add_argument('images', nargs='*', help='image files')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    args = parser.parse_args(argv)
    opts, trailing_images = split_opts_and_paths(args.opts)
    images = args.images + trailing_images
    if not images:
        parser.error('give at least one image file')
    data_path = ['DATA.DATA_PATH', args.data_path] if args.data_path else []
    config = get_config(args.cfg, data_path + opts)
    if args.model:
        run = InferenceModel(args.model, runtime=args.runtime, retime=args.retime)
    else:
        model = build_for_inference(config, args.pretrained)
        run = lambda batch: dygraph_outputs(model, batch)  # noqa: E731
    names = class_names(config)
    for path, top in zip(images, predict(run, images, config, config.DATA.BATCH_SIZE_EVAL)):
        print(f'{path}:')
        for probability, index in top:
            print(f'  {probability:.4f}  {names[index]} ({index})')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

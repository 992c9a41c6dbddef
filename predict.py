"""Classifies images: the top-5 classes with their probabilities.

    python predict.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams cat.jpg dog.png
    python predict.py -cfg configs/mobileformer_26m.yaml -model export/mf26m cat.jpg     # exported model

Preprocessing is the evaluation one of the config: resize to IMAGE_SIZE / CROP_PCT, center crop,
normalise with MEAN / STD. Class names: ImageNet-1k names for `imagenet`, 0..9 for `digits`, else the
folder names of DATA.DATA_PATH/train (folder datasets), else the class index.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image
from yacs.config import CfgNode

from mobileformer import get_config
from mobileformer.deploy import InferenceModel, build_for_inference, dygraph_logits

TOP_K = 5
IMAGENET_NAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mobileformer', 'imagenet_classes.txt')
_RESAMPLE = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST,
             'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING}


def class_names(config: CfgNode) -> List[str]:
    """One name per output class (see the module docstring for where they come from)."""
    count = config.MODEL.NUM_CLASSES
    if config.DATA.DATASET == 'imagenet' and count == 1000:
        with open(IMAGENET_NAMES, encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if not line.startswith('#')]
    if config.DATA.DATASET == 'digits':
        return [str(i) for i in range(count)]
    train = os.path.join(config.DATA.DATA_PATH, 'train')
    if config.DATA.DATA_PATH and os.path.isdir(train):
        folders = sorted(e.name for e in os.scandir(train) if e.is_dir())
        if len(folders) == count:
            return folders
    return [f'class {i}' for i in range(count)]


def load_image(path: str, config: CfgNode) -> np.ndarray:
    """[C, S, S] float32: resize the short side to S / CROP_PCT, center crop S, normalise."""
    try:
        image = Image.open(path)
        image = image.convert('L' if config.DATA.IN_CHANNELS == 1 else 'RGB')
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image '{path}': {e}") from None
    size = config.DATA.IMAGE_SIZE
    short = int(size / config.DATA.CROP_PCT)
    width, height = image.size
    scale = short / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), _RESAMPLE[config.DATA.INTERPOLATION])
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    pixels = pixels.reshape(size, size, -1).transpose(2, 0, 1)
    mean = np.asarray(config.DATA.MEAN, np.float32).reshape(-1, 1, 1)
    std = np.asarray(config.DATA.STD, np.float32).reshape(-1, 1, 1)
    if len(mean) != len(pixels) or len(std) != len(pixels):
        raise ValueError(f'DATA.MEAN and DATA.STD need one value per input channel ({len(pixels)})')
    return (pixels - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def predict(run: Callable[[np.ndarray], np.ndarray], images: Sequence[str], config: CfgNode,
            batch_size: int) -> List[List[tuple]]:
    """[(probability, class index), ...] top-5 per image."""
    results = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([load_image(p, config) for p in images[start:start + batch_size]])
        probabilities = softmax(run(batch).astype(np.float64))
        for row in probabilities:
            best = np.argsort(-row)[:TOP_K]
            results.append([(float(row[i]), int(i)) for i in best])
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', required=True, help='model config YAML (preprocessing, classes)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-pretrained', help='weights (.pdparams), run in dygraph')
    source.add_argument('-model', help='folder written by export.py, run by paddle.inference')
    parser.add_argument('images', nargs='+')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    args = parser.parse_args(argv)
    try:
        config = get_config(args.cfg, args.opts)
        if args.model:
            run = InferenceModel(args.model)
        else:
            model = build_for_inference(config, args.pretrained)
            run = lambda batch: dygraph_logits(model, batch)  # noqa: E731
        names = class_names(config)
        for path, top in zip(args.images, predict(run, args.images, config, config.DATA.BATCH_SIZE_EVAL)):
            print(f'{path}:')
            for probability, index in top:
                print(f'  {probability:.4f}  {names[index]} ({index})')
    except ValueError as e:
        parser.exit(2, f'error: {e}\n')


if __name__ == '__main__':
    main()

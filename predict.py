"""Classifies images: the top-5 classes with their probabilities.

    python predict.py -cfg configs/mobileformer_26m.yaml -pretrained mobileformer_26m.pdparams cat.jpg dog.png
    python predict.py -model export/mf26m cat.jpg                     # exported model: nothing else needed
    python predict.py -model export/mf26m -runtime paddle cat.jpg
    python predict.py -model export/mf26m photos/                     # every image in it

An export folder holds the config it was built from and its class names (mobileformer.deploy.folder),
and runs at the precision it records (export.py -precision: fp32, int8 or bf16), in the fastest
runtime that runs that precision. A folder exported before it held its config needs `-cfg`.

Preprocessing is the config's evaluation transform (mobileformer.data.build_transforms 'val': resize to
IMAGE_SIZE / CROP_PCT, center crop, normalise). Class names: those the export folder records; else
the built-in ImageNet-1k names for `imagenet` with 1000 classes, else the dataset's own
(`mobileformer.data.build_dataset(config, 'val').classes`: 0..9 for digits, folder names for folder
datasets), else the class index; a name other than the index is followed by the index.
"""
from __future__ import annotations

import mobileformer  # noqa: F401  (first: it filters notices Paddle prints when imported)
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from yacs.config import CfgNode

from mobileformer.data import build_transforms, open_image
from mobileformer.data.sources import IMAGE_EXTENSIONS, images_under
from mobileformer import cli, get_config
from mobileformer.deploy import (AUTO, CONFIG_FILE, RUNTIMES, InferenceModel, Outputs, Prediction, build_for_inference,
                                 dataset_class_names, dygraph_outputs, read_class_names, read_config, top_classes)

TOP_K = 5


def load_image(path: str, transform: Callable) -> np.ndarray:
    return transform(open_image(path))


def image_files(paths: Sequence[str]) -> List[str]:
    """`paths` with each folder replaced by the images in it (sub-folders included), sorted."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = images_under(path)
        if not found:
            raise ValueError(f"folder '{path}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); give image files "
                             'or a folder of them')
        files += found
    return files


def predict(run: Callable[[np.ndarray], Outputs], images: Sequence[str], config: CfgNode,
            class_names: Optional[Sequence[str]], batch_size: int) -> List[List[Prediction]]:
    """The top-5 classes of each image, most probable first."""
    transform = build_transforms(config, 'val')
    results = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([load_image(p, transform) for p in images[start:start + batch_size]])
        results += top_classes(run(batch), class_names, TOP_K)
    return results


CONFIG_KEY = re.compile(r'[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)*')


def split_opts_and_paths(opts: Sequence[str]) -> Tuple[List[str], List[str]]:
    """`-opts KEY VALUE ... image.jpg ...` (argparse gives `-opts` everything after it): the
    KEY VALUE pairs, then the image paths that follow them."""
    pairs = 0
    while 2 * pairs + 1 < len(opts) and CONFIG_KEY.fullmatch(opts[2 * pairs]):
        pairs += 1
    return list(opts[:2 * pairs]), list(opts[2 * pairs:])


def _inputs_and_classes(config: CfgNode) -> str:
    size = config.DATA.IMAGE_SIZE
    return f'inputs [N, {config.DATA.IN_CHANNELS}, {size}, {size}] and {config.MODEL.NUM_CLASSES} classes'


def folder_config(model_dir: str, cfg: Optional[str], opts: Sequence) -> CfgNode:
    """The config the export in `model_dir` was built from (with `opts`); `cfg` is only needed for a
    folder exported before it held its config, and refused when it describes another model."""
    config = read_config(model_dir, opts)
    if config is None:
        if cfg is None:
            raise ValueError(f"'{model_dir}' holds no {CONFIG_FILE} (it was exported before export.py wrote one); "
                             'pass -cfg with the config it was exported from, or export it again with export.py')
        return get_config(cfg, opts)
    if cfg is not None:
        given = get_config(cfg, opts)
        if _inputs_and_classes(given) != _inputs_and_classes(config):
            raise ValueError(f"-cfg {cfg} describes {_inputs_and_classes(given)}, but the model in '{model_dir}' "
                             f'was exported for {_inputs_and_classes(config)} and holds its own config '
                             f'({CONFIG_FILE}); drop -cfg')
    return config


def build_parser() -> cli.CommandParser:
    parser = cli.CommandParser(description=cli.summary(__doc__))
    parser.add_argument('-cfg', help='model config YAML (preprocessing, classes); not needed with -model')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('-pretrained', help='weights (.pdparams), run in dygraph')
    source.add_argument('-model', help='folder written by export.py, run at its precision in the fastest runtime for it')
    parser.add_argument('-runtime', default=AUTO, choices=(AUTO,) + RUNTIMES,
                        help='runtime for -model (default: the fastest measured on this CPU)')
    parser.add_argument('-retime', action='store_true',
                        help='with -model and -runtime auto: time the runtimes again instead of reading the cached timing')
    parser.add_argument('-data_path', help='DATA.DATA_PATH, for the class names of a folder dataset')
    parser.add_argument('images', nargs='*', help='image files, or folders whose images are all predicted (sorted)')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    return parser


def run(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    opts, trailing_images = split_opts_and_paths(args.opts)
    images = image_files(args.images + trailing_images)
    if not images:
        parser.error('give at least one image file or folder')
    opts = (['DATA.DATA_PATH', args.data_path] if args.data_path else []) + opts
    if args.model:
        config = folder_config(args.model, args.cfg, opts)
        run = InferenceModel(args.model, runtime=args.runtime, retime=args.retime)
        names = read_class_names(args.model)
    else:
        if args.cfg is None:
            parser.error('-pretrained needs -cfg, the config of the weights')
        config = get_config(args.cfg, opts)
        model = build_for_inference(config, args.pretrained)
        run = lambda batch: dygraph_outputs(model, batch)  # noqa: E731
        names = None
    names = names or dataset_class_names(config, log=lambda notice: print(f'{notice}; printing class indices'))
    for path, top in zip(images, predict(run, images, config, names, config.DATA.BATCH_SIZE_EVAL)):
        print(f'{path}:')
        for prediction in top:
            print(f'  {prediction.probability:.4f}  {prediction.label}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

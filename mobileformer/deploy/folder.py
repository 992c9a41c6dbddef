"""What an export folder holds besides the model files, so that it runs without anything else:
`config.yaml`, the config the model was built from (its evaluation preprocessing is
`mobileformer.data.build_transforms(config, 'val')`), and `model.json`, the input, the
preprocessing spelled out for other languages, and the class names when the data has them.

Folders exported before these files existed still run with the config passed separately
(`predict.py -cfg`)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
from yacs.config import CfgNode

from mobileformer.config import get_config
from mobileformer.data import build_dataset

CONFIG_FILE = 'config.yaml'
DESCRIPTION_FILE = 'model.json'
IMAGENET_NAMES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'imagenet_classes.txt')


def dataset_class_names(config: CfgNode, log: Callable[[str], None] = print) -> Optional[List[str]]:
    """One name per output class, or None where there are none: the built-in ImageNet-1k names for
    `imagenet` with 1000 classes, else the dataset's own (0..9 for digits, folder names for folder
    datasets) when it can be read and has one per class (else a notice through `log` says why not)."""
    count = config.MODEL.NUM_CLASSES
    if config.DATA.DATASET == 'imagenet' and count == 1000:
        with open(IMAGENET_NAMES, encoding='utf-8') as f:
            return [line.rstrip('\n') for line in f if not line.startswith('#')]
    try:
        names = build_dataset(config, 'val').classes
    except ValueError as e:
        log(f'notice: no class names ({e})')
        return None
    return [str(name) for name in names] if len(names) == count else None


def _write_atomically(path: str, text: str) -> None:
    temporary = f'{path}.{os.getpid()}.tmp'
    with open(temporary, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(temporary, path)


def describe_preprocessing(config: CfgNode) -> dict:
    """The evaluation preprocessing of `config` (mobileformer.data.build_transforms 'val') in words."""
    data = config.DATA
    return {'convert_to': 'L' if data.IN_CHANNELS == 1 else 'RGB',
            'resize_shorter_side': math.floor(data.IMAGE_SIZE / data.CROP_PCT), 'interpolation': data.INTERPOLATION,
            'center_crop': data.IMAGE_SIZE, 'scale': 1 / 255, 'mean': list(data.MEAN), 'std': list(data.STD),
            'layout': 'NCHW float32'}


def write_description(model_dir: str, config: CfgNode, class_names: Optional[Sequence[str]]) -> None:
    """Writes `config.yaml` and `model.json` into `model_dir`, each atomically."""
    _write_atomically(os.path.join(model_dir, CONFIG_FILE), config.dump())
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    description = {'model': config.MODEL.NAME, 'type': config.MODEL.TYPE, 'input': [None, channels, size, size],
                   'num_classes': config.MODEL.NUM_CLASSES, 'preprocessing': describe_preprocessing(config),
                   'classes': list(class_names) if class_names else None}
    _write_atomically(os.path.join(model_dir, DESCRIPTION_FILE), json.dumps(description, indent=1))


def read_config(model_dir: str, opts: Sequence = ()) -> Optional[CfgNode]:
    """The config `model_dir` was exported from (with `opts` merged), or None for a folder exported
    before export.py wrote it."""
    path = os.path.join(model_dir, CONFIG_FILE)
    return get_config(path, list(opts)) if os.path.isfile(path) else None


def read_class_names(model_dir: str) -> Optional[List[str]]:
    """The class names `model.json` records, or None."""
    path = os.path.join(model_dir, DESCRIPTION_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            names = json.load(f).get('classes')
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"'{path}' is unreadable or not a description of the model; export the model again "
                         'with export.py') from None
    return names if isinstance(names, list) else None


@dataclass(frozen=True)
class Prediction:
    index: int
    name: str
    probability: float

    @property
    def label(self) -> str:
        """The class name, followed by its index when the name is not the index itself."""
        return self.name if self.name == str(self.index) else f'{self.name} ({self.index})'


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def top_classes(logits, class_names: Optional[Sequence[str]], top_k: int) -> List[List[Prediction]]:
    """The `top_k` most probable classes of each row of `logits`, most probable first; classes
    without a name are called by their index."""
    if isinstance(logits, list):
        raise ValueError(f'the model is a feature extractor ({len(logits)} outputs, from MODEL.OUT_INDICES), '
                         'which predicts no classes; predict with a classifier (no MODEL.OUT_INDICES)')
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    names = list(class_names) if class_names and len(class_names) == probabilities.shape[1] else None
    return [[Prediction(int(i), names[i] if names else str(i), float(row[i])) for i in np.argsort(-row)[:top_k]]
            for row in probabilities]

"""Dataset classes and `build_dataset(config, mode)`.

Samples are `(image float32 [C, H, W] numpy, label int64 numpy scalar)`: numpy only, because
Paddle's DataLoader workers can crash on paddle Tensors.
"""
from __future__ import annotations

import abc
import os
from typing import Callable, Optional

import numpy as np
import paddle
from PIL import Image

from yacs.config import CfgNode

from mobileformer.data import sources
from mobileformer.data.images import open_image
from mobileformer.data.transforms import ConvertMode, build_transforms

DATASETS = ('digits', 'cifar10', 'cifar100', 'mnist', 'fashion_mnist', 'imagenet', 'folder')


class LabelledImages(paddle.io.Dataset, abc.ABC):
    """Base: subclasses provide `_image(index) -> PIL.Image`; labels and class names live here."""

    def __init__(self, labels: np.ndarray, classes: list, transform: Optional[Callable] = None):
        super().__init__()
        self.labels = np.asarray(labels, np.int64)
        self.classes = list(classes)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def _image(self, index: int) -> Image.Image:
        """The sample `index` as a PIL image, before transforms."""

    def __getitem__(self, index: int) -> tuple:
        image = self._image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class ArrayImages(LabelledImages):
    """Images held in memory as uint8 [N, H, W] (grey) or [N, H, W, 3] (RGB)."""

    def __init__(self, source: sources.ArraySource, transform: Optional[Callable] = None):
        super().__init__(source.labels, source.classes, transform)
        self.images = source.images

    def _image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class ImageFiles(LabelledImages):
    """Images read from files on access and converted to RGB (grey and alpha images included)."""

    to_rgb = ConvertMode('RGB')

    def __init__(self, source: sources.FileSource, transform: Optional[Callable] = None):
        super().__init__(source.labels, source.classes, transform)
        self.paths = source.paths

    def _image(self, index: int) -> Image.Image:
        return self.to_rgb(open_image(self.paths[index]))


def _source(name: str, root: str, mode: str):
    if name == 'digits':
        return sources.load_digits(mode)
    if not root:
        raise ValueError(f"DATA.DATA_PATH is empty but DATA.DATASET '{name}' reads its files from there; "
                         'pass -data_path DIR (or use DATA.DATASET digits, which is embedded)')
    if name in sources.CIFAR_FORMATS:
        return sources.load_cifar(root, name, mode)
    if name in sources.MNIST_CLASSES:
        return sources.load_mnist(root, name, mode)
    if not os.path.isdir(root):
        raise ValueError(f"DATA.DATA_PATH '{root}' is not a folder; it must hold train/<class>/<image> and "
                         'val/<class>/<image> (or train_list.txt / val_list.txt)')
    if os.path.isfile(sources.list_file(root, mode)):
        return sources.read_list(root, mode)
    return sources.scan_folder(root, mode)


def build_dataset(config: CfgNode, mode: str) -> LabelledImages:
    """The `mode` ('train' or 'val') split of config.DATA.DATASET with its transforms attached."""
    name = config.DATA.DATASET
    if name not in DATASETS:
        raise ValueError(f"unknown DATA.DATASET '{name}'; choose one of {', '.join(DATASETS)}")
    transform = build_transforms(config, mode)
    source = _source(name, config.DATA.DATA_PATH, mode)
    if len(source.classes) > config.MODEL.NUM_CLASSES:
        # labels beyond the classifier's width would fail deep inside the loss
        raise ValueError(f"DATA.DATASET '{name}' has {len(source.classes)} classes but MODEL.NUM_CLASSES is "
                         f'{config.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES: {len(source.classes)}')
    dataset_type = ArrayImages if isinstance(source, sources.ArraySource) else ImageFiles
    return dataset_type(source, transform)

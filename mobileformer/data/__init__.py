"""Datasets and augmentation for training and evaluation.

- `build_dataset(config, mode)`: a paddle.io.Dataset of (float32 CHW numpy image, int64 numpy label)
  with `classes` and `num_classes`.
- `build_transforms(config, mode)`: PIL image -> float32 CHW numpy array.
- `build_mixup(config)`: None, or a batch callable (images, labels) -> (images, soft targets).
- `open_image(path)`: a user's image file decoded, or one sentence saying why it cannot be.
"""
from mobileformer.data.augment import Mixup, RandAugment, RandomErasing, build_mixup
from mobileformer.data.build import DATASETS, build_dataset
from mobileformer.data.images import open_image
from mobileformer.data.transforms import build_transforms

__all__ = ['DATASETS', 'Mixup', 'RandAugment', 'RandomErasing', 'build_dataset', 'build_mixup', 'build_transforms',
           'open_image']

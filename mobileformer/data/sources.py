"""Readers for the on-disk formats: the embedded digits, CIFAR python tarballs, MNIST idx.gz files,
class-per-folder trees and PaddleViT list files.

Readers return plain numpy arrays / path lists; every problem with the files is reported here, at
build time, as one ValueError sentence (a sample that raises inside a DataLoader can hang it).
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np

# the embedded data stays at the top of the repository, in datasets/data/
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS_FILE = os.path.join(REPOSITORY, 'datasets', 'data', 'digits.npz')
DIGITS_TRAIN_SIZE = 1437  # first 1437 samples train, last 360 validate (see datasets/data/README.md)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp', '.gif')


@dataclass
class ArraySource:
    images: np.ndarray  # uint8 [N, H, W] grey or [N, H, W, 3] RGB
    labels: np.ndarray  # int64 [N]
    classes: list


@dataclass
class FileSource:
    paths: list
    labels: np.ndarray  # int64 [N]
    classes: list


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _split(mode: str, train, val):
    return train if mode == 'train' else val


# ---------------------------------------------------------------------------------------- digits
def load_digits(mode: str) -> ArraySource:
    """The embedded UCI digits: 8x8 grey images with values 0..16, rescaled to 0..255."""
    with np.load(DIGITS_FILE) as data:
        images, labels = data['images'], data['labels']
    part = _split(mode, slice(0, DIGITS_TRAIN_SIZE), slice(DIGITS_TRAIN_SIZE, None))
    images = np.round(images[part].astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    return ArraySource(images, labels[part].astype(np.int64), [str(d) for d in range(10)])


# ----------------------------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class CifarFormat:
    archive: str
    train_members: tuple
    val_members: tuple
    meta_member: str
    names_key: bytes
    labels_key: bytes


CIFAR_FORMATS = {
    'cifar10': CifarFormat('cifar-10-python.tar.gz',
                           tuple(f'cifar-10-batches-py/data_batch_{i}' for i in range(1, 6)),
                           ('cifar-10-batches-py/test_batch',), 'cifar-10-batches-py/batches.meta',
                           b'label_names', b'labels'),
    'cifar100': CifarFormat('cifar-100-python.tar.gz', ('cifar-100-python/train',), ('cifar-100-python/test',),
                            'cifar-100-python/meta', b'fine_label_names', b'fine_labels'),
}
CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts/lists/strings and numpy arrays: a data file must not run code."""

    # _codecs.encode is how Python 3 writes bytes in protocol 2 (a re-saved batch); it runs no code.
    _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.numeric', '_frombuffer'),
                ('numpy._core.numeric', '_frombuffer'), ('_codecs', 'encode')}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a CIFAR batch')
        return super().find_class(module, name)


def _unpickle_member(tar: tarfile.TarFile, path: str, member: str) -> dict:
    try:
        raw = tar.extractfile(member).read()
    except KeyError:
        raise ValueError(f"'{path}' has no member '{member}'; it is not the python-version CIFAR tarball "
                         f'from {CIFAR_URL}') from None
    try:
        return _ArrayUnpickler(io.BytesIO(raw), encoding='bytes').load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ValueError(f"'{path}' member '{member}' is not a CIFAR python batch ({e}); "
                         f'download the python version from {CIFAR_URL}') from None


def load_cifar(root: str, name: str, mode: str) -> ArraySource:
    fmt = CIFAR_FORMATS[name]
    path = os.path.join(root, fmt.archive)
    _require(os.path.isfile(path), f"{name} needs '{path}'; download {fmt.archive} (python version) "
                                   f'from {CIFAR_URL} into DATA.DATA_PATH')
    try:
        with tarfile.open(path, 'r:gz') as tar:
            meta = _unpickle_member(tar, path, fmt.meta_member)
            batches = [_unpickle_member(tar, path, m) for m in _split(mode, fmt.train_members, fmt.val_members)]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"'{path}' is not a readable .tar.gz ({e}); download it again from {CIFAR_URL}") from None
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[fmt.names_key]]
    data = np.concatenate([np.asarray(b[b'data'], np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[fmt.labels_key], np.int64) for b in batches])
    _require(data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and len(data) == len(labels),
             f"'{path}' holds data of shape {data.shape} for {len(labels)} labels; expected [N, 3072] CIFAR rows")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are channel-planar
    return ArraySource(np.ascontiguousarray(images), labels, classes)


# ----------------------------------------------------------------------------------------- MNIST
MNIST_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
               'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
MNIST_CLASSES = {
    'mnist': [str(d) for d in range(10)],
    'fashion_mnist': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                      'Bag', 'Ankle boot'],
}
MNIST_URLS = {'mnist': 'https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of yann.lecun.com/exdb/mnist)',
              'fashion_mnist': 'https://github.com/zalandoresearch/fashion-mnist'}


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads a gzipped idx file of unsigned bytes with `ndim` dimensions."""
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"'{path}' is not a readable gzip file ({e}); download it again") from None
    header = 4 + 4 * ndim
    _require(len(raw) >= header and raw[:4] == bytes([0, 0, 0x08, ndim]),
             f"'{path}' is not an idx file of {ndim}-D unsigned bytes (bad magic number)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    _require(len(raw) - header == int(np.prod(dims)),
             f"'{path}' is truncated: header says {dims} but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_mnist(root: str, name: str, mode: str) -> ArraySource:
    paths = [os.path.join(root, f) for f in MNIST_FILES[mode]]
    for path in paths:
        _require(os.path.isfile(path), f"{name} needs '{path}'; download it from {MNIST_URLS[name]} "
                                       f'into DATA.DATA_PATH')
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    _require(len(images) == len(labels), f"'{paths[0]}' has {len(images)} images but '{paths[1]}' "
                                         f'has {len(labels)} labels')
    _require(int(labels.max(initial=0)) < 10, f"'{paths[1]}' has labels above 9; it is not an MNIST label file")
    return ArraySource(images.copy(), labels.astype(np.int64), MNIST_CLASSES[name])


# ------------------------------------------------------------------------------- image folders
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def images_under(folder: str) -> list:
    """Every image file below `folder` (links followed), in sorted order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


def _class_folders(split_dir: str) -> list:
    _require(os.path.isdir(split_dir), f"'{split_dir}' does not exist; expected <DATA_PATH>/train/<class>/<image> "
                                       'and <DATA_PATH>/val/<class>/<image> (or train_list.txt / val_list.txt)')
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
    loose = [f for f in os.listdir(split_dir) if _is_image(f)]
    _require(classes, f"'{split_dir}' has no class folders" + (f' ({len(loose)} images lie directly in it)' if loose
                                                                else '') + '; put each class in its own sub-folder')
    return classes


def _check_class_count(classes: list, where: str) -> None:
    _require(len(classes) >= 2, f"only one class ('{classes[0]}') found in {where}; classification needs at "
                                'least two classes, each in its own folder / with its own label')


def scan_folder(root: str, mode: str) -> FileSource:
    """root/<mode>/<class>/...image; class indices come from the sorted folders of root/train."""
    split_dir = os.path.join(root, mode)
    train_dir = os.path.join(root, 'train')
    classes = _class_folders(train_dir if os.path.isdir(train_dir) else split_dir)
    _check_class_count(classes, f"'{train_dir if os.path.isdir(train_dir) else split_dir}'")
    present = _class_folders(split_dir)
    unknown = sorted(set(present) - set(classes))
    _require(not unknown, f"'{split_dir}' has class folders {unknown} that '{train_dir}' lacks; "
                          'both splits must use the same class names')
    paths, labels = [], []
    for name in present:
        files = images_under(os.path.join(split_dir, name))
        _require(files, f"class folder '{os.path.join(split_dir, name)}' has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        paths += files
        labels += [classes.index(name)] * len(files)
    return FileSource(paths, np.asarray(labels, np.int64), classes)


def list_file(root: str, mode: str) -> str:
    return os.path.join(root, f'{mode}_list.txt')


def _parse_list(path: str) -> tuple[list, list]:
    names, labels = [], []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            _require(len(parts) == 2 and parts[1].isdigit(),
                     f"'{path}' line {number} is '{line.strip()}'; each line must be '<relative/path> <label>'")
            names.append(parts[0])
            labels.append(int(parts[1]))
    _require(names, f"'{path}' lists no images; each line must be '<relative/path> <label>'")
    return names, labels


def read_list(root: str, mode: str) -> FileSource:
    """PaddleViT list format: root/<mode>_list.txt with '<path relative to root> <label>' lines.

    Class names are the label numbers; their count is max label + 1 of train_list.txt (so train and
    val agree), or of this list when there is no train list.
    """
    path = list_file(root, mode)
    names, labels = _parse_list(path)
    train_path = list_file(root, 'train')
    reference_path = train_path if os.path.isfile(train_path) else path
    reference = labels if reference_path == path else _parse_list(reference_path)[1]
    _check_class_count(sorted(set(map(str, reference))), f"'{reference_path}'")
    classes = [str(i) for i in range(max(reference) + 1)]
    _require(max(labels) < len(classes), f"'{path}' has label {max(labels)} but '{reference_path}' only goes "
                                         f'up to {len(classes) - 1}')
    paths = [os.path.join(root, n) for n in names]
    _require(os.path.isfile(paths[0]), f"'{path}' line 1 names '{paths[0]}', which does not exist; paths in "
                                       'the list must be relative to DATA.DATA_PATH')
    return FileSource(paths, np.asarray(labels, np.int64), classes)

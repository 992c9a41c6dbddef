"""Datasets: every kind on tiny files in the real on-disk formats, split rules and error messages."""
import gzip
import io
import os
import pickle
import random
import tarfile

import numpy as np
import paddle
import pytest
from PIL import Image

from mobileformer.data import build_dataset, build_mixup
from mobileformer.data.sources import DIGITS_FILE
from mobileformer import get_config

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def config(dataset, root='', **opts):
    """Config whose eval transform is the identity on `size` x `size` images (CROP_PCT 1)."""
    flat = ['DATA.DATASET', dataset, 'DATA.CROP_PCT', 1.0, 'DATA.IMAGE_SIZE', opts.pop('size', 8)]
    flat += ['DATA.DATA_PATH', str(root)] if root else []
    for key, value in opts.items():
        flat += [key.replace('__', '.'), value]
    return get_config(opts=flat)


def pixels(x):
    """Undo normalisation: CHW float -> HWC uint8 (exact for unresized images)."""
    return np.round((x * STD[:, None, None] + MEAN[:, None, None]) * 255).astype(np.int64).transpose(1, 2, 0)


# ------------------------------------------------------------------------------------------ digits
def test_digits_split_sizes_classes_and_pixels():
    train, val = build_dataset(config('digits'), 'train'), build_dataset(config('digits'), 'val')
    assert (len(train), len(val), train.num_classes, val.classes) == (1437, 360, 10, [str(d) for d in range(10)])
    with np.load(DIGITS_FILE) as raw:
        images, labels = raw['images'], raw['labels']
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert np.bincount(val.labels).tolist() == [35, 36, 35, 37, 37, 37, 37, 36, 33, 37]
    assert np.array_equal(val.labels, labels[1437:]) and np.array_equal(train.labels, labels[:1437])
    x, y = val[5]
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and isinstance(y, np.int64) and y == labels[1442]
    expected = np.round(images[1442].astype(np.float64) * 255 / 16)  # 0..16 counts rescaled to 0..255, grey in every channel
    assert np.array_equal(pixels(x), np.repeat(expected[..., None], 3, axis=2))


def test_digits_resized_grey_channel_and_deterministic_train_samples():
    val = build_dataset(config('digits', size=32, DATA__IN_CHANNELS=1, DATA__MEAN=[0.5], DATA__STD=[0.5]), 'val')
    x, _ = val[0]
    assert x.shape == (1, 32, 32) and x.min() >= -1 and x.max() <= 1
    train = build_dataset(config('digits', size=32, AUG__RE_PROB=0.5), 'train')
    random.seed(1)
    first = [train[i][0] for i in range(5)]
    random.seed(1)
    again = [train[i][0] for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (3, 32, 32) and not np.array_equal(first[0], train[0][0])


# ------------------------------------------------------------------------------------------- CIFAR
def write_cifar(root, name, n_per_batch=4):
    """A tiny tarball with the member names, keys and layouts of the real python-version files."""
    rng = np.random.default_rng(0)
    if name == 'cifar10':
        folder, members, meta = 'cifar-10-batches-py', ['data_batch_%d' % i for i in range(1, 6)] + ['test_batch'], \
            {b'label_names': [b'airplane', b'automobile', b'bird'], b'num_vis': 3072}
        meta_name, key = 'batches.meta', b'labels'
        archive = 'cifar-10-python.tar.gz'
    else:
        folder, members, meta = 'cifar-100-python', ['train', 'test'], \
            {b'fine_label_names': [b'apple', b'bear', b'bee', b'boy'], b'coarse_label_names': [b'a', b'b']}
        meta_name, key = 'meta', b'fine_labels'
        archive = 'cifar-100-python.tar.gz'
    batches = {}
    with tarfile.open(os.path.join(root, archive), 'w:gz') as tar:
        def add(member, obj):
            # the real files are Python 2 era pickles naming numpy.core (numpy 2 calls it numpy._core)
            data = pickle.dumps(obj, protocol=2).replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
            info = tarfile.TarInfo(f'{folder}/{member}')
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add(meta_name, meta)
        for member in members:
            batch = {b'data': rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                     key: rng.integers(0, len(next(iter(meta.values()))), n_per_batch).tolist(),
                     b'batch_label': member.encode()}
            add(member, batch)
            batches[member] = batch
    return batches


@pytest.mark.parametrize('name, train_members, val_member, classes', [
    ('cifar10', ['data_batch_%d' % i for i in range(1, 6)], 'test_batch', ['airplane', 'automobile', 'bird']),
    ('cifar100', ['train'], 'test', ['apple', 'bear', 'bee', 'boy']),
])
def test_cifar_tarball(tmp_path, name, train_members, val_member, classes):
    batches = write_cifar(tmp_path, name)
    key = b'labels' if name == 'cifar10' else b'fine_labels'
    cfg = config(name, tmp_path, size=32)
    train, val = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    assert (len(train), len(val), train.classes, train.num_classes) == (4 * len(train_members), 4, classes, len(classes))
    assert train.labels.tolist() == sum((batches[m][key] for m in train_members), [])
    x, y = val[3]
    planar = batches[val_member][b'data'][3].reshape(3, 32, 32)  # rows: 1024 red, 1024 green, 1024 blue
    assert y == batches[val_member][key][3] and np.array_equal(pixels(x), planar.transpose(1, 2, 0))


def test_cifar_missing_file_and_code_in_pickle_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cifar10 needs '.*cifar-10-python\.tar\.gz'; download .*cs\.toronto\.edu"):
        build_dataset(config('cifar10', tmp_path), 'train')
    evil = pickle.dumps(os.system)  # a pickle that would import and call os.system
    with tarfile.open(tmp_path / 'cifar-100-python.tar.gz', 'w:gz') as tar:
        info = tarfile.TarInfo('cifar-100-python/meta')
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    with pytest.raises(ValueError, match='posix.system is not allowed'):
        build_dataset(config('cifar100', tmp_path), 'val')
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'not a tarball')
    with pytest.raises(ValueError, match='is not a readable .tar.gz'):
        build_dataset(config('cifar10', tmp_path), 'train')


# ------------------------------------------------------------------------------------------- MNIST
def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('name, first_class', [('mnist', '0'), ('fashion_mnist', 'T-shirt/top')])
def test_mnist_idx_files(tmp_path, name, first_class):
    rng = np.random.default_rng(1)
    images = {m: rng.integers(0, 256, (n, 28, 28)) for m, n in (('train', 6), ('t10k', 3))}
    labels = {m: rng.integers(0, 10, n) for m, n in (('train', 6), ('t10k', 3))}
    for m in ('train', 't10k'):
        write_idx(tmp_path / f'{m}-images-idx3-ubyte.gz', images[m])
        write_idx(tmp_path / f'{m}-labels-idx1-ubyte.gz', labels[m])
    cfg = config(name, tmp_path, size=28)
    train, val = build_dataset(cfg, 'train'), build_dataset(cfg, 'val')
    assert (len(train), len(val), train.num_classes, train.classes[0]) == (6, 3, 10, first_class)
    assert np.array_equal(val.labels, labels['t10k'])
    x, y = val[2]
    assert x.shape == (3, 28, 28) and y == labels['t10k'][2]
    assert np.array_equal(pixels(x), np.repeat(images['t10k'][2][..., None], 3, axis=2))


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match=r"mnist needs '.*train-images-idx3-ubyte\.gz'; download it from"):
        build_dataset(config('mnist', tmp_path), 'train')
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', np.zeros((2, 4, 4)))
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', np.zeros((2, 1)))  # 2-D: wrong magic for labels
    with pytest.raises(ValueError, match='is not an idx file of 1-D unsigned bytes'):
        build_dataset(config('mnist', tmp_path), 'val')


# ------------------------------------------------------------------------------- folders and lists
def save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def image_tree(root, splits=('train', 'val')):
    """bird: RGBA PNGs, cat: RGB JPEGs (one in a sub-folder), dog: grey PNGs; plus a non-image file."""
    for split in splits:
        save(root / split / 'cat' / 'a.jpg', Image.new('RGB', (12, 10), (200, 30, 40)))
        save(root / split / 'cat' / 'more' / 'b.JPEG', Image.new('RGB', (9, 9), (10, 220, 40)))
        save(root / split / 'dog' / 'c.png', Image.new('L', (8, 8), 77))
        save(root / split / 'bird' / 'd.png', Image.new('RGBA', (8, 8), (10, 20, 30, 0)))
        (root / split / 'dog' / 'notes.txt').write_text('not an image')


def test_folder_tree_with_jpeg_png_grey_rgba(tmp_path):
    image_tree(tmp_path)
    for name in ('imagenet', 'folder'):
        train = build_dataset(config(name, tmp_path), 'train')
        assert (train.classes, len(train), train.labels.tolist()) == (['bird', 'cat', 'dog'], 4, [0, 1, 1, 2])
    val = build_dataset(config('folder', tmp_path), 'val')
    bird, dog = val[0][0], val[3][0]
    assert np.array_equal(pixels(bird)[0, 0], [10, 20, 30])  # alpha dropped, colour kept
    assert np.array_equal(pixels(dog)[0, 0], [77, 77, 77])  # grey replicated
    assert val[1][0].shape == (3, 8, 8) and val[1][0].dtype == np.float32


def test_val_with_fewer_classes_keeps_train_indices(tmp_path):
    image_tree(tmp_path, splits=('train',))
    save(tmp_path / 'val' / 'dog' / 'x.png', Image.new('L', (8, 8), 1))
    val = build_dataset(config('folder', tmp_path), 'val')
    assert (val.classes, val.labels.tolist()) == (['bird', 'cat', 'dog'], [2])


@pytest.mark.parametrize('make, message', [
    (lambda root: None, r"DATA.DATA_PATH '.*' is not a folder"),
    (lambda root: (root / 'val').mkdir(parents=True), r"'.*train' does not exist; expected <DATA_PATH>/train/<class>"),
    (lambda root: save(root / 'train' / 'x.png', Image.new('L', (4, 4))), r"has no class folders \(1 images lie"),
    (lambda root: [save(root / 'train' / c / 'x.png', Image.new('L', (4, 4))) for c in 'ab']
     + [(root / 'train' / 'empty').mkdir()], r"class folder '.*empty' has no images"),
    (lambda root: [save(root / 'train' / 'only' / f'{i}.png', Image.new('L', (4, 4))) for i in range(3)],
     r"only one class \('only'\) found in '.*train'; classification needs at least two classes"),
    (lambda root: [save(root / 'train' / c / 'x.png', Image.new('L', (4, 4))) for c in 'ab']
     + [save(root / 'val' / 'zebra' / 'x.png', Image.new('L', (4, 4)))], r"has class folders \['zebra'\] that"),
])
def test_folder_errors(tmp_path, make, message):
    root = tmp_path / 'data'
    make(root)
    mode = 'val' if 'zebra' in message else 'train'
    with pytest.raises(ValueError, match=message):
        build_dataset(config('folder', root), mode)


def test_list_files_take_precedence(tmp_path):
    image_tree(tmp_path, splits=('train',))  # folders exist but the lists decide
    save(tmp_path / 'imgs' / 'p q.png', Image.new('RGB', (8, 8), (1, 2, 3)))
    save(tmp_path / 'imgs' / 'r.jpeg', Image.new('L', (8, 8), 90))
    (tmp_path / 'train_list.txt').write_text('imgs/p q.png 4\nimgs/r.jpeg 0\n\n')
    (tmp_path / 'val_list.txt').write_text('imgs/p q.png 1\n')
    train = build_dataset(config('imagenet', tmp_path), 'train')
    val = build_dataset(config('imagenet', tmp_path), 'val')
    assert (len(train), train.labels.tolist(), train.num_classes) == (2, [4, 0], 5)
    assert (len(val), val.num_classes, val.classes[-1]) == (1, 5, '4')
    assert train[0][1] == 4 and np.array_equal(pixels(val[0][0])[3, 3], [1, 2, 3]) and val[0][1] == 1
    (tmp_path / 'val_list.txt').write_text('imgs/r.jpeg 1\nimgs/r.jpeg\n')
    with pytest.raises(ValueError, match=r"val_list.txt' line 2 is 'imgs/r.jpeg'; each line must be"):
        build_dataset(config('imagenet', tmp_path), 'val')
    (tmp_path / 'val_list.txt').write_text('missing.jpeg 1\n')
    with pytest.raises(ValueError, match=r"line 1 names '.*missing.jpeg', which does not exist"):
        build_dataset(config('imagenet', tmp_path), 'val')
    (tmp_path / 'train_list.txt').write_text('imgs/r.jpeg 3\nimgs/p q.png 3\n')
    with pytest.raises(ValueError, match=r"only one class \('3'\) found in '.*train_list.txt'"):
        build_dataset(config('imagenet', tmp_path), 'train')


def test_unknown_dataset_empty_path_and_too_few_model_classes():
    with pytest.raises(ValueError, match="DATA.DATASET 'digits' has 10 classes but MODEL.NUM_CLASSES is 5; set "
                                         'MODEL.NUM_CLASSES: 10'):
        build_dataset(config('digits', MODEL__NUM_CLASSES=5), 'train')
    with pytest.raises(ValueError, match="unknown DATA.DATASET 'svhn'; choose one of digits, cifar10"):
        build_dataset(config('svhn'), 'train')
    with pytest.raises(ValueError, match="DATA.DATA_PATH is empty but DATA.DATASET 'cifar10' reads its files"):
        build_dataset(config('cifar10'), 'train')


@pytest.mark.timeout(120)
def test_dataloader_with_two_workers():
    val = build_dataset(config('digits', size=16), 'val')
    loader = paddle.io.DataLoader(val, batch_size=64, num_workers=2, shuffle=False)
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == [3, 16, 16] and images.dtype == paddle.float32
        labels += batch_labels.numpy().tolist()
    assert labels == val.labels.tolist()
    train = build_dataset(config('digits', size=16, AUG__RE_PROB=0.5), 'train')
    pickle.dumps(train)  # spawn-started workers (macOS, Windows) receive the dataset pickled
    mixup = build_mixup(config('digits', MODEL__NUM_CLASSES=10))
    for step, (images, batch_labels) in enumerate(paddle.io.DataLoader(train, batch_size=32, num_workers=2,
                                                                        shuffle=True, drop_last=True)):
        images, targets = mixup(images, batch_labels)
        assert images.shape == [32, 3, 16, 16] and targets.shape == [32, 10]
        if step == 3:
            break

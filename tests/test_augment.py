"""Transforms and augmentation: geometry against hand computations, randomness under seeds, Mixup/CutMix targets."""
import math
import random

import numpy as np
import paddle
import pytest
from PIL import Image

from mobileformer.data import Mixup, RandAugment, RandomErasing, build_mixup, build_transforms
from mobileformer.data.augment import RAND_AUGMENT_OPS, _OpContext
from mobileformer.data.transforms import RandomResizedCrop
from mobileformer import get_config


def config(**opts):
    flat = []
    for key, value in opts.items():
        flat += [key.replace('__', '.'), value]
    return get_config(opts=flat)


def noise_image(w, h, mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == 'RGB' else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def unnormalise(x, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.round(x * 255).astype(np.int64).transpose(1, 2, 0)


# ------------------------------------------------------------------------------------ eval / train
def test_eval_resizes_shorter_side_then_center_crops():
    cfg = config(DATA__IMAGE_SIZE=16, DATA__CROP_PCT=0.5, DATA__INTERPOLATION='nearest')
    x = build_transforms(cfg, 'val')(noise_image(40, 30))
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    # shorter side 30 -> floor(16 / 0.5) = 32, longer 40 -> int(32 * 40 / 30) = 42; crop at (13, 8)
    expected = np.asarray(noise_image(40, 30).resize((42, 32), Image.Resampling.NEAREST))[8:24, 13:29]
    assert np.array_equal(unnormalise(x), expected)


def test_train_crop_box_respects_scale_and_ratio():
    crop = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0), interpolation=Image.Resampling.BILINEAR)
    for _ in range(200):
        left, top, w, h = crop.box(100, 60)
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 60
        assert 0.23 <= w * h / 6000 <= 0.52 and 0.45 <= w / h <= 2.2  # rounding to whole pixels
    assert RandomResizedCrop(8, (1, 1), (1, 1), 0).box(50, 50) == (0, 0, 50, 50)
    assert RandomResizedCrop(8, (1, 1), (1, 1), 0).box(80, 50) == (15, 0, 50, 50)  # fallback: centred square


def test_train_full_crop_with_certain_flip_mirrors_the_image():
    opts = dict(DATA__IMAGE_SIZE=12, AUG__RRC_SCALE=[1.0, 1.0], AUG__RRC_RATIO=[1.0, 1.0],
                AUG__RAND_AUGMENT_N=0, DATA__INTERPOLATION='nearest')
    image = noise_image(12, 12)
    flipped = build_transforms(config(AUG__HFLIP=1.0, **opts), 'train')(image)
    kept = build_transforms(config(AUG__HFLIP=0.0, **opts), 'train')(image)
    assert np.array_equal(unnormalise(kept), np.asarray(image))
    assert np.array_equal(unnormalise(flipped), np.asarray(image)[:, ::-1])


def test_train_pipeline_follows_config():
    steps = [type(s).__name__ for s in build_transforms(config(AUG__RE_PROB=0.25, AUG__COLOR_JITTER=0.4), 'train').steps]
    assert steps == ['ConvertMode', 'RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment', 'ColorJitter',
                     'ToNormalizedArray', 'RandomErasing']
    steps = [type(s).__name__ for s in build_transforms(config(AUG__RAND_AUGMENT_N=0, AUG__HFLIP=0.0), 'train').steps]
    assert steps == ['ConvertMode', 'RandomResizedCrop', 'ToNormalizedArray']


@pytest.mark.parametrize('opts, message', [
    (dict(DATA__MEAN=[0.5]), 'DATA.MEAN has 1 values but DATA.IN_CHANNELS is 3'),
    (dict(DATA__INTERPOLATION='cubic'), "DATA.INTERPOLATION 'cubic' is unknown"),
    (dict(AUG__RRC_SCALE=[0.5, 0.1]), r'AUG.RRC_SCALE must be \[min, max\]'),
    (dict(AUG__RE_PROB=0.5, AUG__RE_MODE='noise'), "AUG.RE_MODE in"),
    (dict(AUG__RAND_AUGMENT_M=12.0), r'RandAugment magnitude must be in \[0, 10\]'),
])
def test_bad_augmentation_settings_are_named(opts, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(config(**opts), 'train')


# ------------------------------------------------------------------------------------ RandAugment
@pytest.mark.parametrize('mode, fill', [('RGB', (124, 116, 104)), ('L', 128)])
def test_every_rand_augment_op_keeps_size_and_mode(mode, fill):
    image = noise_image(20, 14, mode)
    ctx = _OpContext(fill, Image.Resampling.BILINEAR)
    assert len(RAND_AUGMENT_OPS) == 15
    for name, op in RAND_AUGMENT_OPS.items():
        out = op(image, 9.0, ctx)
        assert (out.size, out.mode) == ((20, 14), mode), name


@pytest.mark.parametrize('seed', [0, 1])  # seed 0: shift right-to-left (+9), seed 1: left-to-right (-9)
def test_rand_augment_op_arithmetic(seed):
    image = noise_image(20, 10)
    data = np.asarray(image).astype(np.int64)
    ctx = _OpContext((1, 2, 3), Image.Resampling.BILINEAR)
    solarize_add = np.asarray(RAND_AUGMENT_OPS['SolarizeAdd'](image, 10.0, ctx))
    assert np.array_equal(solarize_add, np.where(data < 128, np.minimum(data + 110, 255), data))
    assert np.array_equal(np.asarray(RAND_AUGMENT_OPS['Posterize'](image, 10.0, ctx)), data & 0xF0)
    assert np.array_equal(np.asarray(RAND_AUGMENT_OPS['Solarize'](image, 5.0, ctx)), np.where(data >= 128, 255 - data, data))
    random.seed(seed)
    sign = -1 if random.random() < 0.5 else 1
    random.seed(seed)
    shifted = np.asarray(RAND_AUGMENT_OPS['TranslateXRel'](image, 10.0, ctx)).astype(np.int64)
    # output(x) = input(x + 9 * sign): 0.45 * width = 9 pixels, uncovered pixels take the fill colour
    expected = np.tile(np.array([1, 2, 3]), (10, 20, 1))
    if sign > 0:
        expected[:, :11] = data[:, 9:]
    else:
        expected[:, 9:] = data[:, :11]
    assert sign == (1 if seed == 0 else -1) and np.array_equal(shifted, expected)


def test_rand_augment_is_deterministic_under_a_seed():
    augment = RandAugment(2, 9.0, 0.5, fill=(124, 116, 104))
    image = noise_image(24, 24)
    outputs = []
    for seed in (5, 5, 6, 7, 8):
        random.seed(seed)
        outputs.append(np.asarray(augment(image)))
    assert all(o.shape == (24, 24, 3) and o.dtype == np.uint8 for o in outputs)
    assert np.array_equal(outputs[0], outputs[1])
    assert any(not np.array_equal(outputs[0], o) for o in outputs[2:])
    cfg = config(DATA__IMAGE_SIZE=16)
    transform = build_transforms(cfg, 'train')
    random.seed(3)
    first = transform(image)
    random.seed(3)
    assert first.dtype == np.float32 and first.shape == (3, 16, 16) and np.array_equal(first, transform(image))


# -------------------------------------------------------------------------------- random erasing
def changed_box(before, after):
    """The rows/columns where anything changed, and whether the change fills exactly that box."""
    changed = np.any(before != after, axis=0)
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return box, changed[box].all() and changed.sum() == changed[box].size


@pytest.mark.parametrize('mode', ['pixel', 'rand', 'const'])
def test_random_erasing_changes_one_rectangle_with_prob_one(mode):
    x = np.random.default_rng(0).uniform(1.0, 2.0, (3, 40, 50)).astype(np.float32)
    out = RandomErasing(1.0, mode)(x)
    box, is_rectangle = changed_box(x, out)
    area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start) / (40 * 50)
    assert is_rectangle and 0.015 <= area <= 0.36 and out.dtype == np.float32
    region = out[:, box[0], box[1]]
    if mode == 'const':
        assert np.all(region == 0)
    elif mode == 'rand':
        assert np.all(region == region[:, :1, :1]) and np.unique(region).size == 3
    else:
        assert np.unique(region).size == region.size
    assert np.array_equal(x, np.random.default_rng(0).uniform(1.0, 2.0, (3, 40, 50)).astype(np.float32))


def test_random_erasing_with_prob_zero_changes_nothing():
    erase = RandomErasing(0.0, 'pixel', count=3)
    x = np.random.default_rng(1).standard_normal((3, 16, 16)).astype(np.float32)
    assert all(np.array_equal(erase(x), x) for _ in range(50))


# --------------------------------------------------------------------------------- Mixup / CutMix
def batch(b=6, k=7, size=8):
    images = paddle.to_tensor(np.random.default_rng(2).standard_normal((b, 3, size, size)).astype(np.float32))
    return images, paddle.to_tensor(np.arange(b) % k, dtype='int64')


def smooth(labels, k, s):
    return np.eye(k)[labels] * (1 - s) + s / k


def test_build_mixup_is_off_without_alphas_and_uses_config_class_count():
    assert build_mixup(config(AUG__MIXUP_ALPHA=0.0, AUG__CUTMIX_ALPHA=0.0)) is None
    assert build_mixup(config(AUG__MIXUP_PROB=0.0)) is None
    mixup = build_mixup(config(MODEL__NUM_CLASSES=7))
    images, labels = batch()
    mixed, targets = mixup(images, labels)
    assert targets.shape == [6, 7] and targets.dtype == paddle.float32 and mixed.shape == images.shape
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, rtol=1e-6)


def test_mixup_blends_images_and_targets_with_one_lambda():
    mixup = Mixup(7, mixup_alpha=0.2, label_smoothing=0.1)
    images, labels = batch()
    np.random.seed(11)
    lam, use_cutmix = mixup.sample()
    np.random.seed(11)
    mixed, targets = mixup(images, labels)
    x, y = images.numpy(), labels.numpy()
    assert not use_cutmix and 0 < lam < 1
    np.testing.assert_allclose(mixed.numpy(), lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    expected = lam * smooth(y, 7, 0.1) + (1 - lam) * smooth(y[::-1], 7, 0.1)
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('seed', [0, 2, 3, 4])
def test_cutmix_pasted_area_matches_lambda(seed):
    mixup = build_mixup(config(MODEL__NUM_CLASSES=5, AUG__MIXUP_ALPHA=0.0, AUG__CUTMIX_ALPHA=1.0,
                               AUG__LABEL_SMOOTHING=0.0))
    images, labels = batch(b=4, k=5, size=32)
    np.random.seed(seed)
    mixed, targets = mixup(images, labels)
    x, m, t = images.numpy(), mixed.numpy(), targets.numpy()
    from_partner = np.all(m[0] == x[3], axis=0) & np.any(m[0] != x[0], axis=0)
    lam = t[0, labels.numpy()[0]]  # no smoothing: the own-label weight is lambda
    assert lam < 1 and math.isclose(1 - from_partner.mean(), lam, rel_tol=1e-6)
    assert np.all((m[0] == x[0]) | (m[0] == x[3]))
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('switch_prob, expect_cutmix', [(1.0, True), (0.0, False)])
def test_switch_prob_chooses_between_cutmix_and_mixup(switch_prob, expect_cutmix):
    mixup = Mixup(4, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob)
    assert all(mixup.sample()[1] == expect_cutmix for _ in range(20))


def test_no_mixing_gives_smoothed_one_hot_and_bad_labels_are_named():
    mixup = Mixup(7, mixup_alpha=0.2, prob=0.0, label_smoothing=0.1)
    images, labels = batch()
    mixed, targets = mixup(images, labels)
    assert np.array_equal(mixed.numpy(), images.numpy())
    np.testing.assert_allclose(targets.numpy(), smooth(labels.numpy(), 7, 0.1), rtol=1e-6)
    with pytest.raises(ValueError, match=r'label 9 is outside 0..6; set MODEL.NUM_CLASSES'):
        mixup(images, paddle.to_tensor([9, 0, 1, 2, 3, 4], dtype='int64'))

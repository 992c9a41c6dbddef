"""Every model config in configs/*.yaml: build, forward, backward, class override, jit export.

Configs are reduced per MODEL.TYPE with the -opts each family registers (smaller images, fewer
blocks), so the suite stays fast as families are added and needs no edit for a new one; a type
without reduced -opts runs as written, at a small image size if it builds.
"""
import glob
import os

import numpy as np
import paddle
import pytest

from conftest import CONFIGS
from mobileformer import ConfigError, build_model, get_config
from mobileformer.registry import reduced_opts

CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIGS, '*.yaml')))
SMALL_IMAGE = 64


def _reduced_config(path, *opts):
    """The config with the -opts its family registered for a small variant (mobileformer.registry
    `reduced_opts`: same blocks, fewer and narrower, on a smaller input)."""
    reduced = reduced_opts(get_config(path).MODEL.TYPE)
    if reduced:
        return get_config(path, reduced + list(opts))
    small = get_config(path, ['DATA.IMAGE_SIZE', SMALL_IMAGE] + list(opts))
    try:
        build_model(small)
        return small
    except (ConfigError, ValueError):  # e.g. a fixed-size model: run it at its own size
        return get_config(path, list(opts))


def _build_perturbed(config):
    """The model with every trainable parameter moved off its init, so that zero-initialised
    heads or gates neither hide gradients nor make outputs trivially equal."""
    model = build_model(config)
    for p in model.parameters():
        if not p.stop_gradient:
            p.set_value(p + 0.02 * paddle.randn(p.shape, dtype=p.dtype))
    return model


def _input(config, batch):
    size = config.DATA.IMAGE_SIZE
    return paddle.randn([batch, config.DATA.IN_CHANNELS, size, size])


def _id(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_every_model_family_has_configs_here():
    names = {_id(p) for p in CONFIG_FILES}
    assert {'mixer_b16_224', 'gmlp_s16_224', 'resmlp_12_224', 'fnet_cifar_64'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=_id)
def test_forward_backward_with_num_classes_override(path):
    config = _reduced_config(path, 'MODEL.NUM_CLASSES', 7, 'MODEL.DROPPATH', 0.0, 'MODEL.DROPOUT', 0.0)
    model = _build_perturbed(config)
    model.train()
    logits = model(_input(config, 2))
    assert logits.shape == [2, 7]
    (logits * paddle.randn(logits.shape)).sum().backward()
    for name, p in model.named_parameters():
        if not p.stop_gradient:
            assert p.grad is not None, f'{name} got no gradient'
            grad = p.grad.numpy()
            assert np.isfinite(grad).all() and np.abs(grad).max() > 0, f'{name}: gradient {grad.ravel()[:4]}'


@pytest.mark.parametrize('path', CONFIG_FILES, ids=_id)
def test_jit_save_load_dynamic_batch(path, tmp_path):
    config = _reduced_config(path)
    model = _build_perturbed(config)
    model.eval()
    size = config.DATA.IMAGE_SIZE
    spec = [paddle.static.InputSpec([None, config.DATA.IN_CHANNELS, size, size], 'float32', 'image')]
    prefix = str(tmp_path / 'model')
    paddle.jit.save(model, prefix, input_spec=spec)
    loaded = paddle.jit.load(prefix)
    loaded.eval()
    for batch in (1, 3):
        x = _input(config, batch)
        expected = model(x).numpy()
        np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-5, rtol=1e-5)
        assert expected.shape == (batch, config.MODEL.NUM_CLASSES)

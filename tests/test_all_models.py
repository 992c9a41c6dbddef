"""Every model config in configs/*.yaml: build, forward, backward, class override, jit export; and
for every registered MODEL.TYPE (its first config) the backbone interface and feature extraction.

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
from mobileformer.checkpoint import classifier_keys, load_weights
from mobileformer.registry import reduced_opts, registered_models

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


def _first_config_per_type():
    first = {}
    for path in CONFIG_FILES:
        first.setdefault(get_config(path).MODEL.TYPE, path)
    return first


TYPE_CONFIGS = _first_config_per_type()


def test_every_registered_model_type_has_a_config():
    assert sorted(TYPE_CONFIGS) == registered_models()


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


def _numpy(outputs):
    return [o.numpy() for o in outputs]


@pytest.mark.parametrize('model_type', sorted(TYPE_CONFIGS))
def test_backbone_interface(model_type):
    config = _reduced_config(TYPE_CONFIGS[model_type], 'MODEL.NUM_CLASSES', 7)
    model = _build_perturbed(config)
    model.eval()
    x, size = _input(config, 2), config.DATA.IMAGE_SIZE
    features = model.forward_features(x)
    # unpooled: the last stage as a map [B, C, H/s, W/s] or as tokens [B, H/s * W/s, C]
    last = [info for info in model.feature_info if info.stride > 0][-1]
    side = size // last.stride
    trunk = features[0] if isinstance(features, tuple) else features
    expected = [2, last.channels, side, side] if trunk.ndim == 4 else [2, side * side, last.channels]
    assert list(trunk.shape) == expected
    if isinstance(features, tuple):  # Mobile-Former: (map, tokens)
        tokens = model.feature_info[-1]
        assert tokens.stride == 0 and features[1].shape[0] == 2 and features[1].shape[2] == tokens.channels
    pre_logits = model.forward_head(features, pre_logits=True).numpy()
    assert pre_logits.shape == (2, model.num_features)
    logits = model(x).numpy()
    np.testing.assert_array_equal(logits, model.forward_head(features).numpy())
    name = model.classifier_name
    assert classifier_keys(model) == [f'{name}.weight', f'{name}.bias']
    assert model.state_dict()[f'{name}.weight'].shape == [model.num_features, 7]
    np.testing.assert_allclose(logits, pre_logits @ model.get_classifier().weight.numpy()
                               + model.get_classifier().bias.numpy(), atol=1e-4, rtol=1e-4)

    model.reset_classifier(0)
    np.testing.assert_array_equal(model(x).numpy(), pre_logits)
    assert classifier_keys(model) == [] and not any(k.startswith(name + '.') for k in model.state_dict())
    model.reset_classifier(5)
    assert model(x).shape == [2, 5] and model.num_classes == 5
    assert model.state_dict()[f'{name}.weight'].shape == [model.num_features, 5]


@pytest.mark.parametrize('model_type', sorted(TYPE_CONFIGS))
def test_feature_extraction_and_export(model_type, tmp_path):
    config = _reduced_config(TYPE_CONFIGS[model_type])
    classifier = _build_perturbed(config)
    specs = classifier.feature_specs()
    default = build_model(config, features_only=True)
    assert default.feature_info == [specs[i] for i in default.default_out_indices()]
    last_only = build_model(_reduced_config(TYPE_CONFIGS[model_type], 'MODEL.OUT_INDICES', [-1]))
    assert last_only.feature_info == [specs[-1]] and last_only.out_indices == [len(specs) - 1]

    # every output, loaded from the classifier's checkpoint: the head layers are left out
    model = build_model(config, out_indices=list(range(len(specs))))
    weights = str(tmp_path / 'classifier.pdparams')
    paddle.save(classifier.state_dict(), weights)
    assert load_weights(model, weights) == []
    assert set(model.state_dict()) < set(classifier.state_dict())
    model.eval()
    classifier.eval()
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    x = _input(config, 2)
    outputs = model(x)
    assert len(outputs) == len(model.feature_info) == len(specs)
    for output, info in zip(outputs, model.feature_info):
        if info.stride:
            assert list(output.shape) == [2, info.channels, size // info.stride, size // info.stride], info
        else:  # tokens [B, M, C]
            assert output.ndim == 3 and output.shape[0] == 2 and output.shape[2] == info.channels, info
    for ours, theirs in zip(_numpy(outputs), _numpy(classifier.forward_intermediates(x, model.out_indices))):
        np.testing.assert_array_equal(ours, theirs)

    # the first output alone: the layers after it are gone, and every parameter left trains
    first = build_model(config, out_indices=[0])
    assert first.feature_info == [specs[0]] and len(first.parameters()) < len(model.parameters())
    first.train()
    (first(_input(config, 2))[0] * paddle.randn(outputs[0].shape)).sum().backward()
    assert [name for name, p in first.named_parameters() if not p.stop_gradient and p.grad is None] == []

    prefix = str(tmp_path / 'features')
    paddle.jit.save(model, prefix, input_spec=[paddle.static.InputSpec([None, channels, size, size], 'float32', 'x')])
    loaded = paddle.jit.load(prefix)
    loaded.eval()
    for batch in (1, 3):
        x = _input(config, batch)
        exported, expected = _numpy(loaded(x)), _numpy(model(x))
        assert len(exported) == len(expected)
        for a, b in zip(exported, expected):
            assert a.shape[0] == batch
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

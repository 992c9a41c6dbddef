"""MLP-Mixer, gMLP, ResMLP and FNet against published counts (docs/mlp_mixer.md, docs/fnet.md) and timm."""
import json
import os
import re

import numpy as np
import paddle
import pytest

from conftest import CONFIGS, FIXTURES
from mobileformer import ConfigError, build_model, get_config
from mobileformer.flops import count_madds
from mobileformer.models.fnet import FourierMixing
from mobileformer.models.model_utils import count_trainable
from mobileformer.models.mlp_mixer import ResBlock, SpatialGatingUnit
from mobileformer.registry import converters
from mobileformer.checkpoint import check_state

# timm 1.0.31 parameter counts at 1000 classes and GMACs (docs/mlp_mixer.md, size tables).
PUBLISHED = {
    'mixer_s32_224': (19_104_624, 1.00), 'mixer_s16_224': (18_528_264, 3.78),
    'mixer_b32_224': (60_293_428, 3.24), 'mixer_b16_224': (59_880_472, 12.60),
    'mixer_l32_224': (206_939_264, 11.25), 'mixer_l16_224': (208_196_168, 44.55),
    'gmlp_ti16_224': (5_867_328, 1.34), 'gmlp_s16_224': (19_422_656, 4.39),
    'gmlp_b16_224': (73_075_392, 15.72),
    'resmlp_12_224': (15_350_872, 3.01), 'resmlp_24_224': (30_020_680, 5.96),
    'resmlp_36_224': (44_690_488, 8.91), 'resmlp_big_24_224': (129_138_280, 100.2),
}


def _config(name, *opts):
    return get_config(os.path.join(CONFIGS, f'{name}.yaml'), list(opts))


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_param_count_matches_timm(name):
    with paddle.LazyGuard():  # shapes only: no 200M-parameter initialisation
        model = build_model(_config(name))
    assert count_trainable(model) == PUBLISHED[name][0]


def _madds_at_depth(name, depth, *opts):
    config = _config(name, 'MODEL.MIXER.DEPTH', depth, *opts)
    return count_madds(build_model(config), [1, 3, 224, 224])


def _madds_by_depth(name, *opts):
    """MAdds of the full-depth model from real counts at depth 1 and 2: every block has the same
    shapes, so the count is affine in depth (checked exactly below against full counts). A full
    forward of all 13 models costs ~80 s here; this costs ~20 s."""
    one, two = _madds_at_depth(name, 1, *opts), _madds_at_depth(name, 2, *opts)
    return one + (_config(name).MODEL.MIXER.DEPTH - 1) * (two - one)


@pytest.mark.parametrize('name', ['mixer_s32_224', 'gmlp_ti16_224', 'resmlp_12_224'])
def test_depth_extrapolated_madds_equal_full_count(name):
    narrow = ['MODEL.MIXER.EMBED_DIM', 128]  # width does not matter for linearity in depth
    full = count_madds(build_model(_config(name, *narrow)), [1, 3, 224, 224])
    assert _madds_by_depth(name, *narrow) == full


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_madds_match_published(name):
    gmacs = _madds_by_depth(name) / 1e9
    assert abs(gmacs - PUBLISHED[name][1]) <= 0.03 * PUBLISHED[name][1], gmacs


@pytest.mark.parametrize('model_type', ['mixer', 'gmlp', 'resmlp', 'fnet'])
def test_image_size_not_divisible_by_patch_is_a_config_error(model_type):
    key = 'MODEL.FNET.PATCH_SIZE' if model_type == 'fnet' else 'MODEL.MIXER.PATCH_SIZE'
    config = get_config(opts=['MODEL.TYPE', model_type, 'DATA.IMAGE_SIZE', 100, key, 16])
    with pytest.raises(ConfigError, match='not divisible by ' + re.escape(key)):
        build_model(config)


def test_key_of_another_block_type_is_rejected():
    with pytest.raises(ConfigError, match='LAYERSCALE_INIT does not apply'):
        build_model(_config('mixer_s32_224', 'MODEL.MIXER.LAYERSCALE_INIT', 1e-5))


def _small(name, *opts):
    return build_model(_config(name, 'DATA.IMAGE_SIZE', 64, 'MODEL.MIXER.DEPTH', 2, *opts))


def test_fresh_mixer_outputs_zero_logits():
    model = _small('mixer_s32_224')
    model.eval()
    logits = model(paddle.randn([2, 3, 64, 64]))
    assert logits.shape == [2, 1000]
    assert float(paddle.abs(logits).max()) == 0.0


def test_gmlp_gate_starts_near_identity():
    gates = [m for m in _small('gmlp_ti16_224').sublayers() if isinstance(m, SpatialGatingUnit)]
    assert len(gates) == 2
    for gate in gates:
        np.testing.assert_array_equal(gate.proj.bias.numpy(), 1.0)
        assert 0 < float(gate.proj.weight.std()) < 1e-5


@pytest.mark.parametrize('name, value', [('resmlp_12_224', 0.1), ('resmlp_24_224', 1e-5),
                                         ('resmlp_36_224', 1e-6), ('resmlp_big_24_224', 1e-6)])
def test_resmlp_layerscale_init_by_depth(name, value):
    with paddle.LazyGuard():
        blocks = [m for m in build_model(_config(name)).sublayers() if isinstance(m, ResBlock)]
    assert len(blocks) == _config(name).MODEL.MIXER.DEPTH
    model = _small(name)  # values need real (non-lazy) parameters
    for block in (m for m in model.sublayers() if isinstance(m, ResBlock)):
        np.testing.assert_allclose(block.ls1.numpy(), value, rtol=1e-6)
        np.testing.assert_allclose(block.ls2.numpy(), value, rtol=1e-6)


def test_fourier_mixing_equals_numpy_fft2():
    x = np.random.randn(3, 16, 24).astype('float32')
    out = FourierMixing()(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(out, np.real(np.fft.fft2(x, axes=(-2, -1))), rtol=1e-4, atol=1e-3)


def test_fnet_cifar_matches_keras_example_shape():
    model = build_model(_config('fnet_cifar_64'))
    assert model.pos_embed.shape == [1, 64, 256] and len(model.blocks) == 4
    assert model(paddle.randn([2, 3, 64, 64])).shape == [2, 100]


# ---- weights: timm fixtures and full-size key lists ------------------------------------------

def _load_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize('tag', ['timm_mixer_tiny', 'timm_gmlp_tiny', 'timm_resmlp_tiny'])
def test_timm_tiny_logits_match(tag):
    config = get_config(os.path.join(FIXTURES, f'{tag}.yaml'))
    state = _load_npz(os.path.join(FIXTURES, f'{tag}_state.npz'))
    io = _load_npz(os.path.join(FIXTURES, f'{tag}_io.npz'))
    converter = converters()['timm']
    assert converter.detect(state.keys()) and not converters()['deit-resmlp'].detect(state.keys())
    model = build_model(config)
    converted = converter.convert(state, config)
    check_state(converted, model, tag)  # no missing or extra key, every shape right
    model.set_state_dict(converted)
    assert count_trainable(model) == json.load(open(os.path.join(FIXTURES, f'{tag}.json')))['num_params']
    model.eval()
    logits = model(paddle.to_tensor(io['input'])).numpy()
    np.testing.assert_allclose(logits, io['logits'], atol=1e-4, rtol=0)


def _synthetic(keys):
    """Zero arrays of the listed shapes, without allocating (zero strides)."""
    return {k: np.broadcast_to(np.zeros(1, 'float32'), shape) for k, shape in keys}


def _key_list(name):
    with open(os.path.join(FIXTURES, 'keys', f'timm_{name}.json')) as f:
        return json.load(f)['keys']


def _deit_layout(timm_keys):
    """The authors' ResMLP names/shapes, derived from timm's: patch_embed, attn (token linear),
    mlp, gamma_1/2, Affine vectors of shape (C,)."""
    renames = [('stem.proj.', 'patch_embed.proj.'), ('.linear_tokens.', '.attn.'),
               ('.mlp_channels.', '.mlp.'), ('.ls1', '.gamma_1'), ('.ls2', '.gamma_2')]
    keys = []
    for key, shape in timm_keys:
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        keys.append((key, [shape[-1]] if key.endswith(('alpha', 'beta')) else shape))
    return keys


def _check_loads(converter_name, keys, config):
    converter = converters()[converter_name]
    state = _synthetic(keys)
    assert converter.detect(state.keys())
    converted = converter.convert(state, config)
    assert len(converted) == len(keys)
    with paddle.LazyGuard():  # shapes only: the check needs no initialised weights
        model = build_model(config)
    check_state(converted, model, converter_name)  # no missing or extra key, every shape right
    if sum(int(np.prod(s)) for _, s in keys) < 25_000_000:  # small enough to really load
        missing, unexpected = build_model(config).set_state_dict(converted)
        assert not missing and not unexpected


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_timm_full_key_list_converts_and_loads(name):
    _check_loads('timm', _key_list(name), _config(name))


@pytest.mark.parametrize('name', sorted(n for n in PUBLISHED if n.startswith('resmlp')))
def test_deit_resmlp_key_list_converts_and_loads(name):
    _check_loads('deit-resmlp', _deit_layout(_key_list(name)), _config(name))


def test_deit_resmlp_layout_of_timm_fixture_gives_same_logits():
    config = get_config(os.path.join(FIXTURES, 'timm_resmlp_tiny.yaml'))
    timm_state = _load_npz(os.path.join(FIXTURES, 'timm_resmlp_tiny_state.npz'))
    io = _load_npz(os.path.join(FIXTURES, 'timm_resmlp_tiny_io.npz'))
    deit_keys = _deit_layout([(k, list(v.shape)) for k, v in timm_state.items()])
    deit_state = {new: timm_state[old].reshape(shape) for (new, shape), old in zip(deit_keys, timm_state)}
    model = build_model(config)
    converted = converters()['deit-resmlp'].convert(deit_state, config)
    check_state(converted, model, 'deit-resmlp')
    model.set_state_dict(converted)
    model.eval()
    np.testing.assert_allclose(model(paddle.to_tensor(io['input'])).numpy(), io['logits'], atol=1e-4, rtol=0)

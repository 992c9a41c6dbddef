import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from conftest import CONFIGS
from mobileformer import ConfigError, build_model, get_config
from mobileformer.flops import count_madds
from mobileformer.models.model_utils import count_trainable, re_parameterize_model
from mobileformer.registry import converters
from mobileformer.reparam import reparameterize_checkpoint
from mobileformer.models.repmlp_resnet import RepMLP, official_repmlp_to_paddle
from mobileformer.checkpoint import check_state
from rep_utils import (constant_init, eval_output, lazy_model, load_fixture, randomise_batchnorms, reference_keys,
                       relative_error, state_shapes, synthetic_state)

# config: (params training, params folded, GMACs training, GMACs folded) of the release
# (docs/repmlp_resnet.md, sizes)
FLAVOURS = {
    'repmlp_res50_light_224': (87_038_248, 86_142_440, 3.30, 3.08),
    'repmlp_res50_bottleneck_224': (41_071_144, 40_871_528, 3.95, 3.89),
}
# Full widths, reduced depth and 64 px: stage 2 has 2x2 partitions of 4x4 (global perceptron on),
# stage 3 a single partition (off).
SMALL = ['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLP_RESNET.PARTITION', 4, 'MODEL.REPMLP_RESNET.DEPTHS', [1, 2, 2, 1]]


def config_of(name, deploy=False, opts=()):
    return get_config(os.path.join(CONFIGS, f'{name}.yaml'), ['MODEL.DEPLOY', deploy, *opts])


def fixture_block(deploy):
    """The block of official_repmlp_v1_block_{train,deploy}.json."""
    return RepMLP(8, 8, 8, 8, 4, 4, kernels=[1, 3], fc1_fc2_reduction=2, groups=2, deploy=deploy)


@pytest.fixture
def constant_fc3_init(monkeypatch):
    """fc3's orthogonal init is a QR of up to 6272 x 1568 per block (seconds each on a CPU, and
    LazyGuard does not defer it); counts, shapes and MAdds do not depend on weights."""
    monkeypatch.setattr(paddle.nn.initializer, 'Orthogonal', lambda: paddle.nn.initializer.Constant(0.01))


@pytest.mark.usefixtures('constant_fc3_init')
@pytest.mark.parametrize('name', sorted(FLAVOURS))
def test_parameter_counts(name):
    train, folded = FLAVOURS[name][:2]
    assert count_trainable(lazy_model(config_of(name))) == train
    assert count_trainable(lazy_model(config_of(name, deploy=True))) == folded


def test_plain_baseline_is_resnet50():
    assert count_trainable(lazy_model(config_of('resnet50_repmlp_base'))) == 25_557_032


@pytest.mark.usefixtures('constant_fc3_init')
@pytest.mark.parametrize('name', sorted(FLAVOURS))
def test_madds_match_published(name):
    for deploy, published in ((False, FLAVOURS[name][2]), (True, FLAVOURS[name][3])):
        with constant_init():
            model = build_model(config_of(name, deploy))
        madds = count_madds(model, [1, 3, 224, 224]) / 1e9
        assert abs(madds - published) <= 0.03 * published


@pytest.mark.parametrize('tag', ['train', 'deploy'])
def test_block_parity_with_official_release(tag):
    state, io = load_fixture(f'official_repmlp_v1_block_{tag}')
    block = fixture_block(deploy=tag == 'deploy')
    converted = official_repmlp_to_paddle(state)
    check_state(converted, block, f'the {tag} block')  # no missing or extra key, every shape right
    block.set_state_dict(converted)
    assert relative_error(eval_output(block, io['input']), io['logits']) < 1e-4


def test_our_block_fold_reproduces_official_deploy_block():
    state, _ = load_fixture('official_repmlp_v1_block_train')
    _, deploy_io = load_fixture('official_repmlp_v1_block_deploy')
    block = fixture_block(deploy=False)
    block.set_state_dict(official_repmlp_to_paddle(state))
    block.eval()
    block.re_parameterize()
    assert block.is_repped and state_shapes(block) == state_shapes(fixture_block(deploy=True))
    assert relative_error(eval_output(block, deploy_io['input']), deploy_io['logits']) < 1e-4


@pytest.mark.parametrize('name', sorted(FLAVOURS))
def test_fold_preserves_outputs_and_leaves_no_batchnorm(name):
    model = build_model(config_of(name, opts=SMALL))
    randomise_batchnorms(model)
    x = np.random.randn(2, 3, 64, 64).astype('float32')
    before = eval_output(model, x)
    re_parameterize_model(model)
    assert not [layer for layer in model.sublayers() if isinstance(layer, nn.layer.norm._BatchNormBase)]
    assert relative_error(eval_output(model, x), before) < 1e-5

    deployed = build_model(config_of(name, deploy=True, opts=SMALL))
    assert state_shapes(deployed) == state_shapes(model)
    deployed.set_state_dict(model.state_dict())
    assert relative_error(eval_output(deployed, x), before) < 1e-5


@pytest.mark.usefixtures('constant_fc3_init')
@pytest.mark.parametrize('flavour', ['light', 'bottleneck'])
@pytest.mark.parametrize('layout', ['train', 'deploy'])
def test_full_size_reference_keys_convert_exactly(flavour, layout):
    keys = reference_keys(f'official_repmlp_res50_{flavour}_224_{layout}')
    converter = converters()['official-repmlp']
    assert converter.detect(keys) and not converters()['official-repmlpnet'].detect(keys)
    config = config_of(f'repmlp_res50_{flavour}_224', deploy=layout == 'deploy')
    converted = converter.convert(synthetic_state(keys), config)
    check_state(converted, lazy_model(config), f'the {flavour} {layout} key list')


def test_bad_sizes_are_build_errors():
    with pytest.raises(ConfigError, match='not divisible by MODEL.REPMLP_RESNET.PARTITION 7'):
        build_model(config_of('repmlp_res50_light_224', opts=['DATA.IMAGE_SIZE', 256]))
    with pytest.raises(ConfigError, match='BLOCK must be one of'):
        build_model(config_of('repmlp_res50_light_224', opts=['MODEL.REPMLP_RESNET.BLOCK', 'heavy']))
    with pytest.raises(ConfigError, match=r'^MODEL.REPMLP_RESNET.REPARAM_KERNELS must be positive odd sizes, got \[1, 4\]$'):
        build_model(config_of('repmlp_res50_light_224', opts=['MODEL.REPMLP_RESNET.REPARAM_KERNELS', [1, 4]]))
    with pytest.raises(ConfigError, match='^RepMLP-ResNet has no dropout or stochastic depth; set MODEL.DROPOUT and '):
        build_model(config_of('repmlp_res50_light_224', opts=['MODEL.DROPPATH', 0.1]))


def test_reparam_command_folds_repmlp_resnet(tmp_path):
    cfg = os.path.join(CONFIGS, 'repmlp_res50_bottleneck_224.yaml')
    model = build_model(get_config(cfg, SMALL))
    randomise_batchnorms(model)
    trained, folded = str(tmp_path / 'trained.pdparams'), str(tmp_path / 'deploy.pdparams')
    paddle.save(model.state_dict(), trained)
    reparameterize_checkpoint(cfg, trained, folded, SMALL)

    deployed = build_model(config_of('repmlp_res50_bottleneck_224', deploy=True, opts=SMALL))
    missing, unexpected = deployed.set_state_dict(paddle.load(folded))
    assert (missing, unexpected) == ([], [])
    x = np.random.randn(1, 3, 64, 64).astype('float32')
    assert relative_error(eval_output(deployed, x), eval_output(model, x)) < 1e-5

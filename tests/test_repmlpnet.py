import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from conftest import CONFIGS, FIXTURES, ROOT
from mobileformer import ConfigError, build_model, get_config
from mobileformer.flops import count_madds
from mobileformer.models.model_utils import count_trainable, re_parameterize_model
from mobileformer.reparam import main as reparam_main
from mobileformer.reparam import reparameterize_checkpoint
from mobileformer.registry import converters
from mobileformer.models.repmlpnet import RepMLPBlock
from mobileformer.checkpoint import check_state
from rep_utils import (constant_init, eval_output, lazy_model, load_fixture, randomise_batchnorms, reference_keys,
                       relative_error, state_shapes, synthetic_state)

# name: (params training, params deploy, paper GMACs) (docs/repmlpnet.md, sizes)
SIZES = {
    't224': (38_293_608, 38_331_720, 2.81),
    'b224': (68_242_712, 68_332_664, 6.68),
    't256': (58_687_848, 58_739_400, 4.26),
    'b256': (96_447_512, 96_568_184, 9.64),
    'd256': (86_887_648, 86_985_280, 8.64),
    'l256': (117_641_560, 117_820_600, 11.61),
}
TINY_TRAIN = os.path.join(FIXTURES, 'official_repmlpnet_tiny_train.yaml')
TINY_DEPLOY = os.path.join(FIXTURES, 'official_repmlpnet_tiny_deploy.yaml')
# Two partitions per side in every stage and C/S > 1: the case where the release's row order matters.
MULTI_PARTITION = ['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLPNET.SHARESETS', [2, 4, 8, 16]]


def config_of(name, deploy=False):
    return get_config(os.path.join(CONFIGS, f'repmlpnet_{name}.yaml'), ['MODEL.DEPLOY', deploy])


@pytest.mark.parametrize('name', sorted(SIZES))
def test_parameter_counts(name):
    train, deploy, _ = SIZES[name]
    assert count_trainable(lazy_model(config_of(name))) == train
    assert count_trainable(lazy_model(config_of(name, deploy=True))) == deploy


@pytest.mark.parametrize('name', sorted(SIZES))
def test_madds_match_published(name):
    config = config_of(name)
    with constant_init():
        model = build_model(config)
    size = config.DATA.IMAGE_SIZE
    madds = count_madds(model, [1, 3, size, size])
    assert abs(madds / 1e9 - SIZES[name][2]) <= 0.03 * SIZES[name][2]


@pytest.mark.parametrize('opts', [[], MULTI_PARTITION], ids=['one-partition', 'multi-partition'])
def test_fold_preserves_eval_outputs_and_loads_into_deploy_model(opts):
    model = build_model(get_config(TINY_TRAIN, opts))
    randomise_batchnorms(model)
    size = 64 if opts else 32
    x = np.random.randn(2, 3, size, size).astype('float32')
    before = eval_output(model, x)
    re_parameterize_model(model)
    assert all(block.is_repped for block in model.sublayers() if isinstance(block, RepMLPBlock))
    assert relative_error(eval_output(model, x), before) < 1e-5

    deployed = build_model(get_config(TINY_DEPLOY, opts))
    assert state_shapes(deployed) == state_shapes(model)
    deployed.set_state_dict(model.state_dict())
    assert relative_error(eval_output(deployed, x), before) < 1e-5


def test_partition_order_follows_the_release():
    """Numpy transcription of the release's reshape chain for one block (fc3 + BN only), H = 2h."""
    c, s, h, hp = 8, 2, 2, 2
    block = RepMLPBlock(c, h, s, kernels=[], gp_reduction=4)
    randomise_batchnorms(block)
    block.eval()
    x = np.random.randn(3, c, h * hp, h * hp).astype('float32')
    weight = block.fc3.weight.numpy().reshape(s, h * h, h * h)  # [S, out, in] per share-set
    bn = block.fc3_bn
    scale = bn.weight.numpy() / np.sqrt(bn._variance.numpy() + bn._epsilon)
    shift = bn.bias.numpy() - bn._mean.numpy() * scale

    rows = x.reshape(-1, c, hp, h, hp, h).transpose(0, 2, 4, 1, 3, 5).reshape(-1, s, h * h)
    out = np.einsum('soi,rsi->rso', weight, rows) * scale[:, None] + shift[:, None]
    out = out.reshape(-1, hp, hp, s, h, h).transpose(0, 3, 1, 4, 2, 5).reshape(x.shape)
    gate = block.gp(paddle.to_tensor(x)).numpy()
    with paddle.no_grad():
        actual = block(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(actual, out * gate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tag', ['train', 'deploy'])
def test_parity_with_official_release(tag):
    config = get_config(os.path.join(FIXTURES, f'official_repmlpnet_tiny_{tag}.yaml'))
    state, io = load_fixture(f'official_repmlpnet_tiny_{tag}')
    converter = converters()['official-repmlpnet']
    assert converter.detect(state.keys())
    model = build_model(config)
    converted = converter.convert(state, config)
    check_state(converted, model, f'the {tag} release')  # no missing or extra key, every shape right
    model.set_state_dict(converted)
    assert relative_error(eval_output(model, io['input']), io['logits']) < 1e-4


def test_our_fold_reproduces_official_deploy_model():
    config = get_config(TINY_TRAIN)
    state, io = load_fixture('official_repmlpnet_tiny_train')
    _, deploy_io = load_fixture('official_repmlpnet_tiny_deploy')
    model = build_model(config)
    model.set_state_dict(converters()['official-repmlpnet'].convert(state, config))
    re_parameterize_model(model)
    assert relative_error(eval_output(model, deploy_io['input']), deploy_io['logits']) < 1e-4


@pytest.mark.parametrize('name', sorted(SIZES))
@pytest.mark.parametrize('layout', ['train', 'deploy'])
def test_full_size_reference_keys_convert_exactly(name, layout):
    keys = reference_keys(f'official_repmlpnet-{name}_{layout}')
    converter = converters()['official-repmlpnet']
    assert converter.detect(keys)
    config = config_of(name, deploy=layout == 'deploy')
    converted = converter.convert(synthetic_state(keys), config)
    check_state(converted, lazy_model(config), f'the {name} {layout} key list')


def test_branch_kernels_and_dropout_are_build_errors():
    with pytest.raises(ConfigError, match=r'^MODEL.REPMLPNET.REPARAM_KERNELS must be positive odd sizes, got \[0, 3\]$'):
        build_model(get_config(TINY_TRAIN, ['MODEL.REPMLPNET.REPARAM_KERNELS', [0, 3]]))
    with pytest.raises(ConfigError, match='^RepMLPNet has no dropout or stochastic depth; set MODEL.DROPOUT and '):
        build_model(get_config(TINY_TRAIN, ['MODEL.DROPOUT', 0.1]))


def test_image_size_incompatible_with_partitions_is_a_build_error():
    with pytest.raises(ConfigError, match='divisible by 32'):
        build_model(get_config(os.path.join(CONFIGS, 'repmlpnet_t224.yaml'), ['DATA.IMAGE_SIZE', 200]))
    with pytest.raises(ConfigError, match='not divisible by partition size 56'):
        build_model(get_config(os.path.join(CONFIGS, 'repmlpnet_t224.yaml'),
                               ['DATA.IMAGE_SIZE', 256, 'MODEL.REPMLPNET.PARTITIONS', [56, 28, 14, 7]]))


@pytest.mark.timeout(120)
def test_reparam_command_end_to_end(tmp_path):
    model = build_model(get_config(TINY_TRAIN))
    randomise_batchnorms(model)
    trained, folded = tmp_path / 'trained.pdparams', tmp_path / 'out' / 'deploy.pdparams'
    paddle.save(model.state_dict(), str(trained))
    run = subprocess.run([sys.executable, '-m', 'mobileformer.reparam', '-cfg', TINY_TRAIN,
                          '-pretrained', str(trained), '-o', str(folded)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [p.name for p in folded.parent.iterdir()] == ['deploy.pdparams']  # no temporary left behind

    deployed = build_model(get_config(TINY_DEPLOY))
    missing, unexpected = deployed.set_state_dict(paddle.load(str(folded)))
    assert (missing, unexpected) == ([], [])
    x = np.random.randn(2, 3, 32, 32).astype('float32')
    assert relative_error(eval_output(deployed, x), eval_output(model, x)) < 1e-5


def test_reparam_command_errors(tmp_path, capsys):
    def error_of(*args):
        with pytest.raises(SystemExit) as exit_info:
            reparam_main(list(args))
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    out = str(tmp_path / 'deploy.pdparams')
    assert 'does not exist' in error_of('-cfg', TINY_TRAIN, '-pretrained', str(tmp_path / 'nope.pdparams'), '-o', out)
    other = tmp_path / 'other.pdparams'
    paddle.save(build_model(get_config(TINY_TRAIN, ['MODEL.NUM_CLASSES', 3])).state_dict(), str(other))
    assert 'was trained for 3 classes but MODEL.NUM_CLASSES is 10' in error_of('-cfg', TINY_TRAIN, '-pretrained',
                                                                                str(other), '-o', out)
    folded = build_model(get_config(TINY_DEPLOY)).state_dict()
    paddle.save(folded, str(other))
    assert re.search(r'does not fit the model: \d+ missing', error_of('-cfg', TINY_TRAIN, '-pretrained', str(other),
                                                                        '-o', out))
    assert 'training config' in error_of('-cfg', TINY_DEPLOY, '-pretrained', str(other), '-o', out)
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match='does not exist'):
        reparameterize_checkpoint(TINY_TRAIN, str(tmp_path / 'nope'), out)

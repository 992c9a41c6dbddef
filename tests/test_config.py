import os

import pytest
from conftest import CONFIGS

from mobileformer import ConfigError, build_model, get_config


def write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_are_frozen():
    config = get_config()
    assert config.MODEL.NUM_CLASSES == 1000
    with pytest.raises(AttributeError):
        config.MODEL.NUM_CLASSES = 3


def test_base_inheritance_and_override_order(tmp_path):
    (tmp_path / 'sub').mkdir()
    write(tmp_path / 'base.yaml', 'MODEL:\n  NUM_CLASSES: 7\n  DROPOUT: 0.5\nDATA:\n  IMAGE_SIZE: 160\n')
    child = write(tmp_path / 'sub' / 'child.yaml', '_BASE_: ../base.yaml\nMODEL:\n  DROPOUT: 0.25\n')
    config = get_config(child)
    assert (config.MODEL.NUM_CLASSES, config.MODEL.DROPOUT, config.DATA.IMAGE_SIZE) == (7, 0.25, 160)
    config = get_config(child, ['MODEL.NUM_CLASSES', '10', 'MODEL.DROPOUT', '0.1'])
    assert (config.MODEL.NUM_CLASSES, config.MODEL.DROPOUT) == (10, 0.1)


def test_base_list_merges_in_order(tmp_path):
    write(tmp_path / 'a.yaml', 'MODEL:\n  NUM_CLASSES: 3\n  NAME: a\n')
    write(tmp_path / 'b.yaml', 'MODEL:\n  NAME: b\n')
    child = write(tmp_path / 'c.yaml', '_BASE_: [a.yaml, b.yaml]\n')
    config = get_config(child)
    assert (config.MODEL.NUM_CLASSES, config.MODEL.NAME) == (3, 'b')


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / 'a.yaml', '_BASE_: b.yaml\n')
    write(tmp_path / 'b.yaml', '_BASE_: a.yaml\n')
    with pytest.raises(ConfigError, match='cycle'):
        get_config(str(tmp_path / 'a.yaml'))


def test_unknown_key_names_full_key_and_file(tmp_path):
    path = write(tmp_path / 'typo.yaml', 'MODEL:\n  MF:\n    TOKEN_DIMS: 64\n')
    with pytest.raises(ConfigError) as err:
        get_config(path)
    message = str(err.value)
    assert 'MODEL.MF.TOKEN_DIMS' in message and 'typo.yaml' in message
    assert 'did you mean MODEL.MF.TOKEN_DIM' in message


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path / 'bad.yaml', 'MODEL:\n  NUM_CLASSES: ten\n')
    with pytest.raises(ConfigError) as err:
        get_config(path)
    assert 'MODEL.NUM_CLASSES must be of type int' in str(err.value) and 'bad.yaml' in str(err.value)


def test_wrong_type_in_opts():
    with pytest.raises(ConfigError, match='command-line -opts: MODEL.DEPLOY must be of type bool'):
        get_config(None, ['MODEL.DEPLOY', '3'])


def test_unknown_key_in_opts():
    with pytest.raises(ConfigError, match='unknown config key DATA.IMG_SIZE'):
        get_config(None, ['DATA.IMG_SIZE', '3'])


def test_odd_opts_is_an_error():
    with pytest.raises(ConfigError, match='KEY VALUE pairs'):
        get_config(None, ['MODEL.NUM_CLASSES'])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match='does not exist'):
        get_config(str(tmp_path / 'nope.yaml'))


def test_unknown_model_type_lists_registered():
    config = get_config(None, ['MODEL.TYPE', 'resnet9000'])
    with pytest.raises(ValueError, match='registered types:'):
        build_model(config)


@pytest.mark.parametrize('name, model_type', [('mobileformer_26m', 'mobileformer'), ('fnet_cifar_64', 'fnet')])
def test_deploy_is_refused_by_models_without_a_folded_form(name, model_type):
    config = get_config(os.path.join(CONFIGS, f'{name}.yaml'), ['MODEL.DEPLOY', 'True'])
    with pytest.raises(ConfigError, match=f'{model_type} has none: set MODEL.DEPLOY False$'):
        build_model(config)

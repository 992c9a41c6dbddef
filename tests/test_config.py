import os

import pytest
from conftest import CONFIGS

from mobileformer import ConfigError, build_model, get_config
from mobileformer.config import register_model_defaults
from mobileformer.models.mlp_mixer import MIXER_DEFAULTS


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


def test_family_subtrees_come_from_their_registration():
    assert get_config().MODEL.MIXER == MIXER_DEFAULTS
    register_model_defaults('MIXER', MIXER_DEFAULTS)  # a type sharing the subtree: no change
    changed = MIXER_DEFAULTS.clone()
    changed.DEPTH = 3
    with pytest.raises(ValueError, match='MODEL.MIXER is declared twice with different defaults'):
        register_model_defaults('MIXER', changed)
    assert get_config().MODEL.MIXER.DEPTH == MIXER_DEFAULTS.DEPTH


def test_unknown_model_type_lists_registered():
    config = get_config(None, ['MODEL.TYPE', 'resnet9000'])
    with pytest.raises(ValueError, match='registered types:'):
        build_model(config)


@pytest.mark.parametrize('name, model_type', [('mobileformer_26m', 'mobileformer'), ('fnet_cifar_64', 'fnet')])
def test_deploy_is_refused_by_models_without_a_folded_form(name, model_type):
    config = get_config(os.path.join(CONFIGS, f'{name}.yaml'), ['MODEL.DEPLOY', 'True'])
    with pytest.raises(ConfigError, match=f'{model_type} has none: set MODEL.DEPLOY False$'):
        build_model(config)


@pytest.mark.parametrize('text, value', [('5e-4', 5e-4), ('1e6', 1e6), ('1.0e6', 1e6), ('+2E+3', 2e3), ('.5e1', 5.0),
                                         ('1_000.5', 1000.5), ('8.0e-4', 8e-4)])
def test_every_float_spelling_is_a_float_on_the_command_line_and_in_yaml(tmp_path, text, value):
    assert get_config(None, ['TRAIN.BASE_LR', text]).TRAIN.BASE_LR == value
    path = tmp_path / 'lr.yaml'
    path.write_text(f'TRAIN:\n  BASE_LR: {text}\n')
    assert get_config(str(path)).TRAIN.BASE_LR == value


def test_non_finite_numbers_are_refused():
    with pytest.raises(ConfigError, match=r'TRAIN.BASE_LR must be a finite number, got nan'):
        get_config(None, ['TRAIN.BASE_LR', 'nan'])


RECIPE = os.path.join(CONFIGS, 'mobileformer_26m.yaml')  # 460 epochs: 3 warm-up, 10 cool-down


def test_a_recipe_shortened_on_the_command_line_scales_warm_up_and_cool_down():
    notices = []
    config = get_config(RECIPE, ['TRAIN.EPOCHS', '5', 'TRAIN.BASE_LR', '5e-4'], notices)
    assert config.TRAIN.WARMUP_EPOCHS == pytest.approx(3 * 5 / 460)
    assert config.TRAIN.COOLDOWN_EPOCHS == pytest.approx(10 * 5 / 460)
    assert notices == ["TRAIN.EPOCHS 5 shortens the config's 460 epochs, so warm-up and cool-down are scaled by "
                       "5/460: TRAIN.WARMUP_EPOCHS 3 -> 0.0326, TRAIN.COOLDOWN_EPOCHS 10 -> 0.109"]
    # at 14 epochs the cosine part keeps its share instead of one epoch
    config = get_config(RECIPE, ['TRAIN.EPOCHS', '14'])
    cosine = config.TRAIN.EPOCHS - config.TRAIN.WARMUP_EPOCHS - config.TRAIN.COOLDOWN_EPOCHS
    assert cosine / 14 == pytest.approx(447 / 460)


def test_schedule_keys_given_with_the_shorter_run_are_kept_or_refused():
    config = get_config(RECIPE, ['TRAIN.EPOCHS', '20', 'TRAIN.WARMUP_EPOCHS', '2'])
    assert (config.TRAIN.WARMUP_EPOCHS, config.TRAIN.COOLDOWN_EPOCHS) == (2, pytest.approx(10 * 20 / 460))
    with pytest.raises(ConfigError, match=r'TRAIN.WARMUP_EPOCHS \+ TRAIN.COOLDOWN_EPOCHS \(20.4348\) exceed '
                                          r'TRAIN.EPOCHS \(20\)'):
        get_config(RECIPE, ['TRAIN.EPOCHS', '20', 'TRAIN.WARMUP_EPOCHS', '20'])


def test_a_contradiction_in_the_yaml_itself_stays_an_error(tmp_path):
    path = tmp_path / 'short.yaml'
    path.write_text(f'_BASE_: {RECIPE}\nTRAIN:\n  EPOCHS: 5\n')
    with pytest.raises(ConfigError, match=r'\(13\) exceed TRAIN.EPOCHS \(5\)'):
        get_config(str(path))

"""Build by name from any folder: `create_model` / `list_models` over the shipped configs, which
pyproject.toml installs with the package; errors of the Python entry points speak Python."""
import glob
import json
import os
import subprocess
import sys

import paddle
import pytest
from conftest import CONFIGS, ROOT
from setuptools.config.pyprojecttoml import read_configuration

import mobileformer
from mobileformer import build_model, create_model, get_config, list_models
from mobileformer.config import ConfigError, config_names


def parameter_count(model):
    return sum(int(p.size) for p in model.parameters())


@pytest.mark.timeout(120)
def test_create_model_builds_by_name_outside_the_repository(tmp_path):
    script = ('import json, mobileformer\n'
              "model = mobileformer.create_model('mobileformer_26m', num_classes=10)\n"
              "config = mobileformer.get_config('configs/digits/mobileformer_26m.yaml')\n"
              "print(json.dumps([sum(int(p.size) for p in model.parameters()), config.DATA.DATASET]))\n")
    env = {**os.environ, 'PYTHONPATH': ROOT}
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stderr
    count, dataset = json.loads(result.stdout.splitlines()[-1])
    reference = build_model(get_config(os.path.join(CONFIGS, 'mobileformer_26m.yaml'), ['MODEL.NUM_CLASSES', 10]))
    assert count == parameter_count(reference) == 2229686
    assert dataset == 'digits'


def test_list_models_names_every_model_config():
    stems = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIGS, '*.yaml')))
    assert list_models() == stems and 'mobileformer_26m' in stems
    assert list_models('mixer_s*') == ['mixer_s16_224', 'mixer_s32_224']
    # names of configs in subfolders resolve too, and base/ (only inherited from) is no model
    assert 'digits/mobileformer_26m' in config_names() and not any(n.startswith('base/') for n in config_names())


def test_keyword_arguments_set_their_config_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = create_model('mixer_s32_224', num_classes=7, img_size=64, drop_rate=0.25)
    assert model.get_classifier().weight.shape == [512, 7]
    assert model.stem.proj.weight.shape[0] == 512 and model(paddle.randn([1, 3, 64, 64])).shape == [1, 7]
    features = create_model('mobileformer_26m', features_only=True, out_indices=[1, 3])
    assert [info.stride for info in features.feature_info] == [8, 32]


def test_pretrained_loads_and_class_count_errors_speak_python(tmp_path):
    fresh = create_model('mobileformer_26m', num_classes=10)
    weights = str(tmp_path / 'ten.pdparams')
    paddle.save(fresh.state_dict(), weights)
    loaded = create_model('mobileformer_26m', weights, num_classes=10)
    assert not loaded.training
    for name, value in fresh.state_dict().items():
        assert (loaded.state_dict()[name].numpy() == value.numpy()).all(), name
    with pytest.raises(ValueError) as error:
        create_model('mobileformer_26m', weights)
    assert str(error.value) == (f"'{weights}' was trained for 10 classes but MODEL.NUM_CLASSES is 1000; "
                                'pass num_classes=10 or a matching checkpoint')
    # with num_classes given, another class count is fine-tuning: the classifier starts fresh
    five = create_model('mobileformer_26m', weights, num_classes=5)
    assert five.get_classifier().weight.shape[-1] == 5
    with pytest.raises(ConfigError) as error:
        create_model('mobileformer_26m', num_classes=0)
    assert str(error.value) == ('MODEL.NUM_CLASSES must be > 0, got 0; fix it in the YAML or in the arguments '
                                'of create_model')


def test_an_unknown_name_is_one_sentence_with_close_matches():
    with pytest.raises(ConfigError) as error:
        create_model('mobileformer_27m')
    assert str(error.value) == ("config 'mobileformer_27m' does not exist (neither a YAML file nor a shipped config "
                                'name); did you mean one of mobileformer_52m, mobileformer_26m, mobileformer_294m, '
                                'mobileformer_214m?')
    with pytest.raises(ConfigError, match=r"; pass a YAML file or a name that mobileformer.list_models\(\) returns$"):
        get_config('no_such_model_at_all_xyz')


def test_configs_ship_with_the_package():
    """What setuptools installs (pyproject.toml, read by setuptools itself): every config YAML as
    data of the package `mobileformer.configs`, which `configs_dir` finds inside the package when
    installed; and every subpackage of mobileformer, now that the package list is explicit."""
    tool = read_configuration(os.path.join(ROOT, 'pyproject.toml'))['tool']['setuptools']
    source = os.path.join(ROOT, tool['package-dir']['mobileformer.configs'])
    assert os.path.samefile(source, CONFIGS)
    shipped = set()
    for pattern in tool['package-data']['mobileformer.configs']:
        shipped |= {os.path.relpath(p, source) for p in glob.glob(os.path.join(source, pattern), recursive=True)}
    every_yaml = {os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, '**', '*.yaml'), recursive=True)}
    assert shipped == every_yaml and len(every_yaml) > 30
    package_root = os.path.dirname(mobileformer.__file__)
    folders = [os.path.relpath(os.path.dirname(p), package_root)
               for p in glob.glob(os.path.join(package_root, '**', '__init__.py'), recursive=True)]
    subpackages = {'mobileformer' if f == '.' else 'mobileformer.' + f.replace(os.sep, '.') for f in folders}
    assert set(tool['packages']) == subpackages | {'mobileformer.configs'}

"""`python -m mobileformer.convert`: every reference checkpoint converted with the command reproduces
the reference logits; detection, key/shape errors, class-count changes and atomic output."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import CONFIGS, FIXTURES, ROOT

import torch_writer as tw
from mobileformer import build_model, get_config
from mobileformer import convert as convert_module
from mobileformer.convert import convert_state, main, pick_converter
from mobileformer.registry import Converter, converters
from mobileformer.torch_io import load_state_dict
from mobileformer.checkpoint import load_weights, read_state_dict
from rep_utils import reference_keys, synthetic_state

# (tag, checkpoint file, converter it is detected as, tolerance relative to the largest logit?)
CASES = [
    ('official_mobile_former_tiny_g1', 'official_mobile_former_tiny_g1.pth.tar', 'official-mobileformer', False),
    ('official_mobile_former_tiny_g4', 'official_mobile_former_tiny_g4.pth.tar', 'official-mobileformer', False),
    ('timm_mixer_tiny', 'timm_mixer_tiny.pth', 'timm', False),
    ('timm_gmlp_tiny', 'timm_gmlp_tiny.safetensors', 'timm', False),
    ('timm_resmlp_tiny', 'timm_resmlp_tiny.pth', 'timm', False),
    ('official_repmlpnet_tiny_train', 'official_repmlpnet_tiny_train.pth', 'official-repmlpnet', True),
    ('official_repmlpnet_tiny_deploy', 'official_repmlpnet_tiny_deploy.pth', 'official-repmlpnet', True),
]


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def run_convert(capsys, *argv) -> tuple:
    """main() in-process: (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def logits(config, weights: str, images: np.ndarray) -> np.ndarray:
    model = build_model(config)
    load_weights(model, weights)
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


@pytest.mark.parametrize('tag, checkpoint, converter, relative', CASES, ids=[c[0] for c in CASES])
def test_converted_checkpoint_reproduces_reference_logits(tmp_path, capsys, tag, checkpoint, converter, relative):
    out = tmp_path / f'{tag}.pdparams'
    code, stdout, stderr = run_convert(capsys, fixture(checkpoint), '-cfg', fixture(f'{tag}.yaml'), '-o', out)
    assert code == 0, stderr
    assert f"format '{converter}'" in stdout  # detected from the keys, no --from
    io = np.load(fixture(f'{tag}_io.npz'))
    ours = logits(get_config(fixture(f'{tag}.yaml')), str(out), io['input'])
    reference = io['logits']
    scale = np.abs(reference).max() if relative else 1.0
    np.testing.assert_allclose(ours / scale, reference / scale, rtol=0, atol=1e-4)


@pytest.mark.timeout(120)
def test_command_line(tmp_path):
    out = tmp_path / 'mixer.pdparams'
    result = subprocess.run([sys.executable, '-m', 'mobileformer.convert', fixture('timm_mixer_tiny.pth'),
                             '-cfg', fixture('timm_mixer_tiny.yaml'), '-o', str(out), '--from', 'timm'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "format 'timm') -> " in result.stdout and 'timm_mixer_tiny (mixer)' in result.stdout
    reference = load_state_dict(fixture('timm_mixer_tiny.pth'))
    converted = read_state_dict(str(out))
    np.testing.assert_array_equal(converted['head.weight'], reference['head.weight'].T)


@pytest.mark.parametrize('tag, checkpoint, converter', [c[:3] for c in CASES], ids=[c[0] for c in CASES])
def test_detection_picks_the_right_converter(tag, checkpoint, converter):
    keys = load_state_dict(fixture(checkpoint))
    assert pick_converter(keys, get_config(fixture(f'{tag}.yaml')).MODEL.TYPE).name == converter


@pytest.mark.parametrize('tag, checkpoint, head', [
    ('official_mobile_former_tiny_g1', 'official_mobile_former_tiny_g1.pth.tar', 'head.classifier'),
    ('timm_mixer_tiny', 'timm_mixer_tiny.pth', 'head'),
    ('official_repmlpnet_tiny_train', 'official_repmlpnet_tiny_train.pth', 'head'),
])
def test_other_class_count_drops_the_head_with_a_notice(tmp_path, capsys, tag, checkpoint, head):
    out = tmp_path / 'finetune.pdparams'
    code, stdout, stderr = run_convert(capsys, fixture(checkpoint), '-cfg', fixture(f'{tag}.yaml'), '-o', out,
                                       '-opts', 'MODEL.NUM_CLASSES', 7)
    assert code == 0, stderr
    notices = [line for line in stdout.splitlines() if line.startswith('notice:')]
    assert notices == [f'notice: classifier ({head}.weight, {head}.bias) left out: the checkpoint has 10 classes, '
                       f'MODEL.NUM_CLASSES is 7; it keeps its fresh initialisation']
    converted = read_state_dict(str(out))
    model = build_model(get_config(fixture(f'{tag}.yaml'), ['MODEL.NUM_CLASSES', 7]))
    assert sorted(set(model.state_dict()) - set(converted)) == [f'{head}.bias', f'{head}.weight']
    same_classes = tmp_path / 'same.pdparams'
    assert run_convert(capsys, fixture(checkpoint), '-cfg', fixture(f'{tag}.yaml'), '-o', same_classes)[0] == 0
    reference = read_state_dict(str(same_classes))
    for name, value in converted.items():
        np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_shape_mismatch_lists_the_keys(tmp_path, capsys):
    state = load_state_dict(fixture('official_repmlpnet_tiny_train.pth'))
    name = 'stages.0.0.repmlp_block.fc3.weight'
    state[name] = np.concatenate([state[name], state[name]], axis=0)
    source = tmp_path / 'bad_shape.pth'
    tw.save_state_dict(str(source), state)
    out = tmp_path / 'never.pdparams'
    code, _, stderr = run_convert(capsys, source, '-cfg', fixture('official_repmlpnet_tiny_train.yaml'), '-o', out)
    assert code == 2
    assert "does not fit the model: 1 with a wrong shape" in stderr
    assert f'{name}: {list(state[name].shape)} vs model' in stderr
    assert not out.exists()


def test_wrong_config_for_the_checkpoint_lists_the_keys(tmp_path, capsys):
    out = tmp_path / 'never.pdparams'
    code, _, stderr = run_convert(capsys, fixture('official_mobile_former_tiny_g1.pth.tar'),
                                  '-cfg', fixture('official_mobile_former_tiny_g4.yaml'), '-o', out)
    assert code == 2
    assert 'does not fit the model: 12 with a wrong shape' in stderr
    assert 'blocks.3.mobile.project.conv.weight: [24, 64, 1, 1] vs model [24, 16, 1, 1]' in stderr
    assert not out.exists()


def test_checkpoint_of_another_model_is_named(tmp_path, capsys):
    out = tmp_path / 'never.pdparams'
    code, _, stderr = run_convert(capsys, fixture('timm_mixer_tiny.pth'),
                                  '-cfg', fixture('official_mobile_former_tiny_g1.yaml'), '-o', out)
    assert code == 2
    assert ("is a checkpoint for converter timm (MODEL.TYPE gmlp, mixer, resmlp), but the config builds "
            "MODEL.TYPE 'mobileformer'; use a config of the checkpoint's model") in stderr
    code, _, stderr = run_convert(capsys, fixture('official_repmlpnet_tiny_train.pth'), '-from', 'official-mobileformer',
                                  '-cfg', fixture('official_mobile_former_tiny_g1.yaml'), '-o', out)
    assert code == 2
    assert ('174 keys of the checkpoint have no place in official_mobile_former_tiny_g1 (official-mobileformer '
            'layout): conv_embedding.bn.bias, ') in stderr
    code, _, stderr = run_convert(capsys, fixture('timm_mixer_tiny.pth'), '--from', 'timm',
                                  '-cfg', fixture('official_mobile_former_tiny_g1.yaml'), '-o', out)
    assert "converter 'timm' produces MODEL.TYPE gmlp, mixer, resmlp, but the config builds 'mobileformer'" in stderr
    code, _, stderr = run_convert(capsys, fixture('timm_mixer_tiny.pth'), '--from', 'tim',
                                  '-cfg', fixture('timm_mixer_tiny.yaml'), '-o', out)
    assert "unknown converter -from 'tim'; available: deit-resmlp, official-mobileformer" in stderr
    assert not out.exists()


def test_missing_and_unexpected_keys_are_listed(capsys):
    state = load_state_dict(fixture('timm_mixer_tiny.pth'))
    del state['head.bias']
    state['head.extra'] = np.zeros(3, 'float32')
    with pytest.raises(ValueError) as err:
        convert_state(state, get_config(fixture('timm_mixer_tiny.yaml')), converters()['timm'])
    assert str(err.value) == ("the checkpoint converted by 'timm' does not fit the model: 1 missing (head.bias); "
                              "1 unexpected (head.extra); check that the config matches the weights")
    assert capsys.readouterr().out == ''  # no classifier notice: the head is not a class-count change


def test_mobileformer_release_that_does_not_fit_is_listed():
    config = get_config(fixture('official_mobile_former_tiny_g1.yaml'))
    release = dict(np.load(fixture('official_mobile_former_tiny_g1_state.npz')))
    del release['features.2.hyper2.hyper.0.bias']
    release['features.5.global_block.q.weight'] = np.zeros((32, 31), 'float32')
    with pytest.raises(ValueError) as err:
        convert_state(release, config, converters()['official-mobileformer'])
    assert (" does not fit the model: 1 missing (blocks.2.mobile.act2.fc1.bias); 1 with a wrong shape "
            "(blocks.5.former.q.weight: [31, 32] vs model [32, 32]); ") in str(err.value)
    release['features.2.extra.weight'] = np.zeros(3, 'float32')
    with pytest.raises(ValueError, match=r'^1 keys of the checkpoint have no place in official_mobile_former_tiny_g1 '
                                         r'\(official-mobileformer layout\): features\.2\.extra\.weight; '):
        convert_state(release, config, converters()['official-mobileformer'])


def test_rep_layout_that_disagrees_with_deploy_flag_is_named(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'never.pdparams'
    code, _, stderr = run_convert(capsys, fixture('official_repmlpnet_tiny_deploy.pth'),
                                  '-cfg', fixture('official_repmlpnet_tiny_train.yaml'), '-o', out)
    assert code == 2 and '56 missing (stages.0.0.repmlp_block.fc3_bn.weight, ' in stderr
    assert stderr.endswith('; the checkpoint has the folded (deploy) layout but MODEL.DEPLOY is False; '
                           'set MODEL.DEPLOY True\n')
    code, _, stderr = run_convert(capsys, fixture('official_repmlpnet_tiny_train.pth'),
                                  '-cfg', fixture('official_repmlpnet_tiny_deploy.yaml'), '-o', out)
    assert code == 2 and stderr.endswith('; the checkpoint has the training layout but MODEL.DEPLOY is True; '
                                         'set MODEL.DEPLOY False\n')
    assert not out.exists()
    # RepMLP-ResNet at full size (no small release exists): fc3's orthogonal init is a slow QR per block.
    monkeypatch.setattr(paddle.nn.initializer, 'Orthogonal', lambda: paddle.nn.initializer.Constant(0.01))
    release = synthetic_state(reference_keys('official_repmlp_res50_light_224_deploy'))
    config = get_config(os.path.join(CONFIGS, 'repmlp_res50_light_224.yaml'), ['MODEL.DEPLOY', False])
    with pytest.raises(ValueError, match='the checkpoint has the folded \\(deploy\\) layout but MODEL.DEPLOY is False; '
                                         'set MODEL.DEPLOY True$'):
        convert_state(release, config, converters()['official-repmlp'])


def test_no_or_several_detected_converters(monkeypatch):
    yes = Converter('a', ('mixer',), lambda keys: 'x' in keys, None)
    also = Converter('b', ('mixer',), lambda keys: 'x' in keys, None)
    monkeypatch.setattr(convert_module, 'converters', lambda: {'a': yes, 'b': also})
    with pytest.raises(ValueError, match=r"matches several converters \(a, b\); choose one with -from"):
        pick_converter({'x'}, 'mixer')
    with pytest.raises(ValueError, match=r"no converter recognises the keys of the checkpoint \(first keys: y\); "
                                         r"pass -from with one of: a, b"):
        pick_converter({'y'}, 'mixer')


def test_failed_save_leaves_no_output(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'model.pdparams'
    out.write_bytes(b'previous')

    def broken_save(obj, path, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'half a file')
        raise OSError('disk full')

    monkeypatch.setattr(paddle, 'save', broken_save)
    code, _, stderr = run_convert(capsys, fixture('timm_mixer_tiny.pth'), '-cfg', fixture('timm_mixer_tiny.yaml'),
                                  '-o', out)
    assert code == 2 and stderr == 'error: disk full\n'  # an OSError is one line too (mobileformer.cli)
    assert out.read_bytes() == b'previous'
    assert os.listdir(tmp_path) == ['model.pdparams']


def test_unreadable_source_is_one_sentence(tmp_path, capsys):
    source = tmp_path / 'legacy.pth'
    source.write_bytes(b'\x80\x02' + b'\x00' * 20)
    code, _, stderr = run_convert(capsys, source, '-cfg', fixture('timm_mixer_tiny.yaml'), '-o', tmp_path / 'o.pdparams')
    assert code == 2
    assert stderr.startswith('error: ') and 'legacy (non-zip) torch checkpoint' in stderr
    assert stderr.count('\n') == 1


def test_deit_resmlp_layout_is_detected_and_converted(tmp_path, capsys):
    """The authors' ResMLP names (docs/mlp_mixer.md: `patch_embed`, `attn` = token linear, `mlp`,
    `gamma_1/2`, Affine vectors of shape (C,)), written from the timm fixture inside {'model': ...} as
    DeiT saves."""
    renames = [('stem.proj.', 'patch_embed.proj.'), ('.linear_tokens.', '.attn.'), ('.mlp_channels.', '.mlp.'),
               ('.ls1', '.gamma_1'), ('.ls2', '.gamma_2')]
    authors = {}
    for name, value in load_state_dict(fixture('timm_resmlp_tiny.pth')).items():
        for timm_part, authors_part in renames:
            name = name.replace(timm_part, authors_part)
        authors[name] = value.reshape(-1) if name.endswith(('alpha', 'beta')) else value
    source = tmp_path / 'resmlp_authors.pth'
    tw.save_state_dict(str(source), authors, wrap_key='model')
    out = tmp_path / 'resmlp.pdparams'
    code, stdout, stderr = run_convert(capsys, source, '-cfg', fixture('timm_resmlp_tiny.yaml'), '-o', out)
    assert code == 0, stderr
    assert "format 'deit-resmlp'" in stdout
    io = np.load(fixture('timm_resmlp_tiny_io.npz'))
    ours = logits(get_config(fixture('timm_resmlp_tiny.yaml')), str(out), io['input'])
    np.testing.assert_allclose(ours, io['logits'], rtol=0, atol=1e-4)

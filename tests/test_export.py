"""Deployment: the exported Paddle inference model and its ONNX twin match dygraph at batch 1 and 8
(Mobile-Former, Mixer, folded RepMLPNet); export.py, predict.py and hubconf.py end to end."""
import glob
import os

import numpy as np
import paddle
import pytest
from conftest import CONFIGS, FIXTURES, ROOT
from PIL import Image

import export
import predict
from mobileformer import get_config
from mobileformer.convert import convert_checkpoint
from mobileformer.deploy import (InferenceModel, OnnxModel, build_for_inference, dygraph_logits, export_inference,
                                 export_onnx)

# (tag, checkpoint); RepMLPNet is exported from its training checkpoint, so it is folded first
MODELS = [('official_mobile_former_tiny_g1', 'official_mobile_former_tiny_g1.pth.tar'),
          ('official_mobile_former_tiny_g4', 'official_mobile_former_tiny_g4.pth.tar'),  # channel shuffles
          ('timm_mixer_tiny', 'timm_mixer_tiny.pth'),
          ('official_repmlpnet_tiny_train', 'official_repmlpnet_tiny_train.pth')]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """{tag: .pdparams converted from the reference checkpoint}."""
    folder = tmp_path_factory.mktemp('weights')
    paths = {}
    for tag, checkpoint in MODELS:
        paths[tag] = str(folder / f'{tag}.pdparams')
        convert_checkpoint(os.path.join(FIXTURES, checkpoint), get_config(os.path.join(FIXTURES, f'{tag}.yaml')),
                           paths[tag], log=lambda line: None)
    return paths


def close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5) -> None:
    """Within `tolerance` of the largest logit when that exceeds 1 (RepMLPNet's are ~30)."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual / scale, expected / scale, rtol=0, atol=tolerance)


@pytest.mark.timeout(240)
@pytest.mark.parametrize('tag', [m[0] for m in MODELS])
def test_exported_models_match_dygraph(tmp_path, converted, tag):
    config = get_config(os.path.join(FIXTURES, f'{tag}.yaml'))
    model = build_for_inference(config, converted[tag])
    io = np.load(os.path.join(FIXTURES, f'{tag}_io.npz'))
    close(dygraph_logits(model, io['input']), io['logits'], 1e-4)  # weights and folding are right
    export_inference(model, config, str(tmp_path))
    onnx_file = export_onnx(str(tmp_path), str(tmp_path / 'model.onnx'))
    exported, onnx = InferenceModel(str(tmp_path)), OnnxModel(onnx_file)
    size = config.DATA.IMAGE_SIZE
    for batch in (1, 8):
        images = np.random.randn(batch, 3, size, size).astype(np.float32)
        reference = dygraph_logits(model, images)
        assert reference.shape == (batch, config.MODEL.NUM_CLASSES)
        close(exported(images), reference)
        close(onnx(images), reference)


def test_repmlpnet_is_exported_folded(converted):
    config = get_config(os.path.join(FIXTURES, 'official_repmlpnet_tiny_train.yaml'))
    model = build_for_inference(config, converted['official_repmlpnet_tiny_train'])
    folded = get_config(os.path.join(FIXTURES, 'official_repmlpnet_tiny_deploy.yaml'))
    assert sorted(model.state_dict()) == sorted(build_for_inference(folded).state_dict())


@pytest.mark.timeout(240)
def test_export_and_predict_commands(tmp_path, converted, capsys):
    tag = 'timm_mixer_tiny'
    cfg = os.path.join(FIXTURES, f'{tag}.yaml')
    export.main(['-cfg', cfg, '-pretrained', converted[tag], '-o', str(tmp_path / 'export'), '--onnx'])
    lines = capsys.readouterr().out.splitlines()
    paddle_line = next(line for line in lines if 'max |paddle.inference - dygraph|' in line)
    onnx_line = next(line for line in lines if 'max |onnxruntime - dygraph|' in line)
    assert float(paddle_line.rsplit(' ', 1)[1]) < 1e-5 and float(onnx_line.rsplit(' ', 1)[1]) < 1e-5
    assert sorted(os.listdir(tmp_path / 'export')) == ['inference.json', 'inference.onnx', 'inference.pdiparams']

    images = []
    for i, mode in enumerate(['RGB', 'L', 'RGBA']):  # colour, grey and alpha inputs of odd sizes
        images.append(str(tmp_path / f'image{i}.png'))
        Image.fromarray(np.random.randint(0, 255, (40 + 7 * i, 50, len(mode)), np.uint8).squeeze()).convert(mode).save(images[-1])
    digits = ['-opts', 'DATA.DATASET', 'digits']  # names 0..9 from the data layer
    outputs = {}
    for source in (['-pretrained', converted[tag]], ['-model', str(tmp_path / 'export')]):
        predict.main(['-cfg', cfg] + source + images + digits)
        outputs[source[0]] = capsys.readouterr().out
    assert outputs['-pretrained'].splitlines()[0::6] == [f'{p}:' for p in images]
    for text in outputs.values():
        rows = [line.split() for line in text.splitlines() if line.startswith('  ')]
        assert len(rows) == 5 * len(images)
        for start in range(0, len(rows), 5):
            probabilities = [float(r[0]) for r in rows[start:start + 5]]
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
            assert all(r[1] in '0123456789' and r[2] == f'({r[1]})' for r in rows[start:start + 5])
    top = lambda text: [line.split()[1:] for line in text.splitlines() if line.startswith('  ')]  # noqa: E731
    assert top(outputs['-pretrained']) == top(outputs['-model'])  # same classes from both runners


def test_imagenet_class_names():
    names = predict.class_names(get_config(os.path.join(CONFIGS, 'mobileformer_26m.yaml')))
    assert len(names) == 1000 and names[0] == 'tench' and names[207] == 'Golden Retriever' and names[999] == 'toilet paper'


def test_hub_lists_builds_and_loads_every_config(tmp_path):
    stems = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIGS, '*.yaml')))
    stems = [s for s in stems if not s.startswith('_')]  # _BASE_-only files are not entries
    assert sorted(paddle.hub.list(ROOT, source='local')) == stems
    assert 'mobileformer_26m (mobileformer, 1000 classes, 224 px)' in paddle.hub.help(ROOT, 'mobileformer_26m', source='local')
    model = paddle.hub.load(ROOT, 'mobileformer_26m', source='local', opts=['MODEL.NUM_CLASSES', 10])
    weights = str(tmp_path / 'mf26m.pdparams')
    paddle.save(model.state_dict(), weights)
    loaded = paddle.hub.load(ROOT, 'mobileformer_26m', source='local', pretrained=weights, opts=['MODEL.NUM_CLASSES', 10])
    assert not loaded.training
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    with pytest.raises(ValueError, match=r"was trained for 10 classes but MODEL.NUM_CLASSES is 1000; pass -opts "
                                          r"MODEL.NUM_CLASSES 10"):
        paddle.hub.load(ROOT, 'mobileformer_26m', source='local', pretrained=weights)

"""Deployment: every installed runtime (paddle.inference, onnxruntime, OpenVINO) matches dygraph at
batch 1 and 8 on the exported models (Mobile-Former, Mixer, folded RepMLPNet); the automatic choice
is measured once and cached, falls back with a notice, and bad requests are refused in one sentence;
export.py, predict.py and hubconf.py end to end."""
import glob
import json
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
from mobileformer.data import build_transforms
from mobileformer import deploy
from mobileformer.deploy import (InferenceModel, build_for_inference, dygraph_outputs, export_inference, export_onnx,
                                 installed_runtimes, load_runtime)
from mobileformer.deploy.export import without_dead_nodes

# (tag, checkpoint); RepMLPNet is exported from its training checkpoint, so it is folded first
MODELS = [('official_mobile_former_tiny_g1', 'official_mobile_former_tiny_g1.pth.tar'),
          ('official_mobile_former_tiny_g4', 'official_mobile_former_tiny_g4.pth.tar'),  # channel shuffles
          ('timm_mixer_tiny', 'timm_mixer_tiny.pth'),
          ('official_repmlpnet_tiny_train', 'official_repmlpnet_tiny_train.pth')]

pytestmark = pytest.mark.openvino  # InferenceModel and the benchmark load every installed runtime


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
    close(dygraph_outputs(model, io['input']), io['logits'], 1e-4)  # weights and folding are right
    export_inference(model, config, str(tmp_path))
    export_onnx(model, config, str(tmp_path / deploy.ONNX_FILE))
    import onnx
    graph = onnx.load(str(tmp_path / deploy.ONNX_FILE)).graph
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    assert all(any(output in read for output in node.output) for node in graph.node)  # no dead node (layer norms)
    if 'mobile_former' in tag:  # the dynamic ReLU in the form the ONNX runtimes fuse (cpu_ops.tracing_for_onnx)
        assert 'Max' in {node.op_type for node in graph.node}
    runtimes = {runtime: load_runtime(runtime, str(tmp_path)) for runtime in installed_runtimes()}
    assert {'paddle', 'onnxruntime'} <= set(runtimes)  # both are requirements
    size = config.DATA.IMAGE_SIZE
    for batch in (1, 8):
        images = np.random.randn(batch, 3, size, size).astype(np.float32)
        reference = dygraph_outputs(model, images)
        assert reference.shape == (batch, config.MODEL.NUM_CLASSES)
        for runtime, engine in runtimes.items():
            assert engine.input_shape == (-1, 3, size, size), runtime
            close(engine(images), reference)


@pytest.mark.timeout(240)
def test_openvino_compiles_the_first_shapes_static_and_runs_the_rest_dynamic(tmp_path, converted, monkeypatch):
    if 'openvino' not in installed_runtimes():
        pytest.skip('openvino is not installed')
    tag = 'official_mobile_former_tiny_g4'
    config = get_config(os.path.join(FIXTURES, f'{tag}.yaml'))
    model = build_for_inference(config, converted[tag])
    path = export_onnx(model, config, str(tmp_path / deploy.ONNX_FILE))
    monkeypatch.setattr(deploy.OpenVinoModel, 'STATIC_SHAPES', 3)
    engine = deploy.OpenVinoModel(path, threads=2)
    size = config.DATA.IMAGE_SIZE
    # batch 4 runs as two halves side by side, batch 3 cannot be halved, batch 6 comes fourth: it
    # runs on the dynamic compilation, whole
    for batch in (1, 4, 3, 1, 4, 6):
        images = np.random.randn(batch, 3, size, size).astype(np.float32)
        close(engine(images), dygraph_outputs(model, images))
    assert engine.static_shapes() == {(1, 3, size, size): 1, (4, 3, size, size): 2, (3, 3, size, size): 1}
    assert engine.input_shape == (-1, 3, size, size)
    single = deploy.OpenVinoModel(path, threads=1)  # one thread: no halves
    images = np.random.randn(4, 3, size, size).astype(np.float32)
    close(single(images), dygraph_outputs(model, images))
    assert single.static_shapes() == {(4, 3, size, size): 1}
    plain = deploy.OpenVinoModel(path, threads=2, static_shapes=0)  # the file as read, every batch whole
    close(plain(images), dygraph_outputs(model, images))
    assert plain.static_shapes() == {}


def test_dead_nodes_are_dropped_from_the_onnx_graph():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node('Shape', ['x'], ['shape']),                      # dead, as in paddle2onnx's layer norm
             helper.make_node('Slice', ['shape', 'start', 'end'], ['sliced']),
             helper.make_node('Relu', ['x'], ['r']),
             helper.make_node('Add', ['r', 'bias'], ['y'])]
    initializers = [helper.make_tensor(name, TensorProto.INT64, [1], [value]) for name, value in (('start', 0), ('end', 1))]
    initializers.append(helper.make_tensor('bias', TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    model = helper.make_model(helper.make_graph(nodes, 'g', [x], [y], initializers))
    pruned = onnx.load_from_string(without_dead_nodes(model.SerializeToString()))
    onnx.checker.check_model(pruned)
    assert [node.op_type for node in pruned.graph.node] == ['Relu', 'Add']
    assert [tensor.name for tensor in pruned.graph.initializer] == ['bias']


def test_repmlpnet_is_exported_folded(converted):
    config = get_config(os.path.join(FIXTURES, 'official_repmlpnet_tiny_train.yaml'))
    model = build_for_inference(config, converted['official_repmlpnet_tiny_train'])
    folded = get_config(os.path.join(FIXTURES, 'official_repmlpnet_tiny_deploy.yaml'))
    assert sorted(model.state_dict()) == sorted(build_for_inference(folded).state_dict())


def _images(folder, count=3):
    """PNG files: colour, grey and alpha inputs of odd sizes."""
    paths = []
    for i, mode in enumerate(['RGB', 'L', 'RGBA'][:count]):
        paths.append(str(folder / f'image{i}.png'))
        Image.fromarray(np.random.randint(0, 255, (40 + 7 * i, 50, len(mode)), np.uint8).squeeze()).convert(mode).save(paths[-1])
    return paths


@pytest.mark.timeout(240)
def test_export_and_predict_commands(tmp_path, converted, capsys, monkeypatch):
    """The export folder is self-contained: `predict.py -model DIR images` and
    `InferenceModel(DIR).predict` need no config and no data, and give dygraph's classes."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    tag = 'timm_mixer_tiny'
    cfg = os.path.join(FIXTURES, f'{tag}.yaml')
    digits = ['-opts', 'DATA.DATASET', 'digits', 'DATA.CROP_PCT', '0.8']  # names 0..9 from the data layer
    folder = str(tmp_path / 'export')
    export.main(['-cfg', cfg, '-pretrained', converted[tag], '-o', folder] + digits)
    lines = capsys.readouterr().out.splitlines()
    for runtime in installed_runtimes():
        line = next(line for line in lines if line.startswith(f'max |{runtime} - dygraph|'))
        assert float(line.rsplit(' ', 1)[1]) < 1e-5
    chosen = [line for line in lines if line.startswith('runtime: ')]
    assert len(chosen) == 1 and 'measured now' in chosen[0]
    assert 'wrote what predicting needs beside it: config.yaml (the config, with its preprocessing) and model.json ' \
           '(10 class names)' in lines
    assert sorted(os.listdir(folder)) == ['config.yaml', 'inference.json', 'inference.onnx', 'inference.pdiparams',
                                          'model.json']
    with open(os.path.join(folder, 'model.json'), encoding='utf-8') as f:
        description = json.load(f)
    assert description == {'model': tag, 'type': 'mixer', 'input': [None, 3, 32, 32], 'num_classes': 10,
                           'classes': [str(i) for i in range(10)],
                           'preprocessing': {'convert_to': 'RGB', 'resize_shorter_side': 40, 'interpolation': 'bilinear',
                                             'center_crop': 32, 'scale': 1 / 255, 'mean': [0.485, 0.456, 0.406],
                                             'std': [0.229, 0.224, 0.225], 'layout': 'NCHW float32'}}
    assert get_config(os.path.join(folder, 'config.yaml')) == get_config(cfg, digits[1:])

    images = _images(tmp_path)
    outputs = {}
    for source in (['-cfg', cfg, '-pretrained', converted[tag]] + digits, ['-model', folder],
                   ['-model', folder, '-runtime', 'paddle'], ['-model', folder, '-retime']):
        predict.main(source + images)
        outputs[' '.join(a for a in source if a in ('-pretrained', '-model', '-runtime', '-retime'))] = capsys.readouterr().out
    assert outputs['-pretrained'].splitlines()[0::6] == [f'{p}:' for p in images]
    assert outputs['-model'].splitlines()[0].startswith('runtime: ') and 'cached in' in outputs['-model']
    assert outputs['-model -runtime'].splitlines()[0] == 'runtime: paddle (chosen by the caller)'
    assert 'measured now' in outputs['-model -retime'].splitlines()[0]
    for text in outputs.values():
        rows = [line.split() for line in text.splitlines() if line.startswith('  ')]
        assert len(rows) == 5 * len(images)
        for start in range(0, len(rows), 5):
            probabilities = [float(r[0]) for r in rows[start:start + 5]]
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
            assert all(len(r) == 2 and r[1] in '0123456789' for r in rows[start:start + 5])  # '5', not '5 (5)'
    top = lambda text: [line.split()[1:] for line in text.splitlines() if line.startswith('  ')]  # noqa: E731
    assert top(outputs['-pretrained']) == top(outputs['-model']) == top(outputs['-model -runtime']) == top(outputs['-model -retime'])

    # the Python API: PIL images in, the folder's preprocessing and names
    model = InferenceModel(folder, log=lambda line: None)
    pil_images = [Image.open(path) for path in images]
    predictions = model.predict(pil_images, top_k=3)
    config = get_config(cfg, digits[1:])
    transform = build_transforms(config, 'val')
    reference = dygraph_outputs(build_for_inference(config, converted[tag]),
                                np.stack([transform(image) for image in pil_images]))
    expected = np.exp(reference - reference.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    for row, image_predictions in zip(expected, predictions):
        assert [p.index for p in image_predictions] == list(np.argsort(-row)[:3])
        assert [p.name for p in image_predictions] == [str(i) for i in np.argsort(-row)[:3]]
        np.testing.assert_allclose([p.probability for p in image_predictions], np.sort(row)[::-1][:3], atol=1e-5)


def test_an_export_folder_without_its_config_needs_cfg_or_a_new_export(tmp_path, converted, capsys, monkeypatch):
    """Folders exported before they held their config: -cfg still runs them; without it, and with a
    config for another model, one sentence each; a -cfg that contradicts a self-contained folder too."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    tag = 'timm_mixer_tiny'
    cfg = os.path.join(FIXTURES, f'{tag}.yaml')
    folder = str(tmp_path / 'export')
    export.main(['-cfg', cfg, '-pretrained', converted[tag], '-o', folder, '-no_onnx'])
    capsys.readouterr()
    image = _images(tmp_path, 1)

    def error(*args):
        with pytest.raises(SystemExit) as exit_info:
            predict.main([*args, *image])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip()

    other = os.path.join(CONFIGS, 'digits', 'mobileformer_26m.yaml')  # grey 32 x 32 inputs, 10 classes
    assert error('-model', folder, '-cfg', other) == (
        f"error: -cfg {other} describes inputs [N, 1, 32, 32] and 10 classes, but the model in '{folder}' was exported "
        'for inputs [N, 3, 32, 32] and 10 classes and holds its own config (config.yaml); drop -cfg')
    os.remove(os.path.join(folder, 'config.yaml'))
    os.remove(os.path.join(folder, 'model.json'))
    assert error('-model', folder) == (
        f"error: '{folder}' holds no config.yaml (it was exported before export.py wrote one); pass -cfg with the "
        'config it was exported from, or export it again with export.py')
    # a config with another channel count: not advice about the image size
    assert error('-model', folder, '-cfg', other) == (
        f"error: the model in '{folder}' was exported for inputs [N, 3, 32, 32] but was given [1, 1, 32, 32]; it "
        'takes 3-channel images: preprocess them with the config it was exported from (config.yaml in the folder; '
        'predict.py -model reads it)')
    predict.main(['-model', folder, '-cfg', cfg] + image)
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith('  ')]) == 5
    with pytest.raises(ValueError, match=r"holds no config.yaml .*; export the model again with export.py$"):
        InferenceModel(folder, log=lambda line: None).predict([Image.open(image[0])])


@pytest.fixture
def mixer_export(tmp_path, converted, monkeypatch):
    """(folder with the tiny Mixer exported for every runtime, its dygraph model); the runtime cache
    in tmp_path."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    config = get_config(os.path.join(FIXTURES, 'timm_mixer_tiny.yaml'))
    model = build_for_inference(config, converted['timm_mixer_tiny'])
    folder = str(tmp_path / 'export')
    export_inference(model, config, folder)
    export_onnx(model, config, os.path.join(folder, deploy.ONNX_FILE))
    return folder, model


@pytest.mark.timeout(120)
def test_auto_runtime_is_measured_once_per_model_files_then_cached(mixer_export, monkeypatch):
    folder, model = mixer_export
    lines = []
    first = InferenceModel(folder, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f'runtime: {first.runtime}, the fastest here') and 'measured now' in lines[0]
    with open(deploy.runtime_cache_file()) as f:
        (entry,) = json.load(f)['entries'].values()
    for seconds in (entry['latency'], entry['throughput']):
        assert sorted(seconds) == sorted(installed_runtimes())
    fastest = {key: min(entry[key], key=entry[key].get) for key in ('latency', 'throughput')}
    assert (first.small.name, first.large.name) == (fastest['latency'], fastest['throughput'])
    assert entry['batch'] == deploy.choice.throughput_batch(min(entry['latency'].values()))

    def no_timing(*args):
        raise AssertionError('timed again although the choice is cached')
    monkeypatch.setattr(deploy.choice, 'time_runtimes', no_timing)
    lines.clear()
    again = InferenceModel(folder, log=lines.append)
    assert again.runtime == first.runtime and 'cached in' in lines[0]
    for batch in (1, 2):  # the two choices
        images = np.random.randn(batch, 3, 32, 32).astype(np.float32)
        close(again(images), dygraph_outputs(model, images))
    os.utime(os.path.join(folder, deploy.ONNX_FILE))  # a new export: measured again
    with pytest.raises(AssertionError, match='timed again'):
        InferenceModel(folder, log=lines.append)


@pytest.mark.timeout(120)
def test_a_runtime_that_fails_to_load_falls_back_with_a_notice(mixer_export):
    folder, model = mixer_export
    with open(os.path.join(folder, deploy.ONNX_FILE), 'wb') as f:
        f.write(b'not an onnx file')
    lines = []
    engine = InferenceModel(folder, log=lines.append)
    notices = [line for line in lines if line.startswith('notice: ')]
    assert [n.split(' could not load')[0] for n in notices] == [f'notice: runtime {r}' for r in installed_runtimes() if r != 'paddle']
    assert engine.runtime == 'paddle' and lines[-1].startswith('runtime: paddle')
    images = np.random.randn(2, 3, 32, 32).astype(np.float32)
    close(engine(images), dygraph_outputs(model, images))
    with pytest.raises(ValueError, match=r"runtime onnxruntime could not load '.*inference.onnx' \(.*\); export the model again"):
        InferenceModel(folder, runtime='onnxruntime')



@pytest.mark.timeout(120)
def test_paddle_runtime_leaves_dygraphs_threads_as_they_were(mixer_export):
    """paddle.inference sets the calling thread's math to one thread after each run; dygraph in the
    same process must keep the threads it had."""
    from mobileformer.cpu import paddle_math_threads

    folder, model = mixer_export
    engine = load_runtime('paddle', folder)
    paddle.base.core.set_num_threads(2)
    try:
        for batch in (1, 4):
            engine(np.zeros([batch, 3, 32, 32], np.float32))
            assert paddle_math_threads() == 2
    finally:
        paddle.base.core.set_num_threads(deploy.default_threads())


@pytest.mark.timeout(120)
def test_paddle_keeps_intermediates_for_single_images_only_and_for_that_run_only(mixer_export):
    """The executor's garbage collection is off while a single image runs (latency), on for
    batches (memory), and the process-wide flag is back as it was after every run, failed or not."""
    folder, model = mixer_export
    engine = load_runtime('paddle', folder)
    flag = 'FLAGS_eager_delete_tensor_gb'
    before = paddle.get_flags([flag])[flag]
    seen = []

    class ObservedPredictor:
        def __init__(self, predictor, fail=False):
            self.predictor, self.fail = predictor, fail

        def __getattr__(self, name):
            return getattr(self.predictor, name)

        def run(self):
            seen.append(paddle.get_flags([flag])[flag])
            if self.fail:
                raise RuntimeError('injected')
            return self.predictor.run()
    engine.predictor = ObservedPredictor(engine.predictor)
    for batch in (1, deploy.runtimes.KEEP_INTERMEDIATES_UP_TO + 1, 1):
        images = np.random.randn(batch, 3, 32, 32).astype(np.float32)
        close(engine(images), dygraph_outputs(model, images))
        assert paddle.get_flags([flag])[flag] == before
    assert seen == [-1.0, before, -1.0]

    engine.predictor = ObservedPredictor(engine.predictor.predictor, fail=True)
    with pytest.raises(RuntimeError, match='injected'):
        engine(np.random.randn(1, 3, 32, 32).astype(np.float32))
    assert paddle.get_flags([flag])[flag] == before

def test_bad_requests_are_one_sentence(mixer_export, tmp_path, monkeypatch, capsys):
    folder, _ = mixer_export
    cfg = os.path.join(FIXTURES, 'timm_mixer_tiny.yaml')
    image = _images(tmp_path, 1)

    def error(*args):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(['-cfg', cfg, *image, '-model', *args])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.strip()

    # another image size than the export's
    assert error(folder, '-opts', 'DATA.IMAGE_SIZE', '48') == (
        f"error: the model in '{folder}' was exported for inputs [N, 3, 32, 32] but was given [1, 3, 48, 48]; "
        f"feed images of its size, or export it again with -opts DATA.IMAGE_SIZE 48")
    # a folder without the runtime's files
    os.remove(os.path.join(folder, deploy.ONNX_FILE))
    assert error(folder, '-runtime', 'onnxruntime') == (
        f"error: '{folder}' holds no inference.onnx, which runtime onnxruntime needs; export the model again "
        f"with export.py (it writes inference.onnx unless -no_onnx)")
    assert error(str(tmp_path), '-runtime', 'paddle').startswith(f"error: '{tmp_path}' holds no Paddle inference model")
    # a runtime that is not installed
    monkeypatch.setattr(deploy.runtimes, 'installed_runtimes', lambda: ['paddle', 'onnxruntime'])
    assert error(folder, '-runtime', 'openvino') == ('error: runtime openvino needs the openvino package, which is not '
                                                     'installed: pip install openvino, or choose the runtime auto')


def test_imagenet_class_names():
    names = deploy.dataset_class_names(get_config(os.path.join(CONFIGS, 'mobileformer_26m.yaml')))
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
    # errors speak Python, as the call does
    with pytest.raises(ValueError, match=r"was trained for 10 classes but MODEL.NUM_CLASSES is 1000; pass "
                                          r"num_classes=10 or a matching checkpoint$"):
        paddle.hub.load(ROOT, 'mobileformer_26m', source='local', pretrained=weights)
    with pytest.raises(ValueError, match=r"^create_model\(\): unknown config key MODEL.NUM_CLASSE; did you mean MODEL.NUM_CLASSES\?$"):
        paddle.hub.load(ROOT, 'mobileformer_26m', source='local', opts=['MODEL.NUM_CLASSE', 3])


@pytest.mark.timeout(240)
@pytest.mark.parametrize('tag, out_indices', [('official_mobile_former_tiny_g1', '[0, 1, 2]'),  # 2: the tokens
                                              ('timm_mixer_tiny', '[0, -1]'),
                                              ('official_repmlpnet_tiny_train', '[1, 3]')])
def test_a_feature_extractor_exports_every_output_to_every_runtime(tmp_path, converted, capsys, monkeypatch,
                                                                   tag, out_indices):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    cfg, folder = os.path.join(FIXTURES, f'{tag}.yaml'), str(tmp_path / 'export')
    opts = ['MODEL.OUT_INDICES', out_indices]
    export.main(['-cfg', cfg, '-pretrained', converted[tag], '-output', folder, '-opts'] + opts)
    lines = capsys.readouterr().out.splitlines()
    for runtime in installed_runtimes():
        line = next(line for line in lines if line.startswith(f'max |{runtime} - dygraph|'))
        assert float(line.rsplit(' ', 1)[1]) < 1e-4, line
    config = get_config(cfg, opts)
    model = build_for_inference(config, converted[tag])
    size = config.DATA.IMAGE_SIZE
    images = np.random.default_rng(1).standard_normal((2, 3, size, size), dtype=np.float32)
    reference = dygraph_outputs(model, images)
    channels = [r.shape[1] if r.ndim == 4 else r.shape[-1] for r in reference]  # maps [B, C, H, W], tokens [B, M, C]
    assert channels == model.feat_channels and len(reference) == len(eval(out_indices))
    for runtime in installed_runtimes():
        outputs = InferenceModel(folder, runtime=runtime, log=lambda line: None)(images)
        assert isinstance(outputs, list) and len(outputs) == len(reference), runtime
        for actual, expected in zip(outputs, reference):
            assert actual.shape == expected.shape, runtime
            close(actual, expected, 1e-4)
    with pytest.raises(SystemExit) as stop:
        predict.main(['-cfg', cfg, '-model', folder, '-opts'] + opts + _images(tmp_path, 1))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith('error: ')

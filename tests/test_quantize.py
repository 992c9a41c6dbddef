"""Low-precision export (export.py -precision int8|bf16): an INT8 round trip on a tiny model that
really runs int8 and agrees with fp32, the precision recorded in the folder and honoured by every
runtime, each bad request refused in one sentence with the fp32 export intact, and eval.py -model
giving the dygraph metrics."""
import json
import os
import re

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from PIL import Image

import eval as eval_script
import export
from mobileformer import get_config
from mobileformer.convert import convert_checkpoint
from mobileformer.deploy import (CONFIG_FILE, DESCRIPTION_FILE, INT8_ONNX_FILE, ONNX_FILE, PRECISION_FILE,
                                 InferenceModel, build_for_inference, dygraph_outputs, export_onnx, load_runtime,
                                 read_precision, runtimes)
from mobileformer.deploy import quantize

pytestmark = pytest.mark.openvino  # export.py checks the export in every installed runtime

TAG = 'timm_mixer_tiny'
CFG = os.path.join(FIXTURES, f'{TAG}.yaml')
DIGITS = ['DATA.DATASET', 'digits', 'DATA.NUM_WORKERS', '0']  # grey digits, replicated to the model's 3 channels
# INT8 vs fp32 top-1 on the digits validation split. The converted fixture is untrained: its logits
# are near ties (top-1 at chance), so a class flips more easily than in a trained model (measured: 97%)
MIN_AGREEMENT = 0.95
FP32_FILES = sorted([CONFIG_FILE, DESCRIPTION_FILE, 'inference.json', 'inference.onnx', 'inference.pdiparams'])


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('weights') / f'{TAG}.pdparams')
    convert_checkpoint(os.path.join(FIXTURES, f'{TAG}.pth'), get_config(CFG), path, log=lambda line: None)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


def run_export(weights, folder, *flags):
    """export.py on the tiny Mixer with the digits as its data (flags may add -opts after DIGITS)."""
    opts = flags[flags.index('-opts') + 1:] if '-opts' in flags else []
    flags = flags[:flags.index('-opts')] if '-opts' in flags else flags
    export.main(['-cfg', CFG, '-pretrained', weights, '-output', str(folder), *flags, '-opts', *DIGITS, *opts])


def export_error(capsys, weights, folder, *flags):
    """The one line export.py prints for a refused request (status 2)."""
    with pytest.raises(SystemExit) as stop:
        run_export(weights, folder, *flags)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    return lines[0]


def validation_batch(count=64):
    images, labels = quantize.held_out_images(get_config(CFG, DIGITS), count)
    return np.stack(images), labels


def assert_runs_fp32(folder, weights):
    """The folder holds exactly the fp32 export and every runtime runs it at fp32."""
    assert sorted(os.listdir(folder)) == FP32_FILES
    assert read_precision(str(folder)) == 'fp32'
    images, _ = validation_batch(8)
    reference = dygraph_outputs(build_for_inference(get_config(CFG), weights), images)
    for runtime in runtimes.installed_runtimes():
        engine = InferenceModel(str(folder), runtime=runtime, log=lambda line: None)
        assert engine.precision == 'fp32'
        np.testing.assert_allclose(engine(images), reference, rtol=0, atol=1e-4)


@pytest.mark.timeout(180)
def test_int8_export_round_trip(tmp_path, weights, cache, capsys):
    folder = tmp_path / 'export'
    run_export(weights, folder, '-precision', 'int8', '-calib_images', '64', '-min_agreement', str(MIN_AGREEMENT))
    out = capsys.readouterr().out
    assert 'calibrating: 64/64 images' in out
    assert re.search(r'^(notice: int8 is not faster than fp32 here: |int8 runs at )[\d.]+x the speed of fp32 at '
                     r'batch \d+ \(.*MB of model file instead of [\d.]+ MB', out, re.M)
    checks = dict(re.findall(r'int8 in (\w+) on 360 validation images: .* top-1 agreement with fp32 ([\d.]+)%', out))
    assert 'onnxruntime' in checks

    # the folder: fp32 files, the INT8 model beside them, and the record of what runs
    assert sorted(os.listdir(folder)) == sorted(FP32_FILES + [INT8_ONNX_FILE, PRECISION_FILE])
    with open(folder / PRECISION_FILE) as f:
        record = json.load(f)
    assert record['precision'] == 'int8' and record['calibration_images'] == 64
    assert record['runtimes'] == [r for r in checks if float(checks[r]) / 100 >= MIN_AGREEMENT]
    assert record['check']['onnxruntime']['agreement'] == pytest.approx(float(checks['onnxruntime']) / 100, abs=1e-4)

    # the quantized graph holds int8 weights and quantizes the activations of its matmuls
    graph = onnx.load(str(folder / INT8_ONNX_FILE)).graph
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {node.op_type for node in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2 for t in graph.initializer)
    # the token-mixing weights (a MatMul's first input, W^T x) have one scale per row: per output token
    initializers = {t.name: t for t in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    left = [producer[node.input[0]] for node in graph.node if node.op_type == 'MatMul'
            and node.input[0] in producer and producer[node.input[0]].op_type == 'DequantizeLinear']
    left = [dq for dq in left if dq.input[0] in initializers]
    assert left and all(list(initializers[dq.input[1]].dims) == list(initializers[dq.input[0]].dims[:1]) for dq in left)

    # every runtime that runs it runs int8: close to fp32, not equal to it, same classes
    images, labels = validation_batch()
    fp32 = load_runtime('onnxruntime', str(folder), precision='fp32')(images)
    for runtime in record['runtimes']:
        engine = InferenceModel(str(folder), runtime=runtime, log=lambda line: None)
        assert engine.precision == 'int8'
        int8 = engine(images)
        assert not np.allclose(int8, fp32, rtol=0, atol=1e-6), runtime
        assert np.abs(int8 - fp32).mean() < 0.05 * np.abs(fp32).max(), runtime
        assert (int8.argmax(1) == fp32.argmax(1)).mean() >= MIN_AGREEMENT, runtime
    lines = []
    chosen = InferenceModel(str(folder), log=lines.append)
    assert {chosen.small.name, chosen.large.name} <= set(record['runtimes'])
    with pytest.raises(ValueError, match=r"holds an export in int8, but runtime paddle does not run int8 models here"):
        InferenceModel(str(folder), runtime='paddle')

    # eval.py -model evaluates the INT8 model with the numbers export.py printed for that runtime
    eval_script.main(['-cfg', CFG, '-model', str(folder), '-runtime', 'onnxruntime', '-opts', *DIGITS])
    top1 = float(re.search(r'top1=([\d.]+) .* samples=360$', capsys.readouterr().out.strip()).group(1))
    assert top1 == pytest.approx(record['check']['onnxruntime']['top1'], abs=1e-4)


def small_network():
    """An ONNX graph with the shapes of the models here: input normalised by a constant, a 1x1
    convolution (the stem), a depthwise one, a residual sum, a product, learned tokens expanded to
    the batch size read from the input's Shape, and a classifier followed by a reshape."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
    initializers = [weight('scale', 1), weight('stem_w', 4, 1, 1, 1), weight('dw_w', 4, 1, 3, 3),
                    weight('mm_w', 64, 8), weight('tokens', 1, 8), weight('tok_w', 8, 8), weight('head_w', 8, 3),
                    weight('head_b', 3), numpy_helper.from_array(np.array([-1, 64], np.int64), 'flat'),
                    numpy_helper.from_array(np.array([0], np.int64), 'zero'),
                    numpy_helper.from_array(np.array([1], np.int64), 'one'),
                    numpy_helper.from_array(np.array([8], np.int64), 'width')]
    node = helper.make_node
    nodes = [node('Div', ['x', 'scale'], ['normalised'], name='Normalise'),
             node('Conv', ['normalised', 'stem_w'], ['stem'], name='Stem'),
             node('Relu', ['stem'], ['act'], name='Act'),
             node('Conv', ['act', 'dw_w'], ['dw'], name='Depthwise', group=4, pads=[1, 1, 1, 1]),
             node('Add', ['act', 'dw'], ['sum'], name='Residual'),
             node('Reshape', ['sum', 'flat'], ['flat_sum'], name='Flatten'),
             node('MatMul', ['flat_sum', 'mm_w'], ['mixed'], name='Mix'),
             node('Shape', ['x'], ['shape'], name='Shape'),
             node('Slice', ['shape', 'zero', 'one'], ['batch'], name='Batch'),
             node('Concat', ['batch', 'width'], ['token_shape'], name='TokenShape', axis=0),
             node('Expand', ['tokens', 'token_shape'], ['batch_tokens'], name='Tokens'),
             node('MatMul', ['batch_tokens', 'tok_w'], ['token_features'], name='TokenMix'),
             node('Add', ['mixed', 'token_features'], ['features'], name='Join'),
             node('Gemm', ['features', 'head_w', 'head_b'], ['logits'], name='Classifier'),
             node('Flatten', ['logits'], ['out'], name='Out')]
    graph = helper.make_graph(nodes, 'small', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 1, 4, 4])],
                              [helper.make_tensor_value_info('out', TensorProto.FLOAT, ['N', 3])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    onnx.checker.check_model(model)
    return model


def test_int8_keeps_the_grouped_convolutions_and_the_layers_at_both_ends_in_fp32():
    # walking from the input stops at the first layer (the stem, behind a normalising constant, not the
    # token product the Shape leads to); walking back from the output reaches the classifier through
    # the reshape, and not the products behind the residual sums
    assert quantize.edge_layers(small_network()) == ['Stem', 'Classifier']
    assert quantize.fp32_layers(small_network()) == {'grouped': ['Depthwise'], 'edges': ['Stem', 'Classifier']}


@pytest.mark.timeout(120)
def test_the_int8_graph_runs_the_first_and_last_layers_in_fp32(tmp_path, weights):
    config = get_config(CFG)
    export_onnx(build_for_inference(config, weights), config, str(tmp_path / ONNX_FILE))
    images = np.random.default_rng(0).standard_normal((quantize.MIN_CALIBRATION_IMAGES, 3, 32, 32), dtype=np.float32)
    lines = []
    graph = onnx.load(quantize.quantize_int8(str(tmp_path), images, log=lines.append)).graph
    assert lines[0] == ('INT8 keeps 2 layers in fp32: 0 grouped or depthwise convolutions, and the first and last '
                        '(Conv.0, MatMul.8)')
    dequantized = {out for node in graph.node if node.op_type == 'DequantizeLinear' for out in node.output}
    layers = {node.name: node for node in graph.node if node.op_type in quantize.QUANTIZED_OPS}
    quantized = {name for name, node in layers.items() if set(node.input) & dequantized}
    # the patch embedding reads the image and the classifier writes the logits, both in fp32 with
    # float weights; the token- and channel-mixing products between them run in int8
    assert layers['Conv.0'].input[0] == graph.input[0].name
    writer = {out: node for node in graph.node for out in node.output}
    bias = writer[graph.output[0].name]  # the classifier's bias: MatMul.8 + b is the output
    assert bias.op_type == 'Add' and layers['MatMul.8'].output[0] in bias.input
    assert quantized == set(layers) - {'Conv.0', 'MatMul.8'} and len(quantized) == 8


@pytest.mark.timeout(120)
def test_bf16_export_runs_in_openvino_bf16(tmp_path, weights, cache, capsys):
    if 'openvino' not in runtimes.installed_runtimes() or 'BF16' not in runtimes.openvino_capabilities():
        pytest.skip('needs OpenVINO on a CPU with bf16 instructions')
    folder = tmp_path / 'export'
    run_export(weights, folder, '-precision', 'bf16', '-min_agreement', str(MIN_AGREEMENT))
    assert re.search(r'bf16 in openvino on 360 validation images: .* agreement with fp32', capsys.readouterr().out)
    with open(folder / PRECISION_FILE) as f:
        assert json.load(f)['runtimes'] == ['openvino']
    assert sorted(os.listdir(folder)) == sorted(FP32_FILES + [PRECISION_FILE])  # bf16 is a mode, no new files
    engine = InferenceModel(str(folder), log=lambda line: None)
    assert engine.runtime == 'openvino' and engine.precision == 'bf16'
    images, _ = validation_batch(8)
    fp32 = load_runtime('openvino', str(folder), precision='fp32')(images)
    bf16 = engine(images)
    assert not np.allclose(bf16, fp32, rtol=0, atol=1e-6)
    assert np.abs(bf16 - fp32).max() < 0.05 * np.abs(fp32).max()
    for runtime in ('onnxruntime', 'paddle'):
        with pytest.raises(ValueError, match=f'holds an export in bf16, but runtime {runtime} does not run bf16'):
            InferenceModel(str(folder), runtime=runtime)


@pytest.mark.timeout(240)
def test_bad_low_precision_requests_are_one_sentence_and_keep_the_fp32_export(tmp_path, weights, cache, capsys,
                                                                             monkeypatch):
    folder = tmp_path / 'export'
    run_export(weights, folder)
    capsys.readouterr()
    before = {name: os.stat(folder / name).st_mtime_ns for name in FP32_FILES}

    # refused before anything is written: the earlier export stays as it was
    empty, few = tmp_path / 'empty', tmp_path / 'few'
    empty.mkdir()
    few.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(few / f'{i}.png')
    refusals = [
        (['-no_onnx'], 'error: -precision int8 quantizes the ONNX export, which -no_onnx skips; drop -no_onnx'),
        (['-calib_images', '8'], 'error: -calib_images 8 is too few to calibrate INT8 activation ranges; give at '
                                 f'least {quantize.MIN_CALIBRATION_IMAGES} (default {quantize.DEFAULT_CALIBRATION_IMAGES})'),
        (['-calib_data', str(empty)], f"error: -calib_data '{empty}' holds no images"),
        (['-calib_data', str(few)], f"error: -calib_data '{few}' holds 5 images, too few to calibrate INT8 "
                                    f'activation ranges; it needs at least {quantize.MIN_CALIBRATION_IMAGES}'),
        (['-opts', 'DATA.DATASET', 'imagenet'], 'error: INT8 needs calibration images and the training split cannot '
                                                'be read (DATA.DATA_PATH is empty'),
    ]
    for flags, start in refusals:
        assert export_error(capsys, weights, folder, '-precision', 'int8', *flags).startswith(start)
    monkeypatch.setattr(runtimes, 'openvino_capabilities', lambda: ['FP32', 'INT8'])  # a CPU without bf16
    message = export_error(capsys, weights, folder, '-precision', 'bf16')
    assert message.startswith('error: no installed runtime runs bf16 on this CPU (installed: ')
    assert message.endswith('; export with -precision fp32 or int8')
    for module in (export, runtimes):  # no OpenVINO: the only runtime with bf16
        monkeypatch.setattr(module, 'installed_runtimes', lambda: ['paddle', 'onnxruntime'])
    assert export_error(capsys, weights, folder, '-precision', 'bf16').endswith(
        '; openvino runs it and is not installed: pip install openvino); export with -precision fp32 or int8')
    for module in (export, runtimes):  # only Paddle installed, which does not run INT8 ONNX models
        monkeypatch.setattr(module, 'installed_runtimes', lambda: ['paddle'])
    assert export_error(capsys, weights, folder, '-precision', 'int8') == (
        'error: no installed runtime runs int8 on this CPU (installed: paddle; onnxruntime runs it and is not '
        'installed: pip install onnxruntime; openvino runs it and is not installed: pip install openvino); '
        'export with -precision fp32')
    monkeypatch.undo()
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    assert {name: os.stat(folder / name).st_mtime_ns for name in FP32_FILES} == before
    assert_runs_fp32(folder, weights)

    # refused after the fp32 export is written: it is complete, and it is what runs
    def disagreeing(reference, candidate, images, labels):  # INT8 that flips half of the classes
        return {'top1_fp32': 0.9, 'top1': 0.5, 'agreement': 0.5, 'samples': len(labels)}
    monkeypatch.setattr(quantize, 'compare_precisions', disagreeing)
    assert export_error(capsys, weights, folder, '-precision', 'int8', '-calib_images', '32').startswith(
        'error: int8 changes the top-1 class of too many validation images in every runtime that runs it '
        '(agreement with fp32: onnxruntime 50.00%')
    monkeypatch.undo()
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    assert_runs_fp32(folder, weights)

    # a model whose quantization fails
    import onnxruntime.quantization

    def failing(*args, **kwargs):
        raise RuntimeError('unsupported operator')
    monkeypatch.setattr(onnxruntime.quantization, 'quantize_static', failing)
    assert export_error(capsys, weights, folder, '-precision', 'int8', '-calib_images', '32') == (
        f"error: INT8 quantization of '{folder / ONNX_FILE}' failed (RuntimeError: unsupported operator); "
        f"the fp32 export in '{folder}' is complete and unchanged")
    assert_runs_fp32(folder, weights)


def test_the_speed_of_a_low_precision_is_reported_against_fp32():
    sizes = {'fp32': 6 * 2 ** 20, 'int8': 2 * 2 ** 20}
    slower = export.speed_comparison('int8', {'onnxruntime': 0.0026, 'openvino': 0.0040},
                                     {'onnxruntime': 0.0021, 'openvino': 0.0023, 'paddle': 0.004}, 32, sizes)
    assert slower == ('notice: int8 is not faster than fp32 here: 0.81x the speed of fp32 at batch 32 (onnxruntime '
                      'int8 2.6 ms per image, onnxruntime fp32 2.1 ms); what it saves is 2.0 MB of model file '
                      'instead of 6.0 MB; export with -precision fp32 for speed')
    tie = export.speed_comparison('bf16', {'openvino': 0.0100}, {'onnxruntime': 0.0103}, 1, {})
    assert tie.startswith('notice: bf16 is not faster than fp32 here: 1.03x') and tie.endswith(
        'what it saves is no file size (it runs the fp32 files); export with -precision fp32 for speed')
    faster = export.speed_comparison('int8', {'openvino': 0.0127}, {'openvino': 0.0343}, 32, sizes)
    assert faster == ('int8 runs at 2.70x the speed of fp32 at batch 32 (openvino int8 12.7 ms per image, openvino '
                      'fp32 34.3 ms); it also saves 2.0 MB of model file instead of 6.0 MB')


def test_a_corrupt_precision_record_is_one_sentence(tmp_path):
    (tmp_path / PRECISION_FILE).write_text('{"precision": "int4"}')
    with pytest.raises(ValueError, match=r"'.*precision.json' does not name a precision \(fp32, bf16, int8\); export "
                                         r'the model again with export.py'):
        load_runtime('onnxruntime', str(tmp_path))


@pytest.mark.timeout(120)
def test_eval_of_an_fp32_export_equals_dygraph(tmp_path, weights, cache, capsys):
    folder = str(tmp_path / 'export')
    run_export(weights, folder)
    capsys.readouterr()
    lines = {}
    for source in (['-pretrained', weights], ['-model', folder], ['-model', folder, '-runtime', 'paddle']):
        eval_script.main(['-cfg', CFG, *source, '-opts', *DIGITS])
        lines[' '.join(source[::2])] = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = {k: dict(pair.split('=') for pair in line.split()) for k, line in lines.items()}
    reference = metrics['-pretrained']
    assert reference['samples'] == '360'
    for source, values in metrics.items():
        assert values.keys() == reference.keys(), source
        assert (values['top1'], values['top5'], values['samples']) == (
            reference['top1'], reference['top5'], reference['samples']), source
        assert float(values['loss']) == pytest.approx(float(reference['loss']), abs=2e-4), source

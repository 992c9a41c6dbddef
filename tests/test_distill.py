"""Knowledge distillation: the losses against numpy, the teacher's input, training with a teacher,
and bad teachers refused in one sentence before anything is written."""
import json
import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

import train as train_script
from conftest import CONFIGS
from mobileformer import build_model, engine, get_config
from mobileformer.data import build_mixup
from mobileformer.deploy.export import export_inference, export_onnx
from mobileformer.engine.distill import DistillationLoss, TeacherInput, teacher_term

DIGITS = os.path.join(CONFIGS, 'digits', 'mobileformer_26m.yaml')
SMALL_MODEL = {'MODEL': {'MF': {'BLOCKS': [['lite', 3, 12, 2, 0], ['mf', 3, 12, 1, 0], ['down', 6, 24, 2, 4]],
                                'HEAD_HIDDEN': 64, 'TOKEN_DIM': 32}},
               'DATA': {'IMAGE_SIZE': 16, 'NUM_WORKERS': 0}}
SMALL_OPTS = ['MODEL.MF.BLOCKS', '[[lite, 3, 12, 2, 0], [mf, 3, 12, 1, 0], [down, 6, 24, 2, 4]]',
              'MODEL.MF.HEAD_HIDDEN', '64', 'MODEL.MF.TOKEN_DIM', '32', 'DATA.IMAGE_SIZE', '16',
              'DATA.NUM_WORKERS', '0']


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_soft_loss_equals_numpy(alpha):
    rng = np.random.default_rng(0)
    logits, teacher = rng.standard_normal((6, 5)) * 3, rng.standard_normal((6, 5)) * 3
    labels, tau, smoothing = rng.integers(0, 5, 6), 2.5, 0.1
    loss = DistillationLoss(nn.CrossEntropyLoss(label_smoothing=smoothing), 'soft', tau, alpha)(
        paddle.to_tensor(logits, 'float64'), paddle.to_tensor(labels), paddle.to_tensor(teacher, 'float64'))

    target = np.full((6, 5), smoothing / 5) + (1 - smoothing) * np.eye(5)[labels]
    ground_truth = -(target * log_softmax(logits)).sum(1).mean()
    log_p, log_q = log_softmax(teacher / tau), log_softmax(logits / tau)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(1).mean() * tau ** 2
    np.testing.assert_allclose(float(loss), (1 - alpha) * ground_truth + alpha * kl, rtol=1e-6)  # paddle smooths labels in float32


def test_hard_distillation_is_cross_entropy_on_the_teachers_argmax():
    rng = np.random.default_rng(1)
    logits, teacher = paddle.to_tensor(rng.standard_normal((8, 7))), paddle.to_tensor(rng.standard_normal((8, 7)))
    labels = paddle.to_tensor(rng.integers(0, 7, 8))
    hard = DistillationLoss(nn.CrossEntropyLoss(), 'hard', 1.0, 1.0)(logits, labels, teacher)
    argmax = paddle.to_tensor(np.asarray(teacher).argmax(1))
    np.testing.assert_allclose(float(hard), float(nn.functional.cross_entropy(logits, argmax)), rtol=1e-12)
    half = DistillationLoss(nn.CrossEntropyLoss(), 'hard', 1.0, 0.5)(logits, labels, teacher)
    expected = 0.5 * float(nn.functional.cross_entropy(logits, labels)) + 0.5 * float(hard)
    np.testing.assert_allclose(float(half), expected, rtol=1e-12)
    # tau does not change the hard kind; the soft term at any tau is 0 for the teacher's own logits
    assert float(teacher_term(logits, teacher, 'hard', 4.0).mean()) == pytest.approx(float(hard), rel=1e-12)
    assert float(teacher_term(teacher, teacher, 'soft', 3.0).abs().max()) < 1e-12


def test_teacher_input_adapts_channels_size_and_normalisation():
    rng = np.random.default_rng(2)
    grey = rng.random((2, 1, 8, 8)).astype(np.float32)  # pixels in [0, 1]
    student = (grey - 0.5) / 0.5
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    adapted = TeacherInput([0.5], [0.5], 3, (8, 8), mean, std)(paddle.to_tensor(student)).numpy()
    expected = (np.repeat(grey, 3, axis=1) - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-6)
    # a uniform image stays uniform when resized; a same-input teacher gets the very tensor
    flat = paddle.full([1, 1, 8, 8], 0.25)
    np.testing.assert_allclose(TeacherInput([0.5], [0.5], 1, (12, 12), [0.5], [0.5])(flat).numpy(),
                               np.full((1, 1, 12, 12), 0.25), atol=1e-6)
    assert TeacherInput([0.5], [0.5], 1, (8, 8), [0.5], [0.5])(flat) is flat


class Recorder(nn.Layer):
    """Wraps a network and keeps the batches it was given."""

    def __init__(self, network):
        super().__init__()
        self.network, self.seen = network, []

    def forward(self, x):
        self.seen.append(x.numpy().copy())
        return self.network(x)


def test_the_teacher_sees_exactly_the_students_mixed_batch():
    config = get_config(DIGITS, ['AUG.MIXUP_ALPHA', '1.0', 'AUG.CUTMIX_ALPHA', '1.0', *SMALL_OPTS])
    student = Recorder(build_model(config))
    teacher_net = Recorder(build_model(config))
    teacher = engine.Teacher(teacher_net, TeacherInput([0.5], [0.5], 1, None, [0.5], [0.5]), 'recorded')
    mixup = build_mixup(config)
    criterion, metrics = engine.build_distillation(config.clone(), engine.build_criterion(config, mixup))
    model = engine.TrainingModel(student, criterion, mixup, teacher=teacher)
    model.prepare(paddle.optimizer.SGD(0.0, parameters=student.parameters()), model.train_loss,
                  metrics=engine.build_metrics(10) + metrics)
    paddle.seed(3)
    images = paddle.randn([8, 1, 16, 16])
    model.train_batch([images], [paddle.arange(8).reshape([8, 1]) % 10])
    assert len(student.seen) == len(teacher_net.seen) == 1
    np.testing.assert_array_equal(teacher_net.seen[0], student.seen[0])
    assert np.abs(student.seen[0] - images.numpy()).max() > 0.1  # it was mixed


def test_alpha_one_learns_the_teachers_class_whatever_the_labels():
    paddle.seed(4)
    network = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))

    def always_class_2(images):
        return paddle.to_tensor(np.tile(np.eye(4, dtype=np.float32)[2] * 10, (len(images), 1)))

    config = get_config(DIGITS, ['TRAIN.DISTILL.KIND', 'hard', 'TRAIN.DISTILL.ALPHA', '1.0'])
    criterion, _ = engine.build_distillation(config, nn.CrossEntropyLoss())
    model = engine.TrainingModel(network, criterion, teacher=always_class_2)
    model.prepare(paddle.optimizer.Adam(0.05, parameters=network.parameters()), model.train_loss,
                  metrics=engine.build_metrics(4))
    rng = np.random.default_rng(5)
    for _ in range(60):
        images = paddle.to_tensor(rng.standard_normal((16, 1, 4, 4)).astype(np.float32))
        labels = paddle.to_tensor(rng.choice([0, 1, 3], (16, 1)))  # never class 2
        model.train_batch([images], [labels])
    held_out = paddle.to_tensor(rng.standard_normal((200, 1, 4, 4)).astype(np.float32))
    assert (network(held_out).numpy().argmax(1) == 2).all()


# ------------------------------------------------------------------ bad teachers, before any write
@pytest.fixture(scope='module')
def small_teacher(tmp_path_factory):
    """A small digits model: its YAML, its weights and an ONNX export of it."""
    folder = tmp_path_factory.mktemp('teacher')
    config_file = folder / 'teacher.yaml'
    config_file.write_text(json.dumps({'_BASE_': DIGITS, **SMALL_MODEL}))
    config = get_config(str(config_file))
    paddle.seed(6)
    network = build_model(config)
    network.eval()
    paddle.save(network.state_dict(), str(folder / 'teacher.pdparams'))
    export_onnx(network, config, str(folder / 'teacher.onnx'))
    return folder


def refused(tmp_path, capsys, *args, opts=()):
    output = tmp_path / 'run'
    with pytest.raises(SystemExit) as stopped:
        train_script.main(['-output', str(output), '-epochs', '1', *args, '-opts', *SMALL_OPTS, *opts])
    assert stopped.value.code == 2
    assert not output.exists()  # nothing written
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    return lines[0]


SMALL_MF = SMALL_MODEL['MODEL']['MF']


def write_yaml(path, data):
    path.write_text(json.dumps({'_BASE_': DIGITS, **SMALL_MODEL, **data}))
    return str(path)


def test_teacher_for_another_class_count_is_refused(small_teacher, tmp_path, capsys):
    line = refused(tmp_path, capsys, '-teacher', str(small_teacher / 'teacher.onnx'),
                   opts=['MODEL.NUM_CLASSES', '7'])
    assert "answers 10 classes but the student has MODEL.NUM_CLASSES 7" in line


def test_folder_without_an_export_is_refused(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    line = refused(tmp_path, capsys, '-teacher', str(tmp_path / 'empty'))
    assert 'holds no exported model' in line and 'export.py' in line


def test_onnx_files_that_are_not_classifiers_are_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    def identity(name, shape):
        graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], name,
                                  [helper.make_tensor_value_info('x', TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info('y', TensorProto.FLOAT, shape)])
        path = tmp_path / f'{name}.onnx'
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)]), str(path))
        return str(path)

    line = refused(tmp_path, capsys, '-teacher', identity('maps', ['N', 1, 16, 16]))
    assert 'is not a classifier: it answers [2, 1, 16, 16]' in line
    line = refused(tmp_path, capsys, '-teacher', identity('vectors', ['N', 256]))
    assert 'takes inputs [N, 256], which a batch of images cannot be resized to' in line
    (tmp_path / 'junk.onnx').write_bytes(b'not onnx')
    line = refused(tmp_path, capsys, '-teacher', str(tmp_path / 'junk.onnx'))
    assert 'is not an ONNX model onnxruntime can load' in line


def test_weights_that_do_not_fit_the_teacher_yaml_are_refused(small_teacher, tmp_path, capsys):
    weights = str(small_teacher / 'teacher.pdparams')
    other = write_yaml(tmp_path / 'other.yaml', {'MODEL': {'MF': {**SMALL_MF, 'TOKEN_DIM': 48}}})
    line = refused(tmp_path, capsys, '-teacher', other, weights)
    assert line.startswith(f"error: '{weights}' does not fit the model: ")
    assert line.endswith(f"check that the teacher config '{other}' matches the checkpoint")
    # a classifier as wide as another head (same class count) is a mismatch, not a class count
    wider = write_yaml(tmp_path / 'wider.yaml', {'MODEL': {'MF': {**SMALL_MF, 'HEAD_HIDDEN': 96}}})
    line = refused(tmp_path, capsys, '-teacher', wider, weights)
    assert 'head.classifier.weight: [64, 10] vs model [96, 10]' in line and 'classes' not in line
    # a teacher config of another class count than its weights: fixed in that YAML, not with -opts
    seven = write_yaml(tmp_path / 'seven.yaml', {'MODEL': {'MF': SMALL_MF, 'NUM_CLASSES': 7}})
    line = refused(tmp_path, capsys, '-teacher', seven, weights)
    assert line == (f"error: '{weights}' was trained for 10 classes but MODEL.NUM_CLASSES is 7; pass "
                    f"MODEL.NUM_CLASSES: 10 in '{seven}' or a matching checkpoint")
    line = refused(tmp_path, capsys, '-teacher', str(small_teacher / 'teacher.yaml'))
    assert 'needs its weights' in line


def test_a_feature_extractor_teacher_is_refused(small_teacher, tmp_path, capsys):
    extractor = write_yaml(tmp_path / 'features.yaml', {'MODEL': {**SMALL_MODEL['MODEL'], 'OUT_INDICES': [1]}})
    line = refused(tmp_path, capsys, '-teacher', extractor, str(small_teacher / 'teacher.pdparams'))
    assert 'is not a classifier' in line and 'MODEL.OUT_INDICES' in line


@pytest.mark.parametrize('key, value, sentence', [
    ('TRAIN.DISTILL.TAU', '0', 'TRAIN.DISTILL.TAU must be > 0, got 0.0'),
    ('TRAIN.DISTILL.ALPHA', '1.5', 'TRAIN.DISTILL.ALPHA must be in [0, 1], got 1.5'),
    ('TRAIN.DISTILL.ALPHA', '-0.1', 'TRAIN.DISTILL.ALPHA must be in [0, 1], got -0.1'),
    ('TRAIN.DISTILL.KIND', 'medium', "TRAIN.DISTILL.KIND must be 'soft' or 'hard', got 'medium'")])
def test_impossible_distill_values_are_refused(small_teacher, tmp_path, capsys, key, value, sentence):
    line = refused(tmp_path, capsys, '-teacher', str(small_teacher / 'teacher.onnx'), opts=[key, value])
    assert sentence in line


# ------------------------------------------------------------------ the teacher kinds agree
def test_yaml_onnx_and_export_folder_teachers_answer_alike(small_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # the runtime choice's measurement
    folder = tmp_path / 'export'
    config = get_config(str(small_teacher / 'teacher.yaml'))
    network = build_model(config)
    network.set_state_dict(paddle.load(str(small_teacher / 'teacher.pdparams')))
    network.eval()
    export_inference(network, config, str(folder))
    export_onnx(network, config, str(folder / 'inference.onnx'))
    images = paddle.randn([4, 1, 16, 16])
    answers = []
    for teacher in ([str(small_teacher / 'teacher.yaml'), str(small_teacher / 'teacher.pdparams')],
                    [str(small_teacher / 'teacher.onnx')], [str(folder)]):
        student = train_script.load_config(train_script.parse_args(['-teacher', *teacher, '-opts', *SMALL_OPTS]))
        answers.append(engine.build_teacher(student, log=lambda line: None)(images).numpy())
    for answer in answers[1:]:
        np.testing.assert_allclose(answer, answers[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['resmlp_12_224', 'resmlp_24_224', 'resmlp_36_224', 'resmlp_big_24_224'])
def test_distilled_resmlp_configs_are_their_model_with_deits_hard_distillation(name):
    distilled, plain = get_config(os.path.join(CONFIGS, 'distilled', f'{name}.yaml')), get_config(os.path.join(CONFIGS, f'{name}.yaml'))
    assert distilled.MODEL.MIXER == plain.MODEL.MIXER and distilled.MODEL.TYPE == plain.MODEL.TYPE == 'resmlp'
    assert (distilled.DATA.MEAN, distilled.DATA.CROP_PCT) == (plain.DATA.MEAN, plain.DATA.CROP_PCT)
    distill = distilled.TRAIN.DISTILL
    assert (distill.TEACHER, distill.KIND, distill.ALPHA) == ('', 'hard', 0.5)  # the teacher is the user's
    # the teacher sees DeiT's Mixup 0.8 / CutMix 1.0 batches, the ground truth is smoothed by 0.1
    assert (distilled.AUG.MIXUP_ALPHA, distilled.AUG.CUTMIX_ALPHA, distilled.AUG.LABEL_SMOOTHING) == (0.8, 1.0, 0.1)

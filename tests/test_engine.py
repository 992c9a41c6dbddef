"""Training engine: optimizer groups, LR schedule, checkpoints, resume, fine-tuning, eval, multi-process."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

import eval as eval_script
import train as train_script
from conftest import CONFIGS, ROOT
from mobileformer import build_model, engine, get_config
from mobileformer.checkpoint import load_weights

DIGITS = os.path.join(CONFIGS, 'digits', 'mobileformer_26m.yaml')
# a small Mobile-Former (same block kinds as 26M) so end-to-end runs stay fast on 2 CPU cores
SMALL_MODEL = ['MODEL.MF.BLOCKS', '[[lite, 3, 12, 2, 0], [mf, 3, 12, 1, 0], [down, 6, 24, 2, 4]]',
               'MODEL.MF.HEAD_HIDDEN', '64', 'MODEL.MF.TOKEN_DIM', '32', 'DATA.IMAGE_SIZE', '16']
# nothing random per sample: full-image crops, no flip, no mixup, no dropout
DETERMINISTIC = ['AUG.RRC_SCALE', '[1.0, 1.0]', 'AUG.RRC_RATIO', '[1.0, 1.0]', 'MODEL.DROPOUT', '0.0',
                 'DATA.NUM_WORKERS', '0']


def run_train(output, *args, opts=()):
    argv = ['-output', str(output), *args, '-opts', *SMALL_MODEL, *opts]
    assert train_script.main(argv) == 0


def load(path):
    return {k: np.asarray(v) for k, v in paddle.load(str(path), return_numpy=True).items()}


def test_no_decay_group_is_exactly_norms_and_biases():
    config = get_config(os.path.join(CONFIGS, 'mobileformer_26m.yaml'))
    model = build_model(config)
    skip = engine.no_decay_names(model)
    norm_types = (paddle.nn.BatchNorm2D, paddle.nn.LayerNorm, paddle.nn.BatchNorm1D)
    norm_params = {f'{layer_name}.{p}' for layer_name, layer in model.named_sublayers()
                   if isinstance(layer, norm_types) for p in ('weight', 'bias')
                   if getattr(layer, p, None) is not None}
    biases = {n for n, p in model.named_parameters() if n.endswith('.bias') and not p.stop_gradient}
    assert norm_params and norm_params <= skip and biases <= skip
    assert skip == norm_params | biases
    trainable = {n: p for n, p in model.named_parameters() if not p.stop_gradient}
    tokens = [n for n, p in trainable.items() if p.ndim >= 2 and 'token' in n]
    assert tokens and not set(tokens) & skip
    # Paddle asks apply_decay_param_fun with unique tensor names; the optimizer must map them back
    optimizer = engine.build_optimizer(config, model, 1e-3)
    decided = {n: optimizer._apply_decay_param_fun(p.name) for n, p in trainable.items()}
    assert {n for n, decays in decided.items() if not decays} == skip


def test_warmup_then_cosine_per_iteration():
    schedule = engine.WarmupCosineLR(1.0, total_steps=110, warmup_steps=10, warmup_start_lr=0.1,
                                     end_lr=0.01, cooldown_steps=20)
    lrs = []
    for _ in range(110):
        lrs.append(schedule.get_lr())
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 80)))
    assert lrs[90] == pytest.approx(0.01) and lrs[109] == pytest.approx(0.01)


def test_schedule_counts_optimizer_updates_with_accumulation():
    config = get_config(DIGITS, ['TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.COOLDOWN_EPOCHS', '0',
                                 'TRAIN.ACCUM_ITER', '2', 'TRAIN.BASE_LR', '1.0', 'TRAIN.WARMUP_START_LR', '0.0'])
    schedule = engine.build_lr_schedule(config, batches_per_epoch=5)  # updates after batches 2, 4, 5
    assert (schedule.total_steps, schedule.warmup_steps) == (6, 3)
    callback = engine.StepLROnUpdate(accum_iter=2, batches_per_epoch=5)
    callback.set_model(SimpleNamespace(_optimizer=SimpleNamespace(_learning_rate=schedule)))
    lrs = []
    for step in range(5):
        lrs.append(schedule())
        callback.on_train_batch_end(step)
    assert lrs == pytest.approx([0.0, 0.0, 1 / 3, 1 / 3, 2 / 3]) and schedule() == pytest.approx(1.0)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_quickstart_learns_checkpoints_and_eval(tmp_path, capsys):
    out = tmp_path / 'run'
    # a shortened quickstart: the small model, 3 epochs
    run_train(out, '-epochs', '3', opts=['TRAIN.EMA', 'True', 'TRAIN.EMA_DECAY', '0.5'])
    info = json.load(open(out / 'last.json'))
    assert info['epoch'] == 3 and len(info['history']) == 3
    assert info['metrics']['val_top1'] > 0.6  # chance is 0.1
    assert {'epoch', 'metrics', 'config', 'best_top1', 'history'} <= set(info)
    for name in ('last.pdparams', 'last.pdopt', 'last.pdema', 'best.pdparams', 'train.log', 'curves.png'):
        assert (out / name).is_file(), name
    assert not [f for f in os.listdir(out) if '.tmp' in f]
    assert 'LR_Scheduler' in paddle.load(str(out / 'last.pdopt'))
    best = json.load(open(out / 'best.json'))
    assert best['metrics']['val_top1'] == max(r['val_top1'] for r in info['history'])

    capsys.readouterr()
    assert eval_script.main(['-cfg', DIGITS, '-pretrained', str(out / 'best.pdparams'), '-opts', *SMALL_MODEL]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(item.split('=') for item in last_line.split())
    assert list(fields) == ['top1', 'top5', 'loss', 'samples'] and fields['samples'] == '360'
    assert float(fields['top1']) == pytest.approx(best['metrics']['val_top1'], abs=1e-4)


@pytest.mark.timeout(150)
def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    opts = ['TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EMA', 'True', 'TRAIN.EMA_DECAY', '0.9',
            'AUG.MIXUP_ALPHA', '0.2', 'MODEL.DROPOUT', '0.2', 'DATA.NUM_WORKERS', '1']
    run_train(tmp_path / 'full', '-epochs', '2', opts=opts)

    finish_epoch = engine.EvaluateAndCheckpoint.on_epoch_end

    def crash_after_first_epoch(self, epoch, logs=None):
        finish_epoch(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.EvaluateAndCheckpoint, 'on_epoch_end', crash_after_first_epoch)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, status 130
        run_train(tmp_path / 'cut', '-epochs', '2', opts=opts)
    assert stopped.value.code == 130
    assert json.load(open(tmp_path / 'cut' / 'last.json'))['epoch'] == 1
    monkeypatch.undo()
    run_train(tmp_path / 'cut', '-epochs', '2', '-resume', 'auto', opts=opts)

    for name in ('last.pdparams', 'last.pdema', 'best.pdparams'):
        full, cut = load(tmp_path / 'full' / name), load(tmp_path / 'cut' / name)
        assert full.keys() == cut.keys()
        for key in full:
            np.testing.assert_array_equal(full[key], cut[key], err_msg=f'{name}: {key}')
    full_log = json.load(open(tmp_path / 'full' / 'last.json'))['history']
    cut_log = json.load(open(tmp_path / 'cut' / 'last.json'))['history']
    assert [r['val_ce'] for r in full_log] == [r['val_ce'] for r in cut_log]


@pytest.mark.timeout(120)
def test_same_command_twice_gives_same_numbers(tmp_path, capsys):
    opts = ['AUG.MIXUP_ALPHA', '0.2', 'DATA.NUM_WORKERS', '1']
    for name in ('a', 'b'):
        run_train(tmp_path / name, '-epochs', '1', '-amp', opts=opts)
        notices = [line for line in capsys.readouterr().out.splitlines() if '-amp' in line]
        cpu_notice = ['Notice: -amp has no effect on CPU; training in float32.']
        assert notices == ([] if paddle.is_compiled_with_cuda() else cpu_notice)
    a, b = (json.load(open(tmp_path / n / 'last.json'))['metrics'] for n in 'ab')
    assert a.pop('time') >= 0 and b.pop('time') >= 0
    assert a == b


def _save_model(tmp_path, num_classes):
    config = get_config(DIGITS, SMALL_MODEL + ['MODEL.NUM_CLASSES', str(num_classes)])
    path = str(tmp_path / f'classes{num_classes}.pdparams')
    paddle.save(build_model(config).state_dict(), path)
    return path


def test_pretrained_with_other_class_count_drops_head(tmp_path, capsys):
    path = _save_model(tmp_path, 7)
    config = get_config(DIGITS, SMALL_MODEL)
    model = build_model(config)
    dropped = load_weights(model, path, drop_classifier=True)
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and '7 classes' in notice[0] and 'has 10' in notice[0]
    saved, own = paddle.load(path), model.state_dict()
    assert dropped and all(tuple(saved[k].shape) != tuple(own[k].shape) for k in dropped)
    for key in own:
        if key not in dropped:
            np.testing.assert_array_equal(own[key].numpy(), saved[key].numpy())


def test_fine_tuning_drops_exactly_the_classifier_even_where_other_shapes_look_like_it(tmp_path, capsys):
    """The quickstart's 10-class checkpoint onto 8 classes: 8 is also the stem's width, which a
    guess by shape took for the classifier."""
    path = _save_model(tmp_path, 10)
    config = get_config(DIGITS, SMALL_MODEL + ['MODEL.NUM_CLASSES', '8'])
    assert config.MODEL.MF.STEM_CHANNELS == 8
    model = build_model(config)
    dropped = load_weights(model, path, drop_classifier=True)
    assert dropped == ['head.classifier.weight', 'head.classifier.bias']
    assert capsys.readouterr().out.strip() == (
        f"Notice: '{path}' was trained for 10 classes, the model has 8: the classifier "
        '(head.classifier.weight, head.classifier.bias) starts from scratch (fine-tuning).')


@pytest.mark.parametrize('classes', [3, 5])
def test_fine_tuning_refuses_any_other_mismatch_naming_the_tensor_and_both_shapes(tmp_path, classes):
    """The quickstart's 1-channel checkpoint onto RGB images without `adapt_input` (which train.py's
    -pretrained passes): the stem does not fit."""
    path = _save_model(tmp_path, 10)
    model = build_model(get_config(DIGITS, SMALL_MODEL + ['MODEL.NUM_CLASSES', str(classes), 'DATA.IN_CHANNELS', '3',
                                                          'DATA.MEAN', '[0.5, 0.5, 0.5]', 'DATA.STD', '[0.5, 0.5, 0.5]']))
    with pytest.raises(ValueError) as error:
        load_weights(model, path, drop_classifier=True)
    assert str(error.value) == (f"'{path}' does not fit the model: 1 with a wrong shape (stem.conv.weight: "
                                '[8, 1, 3, 3] vs model [8, 3, 3, 3]); check that -cfg matches the checkpoint')


def test_eval_on_other_class_count_is_one_clear_sentence(tmp_path):
    path = _save_model(tmp_path, 7)
    result = subprocess.run([sys.executable, 'eval.py', '-cfg', DIGITS, '-pretrained', path, '-opts', *SMALL_MODEL],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(error) == 1 and '7 classes' in error[0] and 'NUM_CLASSES is 10' in error[0]
    result = subprocess.run([sys.executable, 'eval.py', '-cfg', DIGITS, '-pretrained', str(tmp_path / 'nope.pdparams')],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'Traceback' not in result.stderr and 'does not exist' in result.stderr


def small_teacher(folder, classes, channels):
    """A small Mobile-Former of `classes` classes at 12 px (the batch is resized for it), its YAML and
    random weights: -teacher arguments."""
    config_file = folder / 'teacher.yaml'
    config_file.write_text(json.dumps({'_BASE_': os.path.join(CONFIGS, 'mobileformer_26m.yaml'),
                                       'MODEL': {'NUM_CLASSES': classes},
                                       'DATA': {'IN_CHANNELS': channels, 'MEAN': [0.5] * channels,
                                                'STD': [0.25] * channels}}))
    config = get_config(str(config_file), SMALL_MODEL + ['DATA.IMAGE_SIZE', '12'])
    config_file.write_text(config.dump())
    paddle.seed(11)
    paddle.save(build_model(config).state_dict(), str(folder / 'teacher.pdparams'))
    return ['-teacher', str(config_file), str(folder / 'teacher.pdparams')]


@pytest.mark.timeout(240)
@pytest.mark.slow
@pytest.mark.parametrize('teacher', [False, True])
def test_two_processes_equal_one_process_on_the_union_batch(tmp_path, teacher):
    # one SGD step (momentum buffer starts empty, so the update is lr x mean gradient) on 16 images:
    # 2 ranks x 8 vs one process that accumulates the same two micro-batches of 8 (the per-replica
    # BatchNorm statistics are then the same, as in the 2-rank run). With a teacher (on every rank,
    # soft kind at tau 2), the teacher term is part of that mean gradient.
    data = tmp_path / 'images'
    rng = np.random.RandomState(0)
    from PIL import Image
    for split in ('train', 'val'):
        for index in range(16):
            folder = data / split / f'class{index % 2}'
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f'{index}.png')
    script, env = os.path.join(ROOT, 'tests', 'train_with_hooks.py'), dict(os.environ, PYTHONPATH=ROOT)
    teacher_args = small_teacher(tmp_path, 2, 3) if teacher else []
    distill_opts = ['TRAIN.DISTILL.TAU', '2.0'] if teacher else []
    common = ['-cfg', os.path.join(CONFIGS, 'mobileformer_26m.yaml'), '-dataset', 'folder', '-data_path', str(data),
              '-batch_size', '8', '-epochs', '1', *teacher_args, '-opts', *SMALL_MODEL, *DETERMINISTIC, *distill_opts,
              'MODEL.NUM_CLASSES', '2', 'AUG.MIXUP_ALPHA', '0.0', 'AUG.RAND_AUGMENT_N', '0', 'AUG.HFLIP', '0.0',
              'TRAIN.OPTIMIZER', 'momentum', 'TRAIN.WEIGHT_DECAY', '0.0', 'TRAIN.BASE_LR', '0.5',
              'TRAIN.END_LR', '0.5', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.COOLDOWN_EPOCHS', '0',
              'DATA.BATCH_SIZE_EVAL', '8']
    launch = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
              str(tmp_path / 'log'), script, f"save_rank_weights={tmp_path / 'dp'}", '--', '-output',
              str(tmp_path / 'dp'), *common]
    result = subprocess.run(launch, cwd=ROOT, capture_output=True, text=True, timeout=200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + open(tmp_path / 'log' / 'workerlog.0').read()[-3000:]
    single = [sys.executable, script, f"save_rank_weights={tmp_path / 'one'}", '--', '-output', str(tmp_path / 'one'),
              *common, 'TRAIN.ACCUM_ITER', '2']
    result = subprocess.run(single, cwd=ROOT, capture_output=True, text=True, timeout=200, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    if teacher:  # it was consulted: the epoch's record has the student's agreement with it
        assert 'train_agreement' in json.load(open(tmp_path / 'dp' / 'last.json'))['history'][0]
    rank0, rank1 = load(tmp_path / 'dp' / 'rank0.pdparams'), load(tmp_path / 'dp' / 'rank1.pdparams')
    one = load(tmp_path / 'one' / 'rank0.pdparams')
    initial_config = get_config(common[1], SMALL_MODEL + ['MODEL.NUM_CLASSES', '2'])
    engine.seed_everything(initial_config.SEED)
    initial = build_model(initial_config)
    trainable = [n for n, p in initial.named_parameters() if not p.stop_gradient]
    moved = 0
    for key in trainable:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
        np.testing.assert_allclose(rank0[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
        moved += not np.array_equal(rank0[key], initial.state_dict()[key].numpy())
    assert moved > len(trainable) // 2  # the step really updated the weights

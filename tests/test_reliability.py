"""Reliability: interruptions (SIGKILL, SIGTERM, SIGINT), divergence, data faults, bad checkpoints,
input validation, full disks and a failing rank never lose work, hang, or end in a traceback."""
import errno
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from PIL import Image

import eval as eval_script
import export as export_script
import predict as predict_script
import train as train_script
from conftest import FIXTURES, ROOT, one_error_line, run_main
from mobileformer.data import build_dataset
from mobileformer import build_model, checkpoint, cli, convert, engine, folder_lock, get_config, reparam
from mobileformer.deploy import build_for_inference, dygraph_outputs, export_inference, load_runtime

TINY = os.path.join(FIXTURES, 'tiny_mobileformer.yaml')
FOLDER_OPTS = ['DATA.DATASET', 'folder', 'MODEL.NUM_CLASSES', '2', 'DATA.IN_CHANNELS', '3',
               'DATA.MEAN', '[0.5, 0.5, 0.5]', 'DATA.STD', '[0.5, 0.5, 0.5]', 'DATA.BATCH_SIZE', '8',
               'DATA.BATCH_SIZE_EVAL', '8']


def make_folder(root, per_class=8, size=16, classes=('a', 'b')):
    """root/{train,val}/<class>/<i>.png of random RGB noise; returns root as str."""
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    return str(root)


def digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.startswith(('last.', 'best.')) and '.tmp' not in name}


def load(path):
    return {k: np.asarray(v) for k, v in paddle.load(str(path), return_numpy=True).items()}


def assert_same_weights(a, b):
    a, b = load(a), load(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------- a rank that raises
LAUNCHER = os.path.join(ROOT, 'tests', 'train_with_hooks.py')
LAUNCHER_ENV = dict(os.environ, PYTHONPATH=ROOT)


@pytest.mark.timeout(150)
@pytest.mark.slow
def test_distributed_run_with_a_failing_rank_ends_every_rank_with_its_error(tmp_path):
    data = make_folder(tmp_path / 'images')
    log_dir = tmp_path / 'log'
    command = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir', str(log_dir),
               LAUNCHER, 'fail_rank=1', '--', '-cfg', TINY, '-data_path', data, '-output', str(tmp_path / 'out'),
               '-opts', *FOLDER_OPTS, 'DATA.BATCH_SIZE', '4']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=140, env=LAUNCHER_ENV)
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown[-2000:]
    injected = 'test failure injected on rank 1 at step 1'  # a ValueError: a problem the user can fix
    # rank 1 ends with its own error; rank 0, which would otherwise wait in a collective until gloo
    # aborts it, ends at once with rank 1's error and status 2
    rank1 = open(log_dir / 'workerlog.1').read()
    assert [line for line in rank1.splitlines() if line.startswith('error: ')] == [f'error: {injected}'], rank1[-2000:]
    rank0 = open(log_dir / 'workerlog.0').read()
    assert 'Traceback' not in rank0 and 'gloo' not in rank0.lower(), rank0[-2000:]
    assert rank0.strip().splitlines()[-1] == (f"error: rank 1: ValueError: {injected} (this rank stopped because of it; "
                                              "see that rank's workerlog)"), rank0[-2000:]
    named = re.search(r'log (\S+workerlog\.\d)', shown)
    assert named, shown[-2000:]
    named_tail = open(named.group(1)).read().strip().splitlines()[-1]  # the log the launcher points to
    assert named_tail.startswith('error: ') and injected in named_tail, named_tail


# ---------------------------------------------------------------------------------- interruptions
def train_in_a_process(output, *args):
    """train.py on the tiny config run to its end as a command of its own. Runs compared for bit
    equality each get a fresh process: a process that loaded other models first (the pytest process
    after the export and distillation tests) can take other kernels' rounding."""
    done = subprocess.run([sys.executable, 'train.py', '-cfg', TINY, '-output', str(output), *args], cwd=ROOT,
                          env=LAUNCHER_ENV, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """The tiny model trained 2 epochs on digits without interruption."""
    out = tmp_path_factory.mktemp('uninterrupted')
    train_in_a_process(out)
    return out


def start_training(output, *faults, opts=()):
    """train.py in its own process group (as a terminal or a scheduler starts it), with faults."""
    command = [sys.executable, LAUNCHER, *faults, '--', '-cfg', TINY, '-output', str(output)]
    command += ['-opts', *map(str, opts)] if opts else []
    return subprocess.Popen(command, cwd=ROOT, env=LAUNCHER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_file(path, process, timeout=120):
    """Returns once `path` exists (the run created it at a known step); fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, f'training ended before {path} appeared: {process.communicate()[1][-2000:]}'
        assert time.monotonic() < deadline, f'no {path} after {timeout} s'
        time.sleep(0.05)


def resume_and_compare(output, reference):
    train_in_a_process(output, '-resume', 'auto')
    assert json.load(open(output / 'last.json'))['epoch'] == 2
    assert not [f for f in os.listdir(output) if '.tmp' in f or f == checkpoint.JOURNAL]
    for name in ('last.pdparams', 'best.pdparams'):
        assert_same_weights(output / name, reference / name)
    expected = json.load(open(reference / 'last.json'))['history']
    assert [r['val_ce'] for r in json.load(open(output / 'last.json'))['history']] == [r['val_ce'] for r in expected]


@pytest.mark.timeout(170)
@pytest.mark.slow
@pytest.mark.parametrize('moment', ['mid-epoch', 'checkpoint write'])
def test_sigkill_keeps_the_previous_checkpoint_and_resume_matches(tmp_path, uninterrupted, moment):
    out, reached = tmp_path / 'run', tmp_path / 'reached'
    # the run holds at a known point of epoch 2 (after its 10th batch, or inside the epoch-2
    # commit with every temporary file written) until the test has killed it
    fault = f'hold=2:10:{reached}' if moment == 'mid-epoch' else f'hold_commit=2:{reached}'
    process = start_training(out, fault)
    try:
        wait_for_file(reached, process)
        before = digests(out)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert digests(out) == before and json.load(open(out / 'last.json'))['epoch'] == 1
    if moment == 'checkpoint write':  # killed with epoch 2 written in full to temporaries, uncommitted
        assert sorted(f.split('.tmp')[0] for f in os.listdir(out) if '.tmp' in f) == [
            'best.json', 'best.pdparams', 'last.json', 'last.pdopt', 'last.pdparams']
    resume_and_compare(out, uninterrupted)


@pytest.mark.timeout(170)
@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_saves_a_mid_epoch_checkpoint_that_resumes_exactly(tmp_path, uninterrupted,
                                                                                          signum):
    """Ctrl-C and schedulers signal the whole process group, data-loader workers included."""
    out, reached = tmp_path / 'run', tmp_path / 'reached'
    process = start_training(out, f'hold=2:5:{reached}', opts=['DATA.NUM_WORKERS', 1])
    try:
        wait_for_file(reached, process)
        os.killpg(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err[-3000:]
    assert one_error_line(err) == (f"error: stopped by {name}; saved a checkpoint at epoch 2 step 5 in '{out}': "
                                   'continue with -resume auto')
    info = json.load(open(out / 'last.json'))
    assert (info['epoch'], info['step'], len(info['history'])) == (1, 5, 1)
    resume_and_compare(out, uninterrupted)


# The quickstart's own recipe (1 loader worker, RandAugment, dropout, label smoothing) on its first
# 256 digits at batch 32: 8 batches an epoch, 2 epochs.
QUICKSTART_SMALL = ['-epochs', '2', '-batch_size', '32']


def stopped_mid_epoch_and_resumed(folder, arguments, signum, timeout=300):
    """The output folder of a digits_subset=256 run of train.py `arguments` (its own process group)
    stopped by `signum` at epoch 2 step 3 and resumed with -resume auto, after checking that its
    last.pdparams equals that of the same run uninterrupted."""
    def run(output, *hooks, resume=()):
        command = [sys.executable, LAUNCHER, 'digits_subset=256', *hooks, '--', '-output', str(output), *resume,
                   *arguments]
        return subprocess.Popen(command, cwd=ROOT, env=LAUNCHER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    reference = run(folder / 'uninterrupted')
    _, err = reference.communicate(timeout=timeout)
    assert reference.returncode == 0, err[-3000:]
    out, reached = folder / 'run', folder / 'reached'
    process = run(out, f'hold=2:3:{reached}')
    try:
        wait_for_file(reached, process, timeout=timeout)
        os.killpg(process.pid, signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err[-3000:]
    assert (json.load(open(out / 'last.json'))['epoch'], json.load(open(out / 'last.json'))['step']) == (1, 3)
    resumed = run(out, resume=['-resume', 'auto'])
    _, err = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, err[-3000:]
    assert_same_weights(out / 'last.pdparams', folder / 'uninterrupted' / 'last.pdparams')
    return out


@pytest.mark.timeout(400)
@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_the_quickstart_stopped_mid_epoch_resumes_to_bit_identical_weights(tmp_path, signum):
    """Augmentation in the loader workers and the dropout masks continue where they stopped."""
    stopped_mid_epoch_and_resumed(tmp_path, QUICKSTART_SMALL, signum)


# The tiny model with random crops, RandAugment, dropout and Mixup/CutMix in one loader worker, on the
# first 256 digits at batch 32 (8 batches an epoch), distilled from a teacher that takes 12 px images.
RANDOM_TINY = ['AUG.RRC_SCALE', '[0.7, 1.0]', 'AUG.RRC_RATIO', '[0.9, 1.1]', 'AUG.RAND_AUGMENT_N', '1',
               'MODEL.DROPOUT', '0.1', 'AUG.MIXUP_ALPHA', '0.8', 'AUG.CUTMIX_ALPHA', '1.0', 'DATA.NUM_WORKERS', '1',
               'DATA.BATCH_SIZE', '32', 'TRAIN.DISTILL.TAU', '2.0']


def tiny_teacher(folder):
    """-teacher arguments: a YAML of the tiny model at 12 px and random weights for it."""
    config_file = folder / 'teacher.yaml'
    config_file.write_text(json.dumps({'_BASE_': TINY, 'DATA': {'IMAGE_SIZE': 12}}))
    paddle.seed(12)
    paddle.save(build_model(get_config(str(config_file))).state_dict(), str(folder / 'teacher.pdparams'))
    return ['-teacher', str(config_file), str(folder / 'teacher.pdparams')]


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_run_with_a_teacher_stopped_mid_epoch_resumes_to_bit_identical_weights(tmp_path):
    """The teacher's answers follow the resumed batches: the same mixed images reach it again."""
    arguments = ['-cfg', TINY, *tiny_teacher(tmp_path), '-opts', *RANDOM_TINY]
    out = stopped_mid_epoch_and_resumed(tmp_path, arguments, signal.SIGTERM, timeout=240)
    history = json.load(open(out / 'last.json'))['history']
    assert len(history) == 2 and 'train_agreement' in history[-1]  # the teacher was there after the resume


def run_processes(root_pid):
    """{pid: start time} of `root_pid` and every process below it, read from /proc."""
    stats = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            stat = open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry)] = (int(stat[1]), stat[19])  # parent, start time
    found, frontier = {}, [root_pid]
    while frontier:
        pid = frontier.pop()
        found[pid] = stats[pid][1]
        frontier += [child for child, (parent, _) in stats.items() if parent == pid]
    return found


def still_running(processes):
    """The processes of `processes` that still run (not zombies, not a reused pid)."""
    alive = []
    for pid, started in processes.items():
        try:
            stat = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if stat[0] != 'Z' and stat[19] == started:
            alive.append(pid)
    return alive


def assert_all_end(processes, seconds=30):
    deadline = time.monotonic() + seconds
    while still_running(processes):
        assert time.monotonic() < deadline, f'still running {seconds} s after the kill: {still_running(processes)}'
        time.sleep(0.1)


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_sigkill_of_the_main_process_ends_its_data_loader_workers(tmp_path):
    reached = tmp_path / 'reached'
    process = start_training(tmp_path / 'run', f'hold=1:3:{reached}', opts=['DATA.NUM_WORKERS', 2])
    try:
        wait_for_file(reached, process)  # three batches came from the workers
        processes = run_processes(process.pid)
        assert len(processes) == 3, processes  # the main process and its two workers
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert_all_end(processes)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_sigkill_of_one_rank_ends_its_workers_and_the_launch(tmp_path):
    reached, log_dir = tmp_path / 'reached', tmp_path / 'log'
    command = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir', str(log_dir),
               LAUNCHER, f'hold=1:3:{reached}.{{rank}}', '--', '-cfg', TINY, '-output', str(tmp_path / 'out'),
               '-opts', 'DATA.NUM_WORKERS', '1']
    launch = subprocess.Popen(command, cwd=ROOT, env=LAUNCHER_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        wait_for_file(f'{reached}.0', launch, timeout=240)
        wait_for_file(f'{reached}.1', launch, timeout=240)
        processes = run_processes(launch.pid)
        assert len(processes) == 5, processes  # the launcher, two ranks, a worker each
        os.kill(int(open(f'{reached}.1').read()), signal.SIGKILL)
        launch.communicate(timeout=120)
    finally:
        launch.kill()
    assert launch.returncode != 0
    # rank 0 ends as it does for any failing rank: the launcher stops it with SIGTERM
    assert open(log_dir / 'workerlog.0').read().strip().splitlines()[-1].startswith('error: stopped by SIGTERM')
    assert_all_end(processes)


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_sigkill_during_the_kernel_build_ends_the_compiler(tmp_path):
    """Paddle compiles through a shell and setup.py: the whole tree goes with the process that built."""
    reached, compiler = tmp_path / 'reached', tmp_path / 'cc'
    compiler.write_text(f'#!/bin/sh\necho $$ > {reached}\nexec sleep 600\n')  # a compiler that never finishes
    compiler.chmod(0o755)
    env = dict(LAUNCHER_ENV, CC=str(compiler), MOBILEFORMER_OPS_CACHE=str(tmp_path / 'ops'), MOBILEFORMER_CPU_OPS='1')
    script = 'import sys; from mobileformer import build_model, cpu_ops, get_config; ' \
             'cpu_ops.prepare(build_model(get_config(sys.argv[1])))'
    build = subprocess.Popen([sys.executable, '-c', script, TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_file(reached, build)
        processes = run_processes(build.pid)
        assert int(open(reached).read()) in processes, processes  # the compiler runs below the build
    finally:
        build.send_signal(signal.SIGKILL)
        build.communicate()
    try:
        assert_all_end(processes, seconds=10)
    finally:
        for pid in still_running(processes):  # a failed test leaves no compiler behind
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- one run per folder
def folder_digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def assert_refused(line, folder, holder, started, argv=None):
    """`line` is the refusal of a run into `folder` while process `holder` (a Popen started at time
    `started`) of this machine runs there; `argv` is its sys.argv when not its Popen arguments."""
    command = shlex.join([os.path.basename(sys.executable), *(argv or holder.args[1:])])
    expected = (f"error: the output folder '{folder}' is in use by another run (process {holder.pid} on "
                f'{socket.gethostname()}, started TIME: {command}); wait for it to end, stop it, or pass another -output')
    pattern = re.escape(expected).replace('TIME', r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \w+')
    match = re.fullmatch(pattern, line)
    assert match, f'{line}\n{expected}'
    assert int(started) <= time.mktime(time.strptime(match.group(1), '%Y-%m-%d %H:%M:%S')) <= time.time()


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_a_second_run_into_the_folder_of_a_running_one_is_refused(tmp_path, capsys):
    out, reached = tmp_path / 'run', tmp_path / 'reached'
    started = time.time()
    first = start_training(out, f'hold=2:3:{reached}', opts=['DATA.NUM_WORKERS', 1])
    try:
        wait_for_file(reached, first)  # an epoch-1 checkpoint is written, epoch 2 runs
        before = folder_digests(out)
        for resume in ([], ['-resume', 'auto']):
            code, printed, err = run_main(train_script.main, ['-cfg', TINY, '-output', out, *resume], capsys)
            assert code == 2 and printed == '', printed
            assert_refused(one_error_line(err), out, first, started)
        assert folder_digests(out) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the kernel dropped the dead run's lock: -resume auto continues from its checkpoint
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-output', out, '-resume', 'auto',
                                                '-opts', 'DATA.NUM_WORKERS', 1], capsys)
    assert code == 0, err
    assert f"Resumed from {out / 'last'} after epoch 1." in open(out / 'train.log').read().splitlines()
    assert json.load(open(out / 'last.json'))['epoch'] == 2 and folder_lock.LOCK_FILE not in os.listdir(out)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_multi_card_launch_into_the_folder_of_a_running_run_ends_every_rank(tmp_path):
    out, reached, log_dir = tmp_path / 'run', tmp_path / 'reached', tmp_path / 'log'
    started = time.time()
    first = start_training(out, f'hold=1:2:{reached}')
    try:
        wait_for_file(reached, first)
        before = folder_digests(out)
        command = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
                   str(log_dir), 'train.py', '-cfg', TINY, '-output', str(out)]
        launch = subprocess.run(command, cwd=ROOT, env=LAUNCHER_ENV, capture_output=True, text=True, timeout=240)
        assert launch.returncode != 0 and folder_digests(out) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # rank 0 is refused; Paddle may add a note of the launcher's SIGTERM if that arrives while the
    # process shuts down, as for any failing rank
    rank0 = open(log_dir / 'workerlog.0').read()
    errors = [line for line in rank0.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and not re.search('^Traceback', rank0, re.M), rank0[-2000:]
    refusal = errors[0]
    assert_refused(refusal, out, first, started)
    # rank 1 ends at once, as for any failing rank: with rank 0's error when its watcher sees it
    # first, or stopped by the launcher's SIGTERM (then possibly before it printed anything)
    rank1 = open(log_dir / 'workerlog.1').read()
    assert not re.search('^Traceback', rank1, re.M), rank1[-2000:]  # Paddle's SIGTERM note is no Python traceback
    rank0_error = (f'error: rank 0: OSError: {refusal[len("error: "):]} (this rank stopped because of it; see that '
                   "rank's workerlog)")
    assert all(line == rank0_error or line.startswith('error: stopped by SIGTERM')
               for line in rank1.splitlines() if line.startswith('error: ')), rank1[-2000:]


HELD_EXPORT = """
import sys, threading
import export
write = export.export_inference

def write_and_hold(*args):
    prefix = write(*args)
    open(sys.argv[1], 'w').close()
    threading.Event().wait()  # until the test kills this export

export.export_inference = write_and_hold
export.main(sys.argv[2:])
"""


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_an_export_into_the_folder_of_a_running_export_is_refused(tmp_path, capsys):
    weights, folder, reached = str(tmp_path / 'w.pdparams'), tmp_path / 'export', tmp_path / 'reached'
    paddle.save(build_model(get_config(TINY)).state_dict(), weights)
    argv = ['-cfg', TINY, '-pretrained', weights, '-output', str(folder), '-no_onnx']
    started = time.time()
    first = subprocess.Popen([sys.executable, '-c', HELD_EXPORT, str(reached), *argv], cwd=ROOT, env=LAUNCHER_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_file(reached, first)  # the first export wrote its inference files and holds there
        before = folder_digests(folder)
        code, printed, err = run_main(export_script.main, argv, capsys)
        assert code == 2 and printed == '', printed
        assert_refused(one_error_line(err), folder, first, started, argv=['-c', *first.args[3:]])
        assert folder_digests(folder) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    code, _, err = run_main(export_script.main, argv, capsys)
    assert code == 0, err
    assert folder_lock.LOCK_FILE not in os.listdir(folder)


FORKING_HOLDER = """
import os, signal, sys
from mobileformer import folder_lock
with folder_lock.hold(sys.argv[1]):
    child = os.fork()
    if child == 0:
        signal.pause()  # outlives its parent until the test ends it
    with open(sys.argv[2], 'w') as f:
        f.write(str(child))
    signal.pause()
"""


@pytest.mark.timeout(120)
def test_a_child_that_outlives_the_holder_does_not_keep_the_folder(tmp_path):
    """A data-loader worker can outlive its killed parent for a moment: the lock is not its to keep."""
    folder, reached = tmp_path / 'out', tmp_path / 'reached'
    holder = subprocess.Popen([sys.executable, '-c', FORKING_HOLDER, str(folder), str(reached)], cwd=ROOT,
                              env=LAUNCHER_ENV, start_new_session=True)
    child = None
    try:
        wait_for_file(reached, holder)
        child = run_processes(int(open(reached).read()))
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert still_running(child)
        with folder_lock.hold(str(folder)):
            assert json.load(open(folder / folder_lock.LOCK_FILE))['pid'] == os.getpid()
        assert not os.listdir(folder)
    finally:
        holder.kill()
        for pid in child or ():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_journal_finishes_a_commit_killed_after_its_commit_point(tmp_path):
    """A process killed between the journal and the renames: recover() completes the new set."""
    for name, text in (('last.json', 'old'), ('last.pdparams', 'old')):
        (tmp_path / name).write_text(text)
    renames = {}
    for name in ('last.json', 'last.pdparams'):
        temporary = checkpoint.temporary_path(str(tmp_path / name))
        open(temporary, 'w').write('new')
        renames[temporary] = str(tmp_path / name)
    os.replace(next(iter(renames)), str(tmp_path / 'last.json'))  # one rename happened before the kill
    (tmp_path / checkpoint.JOURNAL).write_text(json.dumps(renames))
    (tmp_path / 'best.json.tmp999').write_text('uncommitted')
    assert checkpoint.recover(str(tmp_path)) == [str(tmp_path / 'last.pdparams')]
    assert sorted(os.listdir(tmp_path)) == ['last.json', 'last.pdparams']
    assert {(tmp_path / n).read_text() for n in ('last.json', 'last.pdparams')} == {'new'}


# ------------------------------------------------------------------------------------ divergence
@pytest.mark.timeout(90)
@pytest.mark.parametrize('bad, batch', [(float('nan'), 4), (float('inf'), 4), (float('nan'), 1)])
def test_non_finite_loss_stops_with_step_and_untouched_checkpoint(tmp_path, monkeypatch, capsys, bad, batch):
    out = tmp_path / 'out'
    data = make_folder(tmp_path / 'images')
    calls, snapshot = [], {}
    original = engine.TrainingModel.train_batch

    def train_batch(self, inputs, labels=None, update=True):
        losses, metrics = original(self, inputs, labels, update)
        calls.append(1)
        if len(calls) == batch:  # 2 batches an epoch: 4 is epoch 2 step 2, 1 is before any checkpoint
            snapshot.update(digests(out))
            return [np.full_like(loss, bad) for loss in losses], metrics
        return losses, metrics

    monkeypatch.setattr(engine.TrainingModel, 'train_batch', train_batch)
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-data_path', data, '-output', out,
                                                '-opts', *FOLDER_OPTS], capsys)
    assert code == 2
    if batch == 1:
        assert one_error_line(err) == (f'error: the loss is {bad} at epoch 1 step 1: training diverged; no checkpoint '
                                       'was written yet: lower TRAIN.BASE_LR or set TRAIN.GRAD_CLIP, then start again')
        assert not os.path.exists(out / 'last.json')
        return
    assert one_error_line(err) == (f'error: the loss is {bad} at epoch 2 step 2: training diverged; the last good '
                                   f"checkpoint {out / 'last'}.* (after epoch 1) is untouched: lower TRAIN.BASE_LR "
                                   'or set TRAIN.GRAD_CLIP, then resume from it')
    assert snapshot and digests(out) == snapshot and json.load(open(out / 'last.json'))['epoch'] == 1


# ----------------------------------------------------------------------------- full / read-only disk
@pytest.mark.timeout(60)
@pytest.mark.parametrize('fault', ['a file', 'inside a file', 'disk full'])
def test_unwritable_output_is_reported_before_training(tmp_path, monkeypatch, capsys, fault):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    out = {'a file': blocker, 'inside a file': blocker / 'out', 'disk full': tmp_path / 'out'}[fault]
    if fault == 'disk full':
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(checkpoint.os, 'fsync', full)
    monkeypatch.setattr(train_script, 'build_dataset', lambda *a: pytest.fail('training started'))
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-output', out], capsys)
    expected = {
        'a file': f"error: the output folder '{out}' is a file; pass -output with a folder",
        'inside a file': f"error: cannot write to the output folder '{out}' (Not a directory); pass -output with a "
                         'writable folder',
        'disk full': f"error: cannot write to the output folder '{out}' (No space left on device); free disk space "
                     'or pass -output with a folder on another disk'}[fault]
    assert code == 2 and one_error_line(err) == expected


@pytest.mark.timeout(90)
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out'
    data = make_folder(tmp_path / 'images')
    writes, snapshot = [], {}
    original = checkpoint._write

    def write(obj, path, as_json):  # epoch 1 writes 5 files and its journal; epoch 2 fails at its 3rd file
        writes.append(path)
        if len(writes) == 9:
            snapshot.update(digests(out))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        original(obj, path, as_json)

    monkeypatch.setattr(checkpoint, '_write', write)
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-data_path', data, '-output', out,
                                                '-opts', *FOLDER_OPTS], capsys)
    assert code == 2 and one_error_line(err) == (
        f"error: could not write the checkpoint of epoch 2 to '{out}' (No space left on device); the previous "
        'checkpoint there is intact: free disk space, then continue with -resume auto')
    assert snapshot and digests(out) == snapshot and json.load(open(out / 'last.json'))['epoch'] == 1
    assert not [f for f in os.listdir(out) if '.tmp' in f or f == checkpoint.JOURNAL]


# -------------------------------------------------------------------------------------- data faults
def add_bad_files(data):
    """A truncated PNG and a text file named .jpg in the training split; returns their paths."""
    good = open(os.path.join(data, 'train', 'a', '0.png'), 'rb').read()
    truncated = os.path.join(data, 'train', 'a', 'truncated.png')
    open(truncated, 'wb').write(good[:len(good) // 2])
    not_image = os.path.join(data, 'train', 'b', 'notes.jpg')
    open(not_image, 'w').write('not an image')
    return sorted([truncated, not_image])


@pytest.mark.timeout(90)
@pytest.mark.parametrize('workers', [0, 1])
def test_bad_image_stops_the_run_with_its_path(tmp_path, capsys, workers):
    data = make_folder(tmp_path / 'images')
    bad = add_bad_files(data)
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-data_path', data, '-output', tmp_path / 'out',
                                                '-opts', *FOLDER_OPTS, 'DATA.NUM_WORKERS', workers], capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith('error: cannot read image ') and any(f"'{p}'" in line for p in bad)
    assert line.endswith('; or set DATA.SKIP_BAD_IMAGES True to skip unreadable images')


@pytest.mark.timeout(90)
def test_bad_images_are_skipped_and_counted_in_the_log(tmp_path, capsys):
    data = make_folder(tmp_path / 'images')
    bad = add_bad_files(data)
    out = tmp_path / 'out'
    code, _, _ = run_main(train_script.main, ['-cfg', TINY, '-data_path', data, '-output', out, '-opts',
                                              *FOLDER_OPTS, 'DATA.NUM_WORKERS', '1', 'DATA.SKIP_BAD_IMAGES', 'True'],
                          capsys)
    assert code == 0 and json.load(open(out / 'last.json'))['epoch'] == 2
    skipped = [line for line in open(out / 'train.log').read().splitlines() if line.startswith('Skipped')]
    assert len(skipped) == 2  # each bad file once, over both epochs
    assert sorted(p for p in bad for line in skipped if f"'{p}'" in line) == bad
    assert sorted(line.split('; ')[-1] for line in skipped) == [
        '1 skipped so far (DATA.SKIP_BAD_IMAGES).', '2 skipped so far (DATA.SKIP_BAD_IMAGES).']


class FaultyDataset(paddle.io.Dataset):
    """Sample 5 raises (or, with die=True, ends its worker process as the OOM killer would)."""

    def __init__(self, die=False):
        super().__init__()
        self.die, self.parent = die, os.getpid()

    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 5:
            if self.die and os.getpid() != self.parent:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f'broken sample {index}')
        return np.zeros((3, 4, 4), np.float32), np.int64(0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize('workers', [0, 2])
def test_exception_inside_a_dataset_never_hangs(workers):
    loader = engine.build_loader(FaultyDataset(), 4, workers, train=False)
    with pytest.raises(ValueError, match=r'^cannot read sample 5 \(broken sample 5\); or set DATA.SKIP_BAD_IMAGES'):
        list(loader)
    notices = []
    loader = engine.build_loader(FaultyDataset(), 4, workers, train=False, skip_bad=True, log=notices.append)
    assert sum(len(labels) for _, labels in loader) == 16
    assert notices == ['Skipped: cannot read sample 5 (broken sample 5); 1 skipped so far (DATA.SKIP_BAD_IMAGES).']


@pytest.mark.timeout(60)
def test_a_worker_that_dies_is_one_clear_error():
    loader = engine.build_loader(FaultyDataset(die=True), 4, 1, train=False)
    with pytest.raises(cli.TrainingStopped, match='^a data loader worker process died'):
        list(loader)


# ------------------------------------------------------------------------------- bad checkpoints
REPMLPNET = os.path.join(FIXTURES, 'official_repmlpnet_tiny_train.yaml')
TIMM_MIXER = os.path.join(FIXTURES, 'timm_mixer_tiny.pth')


@pytest.fixture(scope='module')
def bad_checkpoints(tmp_path_factory):
    """{(family, fault): path}: for our tiny Mobile-Former (.pdparams), the tiny RepMLPNet
    (.pdparams) and a PyTorch checkpoint for convert (.pth)."""
    folder = tmp_path_factory.mktemp('checkpoints')
    files = {}

    def save(config_file, opts, name):
        path = str(folder / name)
        paddle.save(build_model(get_config(config_file, opts)).state_dict(), path)
        return path

    for family, config_file, other in (('mf', TINY, REPMLPNET), ('repmlpnet', REPMLPNET, TINY)):
        good = open(save(config_file, [], f'{family}.pdparams'), 'rb').read()
        files[family, 'truncated'] = str(folder / f'{family}_truncated.pdparams')
        open(files[family, 'truncated'], 'wb').write(good[:len(good) // 2])
        files[family, 'another model'] = save(other, [], f'{family}_other_model.pdparams')
        files[family, 'another class count'] = save(config_file, ['MODEL.NUM_CLASSES', '7'], f'{family}_7.pdparams')
    source = open(TIMM_MIXER, 'rb').read()
    files['torch', 'truncated'] = str(folder / 'truncated.pth')
    open(files['torch', 'truncated'], 'wb').write(source[:len(source) // 2])
    files['torch', 'another model'] = TIMM_MIXER
    for family in ('mf', 'repmlpnet', 'torch'):
        files[family, 'corrupt'] = str(folder / f'{family}_corrupt.bin')
        open(files[family, 'corrupt'], 'wb').write(np.random.RandomState(1).bytes(4096))
        files[family, 'missing'] = str(folder / f'{family}_missing.pdparams')
    return files


def resume_folder(tmp_path, weights):
    """A -resume prefix whose record is fine and whose weights file is `weights`."""
    (tmp_path / 'last.json').write_text(json.dumps({'epoch': 1, 'history': [], 'best_top1': 0.0}))
    if os.path.exists(weights):
        (tmp_path / 'last.pdparams').write_bytes(open(weights, 'rb').read())
    return str(tmp_path / 'last')


@pytest.mark.timeout(60)
def test_predict_takes_images_after_opts_and_names_the_classes_of_a_data_path(tmp_path, capsys):
    data = make_folder(tmp_path / 'images')
    weights = str(tmp_path / 'w.pdparams')
    paddle.save(build_model(get_config(TINY, FOLDER_OPTS)).state_dict(), weights)
    images = [os.path.join(data, 'val', 'a', '0.png'), os.path.join(data, 'val', 'b', '1.png')]
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', weights, '-data_path', data,
                                                    '-opts', *FOLDER_OPTS, *images], capsys)
    assert code == 0 and err == '', err
    assert [line for line in out.splitlines() if not line.startswith(' ')] == [f'{path}:' for path in images]
    assert {line.split()[1] for line in out.splitlines() if line.startswith(' ')} == {'a', 'b'}


COMMANDS = {  # name: (family of the weights it reads, main, argv for a weights file)
    'train -pretrained': ('mf', train_script.main, lambda w, tmp: ['-cfg', TINY, '-pretrained', w, '-output', tmp / 'o']),
    'train -resume': ('mf', train_script.main, lambda w, tmp: ['-cfg', TINY, '-resume', resume_folder(tmp, w),
                                                               '-output', tmp / 'o']),
    'eval.py': ('mf', eval_script.main, lambda w, tmp: ['-cfg', TINY, '-pretrained', w]),
    'export.py': ('mf', export_script.main, lambda w, tmp: ['-cfg', TINY, '-pretrained', w, '-o', tmp / 'e']),
    'predict.py': ('mf', predict_script.main, lambda w, tmp: ['-cfg', TINY, '-pretrained', w, tmp / 'x.png']),
    'mobileformer.convert': ('torch', convert.main, lambda w, tmp: [w, '-cfg', TINY, '-o', tmp / 'c.pdparams']),
    'mobileformer.reparam': ('repmlpnet', reparam.main, lambda w, tmp: ['-cfg', REPMLPNET, '-pretrained', w,
                                                                        '-o', tmp / 'r.pdparams']),
}
FAULTS = ['truncated', 'corrupt', 'another model', 'another class count', 'missing']
# fine-tuning from another class count is not an error for -pretrained (the classifier restarts)
# nor for convert (the classifier is left out with a notice); a timm Mixer checkpoint is the
# "another model" source for convert
FAULT_WORDS = {'truncated': 'truncated or corrupt',
               'corrupt': 'truncated or corrupt|neither a PyTorch',
               'another model': 'does not fit|is a checkpoint for converter',
               'another class count': r'trained for 7 classes|\[64, 7\]', 'missing': 'does not exist'}
CASES = [(c, f) for c in COMMANDS for f in FAULTS
         if not (f == 'another class count' and c in ('train -pretrained', 'mobileformer.convert'))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('command, fault', CASES)
def test_bad_checkpoint_is_one_sentence(tmp_path, capsys, bad_checkpoints, command, fault):
    family, main, argv = COMMANDS[command]
    weights = bad_checkpoints[family, fault]
    code, _, err = run_main(main, argv(weights, tmp_path), capsys)
    line = one_error_line(err)
    assert code == 2 and re.search(FAULT_WORDS[fault], line), line
    named = 'last.pdparams' if command == 'train -resume' else os.path.basename(weights)
    assert f"{named}'" in line, line


@pytest.mark.timeout(120)
@pytest.mark.parametrize('fault', FAULTS)
def test_the_same_bad_file_gets_the_same_sentence_in_every_command(tmp_path, capsys, bad_checkpoints, fault):
    """Every command that reads Paddle weights reads them through mobileformer.checkpoint."""
    sentences = {}
    for command, (family, main, argv) in COMMANDS.items():
        if family != 'mf' or (command, fault) not in CASES:
            continue
        weights, folder = bad_checkpoints[family, fault], tmp_path / command.replace(' ', '_')
        folder.mkdir()
        _, _, err = run_main(main, argv(weights, folder), capsys)
        line = one_error_line(err)
        named = re.escape(str(tmp_path / 'train_-resume' / 'last.pdparams')) + '|' + re.escape(weights)
        sentences[command] = re.sub(named, 'FILE', line)
    assert len(sentences) >= 4 and len(set(sentences.values())) == 1, sentences


@pytest.mark.timeout(120)
@pytest.mark.parametrize('command', [['train.py', '-h'], ['eval.py', '-h'], ['export.py', '-h'], ['predict.py', '-h'],
                                     ['-m', 'mobileformer.flops', '-cfg', 'configs/mobileformer_26m.yaml']])
def test_commands_print_only_what_the_user_needs(command):
    """No notice of Paddle's (ccache, PIR) or of Python's (runpy) on stderr; a training run's stderr
    is checked by the signal tests (its one line is the stop)."""
    result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    if 'mobileformer.flops' in command:
        assert result.stdout == 'mobileformer_26m: params=3,232,788 MAdds=25.2M at 224x224\n'


@pytest.mark.timeout(120)
def test_export_prints_no_notice_of_paddle(tmp_path):
    weights = str(tmp_path / 'w.pdparams')
    paddle.save(build_model(get_config(TINY)).state_dict(), weights)
    result = subprocess.run([sys.executable, 'export.py', '-cfg', TINY, '-pretrained', weights, '-o', str(tmp_path / 'e')],
                            cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    lines = result.stdout.splitlines()  # what was exported, each runtime's check, the runtime chosen
    assert lines[0].startswith('exported tiny_mobileformer to ') and lines[-1].startswith('runtime: '), lines
    assert not [line for line in lines if 'Paddle2ONNX' in line or line.startswith(('W', 'I'))], lines


@pytest.mark.timeout(150)
def test_predict_with_the_paddle_runtime_prints_only_its_predictions(tmp_path):
    """A fresh process: Paddle 3.3.1 prints a oneDNN reduce_mean notice on fd 1 once per process."""
    config = get_config(os.path.join(FIXTURES, 'timm_mixer_tiny.yaml'))
    folder = str(tmp_path / 'export')
    export_inference(build_for_inference(config), config, folder)
    image = str(tmp_path / 'image.png')
    Image.fromarray(np.random.randint(0, 255, (40, 50, 3), np.uint8)).save(image)
    result = subprocess.run([sys.executable, 'predict.py', '-cfg', os.path.join(FIXTURES, 'timm_mixer_tiny.yaml'),
                             '-model', folder, image, '-opts', 'DATA.DATASET', 'digits'],
                            cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == [f"runtime: paddle (the only installed runtime that can run the export in '{folder}')",
                         f'{image}:'], lines
    assert len(lines) == 7 and all(line.startswith('  ') for line in lines[2:]), lines


@pytest.mark.timeout(150)
def test_a_model_paddle2onnx_cannot_convert_is_one_sentence_and_exports_with_no_onnx(tmp_path):
    """paddle2onnx aborts its process on FNet's FFT: export.py refuses it first in one line, leaves no
    ONNX of an earlier export behind, and -no_onnx gives a paddle export that matches dygraph."""
    cfg = os.path.join(ROOT, 'configs', 'fnet_cifar_64.yaml')
    config = get_config(cfg)
    weights = str(tmp_path / 'fnet.pdparams')
    paddle.save(build_model(config).state_dict(), weights)
    folder = tmp_path / 'export'
    folder.mkdir()
    (folder / 'inference.onnx').write_bytes(b'an earlier export')
    command = [sys.executable, 'export.py', '-cfg', cfg, '-pretrained', weights, '-o', str(folder), '-no_onnx']
    result = subprocess.run(command[:-1], cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 2 and result.stdout == '', result
    assert result.stderr.splitlines() == [
        'error: paddle2onnx cannot convert fnet_cifar_64 (it has no ONNX form of its fft_c2c): export it with '
        '-no_onnx, for the paddle runtime only']
    assert not (folder / 'inference.onnx').exists()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert result.returncode == 0 and result.stderr == '', result.stderr
    assert 'max |paddle - dygraph| on a batch of' in result.stdout
    images = np.random.randn(2, 3, 64, 64).astype(np.float32)
    reference = dygraph_outputs(build_for_inference(config, weights), images)
    assert np.abs(load_runtime('paddle', str(folder))(images) - reference).max() < 1e-4


@pytest.mark.timeout(60)
def test_debug_switch_shows_the_traceback(tmp_path, capsys, monkeypatch, bad_checkpoints):
    argv = ['-cfg', TINY, '-pretrained', bad_checkpoints['mf', 'truncated']]
    with pytest.raises(ValueError, match='is truncated or corrupt'):
        eval_script.main(argv + ['--debug'])
    monkeypatch.setenv(cli.DEBUG_ENV, '1')
    with pytest.raises(ValueError, match='is truncated or corrupt'):
        eval_script.main(argv)
    monkeypatch.delenv(cli.DEBUG_ENV)
    # as a real command: one line without, a traceback with the switch
    command = [sys.executable, '-m', 'mobileformer.reparam', '-cfg', REPMLPNET, '-pretrained',
               bad_checkpoints['repmlpnet', 'corrupt'], '-o', str(tmp_path / 'r.pdparams')]
    quiet = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    errors = [line for line in quiet.stderr.splitlines() if line.startswith('error: ')]
    assert quiet.returncode == 2 and 'Traceback' not in quiet.stderr and len(errors) == 1
    assert 'is truncated or corrupt' in errors[0]
    loud = subprocess.run(command + ['--debug'], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert loud.returncode == 1 and 'Traceback (most recent call last)' in loud.stderr
    assert 'is truncated or corrupt' in loud.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ input validation
def opts(*pairs):
    return lambda tmp: ['-opts', *map(str, pairs)]


def flags(*items):
    return lambda tmp: list(map(str, items))


def folder(per_class=8, classes=('a', 'b'), empty=None, extra=()):
    """A folder dataset (optionally with an empty class folder) for train.py."""
    def argv(tmp):
        data = make_folder(tmp / 'images', per_class=per_class, classes=classes)
        if empty:
            (tmp / 'images' / 'train' / empty).mkdir()
        return ['-data_path', data, '-opts', *FOLDER_OPTS, *extra]  # extra: KEY VALUE overrides
    return argv


VALIDATION = [
    ('unknown key', opts('TRAIN.EPOCH', 3), 'unknown config key TRAIN.EPOCH; did you mean TRAIN.EPOCHS?'),
    ('wrong type', opts('DATA.BATCH_SIZE', 'many'), "DATA.BATCH_SIZE must be of type int (like 64), got str 'many'"),
    ('list for a number', opts('TRAIN.BASE_LR', '[1, 2]'), 'TRAIN.BASE_LR must be of type float'),
    ('section as a value', opts('TRAIN', 3), 'TRAIN is a section; give it a mapping of keys'),
    ('zero image size', opts('DATA.IMAGE_SIZE', 0), 'DATA.IMAGE_SIZE must be > 0, got 0'),
    ('negative image size', opts('DATA.IMAGE_SIZE', -32), 'DATA.IMAGE_SIZE must be > 0, got -32'),
    ('zero batch', flags('-batch_size', 0), 'DATA.BATCH_SIZE must be > 0, got 0'),
    ('negative eval batch', opts('DATA.BATCH_SIZE_EVAL', -1), 'DATA.BATCH_SIZE_EVAL must be > 0, got -1'),
    ('zero epochs', flags('-epochs', 0), 'TRAIN.EPOCHS must be > 0, got 0'),
    ('negative lr', opts('TRAIN.BASE_LR', -0.1), 'TRAIN.BASE_LR must be > 0, got -0.1'),
    ('zero lr', opts('TRAIN.BASE_LR', 0), 'TRAIN.BASE_LR must be > 0, got 0.0'),
    ('zero classes', opts('MODEL.NUM_CLASSES', 0), 'MODEL.NUM_CLASSES must be > 0, got 0'),
    ('zero accumulation', opts('TRAIN.ACCUM_ITER', 0), 'TRAIN.ACCUM_ITER must be > 0, got 0'),
    ('negative workers', opts('DATA.NUM_WORKERS', -2), 'DATA.NUM_WORKERS must be >= 0, got -2'),
    ('negative weight decay', opts('TRAIN.WEIGHT_DECAY', -0.05), 'TRAIN.WEIGHT_DECAY must be >= 0, got -0.05'),
    ('crop above 1', opts('DATA.CROP_PCT', 1.5), 'DATA.CROP_PCT must be in (0, 1], got 1.5'),
    ('EMA decay 1', opts('TRAIN.EMA_DECAY', 1.0), 'TRAIN.EMA_DECAY must be in [0, 1), got 1.0'),
    ('4 channels', opts('DATA.IN_CHANNELS', 4), 'DATA.IN_CHANNELS must be 1 (grey) or 3 (RGB), got 4'),
    ('mean per channel', opts('DATA.MEAN', '[0.5, 0.5]'), 'DATA.MEAN has 2 values but DATA.IN_CHANNELS is 1'),
    ('zero std', opts('DATA.STD', '[0.0]'), 'DATA.STD must be > 0 for every channel, got [0.0]'),
    ('warm-up longer than training', opts('TRAIN.WARMUP_EPOCHS', 5),
     'TRAIN.WARMUP_EPOCHS + TRAIN.COOLDOWN_EPOCHS (5) exceed TRAIN.EPOCHS (2)'),
    ('heads do not divide channels', opts('MODEL.MF.FORMER_HEADS', 5), 'MODEL.MF.TOKEN_DIM=32 is not divisible by'),
    ('empty block table', opts('MODEL.MF.BLOCKS', '[]'), 'MODEL.MF.BLOCKS is empty'),
    ('bad block row', opts('MODEL.MF.BLOCKS', '[[lite, 3, 12]]'), 'must be a row [kind, e1, out, stride, e2]'),
    ('image not divisible by the patch', opts('MODEL.TYPE', 'mixer', 'MODEL.MIXER.PATCH_SIZE', 5),
     'DATA.IMAGE_SIZE 16 is not divisible by'),
    ('unknown model type', opts('MODEL.TYPE', 'resnet'), "'resnet'"),
    ('odd -opts', opts('DATA.BATCH_SIZE'), '-opts takes KEY VALUE pairs; got an odd number of items'),
    ('unknown flag', flags('--lr', 0.1), 'unrecognized arguments: --lr 0.1'),
    ('flag type', flags('-batch_size', 'big'), "argument -batch_size: invalid int value: 'big'"),
    ('missing config', flags('-cfg', 'configs/nope.yaml'), "config 'configs/nope.yaml' does not exist (neither a YAML file nor a shipped config name); pass a YAML file or "
     'a name that mobileformer.list_models() returns'),
    ('resume from nothing', flags('-resume', 'runs/nothing/last'), "cannot resume from 'runs/nothing/last'"),
    ('unknown dataset', flags('-dataset', 'svhn'), "unknown DATA.DATASET 'svhn'"),
    ('missing dataset folder', flags('-dataset', 'folder', '-data_path', '/no/such/folder'),
     "DATA.DATA_PATH '/no/such/folder' is not a folder"),
    ('empty class folder', folder(empty='c', extra=['MODEL.NUM_CLASSES', '3']), 'has no images'),
    ('one class only', folder(classes=('a',)), "only one class ('a') found"),
    ('batch larger than the dataset', folder(per_class=4, extra=['DATA.BATCH_SIZE', '64']),
     'the training set has 8 samples, fewer than one global batch (1 x 64); lower -batch_size'),
    ('classes differ from the dataset', folder(extra=['MODEL.NUM_CLASSES', '3']),
     'the dataset has 2 classes but MODEL.NUM_CLASSES is 3'),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize('make, message', [case[1:] for case in VALIDATION], ids=[case[0] for case in VALIDATION])
def test_bad_input_is_one_clear_message(tmp_path, capsys, monkeypatch, make, message):
    monkeypatch.chdir(ROOT)
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-output', tmp_path / 'out', *make(tmp_path)], capsys)
    assert code == 2 and 'Traceback' not in err
    assert message in err.strip().splitlines()[-1], err


@pytest.mark.timeout(60)
def test_grey_rgba_and_tiny_images_train(tmp_path, capsys):
    data = make_folder(tmp_path / 'images', per_class=4)
    rng = np.random.RandomState(2)
    odd = {'grey.png': (rng.randint(0, 255, (20, 20), dtype=np.uint8), 'L'),
           'rgba.png': (rng.randint(0, 255, (20, 20, 4), dtype=np.uint8), 'RGBA'),
           'one_pixel.png': (rng.randint(0, 255, (1, 1, 3), dtype=np.uint8), 'RGB'),
           'sliver.png': (rng.randint(0, 255, (2, 40, 3), dtype=np.uint8), 'RGB')}
    for split in ('train', 'val'):
        for name, (pixels, mode) in odd.items():
            Image.fromarray(pixels, mode).save(os.path.join(data, split, 'a', name))
    config = get_config(TINY, ['DATA.DATA_PATH', data, *FOLDER_OPTS])
    for split in ('train', 'val'):
        dataset = build_dataset(config, split)
        for index, path in enumerate(dataset.paths):
            if os.path.basename(path) in odd:
                image, label = dataset[index]
                assert image.shape == (3, 16, 16) and image.dtype == np.float32 and np.isfinite(image).all(), path
    code, _, err = run_main(train_script.main, ['-cfg', TINY, '-data_path', data, '-output', tmp_path / 'out',
                                                '-epochs', 1, '-opts', *FOLDER_OPTS, 'AUG.RRC_SCALE', '[0.08, 1.0]'],
                            capsys)
    assert code == 0, err
    assert 'Skipped' not in open(tmp_path / 'out' / 'train.log').read()

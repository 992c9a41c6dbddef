"""Reliability: interruptions (SIGKILL, SIGTERM, SIGINT), divergence, data faults, bad checkpoints,
input validation, full disks and a failing rank never lose work, hang, or end in a traceback."""
import errno
import hashlib
import json
import os
import random
import re
import signal
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
from conftest import CONFIGS, FIXTURES, ROOT
from mobileformer import atomic, build_model, cli, convert, engine, get_config, reparam

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


def run_main(main, argv, capsys):
    """(exit status, stdout, stderr) of a command's main() run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err):
    """The stderr of a failed command: exactly one line, 'error: ...', and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert 'Traceback' not in err and len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0]


def digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.startswith(('last.', 'best.'))}


def load(path):
    return {k: np.asarray(v) for k, v in paddle.load(str(path), return_numpy=True).items()}


def assert_same_weights(a, b):
    a, b = load(a), load(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------- a rank that raises
@pytest.mark.timeout(90)
@pytest.mark.slow
def test_distributed_run_with_a_failing_rank_exits_with_its_error(tmp_path):
    data = make_folder(tmp_path / 'images')
    env = dict(os.environ, MOBILEFORMER_TEST_FAIL_RANK='1')
    command = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
               str(tmp_path / 'log'), 'train.py', '-cfg', TINY, '-data_path', data, '-output', str(tmp_path / 'out'),
               '-opts', *FOLDER_OPTS, 'DATA.BATCH_SIZE', '4']
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=80, env=env)
    elapsed = time.time() - started
    assert result.returncode != 0 and elapsed < 60, (result.returncode, elapsed)
    # the launcher shows the tail of the worker log it names: rank 1's own, or rank 0's, which fails
    # waiting for rank 1 and ends with rank 1's error (mobileformer.cli)
    shown = result.stdout + result.stderr
    named = re.search(r'log (\S+workerlog\.\d)', shown)
    assert named, shown[-2000:]
    named_tail = open(named.group(1)).read().strip().splitlines()[-1]
    injected = 'RuntimeError: test failure injected on rank 1 at step 1'
    assert injected in shown or named_tail.startswith(f'error: rank 1: {injected}'), (shown[-2000:], named_tail)

import importlib.util
import multiprocessing
import os
import random
import sys

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
CONFIGS = os.path.join(ROOT, 'configs')


def load_example(name):
    """A script of examples/ as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'examples', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(autouse=True)
def _seeded():
    paddle.seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def pytest_configure(config):
    """MOBILEFORMER_REQUIRE_OPENVINO=1 (CI): the tests of the OpenVINO runtime must not skip."""
    if os.environ.get('MOBILEFORMER_REQUIRE_OPENVINO') == '1' and importlib.util.find_spec('openvino') is None:
        raise pytest.UsageError('MOBILEFORMER_REQUIRE_OPENVINO=1 but openvino is not installed: pip install openvino')


def pytest_collection_modifyitems(config, items):
    """Tests marked `openvino` run last. OpenVINO's thread pool does not survive fork(): once it is
    loaded in the pytest process, a data-loader worker forked by a later training test crashes
    (SIGSEGV) and takes the session with it."""
    late = [item for item in items if item.get_closest_marker('openvino')]
    items[:] = [item for item in items if not item.get_closest_marker('openvino')] + late


_exit_status = []


def pytest_sessionfinish(session, exitstatus):
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends a session that loaded OpenVINO with the tests' status and without the exit handlers:
    after the full suite (Paddle, its custom kernels, data-loader workers, OpenVINO in one process)
    they crashed with SIGSEGV once every test had passed, and the status was 139."""
    if 'openvino' in sys.modules and _exit_status:
        # data-loader workers still alive: the skipped exit handlers would have stopped them
        for child in multiprocessing.active_children():
            child.terminate()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])

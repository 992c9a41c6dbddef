import os
import random
import sys

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
CONFIGS = os.path.join(ROOT, 'configs')


@pytest.fixture(autouse=True)
def _seeded():
    paddle.seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked `openvino` run last. OpenVINO's thread pool does not survive fork(): once it is
    loaded in the pytest process, a data-loader worker forked by a later training test crashes
    (SIGSEGV) and takes the session with it."""
    late = [item for item in items if item.get_closest_marker('openvino')]
    items[:] = [item for item in items if not item.get_closest_marker('openvino')] + late

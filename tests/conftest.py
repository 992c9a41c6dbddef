import os
import random

import numpy as np
import paddle
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
CONFIGS = os.path.join(ROOT, 'configs')


@pytest.fixture(autouse=True)
def _seeded():
    paddle.seed(0)
    np.random.seed(0)
    random.seed(0)
    yield

"""Test helpers shared by the re-parameterisation families (RepMLPNet, RepMLP-ResNet)."""
import contextlib
import json
import os

import numpy as np
import paddle
import paddle.nn as nn

from conftest import FIXTURES
from mobileformer import build_model


def randomise_batchnorms(model: nn.Layer, seed: int = 0) -> None:
    """Gives every BatchNorm non-trivial affine parameters and running statistics, so that folding
    them is actually exercised (fresh BNs are the identity in eval mode)."""
    rng = np.random.default_rng(seed)
    for layer in model.sublayers():
        if isinstance(layer, nn.layer.norm._BatchNormBase):
            n = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, n).astype('float32'))
            layer.bias.set_value(rng.normal(0, 0.2, n).astype('float32'))
            layer._mean.set_value(rng.normal(0, 0.2, n).astype('float32'))
            layer._variance.set_value(rng.uniform(0.5, 2.0, n).astype('float32'))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest expected magnitude."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@contextlib.contextmanager
def constant_init():
    """Builds full-size models fast (no random number generation) for MAdds counting."""
    paddle.nn.initializer.set_global_initializer(paddle.nn.initializer.Constant(0.01),
                                                 paddle.nn.initializer.Constant(0.0))
    try:
        yield
    finally:
        paddle.nn.initializer.set_global_initializer(None, None)


def reference_keys(name: str) -> dict:
    """{key: shape} of a reference state dict from tests/fixtures/keys/<name>.json."""
    with open(os.path.join(FIXTURES, 'keys', name + '.json')) as f:
        return {k: tuple(shape) for k, shape in json.load(f)['keys']}


def synthetic_state(keys: dict) -> dict:
    """A reference-layout state with exactly `keys` (zeros: calloc'd lazily, so cheap at full size)."""
    return {k: np.zeros(shape, dtype='int64' if k.endswith('num_batches_tracked') else 'float32')
            for k, shape in keys.items()}


def lazy_model(config):
    """The model of `config` with shapes only: counting and key checks need no initialised weights."""
    with paddle.LazyGuard():
        return build_model(config)


def eval_output(model: nn.Layer, x: np.ndarray) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def state_shapes(model: nn.Layer) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_fixture(tag: str):
    """(state dict, io) of tests/fixtures/<tag>_state.npz and <tag>_io.npz."""
    state = dict(np.load(os.path.join(FIXTURES, tag + '_state.npz')))
    io = np.load(os.path.join(FIXTURES, tag + '_io.npz'))
    return state, io

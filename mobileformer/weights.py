"""Checking a state dict against a model, loading `.pdparams`, and saving them atomically."""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from mobileformer import atomic

_LISTED = 8  # keys named per kind of problem before "... and N more"


def list_names(keys: Iterable[str], limit: int = _LISTED) -> str:
    """The first `limit` names, comma-separated, then "... and N more"."""
    keys = list(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def state_shapes(model: nn.Layer) -> Dict[str, tuple]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def mismatches(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> Dict[str, tuple]:
    """{key: (given shape, expected shape)} for keys present in both with different shapes."""
    return {k: (tuple(state[k].shape), expected[k]) for k in state
            if k in expected and tuple(state[k].shape) != expected[k]}


def check_state(state: Mapping[str, np.ndarray], model: nn.Layer, what: str, allow_missing=(),
                hint: Optional[str] = None) -> None:
    """Raises one ValueError listing every missing (beyond `allow_missing`), unexpected and
    mis-shaped key of `state`, ending with `hint` (default: check that the config matches)."""
    expected = state_shapes(model)
    missing = [k for k in expected if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in expected]
    wrong = mismatches(state, expected)
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing ({list_names(missing)})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected ({list_names(unexpected)})')
    if wrong:
        problems.append(f'{len(wrong)} with a wrong shape ('
                        + list_names(f'{k}: {list(a)} vs model {list(b)}' for k, (a, b) in wrong.items()) + ')')
    if problems:
        raise ValueError(f'{what} does not fit the model: ' + '; '.join(problems)
                         + '; ' + (hint or 'check that the config matches the weights'))


def classifier_keys(model: nn.Layer) -> List[str]:
    """The state-dict keys of `model.get_classifier()`."""
    classifier = model.get_classifier()
    prefix = next(name for name, layer in model.named_sublayers() if layer is classifier)
    return [f'{prefix}.{key}' for key in classifier.state_dict()]


def classifier_to_drop(state: Mapping[str, np.ndarray], model: nn.Layer) -> Tuple[List[str], Optional[int]]:
    """The classifier entries of `state` trained for another class count than `model` has (they
    are left out when fine-tuning), and that class count; ([], None) when the classifier fits.
    Only the layer `get_classifier()` names can be dropped: any other mismatch is the caller's error."""
    expected = state_shapes(model)
    keys = [k for k in classifier_keys(model) if k in state and tuple(np.shape(state[k])) != expected[k]]
    if not keys:
        return [], None
    # a Paddle Linear: weight [in, classes], bias [classes]
    return keys, int(np.shape(state[keys[0]])[-1])


def read_pdparams(path: str) -> Dict[str, np.ndarray]:
    """A Paddle state dict file as numpy; accepts a training checkpoint that nests it under `model`."""
    if not os.path.isfile(path):
        raise ValueError(f"weights file '{path}' does not exist")
    try:
        state = paddle.load(path, return_numpy=True)
    except Exception as e:  # paddle raises assorted types on a file it cannot parse
        raise ValueError(f"'{path}' is not a Paddle weights file ({type(e).__name__}); "
                         f"convert PyTorch weights with python -m mobileformer.convert first") from None
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"'{path}' does not hold a state dict of arrays")
    return state


def load_weights(model: nn.Layer, path: str) -> nn.Layer:
    """Loads `.pdparams` into `model` after checking every key and shape; returns the model."""
    state = read_pdparams(path)
    check_state(state, model, f"weights '{path}'")
    model.set_state_dict(cast_like(state, model))
    return model


def cast_like(state: Mapping[str, np.ndarray], model: nn.Layer) -> Dict[str, np.ndarray]:
    """`state` with each array in the dtype of the model's tensor (e.g. float64 -> float32)."""
    dtypes = {k: np.dtype(str(v.dtype).split('.')[-1]) for k, v in model.state_dict().items()}
    return {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False) for k, v in state.items()}


def save_atomic(state: Mapping[str, np.ndarray], path: str) -> None:
    """paddle.save of a state dict (numpy or tensors) that never leaves `path` half written."""
    atomic.write_file({k: paddle.to_tensor(v) for k, v in state.items()}, path)

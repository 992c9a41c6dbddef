"""Weights and checkpoint files: one reader, one checker, one crash-safe writer for every command.

Reading: `read_file` (paddle.load or JSON) and `read_state_dict` (a `.pdparams` as numpy arrays,
also when a training checkpoint nests it under `model` or `state_dict`) say what is wrong with a
file in one sentence, the same sentence in every command.

Checking: `fit_state` compares a state dict with a model. Strictly, every key and shape must match
(evaluation, export, prediction, folding, resuming); with `drop_classifier`, the layer the model's
`get_classifier()` names may have been trained for another class count and is left out
(fine-tuning); with `adapt_input`, the conv that reads the image (`input_conv_name`) may have been
trained on another channel count and its kernel is adapted (`adapt_input_kernel`, as timm does).
Each is announced in a one-line notice. A feature extractor (mobileformer.models.backbone) takes a
classifier's checkpoint but the head layers it does not hold. Any other difference names the tensor and both shapes.

Writing: `write_file` writes one file atomically (a temporary next to it, flushed, then renamed).
`write_together` commits a set of files (weights, optimizer, EMA, the JSON record) as one unit with
a redo journal: every file is first written in full to a temporary and flushed; then a journal
naming the renames is written atomically; then the renames happen and the journal is deleted. A
process killed at any point leaves either the previous set (no journal yet: `recover` deletes the
temporaries) or the new one (`recover` finishes the renames), never a mix of epochs or a
half-written file.
"""
from __future__ import annotations

import errno
import json
import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn

from mobileformer.config import COMMAND_LINE, Overrides

JOURNAL = 'checkpoint.journal'
_TEMPORARY = re.compile(r'\.tmp\d+$')
_LISTED = 8  # keys named per kind of problem before "... and N more"

StateDict = Dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------ reading
def read_file(path: str, **load_kwargs):
    """paddle.load (json for .json) of `path`, with one sentence for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file '{path}' does not exist; check the path")
    try:
        if path.endswith('.json'):
            with open(path, encoding='utf-8') as f:
                return json.load(f)
        return paddle.load(path, **load_kwargs)
    except Exception as e:  # paddle raises assorted types on a truncated or foreign file
        raise ValueError(f"checkpoint file '{path}' is truncated or corrupt ({type(e).__name__}); replace it, "
                         'or convert PyTorch weights with python -m mobileformer.convert') from None


def read_state_dict(path: str) -> StateDict:
    """The weights in a `.pdparams` file (`path` may omit the suffix) as numpy arrays."""
    if not path.endswith('.pdparams') and os.path.exists(path + '.pdparams'):
        path += '.pdparams'
    state = read_file(path, return_numpy=True)
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ValueError(f"checkpoint file '{path}' does not hold a state dict of weights; pass a .pdparams "
                         'file written by paddle.save(model.state_dict())')
    return state


# ----------------------------------------------------------------------------------------- checking
def list_names(keys: Iterable[str], limit: int = _LISTED) -> str:
    """The first `limit` names, comma-separated, then "... and N more"."""
    keys = list(keys)
    more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def state_shapes(model: nn.Layer) -> Dict[str, tuple]:
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def removed_from(model: nn.Layer, key: str) -> bool:
    """Whether `key` belongs to a layer a feature extractor dropped (mobileformer.models.backbone)."""
    return any(key == name or key.startswith(name + '.') for name in getattr(model, 'removed_layers', ()))


def classifier_keys(model: nn.Layer) -> List[str]:
    """The state-dict keys of `model.get_classifier()` (none in a feature extractor)."""
    if removed_from(model, model.classifier_name):
        return []
    classifier = model.get_classifier()
    prefix = next(name for name, layer in model.named_sublayers() if layer is classifier)
    return [f'{prefix}.{key}' for key in classifier.state_dict()]


def classifier_to_drop(state: Mapping[str, np.ndarray], model: nn.Layer) -> Tuple[List[str], Optional[int]]:
    """The classifier entries of `state` trained for another class count than `model` has, and
    that class count; ([], None) when the classifier fits."""
    expected = state_shapes(model)
    # a Paddle Linear: weight [in, classes], bias [classes]; a classifier of the same class count
    # whose input width differs is a model that does not fit (check_state names it), not this
    keys = [k for k in classifier_keys(model)
            if k in state and np.ndim(state[k]) == len(expected[k]) and np.shape(state[k])[-1] != expected[k][-1]]
    if not keys:
        return [], None
    return keys, int(np.shape(state[keys[0]])[-1])


def check_state(state: Mapping[str, np.ndarray], model: nn.Layer, what: str, allow_missing: Iterable[str] = (),
                hint: Optional[str] = None) -> None:
    """Raises one ValueError listing every missing (beyond `allow_missing`), unexpected and
    mis-shaped key of `state`, ending with `hint` (default: check that the config matches)."""
    expected, allowed = state_shapes(model), set(allow_missing)
    missing = [k for k in expected if k not in state and k not in allowed]
    unexpected = [k for k in state if k not in expected]
    wrong = {k: (tuple(np.shape(state[k])), expected[k]) for k in state
             if k in expected and tuple(np.shape(state[k])) != expected[k]}
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


def adapt_input_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """The kernel [out, in, kh, kw] of a conv that reads `in`-channel images, for `channels`-channel
    ones (timm's rule): onto 1 channel, summed over its channels; onto more, repeated over them, cut
    to `channels` and scaled by in / channels. Either way a grey image copied into every channel
    gives the activations the trained kernel gave it."""
    trained = kernel.shape[1]
    if channels == 1:
        return kernel.sum(axis=1, keepdims=True)
    repeated = np.tile(kernel, (1, -(-channels // trained), 1, 1))[:, :channels]
    return (repeated * (trained / channels)).astype(kernel.dtype)


def input_to_adapt(state: Mapping[str, np.ndarray], model: nn.Layer) -> Optional[str]:
    """The key of the image-reading kernel when `state` has it for another input-channel count
    (every other dimension equal), else None."""
    key = f'{model.input_conv_name}.weight'
    ours, theirs = state_shapes(model).get(key), tuple(np.shape(state[key])) if key in state else None
    if ours is None or theirs is None or len(theirs) != 4 or theirs == ours:
        return None
    return key if theirs[:1] + theirs[2:] == ours[:1] + ours[2:] else None


def fit_state(state: StateDict, model: nn.Layer, path: str, drop_classifier: bool = False,
              adapt_input: bool = False, overrides: Overrides = COMMAND_LINE,
              hint: Optional[str] = None) -> Tuple[StateDict, List[str], List[str]]:
    """(`state` ready for `model.set_state_dict`, the classifier keys left out, the notices saying
    what was adapted). Without `drop_classifier` a classifier for another class count is an error
    naming both counts and how the caller sets the class count (`overrides`); without `adapt_input`
    an input conv for another channel count is one of the wrong shapes `check_state` lists. `hint`
    ends the error of a state that does not fit (default: check the config)."""
    dropped, classes = classifier_to_drop(state, model)
    if dropped and not drop_classifier:
        ours = state_shapes(model)[dropped[0]][-1]
        raise ValueError(f"'{path}' was trained for {classes} classes but MODEL.NUM_CLASSES is {ours}; pass "
                         f"{overrides.spell('MODEL.NUM_CLASSES', classes)} or a matching checkpoint")
    # a feature extractor leaves out the head layers it dropped, and with them the classifier
    kept = {k: v for k, v in state.items() if k not in dropped and not removed_from(model, k)}
    notices = []
    adapted = input_to_adapt(kept, model) if adapt_input else None
    if adapted:
        trained, channels = np.shape(kept[adapted])[1], state_shapes(model)[adapted][1]
        kept[adapted] = adapt_input_kernel(np.asarray(kept[adapted]), channels)
        how = 'summed over its channels' if channels == 1 else f'repeated over the channels and scaled by {trained}/{channels}'
        notices.append(f"Notice: '{path}' was trained on {trained}-channel images, the model takes {channels}: "
                       f'the kernel of the first layer ({adapted}) is {how} (fine-tuning).')
    check_state(kept, model, f"'{path}'", allow_missing=dropped,
                hint=hint or f'check that {overrides.config} matches the checkpoint')
    if dropped:
        notices.append(f"Notice: '{path}' was trained for {classes} classes, the model has "
                       f'{state_shapes(model)[dropped[0]][-1]}: the classifier ({", ".join(dropped)}) starts from '
                       'scratch (fine-tuning).')
        # the new classifier keeps its initial values: given in full, the state loads without
        # Paddle's "Skip loading for ..." warning per left-out tensor
        own = model.state_dict()
        kept.update({key: own[key].numpy() for key in dropped})
    return cast_like(kept, model), dropped, notices


def cast_like(state: Mapping[str, np.ndarray], model: nn.Layer) -> StateDict:
    """`state` with each array in the dtype of the model's tensor (e.g. float64 -> float32)."""
    dtypes = {k: np.dtype(str(v.dtype).split('.')[-1]) for k, v in model.state_dict().items()}
    return {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False) for k, v in state.items()}


def load_state(model: nn.Layer, state: StateDict, path: str, drop_classifier: bool = False,
               adapt_input: bool = False, log: Callable[[str], None] = print,
               overrides: Overrides = COMMAND_LINE, hint: Optional[str] = None) -> List[str]:
    """Loads `state` (read from `path`) into `model` after `fit_state`; what fine-tuning adapted
    (`drop_classifier`, `adapt_input`) is announced through `log`. Returns the classifier keys left
    out (they keep the model's initial values)."""
    state, dropped, notices = fit_state(state, model, path, drop_classifier, adapt_input, overrides, hint)
    model.set_state_dict(state)
    for notice in notices:
        log(notice)
    return dropped


def load_weights(model: nn.Layer, path: str, drop_classifier: bool = False, adapt_input: bool = False,
                 log: Callable[[str], None] = print, overrides: Overrides = COMMAND_LINE) -> List[str]:
    """Loads the `.pdparams` at `path` into `model` (see `load_state`). Returns the keys left out."""
    return load_state(model, read_state_dict(path), path, drop_classifier, adapt_input, log, overrides)


# ------------------------------------------------------------------------------------------ writing
def _fsync(path: str) -> None:
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _write(obj, path: str, as_json: bool) -> None:
    """Writes `obj` (as JSON or with paddle.save) and flushes it to disk."""
    if as_json:
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(obj, f, indent=1)
    else:
        paddle.save(obj, path)
    _fsync(path)


def temporary_path(path: str) -> str:
    return f'{path}.tmp{os.getpid()}'


def write_file(obj, path: str) -> None:
    """Writes one file atomically: in full to a temporary next to `path`, flushed, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = temporary_path(path)
    try:
        _write(obj, temporary, as_json=path.endswith('.json'))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_weights(state: Mapping[str, np.ndarray], path: str) -> None:
    """paddle.save of a state dict (numpy or tensors) that never leaves `path` half written."""
    write_file({k: paddle.to_tensor(v) for k, v in state.items()}, path)


def write_together(items: Dict[str, object], before_commit: Optional[Callable[[], None]] = None) -> None:
    """Commits every `{path: object}` at once (see the module docstring). All paths share a folder.
    On an error (e.g. a full disk) the temporaries are removed and the previous files stay.
    `before_commit` runs with every temporary written, just before the commit point."""
    folder = os.path.dirname(os.path.abspath(next(iter(items))))
    renames = {}
    try:
        for path, obj in items.items():
            renames[temporary_path(path)] = os.path.abspath(path)
            _write(obj, temporary_path(path), as_json=path.endswith('.json'))
        if before_commit is not None:
            before_commit()
        journal = os.path.join(folder, JOURNAL)
        _write(renames, temporary_path(journal), as_json=True)
        os.replace(temporary_path(journal), journal)  # the commit point
    except BaseException:
        for temporary in renames:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise
    recover(folder)


def recover(folder: str) -> List[str]:
    """Completes a commit whose journal exists and deletes temporaries of an uncommitted one;
    returns the files it renamed into place (empty when there was nothing to finish)."""
    journal = os.path.join(folder, JOURNAL)
    renamed = []
    if os.path.exists(journal):
        with open(journal, encoding='utf-8') as f:
            renames = json.load(f)
        for temporary, target in renames.items():
            if os.path.exists(temporary):  # absent: renamed before the interruption
                os.replace(temporary, target)
                renamed.append(target)
        os.remove(journal)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _TEMPORARY.search(name):
                os.remove(os.path.join(folder, name))
    return renamed


def check_writable(folder: str) -> None:
    """Creates `folder` and writes, flushes and deletes a small file in it, so a read-only folder or
    a full disk is reported before training starts rather than at the first checkpoint."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OSError(f"the output folder '{folder}' is a file; pass -output with a folder") from None
    probe = os.path.join(folder, temporary_path('.write_test'))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'wb') as f:
            f.write(b'\0' * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        remedy = ('free disk space or pass -output with a folder on another disk'
                  if e.errno in (errno.ENOSPC, errno.EDQUOT) else 'pass -output with a writable folder')
        raise OSError(f"cannot write to the output folder '{folder}' ({e.strerror or e}); {remedy}") from None

"""Writes checkpoints in torch's zip layout without torch, for tests: tensors with arbitrary
storage offsets and strides, any storage dtype, and hand-made pickles (e.g. malicious ones)."""
from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Sequence

import numpy as np

STORAGE_NAMES = {np.dtype(np.float64): 'DoubleStorage', np.dtype(np.float32): 'FloatStorage',
                 np.dtype(np.float16): 'HalfStorage', np.dtype(np.int64): 'LongStorage',
                 np.dtype(np.int32): 'IntStorage', np.dtype(np.uint8): 'ByteStorage',
                 np.dtype(np.int8): 'CharStorage', np.dtype(np.bool_): 'BoolStorage'}


class Global:
    """A reference to `module.name` written as a GLOBAL opcode, whatever Python has under that name."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise AssertionError('never called')


class Call:
    """Pickles as `func(*args)`."""

    def __init__(self, func: Any, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    """A flat storage: `data` is the element array; `dtype_name` the torch storage class."""

    def __init__(self, key: str, data: np.ndarray, dtype_name: str | None = None):
        self.key, self.data = key, data
        self.dtype_name = dtype_name or STORAGE_NAMES[data.dtype]


def tensor(storage: Storage, offset: int, size: Sequence[int], stride: Sequence[int]) -> Call:
    return Call(Global('torch._utils', '_rebuild_tensor_v2'),
                (storage, offset, tuple(size), tuple(stride), False, OrderedDict()))


def parameter(t: Call) -> Call:
    return Call(Global('torch._utils', '_rebuild_parameter'), (t, True, OrderedDict()))


class _Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_global_ref(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())

    dispatch[Global] = save_global_ref

    def persistent_id(self, obj: Any):
        if isinstance(obj, Storage):
            return ('storage', Global('torch', obj.dtype_name), obj.key, 'cpu', obj.data.size)
        return None


def _storages(obj: Any, found: Dict[str, Storage]) -> Dict[str, Storage]:
    if isinstance(obj, Storage):
        found[obj.key] = obj
    elif isinstance(obj, Call):
        _storages(obj.args, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, found)
    return found


def save(path: str, obj: Any, top: str = 'archive', byteorder: str = 'little') -> None:
    """Writes `obj` (dicts, Calls, Storages, plain values) as a torch zip checkpoint."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
        archive.writestr(f'{top}/data.pkl', buffer.getvalue())
        archive.writestr(f'{top}/byteorder', byteorder)
        for key, storage in _storages(obj, {}).items():
            data = storage.data.astype(storage.data.dtype.newbyteorder('<' if byteorder == 'little' else '>'))
            archive.writestr(f'{top}/data/{key}', data.tobytes())
        archive.writestr(f'{top}/version', '3\n')


def save_state_dict(path: str, state: Dict[str, np.ndarray], wrap_key: str | None = None) -> None:
    """A contiguous torch zip checkpoint of `state`, optionally inside {wrap_key: state}."""
    entries = OrderedDict()
    for i, (name, value) in enumerate(state.items()):
        value = np.ascontiguousarray(value)
        stride = [int(s // value.itemsize) for s in value.strides] if value.size else [1] * value.ndim
        entries[name] = tensor(Storage(str(i), value.reshape(-1)), 0, value.shape, stride)
    save(path, {wrap_key: entries} if wrap_key else entries)

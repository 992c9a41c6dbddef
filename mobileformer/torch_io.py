"""Reads PyTorch checkpoints into numpy arrays without torch, and without running any code they hold.

Two formats:
- torch's zip format (torch >= 1.6): `<top>/data.pkl` is a pickle whose tensors point at raw
  storages `<top>/data/<key>`; `<top>/byteorder` says how those bytes are ordered. The pickle is read
  by a restricted unpickler that only resolves the globals tensor rebuilding needs, so a checkpoint
  that references anything else (`os.system`, `builtins.eval`, a user class) is refused unread.
- `.safetensors`: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

`load_state_dict(path)` returns {name: np.ndarray} with PyTorch names and layouts; float16 and
bfloat16 tensors come back as float32 (numpy has no bfloat16), other dtypes unchanged.
`to_paddle_layout(state, rename)` is the one PyTorch -> Paddle transform every converter uses.

    python -m mobileformer.torch_io CHECKPOINT     # lists keys, shapes and dtypes
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from mobileformer.cli import CommandParser

# Where a training checkpoint keeps its weights, in the order they are looked for.
STATE_DICT_KEYS = ('state_dict', 'state_dict_ema', 'model')

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': np.uint16,  # raw bits; widened to float32 after slicing
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}

# Plain containers and scalars a checkpoint may hold next to its tensors (epoch, arch name, ...).
_SAFE_BUILTINS = frozenset({'dict', 'list', 'tuple', 'set', 'frozenset', 'int', 'float', 'complex',
                            'str', 'bytes', 'bytearray', 'bool', 'slice'})

_LEGACY_HINT = ("re-save it with torch>=1.6: torch.save(torch.load(path), out, "
                "_use_new_zipfile_serialization=True)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot (or must not) be read."""


class _StorageType:
    """Stands in for `torch.<X>Storage` in the pickle: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One flat storage read from `data/<key>`; `bfloat16` marks raw bf16 bits."""

    def __init__(self, array: np.ndarray, bfloat16: bool):
        self.array = array
        self.bfloat16 = bfloat16


def _widen(array: np.ndarray, bfloat16: bool) -> np.ndarray:
    """bf16 bits / float16 -> float32; everything else as stored."""
    if bfloat16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    return array


def _rebuild_tensor(storage: _Storage, offset: int, size: Sequence[int], stride: Sequence[int],
                    *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a strided view into a storage, copied out (bounds checked)."""
    if not isinstance(storage, _Storage):
        raise CheckpointError('corrupt checkpoint: a tensor is rebuilt from something that is not a storage')
    size, stride = tuple(size), tuple(stride)
    if (len(size) != len(stride) or not all(isinstance(v, int) and v >= 0 for v in (offset,) + size + stride)):
        raise CheckpointError(f'corrupt checkpoint: invalid tensor geometry size={size} stride={stride} offset={offset}')
    flat = storage.array
    if 0 in size:
        return _widen(np.empty(size, dtype=flat.dtype), storage.bfloat16)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise CheckpointError(f'corrupt checkpoint: a tensor of size {size} reaches element {last} '
                              f'of a storage holding {flat.size}')
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=[s * flat.itemsize for s in stride], writeable=False)
    return _widen(np.array(view), storage.bfloat16)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
    """torch._utils._rebuild_parameter: a Parameter is just its data here."""
    return data


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; storages are read lazily from the zip."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module in ('builtins', '__builtin__') and name in _SAFE_BUILTINS:
            return getattr(__import__('builtins'), name)
        module = 'builtins' if module == '__builtin__' else module  # protocol-2 spelling
        raise CheckpointError(f"refusing to load: the checkpoint references the global '{module}.{name}', "
                              f"which is not part of a tensor state dict (loading it could run code)")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
                and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f'corrupt checkpoint: unexpected persistent id {pid!r:.80}')
        _, storage_type, key, _, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(str(key), storage_type, numel)
        return self._storages[key]

    def _read_storage(self, key: str, storage_type: _StorageType, numel: int) -> _Storage:
        name = f'{self._prefix}data/{key}'
        try:
            raw = self._archive.read(name)
        except KeyError:
            raise CheckpointError(f'corrupt checkpoint: storage {name} is missing from the archive') from None
        dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
        if len(raw) < numel * dtype.itemsize:
            raise CheckpointError(f'corrupt checkpoint: storage {name} holds {len(raw)} bytes, '
                                  f'{numel * dtype.itemsize} expected')
        array = np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder('='))
        return _Storage(array, storage_type.name == 'BFloat16Storage')


def _read_zip_checkpoint(path: str) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') <= 1]
            if len(pickles) != 1:
                raise CheckpointError(f"'{path}' is a zip file but not a PyTorch checkpoint "
                                      f"(no single <folder>/data.pkl inside)")
            prefix = pickles[0][:-len('data.pkl')]
            names = set(archive.namelist())
            byteorder = (archive.read(prefix + 'byteorder').decode().strip()
                         if prefix + 'byteorder' in names else 'little')
            if byteorder not in ('little', 'big'):
                raise CheckpointError(f"corrupt checkpoint '{path}': byteorder is {byteorder!r}")
            return _RestrictedUnpickler(archive.read(pickles[0]), archive, prefix, byteorder).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError,
            IndexError, KeyError, AttributeError) as e:
        raise CheckpointError(f"'{path}' is a truncated or corrupt checkpoint ({e}); download or save it again") from None


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    with open(path, 'rb') as f:
        blob = f.read()
    corrupt = f"'{path}' is a truncated or corrupt safetensors file"
    if len(blob) < 8:
        raise CheckpointError(f'{corrupt} (shorter than its 8-byte header length)')
    (header_len,) = struct.unpack('<Q', blob[:8])
    if 8 + header_len > len(blob):
        raise CheckpointError(f'{corrupt} (header of {header_len} bytes runs past the end)')
    try:
        header = json.loads(blob[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{corrupt} (header is not JSON: {e})') from None
    data = memoryview(blob)[8 + header_len:]
    state = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        if info.get('dtype') not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"'{path}': tensor {name} has dtype {info.get('dtype')!r}, which this reader "
                                  f"does not handle ({', '.join(_SAFETENSORS_DTYPES)})")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
        begin, end = info['data_offsets']
        shape = tuple(info['shape'])
        if not 0 <= begin <= end <= len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointError(f'{corrupt} (tensor {name}: bytes {begin}..{end} do not fit shape {shape})')
        array = np.frombuffer(data[begin:end], dtype=dtype).astype(dtype.newbyteorder('=')).reshape(shape)
        state[name] = _widen(array, info['dtype'] == 'BF16')
    return state


def load_checkpoint(path: str) -> Any:
    """Returns the whole checkpoint object, tensors as numpy arrays."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.endswith('.safetensors'):
        return _read_safetensors(path)
    with open(path, 'rb') as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        return _read_zip_checkpoint(path)
    if head.startswith(b'PK'):
        raise CheckpointError(f"'{path}' is a truncated or corrupt zip checkpoint; download or save it again")
    if head[:1] == b'\x80':
        raise CheckpointError(f"'{path}' is a legacy (non-zip) torch checkpoint, which is not read for "
                              f"safety; {_LEGACY_HINT}")
    raise CheckpointError(f"'{path}' is neither a PyTorch zip checkpoint nor a .safetensors file")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def select_state_dict(checkpoint: Any, key: Optional[str] = None, source: str = 'checkpoint') -> Dict[str, np.ndarray]:
    """Picks the state dict inside a checkpoint: `key` if given, else the checkpoint itself when it
    only holds tensors, else the first of STATE_DICT_KEYS present. Strips a DataParallel `module.`
    prefix shared by every key."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a dict of tensors')
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"{source} has no entry {key!r}; its entries: {', '.join(map(str, checkpoint))}")
        state = checkpoint[key]
    elif _is_state_dict(checkpoint):
        state = checkpoint
    else:
        found = [k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)]
        if not found:
            raise CheckpointError(f"{source} holds no state dict: expected tensors or one of "
                                  f"{', '.join(STATE_DICT_KEYS)}; its entries: {', '.join(map(str, checkpoint))}")
        state = checkpoint[found[0]]
    if not _is_state_dict(state):
        raise CheckpointError(f'{source}: the selected entry is not a non-empty dict of tensors')
    state = {str(k): v for k, v in state.items()}
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def load_state_dict(path: str, key: Optional[str] = None) -> Dict[str, np.ndarray]:
    """{PyTorch name: numpy array} from a .pth/.pth.tar/.bin/.safetensors file (see select_state_dict)."""
    return select_state_dict(load_checkpoint(path), key, source=f"checkpoint '{path}'")


_BN_STATISTICS = {'running_mean': '_mean', 'running_var': '_variance'}


def to_paddle_layout(state: Dict[str, np.ndarray], rename: Callable[[str], Optional[str]] = lambda key: key
                     ) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """PyTorch state dict -> Paddle's names and layouts: `num_batches_tracked` is dropped, BatchNorm
    running statistics become `_mean` / `_variance`, `rename` maps the rest to a family's names
    (None: no place in the model), and Linear weights (2-D `.weight`) go from [out, in] to [in, out].
    Returns (the converted state, the keys `rename` found no place for)."""
    converted, unplaced = {}, []
    for key, value in state.items():
        *parent, leaf = key.split('.')
        if leaf == 'num_batches_tracked':
            continue
        ours = rename('.'.join(parent + [_BN_STATISTICS.get(leaf, leaf)]))
        if ours is None:
            unplaced.append(key)
            continue
        value = np.asarray(value, dtype=np.float32)
        converted[ours] = np.ascontiguousarray(value.T) if ours.endswith('.weight') and value.ndim == 2 else value
    return converted, unplaced


def build_parser() -> 'CommandParser':
    from mobileformer.cli import CommandParser, summary  # the command's imports stay out of the models' imports

    parser = CommandParser(prog='python -m mobileformer.torch_io', description=summary(__doc__))
    parser.add_argument('checkpoint', help='a PyTorch checkpoint: .pth, .pth.tar, .bin or .safetensors')
    parser.add_argument('-key', default=None, help=f'entry holding the weights (default: {", ".join(STATE_DICT_KEYS)})')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        state = load_state_dict(args.checkpoint, args.key)
    except CheckpointError as e:
        parser.exit(2, f'error: {e}\n')
    for name, value in state.items():
        print(f'{name:60s} {str(list(value.shape)):20s} {value.dtype}')
    print(f'{len(state)} tensors, {sum(v.size for v in state.values()):,} elements')


if __name__ == '__main__':
    main()

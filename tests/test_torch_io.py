"""The torch-free checkpoint reader: exact arrays for every reference fixture, strided/offset
storages and every dtype, and refusal (without execution) of anything that is not tensor data."""
import glob
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES

import torch_writer as tw
from mobileformer.torch_io import CheckpointError, load_checkpoint, load_state_dict

CHECKPOINTS = sorted(glob.glob(os.path.join(FIXTURES, '*.pth')) + glob.glob(os.path.join(FIXTURES, '*.pth.tar'))
                     + glob.glob(os.path.join(FIXTURES, '*.safetensors')))


def test_every_reference_fixture_is_present():
    assert len(CHECKPOINTS) == 9


@pytest.mark.parametrize('path', CHECKPOINTS, ids=os.path.basename)
def test_reader_equals_reference_state(path):
    tag = os.path.basename(path).split('.')[0]
    reference = np.load(os.path.join(FIXTURES, f'{tag}_state.npz'))
    state = load_state_dict(path)
    if path.endswith('.safetensors'):  # safetensors headers are sorted by name, not state-dict order
        assert sorted(state) == sorted(reference.files)
    else:
        assert list(state) == reference.files
    for name in reference.files:
        assert state[name].dtype == reference[name].dtype, name
        assert state[name].shape == reference[name].shape, name
        np.testing.assert_array_equal(state[name], reference[name], err_msg=name)


def test_strided_offset_tensors_and_dtypes(tmp_path):
    base = np.arange(60, dtype=np.float32)
    shared = tw.Storage('0', base)
    bits = np.array([0x3F80, 0xC000, 0x4049, 0x0000], dtype=np.uint16)  # bf16 1, -2, 3.140625, 0
    obj = {
        'transposed': tw.tensor(shared, 0, (4, 5), (1, 4)),           # a .t() view
        'offset_slice': tw.tensor(shared, 7, (3, 2), (10, 3)),
        'param': tw.parameter(tw.tensor(shared, 2, (5,), (1,))),
        'half': tw.tensor(tw.Storage('1', np.array([0.5, -1.25, 65504], np.float16)), 0, (3,), (1,)),
        'bf16': tw.tensor(tw.Storage('2', bits, 'BFloat16Storage'), 0, (2, 2), (2, 1)),
        'long': tw.tensor(tw.Storage('3', np.array([7, -8], np.int64)), 1, (), ()),
        'mask': tw.tensor(tw.Storage('4', np.array([True, False, True])), 0, (3,), (1,)),
        'double': tw.tensor(tw.Storage('5', np.array([1e-300, 2.0])), 0, (2,), (1,)),
        'empty': tw.tensor(tw.Storage('6', np.zeros(0, np.float32)), 0, (0, 3), (3, 1)),
    }
    path = str(tmp_path / 'strided.pth')
    tw.save(path, obj, top='anything_goes')
    state = load_state_dict(path)
    np.testing.assert_array_equal(state['transposed'], base[:20].reshape(5, 4).T)
    np.testing.assert_array_equal(state['offset_slice'], base[7:37].reshape(3, 10)[:, 0:6:3])
    np.testing.assert_array_equal(state['param'], base[2:7])
    assert state['half'].dtype == np.float32 and state['half'].tolist() == [0.5, -1.25, 65504.0]
    assert state['bf16'].dtype == np.float32 and state['bf16'].tolist() == [[1.0, -2.0], [3.140625, 0.0]]
    assert state['long'].dtype == np.int64 and state['long'].shape == () and state['long'] == -8
    assert state['mask'].dtype == np.bool_ and state['mask'].tolist() == [True, False, True]
    assert state['double'].dtype == np.float64 and state['double'].tolist() == [1e-300, 2.0]
    assert state['empty'].shape == (0, 3)


def test_big_endian_storage(tmp_path):
    path = str(tmp_path / 'be.pth')
    tw.save(path, {'w': tw.tensor(tw.Storage('0', np.array([1.5, -3.0], np.float32)), 0, (2,), (1,))},
            byteorder='big')
    np.testing.assert_array_equal(load_state_dict(path)['w'], [1.5, -3.0])


@pytest.mark.parametrize('wrap_key', ['state_dict', 'state_dict_ema', 'model'])
def test_training_checkpoint_entries(tmp_path, wrap_key):
    path = str(tmp_path / 'ckpt.pth.tar')
    tw.save_state_dict(path, {'module.fc.weight': np.ones((2, 3), np.float32)}, wrap_key=wrap_key)
    assert list(load_state_dict(path)) == ['fc.weight']  # DataParallel prefix stripped


def test_state_dict_preferred_over_ema_unless_asked(tmp_path):
    path = str(tmp_path / 'both.pth.tar')
    entries = {'state_dict': {'w': tw.tensor(tw.Storage('0', np.zeros(1, np.float32)), 0, (1,), (1,))},
               'state_dict_ema': {'w': tw.tensor(tw.Storage('1', np.ones(1, np.float32)), 0, (1,), (1,))},
               'epoch': 3, 'arch': 'mobile_former_26m'}
    tw.save(path, entries)
    assert load_state_dict(path)['w'][0] == 0.0
    assert load_state_dict(path, key='state_dict_ema')['w'][0] == 1.0
    with pytest.raises(CheckpointError, match="no entry 'ema'; its entries: state_dict, state_dict_ema, epoch, arch"):
        load_state_dict(path, key='ema')


@pytest.mark.parametrize('target, name', [(tw.Global('os', 'system'), 'os.system'),
                                          (eval, 'builtins.eval')])
def test_code_in_pickle_is_refused_not_run(tmp_path, target, name):
    marker = tmp_path / 'pwned'
    command = f'touch {marker}' if name == 'os.system' else f"open({str(marker)!r}, 'w')"
    path = str(tmp_path / 'evil.pth')
    tw.save(path, {'fc.weight': tw.Call(target, (command,))})
    with pytest.raises(CheckpointError, match=f"references the global '{name}'.*could run code"):
        load_state_dict(path)
    assert not marker.exists()
    # the same payload does run under a plain unpickler: the refusal above stopped a live threat
    with zipfile.ZipFile(path) as archive:
        pickle.loads(archive.read('archive/data.pkl'))
    assert marker.exists()


def test_truncated_zip_is_refused(tmp_path):
    source = os.path.join(FIXTURES, 'timm_mixer_tiny.pth')
    path = tmp_path / 'truncated.pth'
    path.write_bytes(open(source, 'rb').read()[:50_000])
    with pytest.raises(CheckpointError, match=r"^'.*truncated.pth' is a truncated or corrupt zip checkpoint; "
                                              r"download or save it again$"):
        load_state_dict(str(path))


def test_corrupt_storage_bytes_are_refused(tmp_path):
    path = str(tmp_path / 'crc.pth')
    tw.save_state_dict(path, {'w': np.arange(64, dtype=np.float32)})
    blob = bytearray(open(path, 'rb').read())
    start = bytes(blob).index(np.arange(64, dtype=np.float32).tobytes())
    blob[start + 10] ^= 0xFF
    open(path, 'wb').write(bytes(blob))
    with pytest.raises(CheckpointError, match='truncated or corrupt checkpoint .*CRC'):
        load_state_dict(path)


def test_tensor_outside_its_storage_is_refused(tmp_path):
    path = str(tmp_path / 'oob.pth')
    tw.save(path, {'w': tw.tensor(tw.Storage('0', np.zeros(4, np.float32)), 2, (2, 2), (2, 1))})
    with pytest.raises(CheckpointError, match=r'a tensor of size \(2, 2\) reaches element 5 of a storage holding 4'):
        load_state_dict(path)


def test_legacy_torch_file_is_refused(tmp_path):
    path = tmp_path / 'legacy.pth'
    with open(path, 'wb') as f:  # torch<1.6 layout: pickled magic number, protocol, sys info, ...
        pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"is a legacy \(non-zip\) torch checkpoint.*"
                                              r"_use_new_zipfile_serialization=True"):
        load_checkpoint(str(path))


def test_safetensors_bf16_and_truncation(tmp_path):
    header = {'w': {'dtype': 'BF16', 'shape': [2], 'data_offsets': [0, 4]}, '__metadata__': {'format': 'pt'}}
    text = json_bytes(header)
    body = np.array([0x3F80, 0xBF80], np.uint16).tobytes()
    path = tmp_path / 'w.safetensors'
    path.write_bytes(struct.pack('<Q', len(text)) + text + body)
    assert load_state_dict(str(path))['w'].tolist() == [1.0, -1.0]
    path.write_bytes(struct.pack('<Q', len(text)) + text + body[:2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt safetensors file \(tensor w: bytes 0..4"):
        load_state_dict(str(path))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('hello')
    with pytest.raises(CheckpointError, match='neither a PyTorch zip checkpoint nor a .safetensors file'):
        load_state_dict(str(path))
    with pytest.raises(CheckpointError, match="checkpoint '.*missing.pth' does not exist"):
        load_state_dict(str(tmp_path / 'missing.pth'))


def json_bytes(obj) -> bytes:
    import json
    return json.dumps(obj).encode()

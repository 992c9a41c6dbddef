"""What a new user meets first: one flag style in every command, images PIL refuses to open,
fine-tuning onto another input-channel count, and output free of noise."""
import argparse
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import paddle
import pytest
from PIL import Image

import benchmarks.bench as bench
import benchmarks.paired as paired
import eval as eval_script
import export as export_script
import predict as predict_script
import train as train_script
from conftest import FIXTURES, ROOT
from mobileformer import build_model, cli, convert, engine, flops, get_config, reparam, torch_io
from mobileformer.data import build_dataset, open_image
from mobileformer.deploy import quantize

TINY = os.path.join(FIXTURES, 'tiny_mobileformer.yaml')
FOLDER_OPTS = ['DATA.DATASET', 'folder', 'MODEL.NUM_CLASSES', '2', 'DATA.IN_CHANNELS', '3',
               'DATA.MEAN', '[0.5, 0.5, 0.5]', 'DATA.STD', '[0.5, 0.5, 0.5]']

# ------------------------------------------------------------------------------ one flag style
PARSERS = {'train.py': train_script.build_parser, 'eval.py': eval_script.build_parser,
           'predict.py': predict_script.build_parser, 'export.py': export_script.build_parser,
           'mobileformer.convert': convert.build_parser, 'mobileformer.reparam': reparam.build_parser,
           'mobileformer.flops': flops.build_parser, 'mobileformer.torch_io': torch_io.build_parser,
           'benchmarks/bench.py': bench.build_parser, 'benchmarks/paired.py': paired.build_parser}


def _values(action: argparse.Action) -> list:
    """Words that give `action` a value other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        value = [c for c in action.choices if c != action.default][0]
    else:
        value = {int: '3', float: '0.5'}.get(action.type, 'word')
    return [value, value] if action.nargs in ('+', '*') else [value]


def _minimal_argv(parser: argparse.ArgumentParser, tested: argparse.Action) -> list:
    """The required positionals and options other than `tested`, so that the parser accepts it."""
    argv = [w for a in parser._actions if not a.option_strings and a.nargs is None for w in _values(a)]
    for action in parser._actions:
        if action.option_strings and action.required and action is not tested:
            argv += [action.option_strings[0], *_values(action)]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            chosen = next(a for a in group._group_actions if a is not tested)
            argv += [chosen.option_strings[0], *_values(chosen)] if tested not in group._group_actions else []
    return argv


def _spellings(option: str) -> list:
    name = option.lstrip('-')
    return sorted({'-' + name, '--' + name, '--' + name.replace('_', '-')})


@pytest.mark.parametrize('command', PARSERS)
def test_every_option_takes_one_or_two_dashes(command):
    parser = PARSERS[command]()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        long_name = next(o for o in action.option_strings if len(o.lstrip('-')) > 1)
        parsed = []
        for spelling in _spellings(long_name):
            values = _values(action)
            namespace = parser.parse_args(_minimal_argv(parser, action) + [spelling, *values])
            parsed.append(getattr(namespace, action.dest))
        assert parsed[0] != action.default and all(p == parsed[0] for p in parsed), (long_name, parsed)


def test_two_dashes_with_equals_and_after_a_separator():
    parser = train_script.build_parser()
    assert parser.parse_args(['--epochs=2']).epochs == 2
    predict = predict_script.build_parser()
    args = predict.parse_args(['-cfg', 'c.yaml', '--model', 'm', '--', '--runtime'])
    assert args.images == ['--runtime'] and args.runtime == 'auto'


@pytest.mark.parametrize('command', PARSERS)
def test_help_ends_in_whole_sentences(command):
    parser = PARSERS[command]()
    assert parser.description.endswith('.') and '\n' not in parser.description, parser.description
    assert ' '.join(parser.format_help().split()).endswith(cli.FLAG_STYLE)


# ------------------------------------------------------------------------------ shared helpers
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
    lines = [line for line in err.splitlines() if line.strip()]
    assert 'Traceback' not in err and len(lines) == 1 and lines[0].startswith('error: '), err
    return lines[0][len('error: '):]


def save_images(folder, count, size=12, channels=3):
    """`count` PNGs of random pixels in `folder` (created), named 00.png, 01.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    shape = (size, size, channels) if channels == 3 else (size, size)
    for i in range(count):
        Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(folder / f'{i:02d}.png')
    return folder


def tiny_weights(tmp_path, opts=()):
    path = tmp_path / 'tiny.pdparams'
    paddle.save(build_model(get_config(TINY, list(opts))).state_dict(), str(path))
    return path


# ------------------------------------------------------------------------ decompression bombs
def png_declaring(path, width, height):
    """A PNG of a few dozen bytes whose header declares `width` x `height` grey pixels."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b''))
                     + chunk(b'IEND', b''))
    return str(path)


def bomb_sentence(path, pixels):
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's default; the sentence quotes it
    return (f"image '{path}' declares {pixels:,} pixels, more than PIL's limit of 89,478,485 (a guard against "
            'decompression bombs); remove or replace the file')


# 30000 x 30000 is over twice PIL's limit (PIL itself refuses it); 12000 x 12000 is between the limit
# and twice it, where PIL only warns and would decode 144 million pixels
BOMBS = [(30000, 30000), (12000, 12000)]


@pytest.mark.parametrize('width, height', BOMBS)
def test_open_image_refuses_more_pixels_than_pils_limit(tmp_path, width, height):
    path = png_declaring(tmp_path / 'bomb.png', width, height)
    assert os.path.getsize(path) < 100
    with pytest.raises(ValueError) as error:
        open_image(path)
    assert str(error.value) == bomb_sentence(path, width * height)


@pytest.mark.timeout(60)
@pytest.mark.parametrize('width, height', BOMBS)
def test_predict_refuses_a_bomb_in_one_sentence(tmp_path, capsys, width, height):
    path = png_declaring(tmp_path / 'bomb.png', width, height)
    good = save_images(tmp_path / 'good', 1) / '00.png'
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', tiny_weights(tmp_path), good, path],
                              capsys)
    assert code == 2 and out == '' and one_error_line(err) == bomb_sentence(path, width * height)


@pytest.mark.timeout(60)
def test_a_bomb_in_a_dataset_follows_the_bad_image_policy(tmp_path):
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        for name in ('a', 'b'):
            save_images(data / split / name, 4)
    bomb = png_declaring(data / 'val' / 'b' / '02.png', 30000, 30000)
    config = get_config(TINY, FOLDER_OPTS + ['DATA.DATA_PATH', str(data)])
    dataset = build_dataset(config, 'val')
    with pytest.raises(ValueError) as error:
        dataset[dataset.paths.index(bomb)]
    assert str(error.value) == bomb_sentence(bomb, 900_000_000)

    refused = engine.build_loader(dataset, 8, 0, train=False, skip_bad=False)
    with pytest.raises(ValueError) as error:
        list(refused)
    assert str(error.value) == bomb_sentence(bomb, 900_000_000) + ('; or set DATA.SKIP_BAD_IMAGES True to skip '
                                                                   'unreadable images')
    notices = []
    skipping = engine.build_loader(dataset, 8, 0, train=False, skip_bad=True, log=notices.append)
    assert sum(len(labels) for _, labels in skipping) == 8
    assert notices == [f'Skipped: {bomb_sentence(bomb, 900_000_000)}; 1 skipped so far (DATA.SKIP_BAD_IMAGES).']


def test_int8_calibration_refuses_a_bomb_in_one_sentence(tmp_path):
    folder = save_images(tmp_path / 'calib', quantize.MIN_CALIBRATION_IMAGES - 1)
    bomb = png_declaring(folder / 'zz.png', 30000, 30000)
    with pytest.raises(ValueError) as error:
        quantize.calibration_images(get_config(TINY), quantize.MIN_CALIBRATION_IMAGES, str(folder))
    assert str(error.value) == bomb_sentence(bomb, 900_000_000)


@pytest.mark.timeout(120)
def test_a_bomb_under_twice_the_limit_prints_no_warning_of_pils(tmp_path):
    """Between the limit and twice it PIL only warns (DecompressionBombWarning on stderr); the command
    refuses the image itself, so its one line is all that is printed."""
    path = png_declaring(tmp_path / 'bomb.png', 12000, 12000)
    result = subprocess.run([sys.executable, 'predict.py', '-cfg', TINY, '-pretrained', str(tiny_weights(tmp_path)),
                             path], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 2 and result.stdout == ''
    assert result.stderr == f'error: {bomb_sentence(path, 144_000_000)}\n'


# ------------------------------------------------------------------------------ quiet output
@pytest.mark.timeout(120)
def test_the_first_curves_on_a_machine_print_nothing(tmp_path):
    """A fresh matplotlib cache: matplotlib builds its font list and logs it at INFO, which Paddle's
    logging setup printed as `[INFO] font_manager.py ... generated new fontManager`."""
    curves = tmp_path / 'curves.png'
    code = ('import mobileformer\nfrom mobileformer.engine import plot_curves\n'
            f"assert plot_curves([{{'epoch': 1, 'train_loss': 1.0, 'val_loss': 0.9, 'val_top1': 0.5}}], {str(curves)!r})")
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=110,
                            env=dict(os.environ, PYTHONPATH=ROOT, MPLCONFIGDIR=str(tmp_path / 'mpl')))
    assert result.returncode == 0 and result.stdout == '' and result.stderr == '', result.stderr
    assert curves.stat().st_size > 0 and os.listdir(tmp_path / 'mpl')  # the cache was built in this run


@pytest.mark.timeout(60)
def test_a_refused_run_prints_no_notice_before_its_error(tmp_path, capsys):
    """-epochs 1 shortens the tiny config's 2 epochs (a notice), then the -pretrained file is missing."""
    missing = tmp_path / 'missing.pdparams'
    code, out, err = run_main(train_script.main, ['-cfg', TINY, '-epochs', '1', '-output', tmp_path / 'o',
                                                  '-pretrained', missing], capsys)
    assert code == 2 and one_error_line(err) == f"checkpoint file '{missing}' does not exist; check the path"
    assert out == ''


@pytest.mark.timeout(60)
def test_predict_takes_a_folder_and_names_each_class_once(tmp_path, capsys):
    folder = save_images(tmp_path / 'photos', 2, channels=1)
    save_images(folder / 'more', 1, channels=1)
    (folder / 'notes.txt').write_text('not an image')
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', tiny_weights(tmp_path), folder],
                              capsys)
    assert code == 0 and err == '', err
    names = [line[:-1] for line in out.splitlines() if not line.startswith(' ')]
    assert names == [str(folder / '00.png'), str(folder / '01.png'), str(folder / 'more' / '00.png')]
    classes = [line.split()[1:] for line in out.splitlines() if line.startswith(' ')]
    assert len(classes) == 15 and all(len(c) == 1 and c[0] in '0123456789' for c in classes), classes  # '5', not '5 (5)'


def test_predict_names_the_index_beside_a_class_name():
    assert predict_script.class_label(['cat', 'dog'], 1) == 'dog (1)'
    assert predict_script.class_label(['0', '1'], 1) == '1'


def test_predict_refuses_a_folder_without_images(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', tmp_path / 'w.pdparams', empty],
                              capsys)
    assert code == 2 and one_error_line(err).startswith(f"folder '{empty}' holds no images (.jpg, .jpeg, .png")

"""What a new user meets first: one flag style in every command, images PIL refuses to open,
fine-tuning onto another input-channel count, and output free of noise."""
import argparse
import os
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import paddle
import pytest
from PIL import Image

import benchmarks.bench as bench
import benchmarks.paired as paired
import benchmarks.profile_ops as profile_ops
import eval as eval_script
import export as export_script
import predict as predict_script
import train as train_script
from conftest import FIXTURES, ROOT, one_error_line, run_main
from mobileformer import build_model, checkpoint, cli, convert, engine, flops, get_config, reparam, torch_io
from mobileformer.data import build_dataset, open_image
from mobileformer.deploy import quantize, top_classes

TINY = os.path.join(FIXTURES, 'tiny_mobileformer.yaml')
DIGITS = os.path.join(ROOT, 'configs', 'digits', 'mobileformer_26m.yaml')
FOLDER_OPTS = ['DATA.DATASET', 'folder', 'MODEL.NUM_CLASSES', '2', 'DATA.IN_CHANNELS', '3',
               'DATA.MEAN', '[0.5, 0.5, 0.5]', 'DATA.STD', '[0.5, 0.5, 0.5]']

# ------------------------------------------------------------------------------ one flag style
PARSERS = {'train.py': train_script.build_parser, 'eval.py': eval_script.build_parser,
           'predict.py': predict_script.build_parser, 'export.py': export_script.build_parser,
           'mobileformer.convert': convert.build_parser, 'mobileformer.reparam': reparam.build_parser,
           'mobileformer.flops': flops.build_parser, 'mobileformer.torch_io': torch_io.build_parser,
           'benchmarks/bench.py': bench.build_parser, 'benchmarks/paired.py': paired.build_parser,
           'benchmarks/profile_ops.py': profile_ops.build_parser}


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
# and twice it, where PIL only warns and would decode 144 million pixels. (pytest shows warnings that
# the package filters: its PIL warning is checked where a command runs, in a process of its own.)
BOMBS = [(30000, 30000), (12000, 12000)]
quiet_pil = pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')


@quiet_pil
@pytest.mark.parametrize('width, height', BOMBS)
def test_open_image_refuses_more_pixels_than_pils_limit(tmp_path, width, height):
    path = png_declaring(tmp_path / 'bomb.png', width, height)
    assert os.path.getsize(path) < 100
    with pytest.raises(ValueError) as error:
        open_image(path)
    assert str(error.value) == bomb_sentence(path, width * height)


@quiet_pil
@pytest.mark.timeout(60)
@pytest.mark.parametrize('width, height', BOMBS)
def test_predict_refuses_a_bomb_in_one_sentence(tmp_path, capsys, width, height):
    path = png_declaring(tmp_path / 'bomb.png', width, height)
    good = save_images(tmp_path / 'good', 1) / '00.png'
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', tiny_weights(tmp_path), good, path],
                              capsys)
    assert code == 2 and out == '' and one_error_line(err) == 'error: ' + bomb_sentence(path, width * height)


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
            f"assert plot_curves([{{'epoch': 1, 'train_ce': 1.0, 'val_ce': 0.9, 'val_top1': 0.5}}], {str(curves)!r})")
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
    assert code == 2 and one_error_line(err) == f"error: checkpoint file '{missing}' does not exist; check the path"
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
    [[dog]], [[one]] = top_classes(np.array([[0., 1.]]), ['cat', 'dog'], 1), top_classes(np.array([[0., 1.]]), None, 1)
    assert (dog.label, one.label) == ('dog (1)', '1')


def test_predict_refuses_a_folder_without_images(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out, err = run_main(predict_script.main, ['-cfg', TINY, '-pretrained', tmp_path / 'w.pdparams', empty],
                              capsys)
    assert code == 2 and one_error_line(err).startswith(f"error: folder '{empty}' holds no images (.jpg, .jpeg, .png")


# ---------------------------------------------------------- fine-tuning onto another channel count
def logits(model, images):
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy()


@pytest.mark.parametrize('config_file', [TINY, os.path.join(FIXTURES, 'timm_mixer_tiny.yaml')])
def test_a_grey_checkpoint_fine_tuned_onto_rgb_gives_the_same_logits_on_grey_images(tmp_path, capsys, config_file):
    """1 -> 3 channels: the kernel is repeated and scaled by 1/3, so a grey image copied into the
    three channels (with the same mean and std in each) gives what the grey model gave."""
    grey_config = get_config(config_file, ['DATA.IN_CHANNELS', '1', 'DATA.MEAN', '[0.5]', 'DATA.STD', '[0.5]'])
    grey = build_model(grey_config)
    path = str(tmp_path / 'grey.pdparams')
    paddle.save(grey.state_dict(), path)
    rgb = build_model(get_config(config_file, ['DATA.IN_CHANNELS', '3', 'DATA.MEAN', '[0.5, 0.5, 0.5]',
                                               'DATA.STD', '[0.5, 0.5, 0.5]']))
    capsys.readouterr()
    assert checkpoint.load_weights(rgb, path, drop_classifier=True, adapt_input=True) == []
    key = f'{grey.input_conv_name}.weight'
    assert capsys.readouterr().out == (f"Notice: '{path}' was trained on 1-channel images, the model takes 3: the "
                                       f'kernel of the first layer ({key}) is repeated over the channels and scaled '
                                       'by 1/3 (fine-tuning).\n')
    size = grey_config.DATA.IMAGE_SIZE
    images = np.random.RandomState(0).uniform(-1, 1, (2, 1, size, size)).astype(np.float32)
    expected = logits(grey, images)
    np.testing.assert_allclose(logits(rgb, np.repeat(images, 3, axis=1)), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_an_rgb_kernel_onto_one_channel_is_summed_and_other_counts_repeat_and_scale():
    kernel = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(checkpoint.adapt_input_kernel(kernel, 1), kernel.sum(axis=1, keepdims=True))
    four = checkpoint.adapt_input_kernel(kernel, 4)
    np.testing.assert_allclose(four, np.concatenate([kernel, kernel[:, :1]], axis=1) * 3 / 4)
    grey = np.random.RandomState(0).uniform(size=(5, 1, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(checkpoint.adapt_input_kernel(grey, 3), np.repeat(grey, 3, axis=1) / 3, rtol=1e-6)
    # a grey image in every channel gives the same sum of products
    patch = np.random.RandomState(1).uniform(size=(3, 3)).astype(np.float32)
    np.testing.assert_allclose((checkpoint.adapt_input_kernel(grey, 3) * patch).sum(axis=(1, 2, 3)),
                               (grey * patch).sum(axis=(1, 2, 3)), rtol=1e-6)


def test_strict_loading_still_refuses_another_channel_count(tmp_path):
    """eval, export and predict load strictly: there the mismatch is the config's, not adapted."""
    path = str(tiny_weights(tmp_path))
    rgb = build_model(get_config(TINY, ['DATA.IN_CHANNELS', '3']))
    with pytest.raises(ValueError) as error:
        checkpoint.load_weights(rgb, path)
    assert str(error.value) == (f"'{path}' does not fit the model: 1 with a wrong shape (stem.conv.weight: "
                                '[8, 1, 3, 3] vs model [8, 3, 3, 3]); check that -cfg matches the checkpoint')


@pytest.mark.parametrize('opts, mean, std, notice', [
    (['DATA.IN_CHANNELS', '3'], [0.5] * 3, [0.5] * 3,
     'DATA.IN_CHANNELS 3 was set without a DATA.MEAN / DATA.STD for 3 channels, so DATA.MEAN [0.5, 0.5, 0.5] and '
     'DATA.STD [0.5, 0.5, 0.5] are repeated from the 1-channel values; set them to override'),
    (['DATA.IN_CHANNELS', '3', 'DATA.MEAN', '[0.4, 0.5, 0.6]'], [0.4, 0.5, 0.6], [0.5] * 3,
     'DATA.IN_CHANNELS 3 was set without a DATA.MEAN / DATA.STD for 3 channels, so DATA.STD [0.5, 0.5, 0.5] are '
     'repeated from the 1-channel values; set them to override'),
    (['DATA.IN_CHANNELS', '1'], [0.5], [0.5], None),
])
def test_normalisation_follows_a_changed_channel_count_from_the_digits_config(opts, mean, std, notice):
    notices = []
    config = get_config(DIGITS, opts, notices)
    assert (list(config.DATA.MEAN), list(config.DATA.STD)) == (mean, std)
    assert notices == ([notice] if notice else [])


def test_normalisation_for_one_channel_is_the_mean_of_the_rgb_values():
    notices = []
    config = get_config(os.path.join(ROOT, 'configs', 'mobileformer_26m.yaml'), ['DATA.IN_CHANNELS', '1'], notices)
    assert list(config.DATA.MEAN) == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]
    assert list(config.DATA.STD) == [pytest.approx((0.229 + 0.224 + 0.225) / 3)]
    assert notices == ['DATA.IN_CHANNELS 1 was set without a DATA.MEAN / DATA.STD for 1 channel, so DATA.MEAN '
                       '[0.449] and DATA.STD [0.226] are the mean of the 3-channel values; set them to override']


def test_normalisation_given_with_the_channel_count_is_checked_not_derived():
    with pytest.raises(ValueError, match=r'^DATA.MEAN has 3 values but DATA.IN_CHANNELS is 1; give one value per '):
        get_config(os.path.join(ROOT, 'configs', 'mobileformer_26m.yaml'),
                   ['DATA.IN_CHANNELS', '1', 'DATA.MEAN', '[0.1, 0.2, 0.3]'])


@pytest.mark.timeout(180)
def test_the_quickstart_checkpoint_fine_tunes_onto_an_rgb_folder_as_the_readme_says(tmp_path, capsys):
    """README "Train on your own images": a digits (1-channel, 10-class) checkpoint, -pretrained onto
    an RGB folder of 2 classes: one run, its notices alone (no warning of Paddle's), then training."""
    grey = str(tiny_weights(tmp_path))
    data = tmp_path / 'data'
    for split in ('train', 'val'):
        for name in ('a', 'b'):
            save_images(data / split / name, 8, size=16)
    output = tmp_path / 'out'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        code, out, err = run_main(train_script.main, [
            '-cfg', TINY, '-data_path', data, '-epochs', '1', '-batch_size', '8', '-output', output,
            '-pretrained', grey, '-opts', 'DATA.DATASET', 'folder', 'MODEL.NUM_CLASSES', '2', 'DATA.IN_CHANNELS', '3'],
            capsys)
    assert code == 0 and err == '', err
    assert not [w for w in caught if 'Skip loading' in str(w.message)], [str(w.message) for w in caught]
    notices = [line for line in out.splitlines() if line.startswith('Notice')]
    assert notices == [
        "Notice: TRAIN.EPOCHS 1 shortens the config's 2 epochs, so warm-up and cool-down are scaled by 1/2: "
        'TRAIN.WARMUP_EPOCHS 1 -> 0.5.',
        'Notice: DATA.IN_CHANNELS 3 was set without a DATA.MEAN / DATA.STD for 3 channels, so DATA.MEAN '
        '[0.5, 0.5, 0.5] and DATA.STD [0.5, 0.5, 0.5] are repeated from the 1-channel values; set them to override.',
        f"Notice: '{grey}' was trained on 1-channel images, the model takes 3: the kernel of the first layer "
        '(stem.conv.weight) is repeated over the channels and scaled by 1/3 (fine-tuning).',
        f"Notice: '{grey}' was trained for 10 classes, the model has 2: the classifier (head.classifier.weight, "
        'head.classifier.bias) starts from scratch (fine-tuning).']
    assert (output / 'best.pdparams').exists()

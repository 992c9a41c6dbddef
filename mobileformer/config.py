"""Configuration: defaults in code < YAML file (with `_BASE_` inheritance) < command-line overrides.

Every key that exists is read by some builder; a key that does not exist here or in a registered
family's subtree is rejected with its full name and the file it came from, so a typo never silently
falls back to a default.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from mobileformer.errors import ConfigError


@dataclass(frozen=True)
class Overrides:
    """How the caller of an entry point changes config keys, as error messages tell them to: on a
    command line `-opts MODEL.NUM_CLASSES 3`, in Python `create_model(..., num_classes=3)`."""
    source: str  # where the overrides came from
    remedy: str  # how to fix a value that is out of range
    spell: Callable[[str, Any], str]  # (key, value) -> how to set the key to the value
    config: str  # what names the config


COMMAND_LINE = Overrides('command-line -opts', 'fix it in the YAML or with -opts',
                         lambda key, value: f'-opts {key} {value}', '-cfg')


_C = CN()
_C.SEED = 0
_C.OUTPUT = ''

_C.DATA = CN()
_C.DATA.DATASET = 'imagenet'
_C.DATA.DATA_PATH = ''
_C.DATA.IMAGE_SIZE = 224
_C.DATA.IN_CHANNELS = 3
_C.DATA.CROP_PCT = 0.875
_C.DATA.INTERPOLATION = 'bilinear'
_C.DATA.MEAN = [0.485, 0.456, 0.406]
_C.DATA.STD = [0.229, 0.224, 0.225]
_C.DATA.BATCH_SIZE = 128
_C.DATA.BATCH_SIZE_EVAL = 128
_C.DATA.NUM_WORKERS = 2
_C.DATA.SKIP_BAD_IMAGES = False  # skip (and log) unreadable images instead of stopping the run

# Training augmentation (mobileformer/data/transforms.py, mobileformer/data/augment.py). Defaults: the Mobile-Former
# recipe (timm 'rand-m9-mstd0.5', mixup 0.2, no cutmix, label smoothing 0.1); DeiT adds CUTMIX_ALPHA 1.0.
_C.AUG = CN()
_C.AUG.HFLIP = 0.5  # probability of a horizontal flip
_C.AUG.RRC_SCALE = [0.08, 1.0]  # RandomResizedCrop area fraction
_C.AUG.RRC_RATIO = [3.0 / 4.0, 4.0 / 3.0]  # RandomResizedCrop aspect ratio
_C.AUG.COLOR_JITTER = 0.0  # brightness/contrast/saturation strength; 0 = off
_C.AUG.RAND_AUGMENT_N = 2  # ops per image; 0 = RandAugment off
_C.AUG.RAND_AUGMENT_M = 9.0  # magnitude in [0, 10]
_C.AUG.RAND_AUGMENT_MSTD = 0.5  # std of the per-op magnitude noise
_C.AUG.RE_PROB = 0.0  # random erasing probability (recipe: 0.2 for the 151M-508M models)
_C.AUG.RE_MODE = 'pixel'  # pixel | rand | const
_C.AUG.RE_COUNT = 1  # at most this many erased boxes
_C.AUG.MIXUP_ALPHA = 0.2
_C.AUG.CUTMIX_ALPHA = 0.0
_C.AUG.MIXUP_PROB = 1.0  # probability that a batch is mixed at all
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of CutMix instead of Mixup when both alphas > 0
_C.AUG.LABEL_SMOOTHING = 0.1

_C.MODEL = CN()
_C.MODEL.TYPE = 'mobileformer'
_C.MODEL.NAME = 'mobileformer_26m'
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROPOUT = 0.0
_C.MODEL.DROPPATH = 0.0
_C.MODEL.DEPLOY = False
# Non-empty: build_model returns a feature extractor of these outputs (mobileformer.models.backbone; the
# indices each family offers are in its docs/*.md page) instead of the classifier.
_C.MODEL.OUT_INDICES = []
# Each family's own subtree (MODEL.MF, MODEL.MIXER, ...) is declared beside its model and added by
# `register_model_defaults` when the model module registers its builder (mobileformer.registry).

_C.TRAIN = CN()
_C.TRAIN.EPOCHS = 300
_C.TRAIN.BASE_LR = 1e-3
# Training engine (mobileformer/engine/). The LR schedule is stepped per iteration: linear
# warm-up WARMUP_START_LR -> BASE_LR over WARMUP_EPOCHS, cosine BASE_LR -> END_LR until
# EPOCHS - COOLDOWN_EPOCHS, then END_LR for the cool-down epochs (EPOCHS counts all of them).
# Warm-up and cool-down may be fractions of an epoch: a recipe shortened with -epochs / -opts
# TRAIN.EPOCHS scales both by the same factor (see _fit_schedule).
_C.TRAIN.WARMUP_EPOCHS = 0.0
_C.TRAIN.WARMUP_START_LR = 1e-6
_C.TRAIN.END_LR = 1e-5
_C.TRAIN.COOLDOWN_EPOCHS = 0.0
_C.TRAIN.OPTIMIZER = 'adamw'  # 'adamw' or 'momentum' (SGD with momentum)
_C.TRAIN.WEIGHT_DECAY = 0.05  # never applied to 1-D parameters (norm weights) and biases
_C.TRAIN.BETAS = [0.9, 0.999]
_C.TRAIN.EPS = 1e-8
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.GRAD_CLIP = 0.0  # max global gradient norm; 0 disables clipping
_C.TRAIN.ACCUM_ITER = 1  # optimizer step every ACCUM_ITER batches, on their mean gradient
_C.TRAIN.EMA = False  # keep an exponential moving average of the weights; evaluate and save it
_C.TRAIN.EMA_DECAY = 0.9999
_C.TRAIN.AMP = False  # mixed precision on GPU (no effect on CPU)
_C.TRAIN.EVAL_FREQ = 1  # evaluate every N epochs (and always after the last one)
_C.TRAIN.SAVE_FREQ = 0  # also keep epoch_<N>.pdparams every N epochs; 0 keeps only last/best
_C.TRAIN.LOG_FREQ = 10  # progress-bar update every N iterations
# Knowledge distillation (mobileformer/engine/distill.py, docs/distillation.md); off while TEACHER is ''.
_C.TRAIN.DISTILL = CN()
_C.TRAIN.DISTILL.TEACHER = ''  # a teacher YAML (with WEIGHTS), an export.py folder or an .onnx classifier
_C.TRAIN.DISTILL.WEIGHTS = ''  # the .pdparams of a YAML teacher
_C.TRAIN.DISTILL.KIND = 'soft'  # soft: KL at temperature TAU (x TAU^2); hard: cross-entropy with its argmax
_C.TRAIN.DISTILL.TAU = 1.0  # temperature of the soft kind
_C.TRAIN.DISTILL.ALPHA = 0.5  # weight of the teacher term; 1 - ALPHA weighs the ground-truth loss
# normalisation of an export / ONNX teacher's input ([]: what an export folder's config.yaml records,
# else the student's DATA.MEAN/STD); a YAML teacher has its own DATA.MEAN/STD
_C.TRAIN.DISTILL.MEAN = []
_C.TRAIN.DISTILL.STD = []


def register_model_defaults(key: str, defaults: CN) -> None:
    """Adds the subtree MODEL.<key> with `defaults` to the config defaults. Model types sharing a
    subtree (Mixer, gMLP, ResMLP) register the same defaults again, which changes nothing."""
    if key in _C.MODEL:
        if _C.MODEL[key] != defaults:
            raise ValueError(f'MODEL.{key} is declared twice with different defaults')
        return
    _C.MODEL[key] = defaults.clone()


_BASE_KEY = '_BASE_'


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 and Python do: its YAML 1.1 rules take
    `5e-4` and `1e6` (no dot, or no exponent sign) for strings."""


_Yaml12Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$'),
    list('-+0123456789.'))


def _load_yaml(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            data = yaml.load(f, Loader=_Yaml12Loader)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML from configs/") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _resolve_bases(path: str, stack: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """Returns [(file, mapping), ...] in merge order: every base before the file that names it."""
    path = os.path.abspath(path)
    if path in stack:
        chain = ' -> '.join(os.path.relpath(p) for p in stack + (path,))
        raise ConfigError(f'_BASE_ inheritance cycle: {chain}; remove one of these _BASE_ entries')
    data = _load_yaml(path)
    bases = data.pop(_BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _BASE_ must be a path or a list of paths, got {bases!r}")
    merged = []
    for base in bases:
        merged += _resolve_bases(os.path.join(os.path.dirname(path), base), stack + (path,))
    return merged + [(path, data)]


def _python_float(value: Any) -> Any:
    """`value` as a float when it is text Python reads as one (`1_000.5`, `inf`), else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Returns `value` typed like `default`, or raises naming the key and where it came from."""
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) if default is not None else True
    elif isinstance(default, float):
        value = _python_float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{source}: {key} must be of type {type(default).__name__} "
                          f"(like {default!r}), got {type(value).__name__} {value!r}")
    return value


def _unknown_key(key: str, node: CN, prefix: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = f'; did you mean {prefix}{close[0]}?' if close else f'; known keys under {prefix or "the root"}: {", ".join(sorted(node.keys()))}'
    return ConfigError(f'{source}: unknown config key {prefix}{key}{hint}')


def _merge(node: CN, data: dict, source: str, prefix: str = '') -> None:
    for key, value in data.items():
        if key not in node:
            raise _unknown_key(key, node, prefix, source)
        full_key = prefix + key
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f'{source}: {full_key} is a section; give it a mapping of keys, got {value!r}')
            _merge(node[key], value, source, full_key + '.')
        else:
            node[key] = _coerce(value, node[key], full_key, source)


def _parse_opt_value(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError:
        return text


def merge_opts(config: CN, opts: Sequence[Any], overrides: Overrides = COMMAND_LINE) -> None:
    """Merges a flat [KEY, VALUE, ...] list (the `-opts` command-line form) into `config`."""
    if len(opts) % 2:
        raise ConfigError(f'{overrides.source} takes KEY VALUE pairs; got an odd number of items: {list(opts)}')
    for key, text in zip(opts[0::2], opts[1::2]):
        *parents, leaf = str(key).split('.')
        data: dict = {leaf: _parse_opt_value(text)}
        for parent in reversed(parents):
            data = {parent: data}
        _merge(config, data, overrides.source)


_SCHEDULE_KEYS = ('TRAIN.WARMUP_EPOCHS', 'TRAIN.COOLDOWN_EPOCHS')


def _fit_schedule(config: CN, file_epochs: int, overridden: set) -> Optional[str]:
    """Scales the files' warm-up and cool-down when the command line shortens their TRAIN.EPOCHS
    (a smoke run, a quick fine-tune of a 460-epoch recipe), so the schedule keeps its shape; keys
    the command line sets itself are kept. Returns the notice to show, or None."""
    epochs = config.TRAIN.EPOCHS
    if 'TRAIN.EPOCHS' not in overridden or epochs >= file_epochs:
        return None
    changes = []
    for key in _SCHEDULE_KEYS:
        leaf = key.split('.')[1]
        before = config.TRAIN[leaf]
        if key not in overridden and before > 0:
            config.TRAIN[leaf] = before * epochs / file_epochs
            changes.append(f'{key} {before:g} -> {config.TRAIN[leaf]:.3g}')
    if not changes:
        return None
    return (f'TRAIN.EPOCHS {epochs} shortens the config\'s {file_epochs} epochs, so warm-up and cool-down '
            f'are scaled by {epochs}/{file_epochs}: ' + ', '.join(changes))


def configs_dir() -> str:
    """The configs shipped with the package: inside it when installed from a wheel (pyproject.toml
    maps the checkout's configs/ to the package `mobileformer.configs`), beside it in a checkout
    and in an editable install."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, 'configs')
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), 'configs')


_YAML_SUFFIXES = ('.yaml', '.yml')
_BASES_FOLDER = 'base'  # configs that only other configs inherit from (_BASE_): no model name


def config_names(top_level: bool = False) -> List[str]:
    """The shipped configs by name, their path under configs/ without the suffix, sorted
    ('mobileformer_26m', 'digits/mobileformer_26m', ...); with `top_level`, only those directly in
    configs/ (one per model variant)."""
    root = configs_dir()
    names = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if not (folder == root and s == _BASES_FOLDER))
        for file in files:
            stem, suffix = os.path.splitext(file)
            if suffix in _YAML_SUFFIXES and not stem.startswith('_'):
                names.append(os.path.relpath(os.path.join(folder, stem), root).replace(os.sep, '/'))
    return sorted(n for n in names if not top_level or '/' not in n)


def resolve_config(cfg: str) -> str:
    """The YAML file `cfg` names: a file that exists, else a shipped config by name ('mobileformer_26m',
    'digits/mobileformer_26m', with or without .yaml, or 'configs/...' as the commands spell it from
    the repository root), wherever the caller runs."""
    if os.path.isfile(cfg):
        return cfg
    name = cfg.replace('\\', '/')
    name = re.sub(r'^(\./)?configs/', '', name)
    if not name.endswith(_YAML_SUFFIXES):
        name += '.yaml'
    shipped = os.path.join(configs_dir(), *name.split('/'))
    if os.path.isfile(shipped):
        return shipped
    stem = os.path.splitext(name)[0]
    close = difflib.get_close_matches(stem, config_names(), n=4, cutoff=0.6)
    remedy = (f"did you mean {close[0]}?" if len(close) == 1 else f"did you mean one of {', '.join(close)}?" if close else
              'pass a YAML file or a name that mobileformer.list_models() returns')
    raise ConfigError(f"config '{cfg}' does not exist (neither a YAML file nor a shipped config name); {remedy}")


_NORMALISATION_KEYS = ('DATA.MEAN', 'DATA.STD')


def _sets(data: dict, key: str) -> bool:
    """Whether the nested mapping `data` (a YAML file) gives a value for the dotted `key`."""
    for part in key.split('.'):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _fit_normalisation(config: CN, set_by: dict) -> Optional[str]:
    """Derives DATA.MEAN / DATA.STD for DATA.IN_CHANNELS when a later source (a child YAML, the
    command line) changed the channel count than the one that gave them (`set_by`: key -> index of
    the source that last set it, -1 for the defaults): onto 1 channel their mean, onto several the
    one value repeated. Values given with the channel count, or that cannot be derived, are left
    for `check_ranges`. Returns the notice to show, or None."""
    channels, derived, given = config.DATA.IN_CHANNELS, [], 0
    for key in _NORMALISATION_KEYS:
        leaf = key.split('.')[1]
        values = list(config.DATA[leaf])
        stale = set_by[key] < set_by['DATA.IN_CHANNELS'] and len(values) != channels
        if stale and (channels == 1 or len(values) == 1):
            config.DATA[leaf] = [sum(values) / len(values)] if channels == 1 else values * channels
            derived.append(f'{key} {[round(v, 4) for v in config.DATA[leaf]]}')
            given = len(values)
    if not derived:
        return None
    how = 'the mean of' if channels == 1 else 'repeated from'
    return (f'DATA.IN_CHANNELS {channels} was set without a DATA.MEAN / DATA.STD for {channels} channel'
            f"{'s' if channels > 1 else ''}, so {' and '.join(derived)} are {how} the {given}-channel values; "
            'set them to override')


def get_config(cfg_file: Optional[str] = None, opts: Optional[Iterable[Any]] = None,
               notices: Optional[List[str]] = None, overrides: Overrides = COMMAND_LINE) -> CN:
    """Returns a frozen config: defaults, then `cfg_file` (a path, or a shipped config's name: see
    `resolve_config`) and its `_BASE_` files, then `opts`. Notices about adjustments (a shortened
    schedule, a derived normalisation) are appended to `notices` when given; `overrides` says how
    the caller gave `opts`, for error messages."""
    config = _C.clone()
    set_by = dict.fromkeys(('DATA.IN_CHANNELS',) + _NORMALISATION_KEYS, -1)
    found: List[Optional[str]] = []
    sources = _resolve_bases(resolve_config(cfg_file)) if cfg_file else []
    for index, (path, data) in enumerate(sources):
        set_by.update({key: index for key in set_by if _sets(data, key)})
        _merge(config, data, os.path.relpath(path))
    if opts:
        opts = list(opts)
        file_epochs = config.TRAIN.EPOCHS
        merge_opts(config, opts, overrides)
        set_by.update({key: len(sources) for key in set_by if key in {str(k) for k in opts[0::2]}})
        found.append(_fit_schedule(config, file_epochs, {str(key) for key in opts[0::2]}))
    found.append(_fit_normalisation(config, set_by))
    if notices is not None:
        notices += [notice for notice in found if notice]
    check_ranges(config, overrides)
    config.freeze()
    return config


# Range checks of the shared keys (model builders check their own subtree): a zero batch size or a
# negative learning rate would otherwise fail deep inside paddle, or train on silently.
_POSITIVE = ('DATA.IMAGE_SIZE', 'DATA.BATCH_SIZE', 'DATA.BATCH_SIZE_EVAL', 'MODEL.NUM_CLASSES', 'TRAIN.EPOCHS',
             'TRAIN.BASE_LR', 'TRAIN.EPS', 'TRAIN.ACCUM_ITER', 'TRAIN.EVAL_FREQ', 'TRAIN.LOG_FREQ')
_NON_NEGATIVE = ('DATA.NUM_WORKERS', 'TRAIN.WARMUP_EPOCHS', 'TRAIN.COOLDOWN_EPOCHS', 'TRAIN.SAVE_FREQ',
                 'TRAIN.WEIGHT_DECAY', 'TRAIN.GRAD_CLIP', 'TRAIN.END_LR', 'TRAIN.WARMUP_START_LR')
_UNIT_INTERVAL = {'DATA.CROP_PCT': (0.0, 1.0, '(0, 1]'), 'TRAIN.EMA_DECAY': (0.0, 1.0, '[0, 1)'),
                  'AUG.HFLIP': (0.0, 1.0, '[0, 1]'), 'AUG.LABEL_SMOOTHING': (0.0, 1.0, '[0, 1)')}


def check_patch_grid(image_size: int, patch_size: int, patch_key: str) -> None:
    """For patch-token models (their token-mixing weights are N x N, so N is fixed at build time):
    DATA.IMAGE_SIZE must be a multiple of the family's patch size, named `patch_key`."""
    if patch_size <= 0 or image_size % patch_size:
        raise ConfigError(f'DATA.IMAGE_SIZE {image_size} is not divisible by {patch_key} {patch_size}; '
                          f'use an image size that is a multiple of the patch size')


def _value(config: CN, key: str) -> Any:
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def _check_distill(distill: CN, remedy: str) -> None:
    if distill.KIND not in ('soft', 'hard'):
        raise ConfigError(f"TRAIN.DISTILL.KIND must be 'soft' or 'hard', got {distill.KIND!r}; {remedy}")
    if not (math.isfinite(distill.TAU) and distill.TAU > 0):
        raise ConfigError(f'TRAIN.DISTILL.TAU must be > 0, got {distill.TAU!r}; {remedy}')
    if not 0 <= distill.ALPHA <= 1:
        raise ConfigError(f'TRAIN.DISTILL.ALPHA must be in [0, 1], got {distill.ALPHA!r}; {remedy}')
    if distill.WEIGHTS and not distill.TEACHER:
        raise ConfigError('TRAIN.DISTILL.WEIGHTS is set but TRAIN.DISTILL.TEACHER is empty; name the teacher '
                          'config the weights belong to')
    if len(distill.MEAN) != len(distill.STD) or (distill.STD and min(distill.STD) <= 0):
        raise ConfigError(f'TRAIN.DISTILL.MEAN and STD must have one value per channel each, STD > 0; got '
                          f'{list(distill.MEAN)} and {list(distill.STD)}')


def check_ranges(config: CN, overrides: Overrides = COMMAND_LINE) -> None:
    """Raises a ConfigError for the first shared key whose value is out of its range."""
    remedy = overrides.remedy
    for key in _POSITIVE + _NON_NEGATIVE + tuple(_UNIT_INTERVAL):
        if not math.isfinite(_value(config, key)):
            raise ConfigError(f'{key} must be a finite number, got {_value(config, key)!r}; {remedy}')
    for key in _POSITIVE:
        if _value(config, key) <= 0:
            raise ConfigError(f'{key} must be > 0, got {_value(config, key)!r}; {remedy}')
    for key in _NON_NEGATIVE:
        if _value(config, key) < 0:
            raise ConfigError(f'{key} must be >= 0, got {_value(config, key)!r}; {remedy}')
    for key, (low, high, shown) in _UNIT_INTERVAL.items():
        value = _value(config, key)
        inside = low < value <= high if shown.startswith('(') else low <= value <= high
        if not inside or (shown.endswith(')') and value == high):
            raise ConfigError(f'{key} must be in {shown}, got {value!r}; {remedy}')
    channels = config.DATA.IN_CHANNELS
    if channels not in (1, 3):
        raise ConfigError(f'DATA.IN_CHANNELS must be 1 (grey) or 3 (RGB), got {channels!r}')
    for key in ('DATA.MEAN', 'DATA.STD'):
        if len(_value(config, key)) != channels:
            raise ConfigError(f'{key} has {len(_value(config, key))} values but DATA.IN_CHANNELS is {channels}; '
                              'give one value per channel')
    if min(config.DATA.STD) <= 0:
        raise ConfigError(f'DATA.STD must be > 0 for every channel, got {list(config.DATA.STD)}')
    _check_distill(config.TRAIN.DISTILL, remedy)
    scheduled = config.TRAIN.WARMUP_EPOCHS + config.TRAIN.COOLDOWN_EPOCHS
    if scheduled > config.TRAIN.EPOCHS:
        raise ConfigError(f'TRAIN.WARMUP_EPOCHS + TRAIN.COOLDOWN_EPOCHS ({scheduled:g}) exceed TRAIN.EPOCHS '
                          f'({config.TRAIN.EPOCHS}); shorten them or train longer')

"""Build a model by name, as timm's `create_model`: `create_model('mobileformer_26m', pretrained=...,
num_classes=10)` builds the shipped config of that name (mobileformer/configs, see
`mobileformer.config.resolve_config`) from any folder; `list_models()` names them. Errors speak
Python (`num_classes=3`), not command-line flags: this is also what paddle.hub entries (hubconf.py)
call."""
from __future__ import annotations

import fnmatch
from typing import Any, List, Optional, Sequence, Union

import paddle.nn as nn

from mobileformer.checkpoint import load_state
from mobileformer.config import Overrides, config_names, get_config
from mobileformer.convert import weights_state
from mobileformer.registry import build_model
from mobileformer.weights import release_of

# create_model's keyword arguments (timm's names) and the config keys they set
KEYWORDS = {'num_classes': 'MODEL.NUM_CLASSES', 'img_size': 'DATA.IMAGE_SIZE',
            'drop_rate': 'MODEL.DROPOUT', 'drop_path_rate': 'MODEL.DROPPATH', 'out_indices': 'MODEL.OUT_INDICES'}


def _python_spelling(key: str, value: Any) -> str:
    keyword = next((k for k, v in KEYWORDS.items() if v == key), None)
    return f'{keyword}={value!r}' if keyword else f"opts=['{key}', {value!r}]"


PYTHON = Overrides('create_model()', 'fix it in the YAML or in the arguments of create_model', _python_spelling,
                   'the model name')


def list_models(pattern: str = '*') -> List[str]:
    """The names `create_model` builds (one per shipped model config, e.g. 'mobileformer_26m'),
    sorted, those matching the shell-style `pattern` ('mixer_*')."""
    return [name for name in config_names(top_level=True) if fnmatch.fnmatchcase(name, pattern)]


def create_model(model_name: str, pretrained: Union[bool, str, None] = False, *, num_classes: Optional[int] = None,
                 img_size: Optional[int] = None, drop_rate: Optional[float] = None,
                 drop_path_rate: Optional[float] = None, features_only: bool = False,
                 out_indices: Optional[Sequence[int]] = None, opts: Sequence[Any] = ()) -> nn.Layer:
    """The model of the shipped config `model_name` (`list_models()`; also 'digits/mobileformer_26m'
    or a YAML path), with `pretrained` weights loaded and switched to eval mode: True for the
    release `mobileformer.weights.RELEASES` names for `model_name` (downloaded once into the cache
    and converted), or a .pdparams or PyTorch checkpoint, as a path or a URL.

    The keyword arguments set the config keys of `KEYWORDS`; `opts` any others, as [KEY, VALUE, ...].
    With `num_classes` given, a checkpoint trained for another class count loads without its
    classifier (fine-tuning, announced in one line); without it, that is an error naming the count.
    `features_only` / `out_indices` build a feature extractor (mobileformer.backbone)."""
    given = {'num_classes': num_classes, 'img_size': img_size, 'drop_rate': drop_rate,
             'drop_path_rate': drop_path_rate, 'out_indices': out_indices}
    keyword_opts = []
    for keyword, value in given.items():
        if value is not None:
            keyword_opts += [KEYWORDS[keyword], list(value) if keyword == 'out_indices' else value]
    config = get_config(model_name, keyword_opts + list(opts), overrides=PYTHON)
    model = build_model(config, features_only=features_only)
    if pretrained:
        source, sha256 = pretrained, None
        if pretrained is True:
            release = release_of(model_name)
            source, sha256 = release.url, release.sha256
        state, hint = weights_state(source, config, sha256)
        load_state(model, state, source, drop_classifier=num_classes is not None, overrides=PYTHON, hint=hint)
        model.eval()
    return model

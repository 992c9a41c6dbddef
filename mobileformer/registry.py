"""Registries that every model family joins: model builders by MODEL.TYPE (with the family's config
defaults and a reduced variant for tests), weight converters, and MAdds rules for layers the counter
(mobileformer.flops) does not know."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import paddle
import paddle.nn as nn
from yacs.config import CfgNode

from mobileformer.models.backbone import Backbone
from mobileformer.config import ConfigError, register_model_defaults
from mobileformer.models.model_utils import has_deploy_structure

Builder = Callable[[CfgNode], nn.Layer]
StateDict = Mapping[str, np.ndarray]

_BUILDERS: Dict[str, Builder] = {}
# -opts [KEY, VALUE, ...] per MODEL.TYPE giving a small variant of the same blocks (fewer, narrower,
# on a smaller input), so generic tests of every config stay fast as families are added.
_REDUCED: Dict[str, list] = {}

MaddsRule = Callable[[nn.Layer, tuple, paddle.Tensor], int]
MADDS_RULES: Dict[type, MaddsRule] = {}


def register_madds(layer_type: type) -> Callable[[MaddsRule], MaddsRule]:
    """Registers `rule(layer, inputs, output) -> MAdds` for layers of `layer_type`."""
    def wrap(rule: MaddsRule) -> MaddsRule:
        MADDS_RULES[layer_type] = rule
        return rule
    return wrap


def register_model(model_type: str, defaults: Optional[Mapping[str, CfgNode]] = None,
                   reduced: Sequence[Any] = ()) -> Callable[[Builder], Builder]:
    """Registers `builder(config) -> nn.Layer` for `MODEL.TYPE == model_type`.

    `defaults` maps the MODEL subtrees the builder reads to their defaults, e.g. {'MIXER': node}
    for MODEL.MIXER; they join the config defaults now (types sharing a subtree pass the same node).
    `reduced` is the -opts list of a small variant of the same blocks (see `reduced_opts`).
    """
    def wrap(builder: Builder) -> Builder:
        if model_type in _BUILDERS:
            raise ValueError(f'MODEL.TYPE {model_type!r} is registered twice')
        for key, node in (defaults or {}).items():
            register_model_defaults(key, node)
        _BUILDERS[model_type] = builder
        _REDUCED[model_type] = list(reduced)
        return builder
    return wrap


def registered_models() -> list[str]:
    return sorted(_BUILDERS)


def reduced_opts(model_type: str) -> list:
    """The -opts [KEY, VALUE, ...] that `model_type` registered for a small, fast variant of its
    configs (same block types, fewer and narrower blocks, smaller images); [] if none."""
    return list(_REDUCED.get(model_type, []))


def build_model(config: CfgNode, features_only: bool = False,
                out_indices: Optional[Sequence[int]] = None) -> nn.Layer:
    """Builds the network that `config.MODEL.TYPE` names: a classifier, or a feature extractor
    (mobileformer.models.backbone) returning the list of outputs `out_indices` (default
    MODEL.OUT_INDICES, and when that is empty the family's default outputs) when `features_only`
    is set or indices are given."""
    model_type = config.MODEL.TYPE
    if model_type not in _BUILDERS:
        raise ValueError(f'unknown MODEL.TYPE {model_type!r}; registered types: {", ".join(registered_models())}')
    model = _BUILDERS[model_type](config)
    if config.MODEL.DEPLOY and not has_deploy_structure(model):
        raise ConfigError(f'MODEL.DEPLOY True builds the deploy structure of a re-parameterisable model '
                          f'(RepMLPNet, RepMLP-ResNet-50), which has checkpoints of its own; {model_type} has none: '
                          f'set MODEL.DEPLOY False')
    indices = list(config.MODEL.OUT_INDICES if out_indices is None else out_indices)
    if not (features_only or indices):
        return model
    if not isinstance(model, Backbone):
        raise ConfigError(f'MODEL.TYPE {model_type} has no feature outputs (no stages); leave MODEL.OUT_INDICES '
                          'empty and build it as a classifier')
    return model.as_features(indices)


@dataclass(frozen=True)
class Converter:
    """Maps a reference state dict (PyTorch names and layouts, numpy values) to ours.

    `detect(keys)` says whether a set of reference keys is in this converter's layout;
    `convert(state, config)` returns our state dict (numpy), Linear weights already transposed. It
    is a pure mapping: it raises only for keys it cannot place, and leaves checking the result
    against the model to `mobileformer.checkpoint.check_state`. `hint(keys, config)`, if given, says
    why the reference may not fit the model of `config` (e.g. a folded checkpoint for a training
    config), or None; it ends the check's error message.
    """
    name: str
    model_types: tuple
    detect: Callable[[Iterable[str]], bool]
    convert: Callable[[StateDict, CfgNode], Dict[str, np.ndarray]]
    hint: Optional[Callable[[Iterable[str], CfgNode], Optional[str]]] = None


_CONVERTERS: Dict[str, Converter] = {}


def register_converter(name: str, model_types: Iterable[str], detect: Callable[[Iterable[str]], bool],
                       hint: Optional[Callable[[Iterable[str], CfgNode], Optional[str]]] = None) -> Callable:
    """Registers `convert(state, config) -> state` as the `-from name` source format."""
    def wrap(convert: Callable) -> Callable:
        if name in _CONVERTERS:
            raise ValueError(f'converter {name!r} is registered twice')
        _CONVERTERS[name] = Converter(name, tuple(model_types), detect, convert, hint)
        return convert
    return wrap


def converters() -> Dict[str, Converter]:
    return dict(_CONVERTERS)

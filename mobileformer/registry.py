"""Registries that every model family joins: model builders by MODEL.TYPE, weight converters, and
MAdds rules for layers the counter (mobileformer.flops) does not know."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional

import numpy as np
import paddle
import paddle.nn as nn
from yacs.config import CfgNode

from mobileformer.config import ConfigError
from mobileformer.model_utils import has_foldable_layers

Builder = Callable[[CfgNode], nn.Layer]
StateDict = Mapping[str, np.ndarray]

_BUILDERS: Dict[str, Builder] = {}

MaddsRule = Callable[[nn.Layer, tuple, paddle.Tensor], int]
MADDS_RULES: Dict[type, MaddsRule] = {}


def register_madds(layer_type: type) -> Callable[[MaddsRule], MaddsRule]:
    """Registers `rule(layer, inputs, output) -> MAdds` for layers of `layer_type`."""
    def wrap(rule: MaddsRule) -> MaddsRule:
        MADDS_RULES[layer_type] = rule
        return rule
    return wrap


def register_model(model_type: str) -> Callable[[Builder], Builder]:
    """Registers `builder(config) -> nn.Layer` for `MODEL.TYPE == model_type`."""
    def wrap(builder: Builder) -> Builder:
        if model_type in _BUILDERS:
            raise ValueError(f'MODEL.TYPE {model_type!r} is registered twice')
        _BUILDERS[model_type] = builder
        return builder
    return wrap


def registered_models() -> list[str]:
    return sorted(_BUILDERS)


def build_model(config: CfgNode) -> nn.Layer:
    """Builds the network that `config.MODEL.TYPE` names."""
    model_type = config.MODEL.TYPE
    if model_type not in _BUILDERS:
        raise ValueError(f'unknown MODEL.TYPE {model_type!r}; registered types: {", ".join(registered_models())}')
    model = _BUILDERS[model_type](config)
    if config.MODEL.DEPLOY and not has_foldable_layers(model):
        raise ConfigError(f'MODEL.DEPLOY True builds the folded form of a re-parameterisable model '
                          f'(RepMLPNet, RepMLP-ResNet-50); {model_type} has none: set MODEL.DEPLOY False')
    return model


@dataclass(frozen=True)
class Converter:
    """Maps a reference state dict (PyTorch names and layouts, numpy values) to ours.

    `detect(keys)` says whether a set of reference keys is in this converter's layout;
    `convert(state, config)` returns our state dict (numpy), Linear weights already transposed. It
    is a pure mapping: it raises only for keys it cannot place, and leaves checking the result
    against the model to `mobileformer.weights.check_state`. `hint(keys, config)`, if given, says
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
    """Registers `convert(state, config) -> state` as the `--from name` source format."""
    def wrap(convert: Callable) -> Callable:
        if name in _CONVERTERS:
            raise ValueError(f'converter {name!r} is registered twice')
        _CONVERTERS[name] = Converter(name, tuple(model_types), detect, convert, hint)
        return convert
    return wrap


def converters() -> Dict[str, Converter]:
    return dict(_CONVERTERS)

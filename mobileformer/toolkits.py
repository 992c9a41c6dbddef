"""Adapters to the Paddle dense-prediction toolkits; neither is a dependency of this repository.

- PaddleSeg takes a backbone whose `feat_channels` lists the channels of its outputs and whose
  forward returns the list of maps: a feature extractor (`feature_backbone`) is one already.
  `register_paddleseg()` adds `feature_backbone` to PaddleSeg's backbone manager for its YAML files;
  PaddleSeg's builder passes a dataset's `img_channels` to the backbone as `in_channels`.
- PaddleDetection takes a backbone class registered with `@register` / `@serializable` whose
  forward reads `inputs['image']` and whose `out_shape` lists ShapeSpec(channels, stride):
  `DetBackbone`, registered by `register_paddledet()` (under the name `DetBackbone`).

The toolkit is imported only by the `register_*` functions and `DetBackbone.out_shape`, which the
toolkit itself calls. Usage: docs/backbones.md.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import paddle
import paddle.nn as nn

from mobileformer.models.backbone import Backbone
from mobileformer.checkpoint import load_weights
from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model


def feature_backbone(config: str, out_indices: Optional[Sequence[int]] = None, pretrained: Optional[str] = None,
                     opts: Sequence = (), in_channels: Optional[int] = None) -> Backbone:
    """The feature extractor of the model YAML `config` (with -opts `opts`): outputs `out_indices`
    (default: MODEL.OUT_INDICES, or the family's default maps), weights from the classifier or
    feature checkpoint `pretrained` (its head is left out). Every output must be a map.
    `in_channels` (1 or 3; default: the config's DATA.IN_CHANNELS) is the channels of the input
    images; DATA.MEAN / DATA.STD, which the toolkit does not use, are averaged or repeated to match."""
    model_config = get_config(config, list(opts))
    if in_channels is not None and in_channels != model_config.DATA.IN_CHANNELS:
        model_config = get_config(config, list(opts) + _channel_opts(model_config, in_channels))
    model = build_model(model_config, features_only=True, out_indices=out_indices)
    tokens = [info.name for info in model.feature_info if info.stride == 0]
    if tokens:
        raise ConfigError(f'dense-prediction toolkits take feature maps, but out_indices {model.out_indices} include '
                          f'the {tokens[0]}; leave that index out')
    if pretrained:
        load_weights(model, pretrained)
    return model


def _channel_opts(model_config, in_channels: int) -> list:
    """-opts giving the config `in_channels` input channels, with one mean and std per channel."""
    opts = ['DATA.IN_CHANNELS', in_channels]
    for key in ('MEAN', 'STD'):
        values = [float(v) for v in model_config.DATA[key]]
        if in_channels == 1:
            values = [sum(values) / len(values)]
        elif len(values) == 1:
            values = values * in_channels
        opts += [f'DATA.{key}', values]
    return opts


def register_paddleseg() -> None:
    """Makes `type: feature_backbone` usable in PaddleSeg YAML files (keys: config, out_indices,
    pretrained, opts, and in_channels, which PaddleSeg sets from a dataset's img_channels). Needs paddleseg."""
    from paddleseg.cvlibs import manager
    if 'feature_backbone' not in manager.BACKBONES.components_dict:
        manager.BACKBONES.add_component(feature_backbone)


class DetBackbone(nn.Layer):
    """A feature extractor in PaddleDetection's backbone convention: forward(inputs) reads
    inputs['image'] and returns the list of maps; `out_shape` gives their ShapeSpecs. The
    arguments are those of `feature_backbone` (PaddleDetection passes them from its YAML)."""

    def __init__(self, config: str, out_indices: Optional[Sequence[int]] = None, pretrained: Optional[str] = None,
                 opts: Sequence = ()):
        super().__init__()
        self.body = feature_backbone(config, out_indices, pretrained, opts)

    def forward(self, inputs: Dict[str, paddle.Tensor]) -> List[paddle.Tensor]:
        return self.body(inputs['image'])

    @property
    def out_shape(self) -> list:
        from ppdet.modeling.shape_spec import ShapeSpec
        return [ShapeSpec(channels=info.channels, stride=info.stride) for info in self.body.feature_info]


def register_paddledet() -> type:
    """Registers `DetBackbone` with PaddleDetection (once) so its YAML files can name it; returns
    the class. Needs ppdet."""
    from ppdet.core.workspace import global_config, register, serializable
    if DetBackbone.__name__ not in global_config:
        register(serializable(DetBackbone))
    return DetBackbone

"""The interface every model class shares, for classification and as a backbone of dense tasks.

Classification: `forward(x) = forward_head(forward_features(x))`; `forward_features` is unpooled (a
map [B, C, H, W] or tokens [B, N, C], per family), `forward_head(features, pre_logits=True)` stops
before the classifier and returns [B, num_features]. `get_classifier()` is the classifier whatever
its attribute (`classifier_name` says where it lives, so state-dict keys never change);
`reset_classifier(k)` replaces it, with an identity for k = 0 (the output is then pre-logits).

Features: `feature_specs()` lists every feature output a family offers (index order, channels and
stride of each); `as_features(out_indices)` turns the model into a feature extractor whose forward
returns the list of those outputs. The layers it does not run (the classification head, blocks
after the last output) are removed (`removed_layers`), so every remaining parameter trains (no
unused parameters for data-parallel training); the others keep their names, so a classification
checkpoint loads into it (mobileformer.checkpoint leaves the removed layers out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import paddle
import paddle.nn as nn

from mobileformer.errors import ConfigError


@dataclass(frozen=True)
class FeatureInfo:
    """One feature output: `channels` and `stride` (input pixels per map cell; 0 for a set of
    tokens [B, M, C], which has no grid). `name` says where it comes from, e.g. 'stage2', 'block7'."""
    name: str
    channels: int
    stride: int


def tokens_to_map(tokens: paddle.Tensor, height: int, width: int) -> paddle.Tensor:
    """Patch tokens [B, N, C] in row-major grid order -> map [B, C, height, width]."""
    return tokens.transpose([0, 2, 1]).reshape([0, tokens.shape[2], height, width])


def check_input_size(x: paddle.Tensor, model_name: str, exact: Optional[int] = None, multiple: int = 1) -> None:
    """Raises a ValueError when the input's sides are not `exact` (fixed-size models) or not
    multiples of `multiple`. Sides unknown while tracing (-1) are not checked."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if height < 0 or width < 0:
        return
    wrong_size = exact is not None and (height, width) != (exact, exact)
    if wrong_size or height % multiple or width % multiple:
        need = f'{exact}x{exact} inputs' if exact is not None else f'inputs whose sides are multiples of {multiple}'
        raise ValueError(f'{model_name} was built for {need}, got {height}x{width}; resize or pad the images to '
                         'that, or build the model for your size with -opts DATA.IMAGE_SIZE (its size-dependent '
                         'weights then differ from a checkpoint trained at the other size)')


def evenly_spaced(count: int, wanted: int = 4) -> List[int]:
    """Up to `wanted` block indices spread over `count` blocks, ending at the last one (the
    default outputs of a single-scale token model, as the 4 of 12 blocks ViT dense heads read)."""
    if count <= wanted:
        return list(range(count))
    step = count / wanted
    return [int(round(step * (i + 1))) - 1 for i in range(wanted)]


class Backbone(nn.Layer):
    """Base of every model class. A family sets `classifier_name`, `input_conv_name` (the conv that
    reads the image: fine-tuning adapts its kernel to another channel count), `num_features` and
    `num_classes`, and implements `forward_features`, `forward_head`, `feature_specs`,
    `_features(x, last)` (the outputs 0..last, computed no further than needed) and
    `_unused_layers(last)` (the layers a feature extractor whose last output is `last` does not
    run, as dotted names: `head`, `blocks.7`)."""

    classifier_name = 'head'
    input_conv_name = 'stem.proj'  # the patch embedding of the token models

    def __init__(self) -> None:
        super().__init__()
        self.out_indices: Optional[List[int]] = None
        self.removed_layers: Tuple[str, ...] = ()

    # ----------------------------------------------------------------------- classification
    def forward(self, x: paddle.Tensor) -> Union[paddle.Tensor, List[paddle.Tensor]]:
        if self.out_indices is not None:
            return self.forward_intermediates(x, self.out_indices)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Layer:
        """The layer mapping pre-logits to class logits (replaced when fine-tuning on other classes)."""
        layer = self
        for part in self.classifier_name.split('.'):
            layer = getattr(layer, part)
        return layer

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for `num_classes` (initialised as the family does), or an identity for 0."""
        if self.out_indices is not None:
            raise ValueError('a feature extractor has no classifier; build the model without features_only '
                             'or MODEL.OUT_INDICES to classify')
        *path, name = self.classifier_name.split('.')
        parent = self
        for part in path:
            parent = getattr(parent, part)
        setattr(parent, name, self._new_classifier(num_classes) if num_classes > 0 else nn.Identity())
        self.num_classes = num_classes

    def _new_classifier(self, num_classes: int) -> nn.Layer:
        return nn.Linear(self.num_features, num_classes)

    # ----------------------------------------------------------------------------- features
    @property
    def feature_info(self) -> List[FeatureInfo]:
        """The outputs of this feature extractor, or every output the model offers."""
        specs = self.feature_specs()
        return specs if self.out_indices is None else [specs[i] for i in self.out_indices]

    @property
    def feat_channels(self) -> List[int]:
        """Channels of each output (PaddleSeg's backbone attribute)."""
        return [info.channels for info in self.feature_info]

    def default_out_indices(self) -> List[int]:
        """The outputs of `as_features()` without indices: every stage (token models override)."""
        return [i for i, info in enumerate(self.feature_specs()) if info.stride > 0]

    def resolve_indices(self, indices: Optional[Sequence[int]]) -> List[int]:
        """`indices` (None: the defaults) as non-negative positions in `feature_specs()`;
        negative ones count from the end. Raises a ConfigError saying which exist."""
        specs = self.feature_specs()
        if indices is None or len(indices) == 0:
            if not self.default_out_indices():
                raise ConfigError(f'this {type(self).__name__} has no feature maps (no stage at stride 4 or '
                                  'more); give MODEL.OUT_INDICES explicitly or build it as a classifier')
            return self.default_out_indices()
        count = len(specs)
        valid = all(isinstance(i, int) and not isinstance(i, bool) and -count <= i < count for i in indices)
        resolved = [i % count for i in indices] if valid else []
        if not valid or len(set(resolved)) != len(resolved):
            offered = ', '.join(f'{i} {info.name}' for i, info in enumerate(specs))
            raise ConfigError(f'MODEL.OUT_INDICES {list(indices)} does not fit {type(self).__name__}, which has '
                              f'{count} feature outputs ({offered}); give distinct indices in [-{count}, {count})')
        return resolved

    def as_features(self, out_indices: Optional[Sequence[int]] = None) -> 'Backbone':
        """Turns this model, in place, into a feature extractor of `out_indices`; returns it."""
        indices = self.resolve_indices(out_indices)
        self.removed_layers = tuple(self._unused_layers(max(indices)))
        for name in self.removed_layers:
            *path, leaf = name.split('.')
            parent = self
            for part in path:
                parent = getattr(parent, part)
            # trailing entries of a LayerList / Sequential go too: the earlier ones keep their index
            del parent._sub_layers[leaf]
        self.out_indices = indices
        return self

    def forward_intermediates(self, x: paddle.Tensor, indices: Sequence[int]) -> List[paddle.Tensor]:
        """The outputs `indices` (non-negative, as `resolve_indices` gives) in that order."""
        outputs = self._features(x, max(indices))
        return [outputs[i] for i in indices]


class TokenBackbone(Backbone):
    """Patch-token models (Mixer, gMLP, ResMLP, FNet): `_embed(x)` gives tokens [B, N, C] on a fixed
    (image_size / patch_size)^2 grid, `blocks` (nn.Sequential) keep that shape, and the head is
    token mean -> `head_drop` -> `head`. Feature output i is block i reshaped to a map, stride P."""

    def __init__(self, image_size: int, patch_size: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.image_size, self.patch_size, self.grid = image_size, patch_size, image_size // patch_size
        self.num_features, self.num_classes = embed_dim, num_classes

    def _tokens(self, x: paddle.Tensor) -> paddle.Tensor:
        check_input_size(x, type(self).__name__, exact=self.image_size)
        return self._embed(x)

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.blocks(self._tokens(x))

    def forward_head(self, x: paddle.Tensor, pre_logits: bool = False) -> paddle.Tensor:
        x = self.head_drop(x.mean(axis=1))
        return x if pre_logits else self.head(x)

    def feature_specs(self) -> List[FeatureInfo]:
        return [FeatureInfo(f'block{i}', self.num_features, self.patch_size) for i in range(len(self.blocks))]

    def default_out_indices(self) -> List[int]:
        return evenly_spaced(len(self.blocks))

    def _features(self, x: paddle.Tensor, last: int) -> List[paddle.Tensor]:
        x, outputs = self._tokens(x), []
        for i in range(last + 1):
            x = self.blocks[i](x)
            outputs.append(tokens_to_map(x, self.grid, self.grid))
        return outputs

    def _unused_layers(self, last: int) -> List[str]:
        return ['head_drop', 'head'] + [f'blocks.{i}' for i in range(last + 1, len(self.blocks))]

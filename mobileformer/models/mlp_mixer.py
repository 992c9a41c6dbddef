"""MLP-Mixer, gMLP and ResMLP: one patch-token skeleton (timm `MlpMixer`) with three block types.

    image [B, 3, S, S] -> patch conv -> tokens [B, N, C] -> depth x block -> norm -> mean over N
    -> dropout -> Linear(C, classes)

Papers: MLP-Mixer (Tolstikhin et al., NeurIPS 2021, arXiv 2105.01601), gMLP ("Pay Attention to
MLPs", Liu et al., NeurIPS 2021, arXiv 2105.08050), ResMLP (Touvron et al., TPAMI 2023, arXiv
2105.03404). Reference code: timm `timm/models/mlp_mixer.py`; for ResMLP also the authors'
facebookresearch/deit `resmlp_models.py`. Layer names follow timm's checkpoints, so the timm converter
only transposes Linear weights; the authors' ResMLP layout is renamed. Differs from timm only where
ResMLP follows its authors (init, LayerScale 0.1 at depth 12). See docs/mlp_mixer.md.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Iterable, List

import numpy as np
import paddle
import paddle.nn as nn
from yacs.config import CfgNode

from mobileformer.models.backbone import TokenBackbone
from mobileformer.config import ConfigError, check_patch_grid
from mobileformer.cpu_ops import channel_scale
from mobileformer.models.layers import (GELU, DropPath, HalvedLinear, LayerNorm, Linear, Mlp, PatchEmbed, TokenLinear,
                                       drop_path_rates)
from mobileformer.registry import register_converter, register_model
from mobileformer.torch_io import to_paddle_layout

I = nn.initializer


class MixerBlock(nn.Layer):
    """x += TokenMLP(LN(x)^T)^T; x += ChannelMLP(LN(x))."""

    def __init__(self, dim: int, num_tokens: int, token_hidden: int, channel_hidden: int,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=1e-6)
        self.mlp_tokens = Mlp(num_tokens, token_hidden, linear=TokenLinear)
        self.norm2 = LayerNorm(dim, epsilon=1e-6)
        self.mlp_channels = Mlp(dim, channel_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x)))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class SpatialGatingUnit(nn.Layer):
    """gMLP's gate: u * Linear_NxN(LN(v) over tokens) for the halves u, v of its input."""

    def __init__(self, hidden: int, num_tokens: int):
        super().__init__()
        self.norm = LayerNorm(hidden // 2, epsilon=1e-5)  # PyTorch default, unlike the blocks
        self.proj = TokenLinear(num_tokens, num_tokens)

    def init_weights(self) -> None:
        # Near-zero weight and unit bias: the gate starts as identity (u * 1).
        I.Normal(0.0, 1e-6)(self.proj.weight)
        I.Constant(1.0)(self.proj.bias)

    def forward(self, u: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
        return u * self.proj(self.norm(v))


class GatedMlp(nn.Layer):
    """fc1 (C -> H) -> GELU -> spatial gate (H -> H/2) -> fc2 (H/2 -> C)."""

    def __init__(self, dim: int, hidden: int, num_tokens: int):
        super().__init__()
        self.fc1 = HalvedLinear(dim, hidden)  # the gate's two inputs
        self.act = GELU()
        self.gate = SpatialGatingUnit(hidden, num_tokens)
        self.fc2 = Linear(hidden // 2, dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        u, v = self.fc1(x)
        return self.fc2(self.gate(self.act(u), self.act(v)))


class SpatialGatingBlock(nn.Layer):
    """gMLP block: x += GatedMlp(LN(x))."""

    def __init__(self, dim: int, num_tokens: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.norm = LayerNorm(dim, epsilon=1e-6)
        self.mlp_channels = GatedMlp(dim, hidden, num_tokens)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + self.drop_path(self.mlp_channels(self.norm(x)))


class Affine(nn.Layer):
    """ResMLP's normalisation replacement: alpha * x + beta per channel (no statistics)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = self.create_parameter([dim], default_initializer=I.Constant(1.0))
        self.beta = self.create_parameter([dim], default_initializer=I.Constant(0.0))

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return channel_scale(x, self.alpha, self.beta)


class ResBlock(nn.Layer):
    """ResMLP block: x += ls1 * Linear_NxN(Aff(x)^T)^T; x += ls2 * MLP(Aff(x))."""

    def __init__(self, dim: int, num_tokens: int, hidden: int, layerscale_init: float,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = Affine(dim)
        self.linear_tokens = TokenLinear(num_tokens, num_tokens)
        self.norm2 = Affine(dim)
        self.mlp_channels = Mlp(dim, hidden)
        self.ls1 = self.create_parameter([dim], default_initializer=I.Constant(layerscale_init))
        self.ls2 = self.create_parameter([dim], default_initializer=I.Constant(layerscale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.drop_path(channel_scale(self.linear_tokens(self.norm1(x)), self.ls1))
        return x + self.drop_path(channel_scale(self.mlp_channels(self.norm2(x)), self.ls2))


BLOCK_TYPES = ('mixer', 'gmlp', 'resmlp')


class MlpMixer(TokenBackbone):
    """Patch embedding, `depth` blocks of `block_type`, final norm, token mean, dropout, classifier.

    block_type 'mixer' (token MLP of token_mlp_ratio x embed_dim, channel MLP of mlp_ratio x
    embed_dim), 'gmlp' (fc1 of mlp_ratio x embed_dim, half of it gates) or 'resmlp' (Affine norms,
    LayerScale layerscale_init); keys another block type has no use for are ignored. The token
    mixers are N x N, N = (image_size / patch_size)^2, so the image size is fixed. Initialised as the
    references: timm's init for Mixer and gMLP, the ResMLP authors' for ResMLP.

    Backbone interface (mobileformer.models.backbone.TokenBackbone): `forward_features` gives the tokens
    after the final norm, [B, N, C]; feature output i is block i (before the final norm) as a map
    [B, C, S/P, S/P], stride P. Inputs must be image_size x image_size.
    """

    def __init__(self, block_type: str = 'mixer', image_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 512, depth: int = 8, mlp_ratio: float = 4.0, token_mlp_ratio: float = 0.5,
                 layerscale_init: float = 0.1, in_channels: int = 3, num_classes: int = 1000,
                 dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__(image_size, patch_size, embed_dim, num_classes)
        if block_type not in BLOCK_TYPES:
            raise ValueError(f'block_type must be one of {BLOCK_TYPES}, got {block_type!r}')
        tokens = (image_size // patch_size) ** 2
        hidden = int(mlp_ratio * embed_dim)
        # Norm and blocks are made before the stem, as they always were: the order of the random
        # draws of the default initialisers decides the values the seeded re-initialisation gives.
        norm = Affine(embed_dim) if block_type == 'resmlp' else LayerNorm(embed_dim, epsilon=1e-6)
        blocks = []
        for rate in drop_path_rates(drop_path, depth):
            if block_type == 'mixer':
                blocks.append(MixerBlock(embed_dim, tokens, int(token_mlp_ratio * embed_dim), hidden, rate))
            elif block_type == 'gmlp':
                blocks.append(SpatialGatingBlock(embed_dim, tokens, hidden, rate))
            else:
                blocks.append(ResBlock(embed_dim, tokens, hidden, layerscale_init, rate))
        self.stem = PatchEmbed(in_channels, embed_dim, patch_size)
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        if block_type == 'resmlp':
            self._init_deit_resmlp()
        else:
            self._init_timm()

    def _embed(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.stem(x)

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.norm(super().forward_features(x))  # [B, N, C]

    def _unused_layers(self, last: int) -> List[str]:
        return ['norm'] + super()._unused_layers(last)

    def _init_timm(self) -> None:
        """timm's Mixer/gMLP init: xavier-uniform Linear with N(0, 1e-6) bias (every block Linear sits
        in an MLP), zero head (fresh logits are 0), lecun-normal patch conv with zero bias; the
        spatial gates then re-initialise themselves (timm visits children before parents)."""
        for name, layer in self.named_sublayers():
            if isinstance(layer, nn.Linear):
                head = name == 'head'
                (I.Constant(0.0) if head else I.XavierUniform())(layer.weight)
                (I.Constant(0.0) if head else I.Normal(0.0, 1e-6))(layer.bias)
            elif isinstance(layer, nn.Conv2D):
                _lecun_normal(layer.weight)
                I.Constant(0.0)(layer.bias)
        for layer in self.sublayers():
            if isinstance(layer, SpatialGatingUnit):
                layer.init_weights()

    def _init_deit_resmlp(self) -> None:
        """The ResMLP authors' init: every Linear (head included) trunc_normal(0.02) with zero bias;
        the patch conv keeps PyTorch's default, uniform(+-1/sqrt(fan_in)) for weight and bias."""
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                I.TruncatedNormal(0.0, 0.02, a=-2.0, b=2.0)(layer.weight)
                I.Constant(0.0)(layer.bias)
            elif isinstance(layer, nn.Conv2D):
                bound = 1.0 / math.sqrt(int(np.prod(layer.weight.shape[1:])))
                I.Uniform(-bound, bound)(layer.weight)
                I.Uniform(-bound, bound)(layer.bias)


def _lecun_normal(weight: paddle.Tensor) -> None:
    """Truncated normal (at 2 std) with std sqrt(1 / fan_in), as timm/JAX `lecun_normal`."""
    std = math.sqrt(1.0 / int(np.prod(weight.shape[1:])))
    I.TruncatedNormal(0.0, std / 0.87962566103423978, a=-2 * std, b=2 * std)(weight)


# ---- builders -------------------------------------------------------------------------------

# MODEL.MIXER (docs/mlp_mixer.md), one subtree for the three block types (MODEL.TYPE).
# TOKEN_MLP_RATIO (Mixer only) sizes the token MLP from EMBED_DIM (timm); MLP_RATIO is the channel
# MLP (gMLP: fc1 width, half of it gates); LAYERSCALE_INIT is ResMLP's.
MIXER_DEFAULTS = CfgNode({
    'PATCH_SIZE': 16,
    'EMBED_DIM': 512,
    'DEPTH': 8,
    'TOKEN_MLP_RATIO': 0.5,
    'MLP_RATIO': 4.0,
    'LAYERSCALE_INIT': 0.1,
})
# Same blocks (patch size, ratios, block type), fewer and narrower, on a smaller input.
_REDUCED = ['DATA.IMAGE_SIZE', 64, 'MODEL.MIXER.DEPTH', 2, 'MODEL.MIXER.EMBED_DIM', 64]


def _reject_unused(config: CfgNode, keys: Iterable[str]) -> None:
    """Keys of the shared MODEL.MIXER subtree that this block type has no use for must keep their
    defaults: a value set there would otherwise be silently ignored."""
    for key in keys:
        if config.MODEL.MIXER[key] != MIXER_DEFAULTS[key]:
            raise ConfigError(f'MODEL.MIXER.{key} does not apply to MODEL.TYPE {config.MODEL.TYPE!r}; '
                              f'remove it from the config')


def _hidden(ratio: float, dim: int, key: str) -> int:
    hidden = int(ratio * dim)
    if hidden <= 0:
        raise ConfigError(f'{key} {ratio} gives an empty hidden layer for EMBED_DIM {dim}; use a ratio > 0')
    return hidden


def _build(config: CfgNode, block_type: str) -> MlpMixer:
    m = config.MODEL.MIXER
    check_patch_grid(config.DATA.IMAGE_SIZE, m.PATCH_SIZE, 'MODEL.MIXER.PATCH_SIZE')
    return MlpMixer(block_type, config.DATA.IMAGE_SIZE, m.PATCH_SIZE, m.EMBED_DIM, m.DEPTH, m.MLP_RATIO,
                    m.TOKEN_MLP_RATIO, m.LAYERSCALE_INIT, config.DATA.IN_CHANNELS, config.MODEL.NUM_CLASSES,
                    config.MODEL.DROPOUT, config.MODEL.DROPPATH)


@register_model('mixer', defaults={'MIXER': MIXER_DEFAULTS}, reduced=_REDUCED)
def build_mixer(config: CfgNode) -> MlpMixer:
    """MLP-Mixer (arXiv 2105.01601)."""
    _reject_unused(config, ['LAYERSCALE_INIT'])
    m = config.MODEL.MIXER
    _hidden(m.TOKEN_MLP_RATIO, m.EMBED_DIM, 'MODEL.MIXER.TOKEN_MLP_RATIO')
    _hidden(m.MLP_RATIO, m.EMBED_DIM, 'MODEL.MIXER.MLP_RATIO')
    return _build(config, 'mixer')


@register_model('gmlp', defaults={'MIXER': MIXER_DEFAULTS}, reduced=_REDUCED)
def build_gmlp(config: CfgNode) -> MlpMixer:
    """gMLP (arXiv 2105.08050): MLP_RATIO sizes fc1; half of it is the gate."""
    _reject_unused(config, ['TOKEN_MLP_RATIO', 'LAYERSCALE_INIT'])
    m = config.MODEL.MIXER
    hidden = _hidden(m.MLP_RATIO, m.EMBED_DIM, 'MODEL.MIXER.MLP_RATIO')
    if hidden % 2:
        raise ConfigError(f'gMLP splits fc1 output in halves, but MODEL.MIXER.MLP_RATIO {m.MLP_RATIO} x '
                          f'EMBED_DIM {m.EMBED_DIM} = {hidden} is odd; choose values giving an even width')
    return _build(config, 'gmlp')


@register_model('resmlp', defaults={'MIXER': MIXER_DEFAULTS}, reduced=_REDUCED)
def build_resmlp(config: CfgNode) -> MlpMixer:
    """ResMLP (arXiv 2105.03404), authors' init; LAYERSCALE_INIT 0.1 / 1e-5 / 1e-6 by depth."""
    _reject_unused(config, ['TOKEN_MLP_RATIO'])
    m = config.MODEL.MIXER
    _hidden(m.MLP_RATIO, m.EMBED_DIM, 'MODEL.MIXER.MLP_RATIO')
    return _build(config, 'resmlp')


# ---- weight converters ----------------------------------------------------------------------

def _to_paddle(state: Dict[str, np.ndarray], rename: Callable[[str], str] = lambda key: key) -> Dict[str, np.ndarray]:
    """torch_io.to_paddle_layout, then per-channel vectors stored as (1, 1, C) by timm (Affine,
    LayerScale) -> (C,)."""
    converted, _ = to_paddle_layout(state, rename)
    return {k: v.reshape(-1) if re.search(r'(alpha|beta|ls[12])$', k) else v for k, v in converted.items()}


def _is_timm_mixer(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return 'stem.proj.weight' in keys and any(k.startswith('blocks.0.mlp_channels.') for k in keys)


@register_converter('timm', ['mixer', 'gmlp', 'resmlp'], detect=_is_timm_mixer)
def convert_timm(state: Dict[str, np.ndarray], config: CfgNode) -> Dict[str, np.ndarray]:
    """timm `MlpMixer` checkpoints (mixer_*, gmlp_*, resmlp_*): same names, PyTorch layouts."""
    return _to_paddle(state)


# The authors' ResMLP (facebookresearch/deit resmlp_models.py) names -> ours.
_DEIT_RESMLP_RENAMES = [
    (r'^patch_embed\.proj\.', 'stem.proj.'),
    (r'^blocks\.(\d+)\.attn\.', r'blocks.\1.linear_tokens.'),
    (r'^blocks\.(\d+)\.mlp\.', r'blocks.\1.mlp_channels.'),
    (r'^blocks\.(\d+)\.gamma_1$', r'blocks.\1.ls1'),
    (r'^blocks\.(\d+)\.gamma_2$', r'blocks.\1.ls2'),
]


def _is_deit_resmlp(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return 'patch_embed.proj.weight' in keys and 'blocks.0.gamma_1' in keys and 'blocks.0.attn.weight' in keys


def _deit_name(key: str) -> str:
    for pattern, replacement in _DEIT_RESMLP_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


@register_converter('deit-resmlp', ['resmlp'], detect=_is_deit_resmlp)
def convert_deit_resmlp(state: Dict[str, np.ndarray], config: CfgNode) -> Dict[str, np.ndarray]:
    """The authors' ResMLP checkpoints (resmlp_12/24/36, resmlpB_24; plain or distilled)."""
    return _to_paddle(state, _deit_name)


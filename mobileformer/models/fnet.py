"""FNet as an image classifier ("FNet: Mixing Tokens with Fourier Transforms", Lee-Thorp et al.,
NAACL 2022, arXiv 2105.03824), an NLP model; the image version follows the Keras example "Image
classification with modern MLP models" (keras.io/examples/vision/mlp_image_classification).

    image -> patch conv -> tokens [B, N, C] + learned position embedding
    -> depth x (x = LN(x + Re(FFT2(x))); x = LN(x + FFN(x))) -> mean over N -> dropout -> Linear

The Fourier layer has no parameters; the 2-D transform runs over (tokens, hidden) and only the
real part is kept. Differs from the Keras example: no dropout inside the FFN (MODEL.DROPOUT acts
before the classifier only). See docs/fnet.md.
"""
from __future__ import annotations

import math

import paddle
import paddle.nn as nn
from yacs.config import CfgNode

from mobileformer.models.backbone import TokenBackbone
from mobileformer.config import ConfigError, check_patch_grid
from mobileformer.models.layers import DropPath, Mlp, PatchEmbed, drop_path_rates
from mobileformer.registry import register_madds, register_model

I = nn.initializer


class FourierMixing(nn.Layer):
    """Re(FFT2(x)) over the last two axes (tokens, hidden) of x [B, N, C]."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.real(paddle.fft.fft2(paddle.complex(x, paddle.zeros_like(x)), axes=(-2, -1)))


@register_madds(FourierMixing)
def _fourier_madds(layer: FourierMixing, inputs: tuple, output: paddle.Tensor) -> int:
    """Radix-2 FFT estimate: one multiply-add per element per stage, N*C*log2(N*C) per sample
    (2-D FFT = FFTs over both axes, log2 N + log2 C stages); complex-arithmetic constants ignored."""
    batch, tokens, dim = (int(s) for s in output.shape)
    return int(round(batch * tokens * dim * math.log2(tokens * dim)))


class FNetBlock(nn.Layer):
    """Post-norm encoder block with Fourier mixing in place of self-attention."""

    def __init__(self, dim: int, hidden: int, drop_path: float = 0.0):
        super().__init__()
        self.mixing = FourierMixing()
        self.norm1 = nn.LayerNorm(dim, epsilon=1e-6)
        self.ffn = Mlp(dim, hidden)
        self.norm2 = nn.LayerNorm(dim, epsilon=1e-6)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.norm1(x + self.drop_path(self.mixing(x)))
        return self.norm2(x + self.drop_path(self.ffn(x)))


class FNet(TokenBackbone):
    """Patch tokens + learned position embedding, `depth` Fourier blocks, token mean, dropout,
    classifier; the Keras example's init. N = (image_size / patch_size)^2 tokens, fixed.

    Backbone interface (mobileformer.models.backbone.TokenBackbone): `forward_features` gives the tokens of
    the last block, [B, N, C]; feature output i is block i as a map [B, C, S/P, S/P], stride P.
    Inputs must be image_size x image_size (the position embedding has N entries)."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, embed_dim: int, depth: int,
                 mlp_ratio: float, num_classes: int, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__(image_size, patch_size, embed_dim, num_classes)
        tokens = (image_size // patch_size) ** 2
        self.stem = PatchEmbed(in_channels, embed_dim, patch_size)
        self.pos_embed = self.create_parameter([1, tokens, embed_dim],
                                               default_initializer=I.TruncatedNormal(0.0, 0.02, a=-0.04, b=0.04))
        hidden = int(mlp_ratio * embed_dim)
        self.blocks = nn.Sequential(*[FNetBlock(embed_dim, hidden, rate)
                                      for rate in drop_path_rates(drop_path, depth)])
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights(in_channels * patch_size ** 2, embed_dim)

    def _init_weights(self, patch_fan_in: int, embed_dim: int) -> None:
        # Keras defaults of the example: glorot-uniform dense layers with zero bias; the patch conv
        # is its Dense over flattened patches (fans: P*P*3 in, C out).
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                I.XavierUniform()(layer.weight)
                I.Constant(0.0)(layer.bias)
        limit = math.sqrt(6.0 / (patch_fan_in + embed_dim))
        I.Uniform(-limit, limit)(self.stem.proj.weight)
        I.Constant(0.0)(self.stem.proj.bias)

    def _embed(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.stem(x) + self.pos_embed


# MODEL.FNET (docs/fnet.md): patch embedding + learned position embedding, Fourier-mixing post-norm
# blocks.
FNET_DEFAULTS = CfgNode({
    'PATCH_SIZE': 16,
    'EMBED_DIM': 512,
    'DEPTH': 8,
    'MLP_RATIO': 4.0,
})


@register_model('fnet', defaults={'FNET': FNET_DEFAULTS},
                reduced=['DATA.IMAGE_SIZE', 64, 'MODEL.FNET.DEPTH', 2, 'MODEL.FNET.EMBED_DIM', 64])
def build_fnet(config: CfgNode) -> FNet:
    f = config.MODEL.FNET
    check_patch_grid(config.DATA.IMAGE_SIZE, f.PATCH_SIZE, 'MODEL.FNET.PATCH_SIZE')
    if int(f.MLP_RATIO * f.EMBED_DIM) <= 0:
        raise ConfigError(f'MODEL.FNET.MLP_RATIO {f.MLP_RATIO} gives an empty FFN; use a ratio > 0')
    return FNet(config.DATA.IN_CHANNELS, config.DATA.IMAGE_SIZE, f.PATCH_SIZE, f.EMBED_DIM, f.DEPTH,
                f.MLP_RATIO, config.MODEL.NUM_CLASSES, config.MODEL.DROPOUT, config.MODEL.DROPPATH)

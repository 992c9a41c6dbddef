"""Mobile-Former ("Mobile-Former: Bridging MobileNet and Transformer", Chen et al., CVPR 2022,
arXiv 2108.05895), following the authors' release (github.com/AAboys/MobileFormer).

Differs from the release in form only: our parameter names (the converter renames), block rows
without the repeat count, export-time rewrites that compute the same numbers, and the linear
drop-path ramp (equal at the released rate, 0). Architecture, sizes and recipe: docs/mobileformer.md.

A MobileNet-style branch (feature map, NCHW) and a tiny Transformer (M learnable tokens of width d)
run in parallel and talk through two light cross-attention bridges in every block:

    z = MobileToFormer(x, z)        tokens read the map (2 heads, no projection on the map side)
    z = Former(z)                   4-head self-attention + FFN on the tokens (post-norm)
    h = mobile(x, z[:, 0])          convs whose dynamic ReLUs are generated from token 0
    h = h + x                       identity skip (stride 1, same width)
    x = FormerToMobile(h, z)        the map reads the tokens (2 heads)

Inference form: `re_parameterize()` (PaddleClas convention, applied by `re_parameterize_model`,
hence by export.py) folds the constant scales and affine maps after the bridges' and dynamic ReLUs'
Linears into those Linears' weights, leaving one clip where `2 * hard_sigmoid` stood: the same
outputs with fewer ops per image. The folded weights keep every key and shape, so they are no deploy
checkpoint (`InferenceFold`).

Tokens are kept batch-first, [B, M, d]. Every attention batches all heads in one `paddle.matmul`
on [B, heads, ...] views; heads are contiguous channel chunks, so the feature map is only ever
reshaped, never transposed.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from yacs.config import CfgNode

from mobileformer.models.backbone import Backbone, FeatureInfo
from mobileformer.config import ConfigError
from mobileformer.cpu_ops import dynamic_relu, traced_for_onnx
from mobileformer.checkpoint import list_names
from mobileformer.models.layers import DepthwiseConv2D, DropPath, drop_path_rates
from mobileformer.models.model_utils import fuse_conv_bn
from mobileformer.registry import register_converter, register_madds, register_model
from mobileformer.torch_io import to_paddle_layout

BLOCK_KINDS = ('lite', 'mf', 'down')
Row = Tuple[str, int, int, int, int]  # (kind, e1, out_channels, stride, e2), one block
_STRIDES = {'lite': (1, 2), 'mf': (1,), 'down': (2,)}


def hard_sigmoid(x: paddle.Tensor) -> paddle.Tensor:
    """relu6(x + 3) / 6, written out: Paddle's hardsigmoid rounds its slope to 0.1666667."""
    return F.relu6(x + 3.0) / 6.0


def channel_shuffle(x: paddle.Tensor, groups: int) -> paddle.Tensor:
    """F.channel_shuffle in dygraph; spelled reshape -> transpose -> reshape when traced for export,
    because the inference engine runs those three with oneDNN, while `channel_shuffle` has no oneDNN
    kernel and the layout conversions around it cost more than the op (measured: MF-26M batch 32
    0.21 -> 0.14 s with the dynamic ReLU below). In dygraph the 5-D transpose is the slow one."""
    if paddle.in_dynamic_mode():
        return F.channel_shuffle(x, groups)
    _, channels, height, width = x.shape
    x = x.reshape([0, groups, channels // groups, height, width]).transpose([0, 2, 1, 3, 4])
    return x.reshape([0, channels, height, width])


def fold_affine(linear: nn.Linear, scale: float, shift: float | paddle.Tensor = 0.0) -> None:
    """Makes `linear` compute `linear(x) * scale + shift`, in place."""
    linear.weight.set_value(linear.weight * scale)
    linear.bias.set_value(linear.bias * scale + shift)


class InferenceFold(nn.Layer):
    """A layer with an inference form (PaddleClas convention: `re_parameterize()`, `is_repped`): the
    `_fold()` each subclass defines moves constant arithmetic into its own Linears' weights and biases, and its forward
    then skips that arithmetic. Training never folds.

    `folds_values_only`: the folded state dict has the training keys and shapes, so it could not be
    told from a training checkpoint; `model_utils.has_deploy_structure` leaves such layers out, so
    `reparam.py` writes no folded Mobile-Former checkpoint and MODEL.DEPLOY does not apply to it:
    checkpoints stay in the training form and export.py folds them."""

    folds_values_only = True

    def __init__(self):
        super().__init__()
        self.is_repped = False

    def re_parameterize(self) -> None:
        with paddle.no_grad():
            self._fold()
        self.is_repped = True


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear with the release's init: weight N(0, 0.01), bias 0."""
    return nn.Linear(in_features, out_features,
                     weight_attr=paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 0.01)),
                     bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)))


class ConvBNShuffle(nn.Layer):
    """Bias-free conv -> BatchNorm -> [channel shuffle]. Conv init N(0, sqrt(2 / (k*k*out)))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, shuffle_groups: int = 1):
        super().__init__()
        std = math.sqrt(2.0 / (kernel_size * kernel_size * out_channels))
        init = paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std))
        if groups == in_channels and kernel_size > 1:
            self.conv = DepthwiseConv2D(in_channels, out_channels, kernel_size, stride, weight_attr=init)
        else:
            self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                                  groups=groups, bias_attr=False, weight_attr=init)
        self.bn = nn.BatchNorm2D(out_channels, momentum=0.9, epsilon=1e-5)
        self.shuffle_groups = shuffle_groups
        # an expanding depthwise conv whose output is shuffled across its input channels
        expanding_depthwise = isinstance(self.conv, DepthwiseConv2D) and shuffle_groups == in_channels
        self.tiles = out_channels // in_channels if expanding_depthwise else 1

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        # only for paddle.inference: onnxruntime runs the plain form faster at batch 32 (the copy of
        # the tiled input costs more than the shuffle it saves; CPU seconds, 1 thread, MF-26M:
        # 0.164 tiled vs 0.134 plain; batch 1: 0.0046 vs 0.0051), OpenVINO runs both alike
        if self.tiles > 1 and not self.training and not paddle.in_dynamic_mode() and not traced_for_onnx():
            return self._tiled_depthwise(x)
        x = self.bn(self.conv(x))
        if self.shuffle_groups > 1:
            x = channel_shuffle(x, self.shuffle_groups)
        return x

    def _tiled_depthwise(self, x: paddle.Tensor) -> paddle.Tensor:
        """The same output, traced for inference: shuffled channel t*C + c is filter t of input
        channel c, i.e. a plain depthwise conv of the input tiled `tiles` times whose weights (BN
        folded in) are reordered alike. The shuffle disappears and the tile is 1/tiles of its size
        (measured: MF-26M exported, batch 32, median of per-run minima 0.165 -> 0.145 s)."""
        channels, tiles, k = x.shape[1], self.tiles, self.conv.weight.shape[-1]
        weight, bias = fuse_conv_bn(self.conv.weight, self.bn)                          # [C*tiles, ...]

        def reorder(t: paddle.Tensor) -> paddle.Tensor:   # [C*tiles, ...] index c*tiles+t -> t*C+c
            rest = list(t.shape[1:])
            t = t.reshape([channels, tiles] + rest).transpose([1, 0] + list(range(2, 2 + len(rest))))
            return t.reshape([channels * tiles] + rest)

        return F.conv2d(paddle.concat([x] * tiles, axis=1), reorder(weight), reorder(bias),
                        stride=self.conv.stride, padding=k // 2, groups=channels * tiles)


class DynamicReLU(InferenceFold):
    """y = max(a1 * x, a2 * x) per channel, slopes generated from the first token.

    theta = hard_sigmoid(fc2(relu(fc1(token)))) is [B, 2C], split [first C | last C]:
    a1 = 2 (theta1 - 0.5) + 1, a2 = 2 (theta2 - 0.5). Near init theta ~ 0.5, i.e. a plain ReLU.
    With hard_sigmoid(z) = clip(z / 6 + 1/2, 0, 1) these are a1 = clip(z1 / 3 + 1, 0, 2) and
    a2 = clip(z2 / 3, -1, 1): the inference form folds 1/3 and [1 | 0] into fc2.
    """

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def __init__(self, channels: int, token_dim: int, reduction: int):
        super().__init__()
        self.channels = channels
        self.fc1 = _linear(token_dim, token_dim // reduction)
        self.fc2 = _linear(token_dim // reduction, 2 * channels)

    def forward(self, x: paddle.Tensor, token: paddle.Tensor) -> paddle.Tensor:
        z = self.fc2(F.relu(self.fc1(token)))                            # [B, 2C]
        if self.is_repped:
            # one reshape to the slopes' broadcast form instead of an unsqueeze per slope
            z1, z2 = paddle.split(z.reshape([0, 2 * self.channels, 1, 1]), 2, axis=1)
            return dynamic_relu(x, paddle.clip(z1, 0.0, 2.0), paddle.clip(z2, -1.0, 1.0))
        slope1, slope2 = paddle.split((hard_sigmoid(z) - 0.5) * 2.0, 2, axis=1)  # [B, C] each
        return dynamic_relu(x, slope1 + 1.0, slope2)

    def _fold(self) -> None:
        shift = paddle.concat([paddle.ones([self.channels]), paddle.zeros([self.channels])])
        fold_affine(self.fc2, 1.0 / 3.0, shift)


@register_madds(DynamicReLU)
def _dynamic_relu_madds(layer: DynamicReLU, inputs: tuple, output: paddle.Tensor) -> int:
    """Two multiplies per element of the activated map (its generator Linears are counted apart)."""
    return 2 * int(np.prod([int(s) for s in inputs[0].shape]))


def _split_heads(tokens: paddle.Tensor, heads: int) -> paddle.Tensor:
    """[B, M, C] -> [B, heads, M, C/heads]."""
    return tokens.reshape([0, 0, heads, -1]).transpose([0, 2, 1, 3])


def _merge_heads(tokens: paddle.Tensor) -> paddle.Tensor:
    """[B, heads, M, C/heads] -> [B, M, C]. A reshape, not flatten(2): paddle2onnx turns the
    flatten into a Shape/Slice/Concat chain before its Reshape."""
    return tokens.transpose([0, 2, 1, 3]).reshape([0, 0, -1])


class MobileToFormer(InferenceFold):
    """Tokens query the raw feature map (k = v = map), gated per channel, then proj + post-norm.

    Inference form: the attention scale folded into q, and the gate 2 * hard_sigmoid(z) =
    clip(z / 3 + 1, 0, 2) into the gate Linear, leaving one clip."""

    def __init__(self, channels: int, token_dim: int, heads: int, drop_path: float):
        super().__init__()
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.gate = _linear(token_dim, channels)
        self.q = _linear(token_dim, channels)
        self.proj = _linear(channels, token_dim)
        self.norm = nn.LayerNorm(token_dim, epsilon=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor, tokens: paddle.Tensor) -> paddle.Tensor:
        q = _split_heads(self.q(tokens), self.heads)                     # [B, h, M, C/h]
        kv = x.reshape([0, self.heads, x.shape[1] // self.heads, -1])    # [B, h, C/h, HW]
        logits = paddle.matmul(q, kv)                                    # [B, h, M, HW]
        attn = F.softmax(logits if self.is_repped else logits * self.scale, axis=-1)
        out = _merge_heads(paddle.matmul(attn, kv, transpose_y=True))    # [B, M, C]
        gate = self.gate(tokens)
        out = out * (paddle.clip(gate, 0.0, 2.0) if self.is_repped else 2.0 * hard_sigmoid(gate))
        return self.norm(tokens + self.drop_path(self.proj(out)))

    def _fold(self) -> None:
        fold_affine(self.q, self.scale)
        fold_affine(self.gate, 1.0 / 3.0, 1.0)


class Former(InferenceFold):
    """Post-norm Transformer block on the tokens; only q is projected (k = v = tokens).
    Inference form: the attention scale folded into q."""

    def __init__(self, token_dim: int, heads: int, ffn_ratio: int, drop_path: float):
        super().__init__()
        self.heads = heads
        self.scale = (token_dim // heads) ** -0.5
        self.q = _linear(token_dim, token_dim)
        self.proj = _linear(token_dim, token_dim)
        self.norm1 = nn.LayerNorm(token_dim, epsilon=1e-5)
        self.fc1 = _linear(token_dim, token_dim * ffn_ratio)
        self.fc2 = _linear(token_dim * ffn_ratio, token_dim)
        self.norm2 = nn.LayerNorm(token_dim, epsilon=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: paddle.Tensor) -> paddle.Tensor:
        q = _split_heads(self.q(tokens), self.heads)                     # [B, h, M, d/h]
        kv = _split_heads(tokens, self.heads)
        logits = paddle.matmul(q, kv, transpose_y=True)                  # [B, h, M, M]
        attn = F.softmax(logits if self.is_repped else logits * self.scale, axis=-1)
        out = _merge_heads(paddle.matmul(attn, kv))
        tokens = self.norm1(tokens + self.drop_path(self.proj(out)))
        return self.norm2(tokens + self.fc2(F.gelu(self.fc1(tokens))))

    def _fold(self) -> None:
        fold_affine(self.q, self.scale)


class FormerToMobile(InferenceFold):
    """The raw feature map queries the tokens (separate k and v projections); added to the map.
    Inference form: the attention scale folded into k (the query, the map, has no projection)."""

    def __init__(self, channels: int, token_dim: int, heads: int, drop_path: float):
        super().__init__()
        self.heads = heads
        self.scale = (channels // heads) ** -0.5
        self.k = _linear(token_dim, channels)
        self.v = _linear(token_dim, channels)
        self.drop_path = DropPath(drop_path)

    def _per_head(self, tokens: paddle.Tensor) -> paddle.Tensor:
        """[B, M, C] -> [B, h, C/h, M]: channels first, like the map."""
        return tokens.transpose([0, 2, 1]).reshape([0, self.heads, -1, tokens.shape[1]])

    def forward(self, x: paddle.Tensor, tokens: paddle.Tensor) -> paddle.Tensor:
        q = x.reshape([0, self.heads, x.shape[1] // self.heads, -1])     # [B, h, C/h, HW]
        k, v = self._per_head(self.k(tokens)), self._per_head(self.v(tokens))
        # Attention kept as [B, h, M, HW] (softmax over the tokens) so the output comes out
        # channels-first, [B, h, C/h, HW], and reshapes straight back to the map.
        logits = paddle.matmul(k, q, transpose_x=True)
        attn = F.softmax(logits if self.is_repped else logits * self.scale, axis=2)
        out = paddle.matmul(v, attn).reshape([0, x.shape[1], x.shape[2], x.shape[3]])
        return x + self.drop_path(out)

    def _fold(self) -> None:
        fold_affine(self.k, self.scale)


class LiteBlock(nn.Layer):
    """Conv-only bottleneck: expanding dw3x3 -> ReLU6 -> [shuffle] -> pw; no tokens."""

    def __init__(self, in_channels: int, e1: int, out_channels: int, stride: int, groups: int,
                 drop_path: float):
        super().__init__()
        hidden = in_channels * e1
        self.dw = ConvBNShuffle(in_channels, hidden, 3, stride, groups=in_channels,
                                shuffle_groups=in_channels if groups > 1 else 1)
        self.pw = ConvBNShuffle(hidden, out_channels, groups=groups)
        self.use_skip = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor, tokens: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        # The shuffle sits after ReLU6 in the release; a channel permutation commutes with it.
        h = self.pw(F.relu6(self.dw(x)))
        return (x + self.drop_path(h) if self.use_skip else h), tokens


class InvertedBottleneck(nn.Layer):
    """Mobile branch of a stride-1 block: pw expand -> dyReLU -> dw3x3 -> dyReLU -> pw project."""

    def __init__(self, in_channels: int, e1: int, out_channels: int, groups: int, token_dim: int,
                 reduction: int):
        super().__init__()
        hidden = in_channels * e1
        self.expand = ConvBNShuffle(in_channels, hidden, groups=groups, shuffle_groups=groups)
        self.act1 = DynamicReLU(hidden, token_dim, reduction)
        self.dw = ConvBNShuffle(hidden, hidden, 3, groups=hidden)
        self.act2 = DynamicReLU(hidden, token_dim, reduction)
        self.project = ConvBNShuffle(hidden, out_channels, groups=groups, shuffle_groups=groups)

    def forward(self, x: paddle.Tensor, token: paddle.Tensor) -> paddle.Tensor:
        h = self.act1(self.expand(x), token)
        h = self.act2(self.dw(h), token)
        return self.project(h)


class DownsampleBottleneck(nn.Layer):
    """Mobile branch of a stride-2 block: expanding dw3x3/2 -> dyReLU -> pw, then an inner
    residual around expanding dw3x3 -> dyReLU -> pw."""

    def __init__(self, in_channels: int, e1: int, out_channels: int, e2: int, groups: int,
                 token_dim: int, reduction: int, drop_path: float):
        super().__init__()
        hidden1, hidden2 = in_channels * e1, out_channels * e2
        shuffle = groups > 1
        self.dw1 = ConvBNShuffle(in_channels, hidden1, 3, 2, groups=in_channels,
                                 shuffle_groups=in_channels if shuffle else 1)
        self.act1 = DynamicReLU(hidden1, token_dim, reduction)
        self.pw1 = ConvBNShuffle(hidden1, out_channels, groups=groups)
        self.dw2 = ConvBNShuffle(out_channels, hidden2, 3, groups=out_channels,
                                 shuffle_groups=out_channels if shuffle else 1)
        self.act2 = DynamicReLU(hidden2, token_dim, reduction)
        self.pw2 = ConvBNShuffle(hidden2, out_channels, groups=groups)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor, token: paddle.Tensor) -> paddle.Tensor:
        h = self.pw1(self.act1(self.dw1(x), token))
        return h + self.drop_path(self.pw2(self.act2(self.dw2(h), token)))


class MobileFormerBlock(nn.Layer):
    """Mobile->Former bridge, Former, mobile branch, identity skip, Former->Mobile bridge."""

    def __init__(self, kind: str, in_channels: int, e1: int, out_channels: int, e2: int, token_dim: int,
                 groups: int = 1, bridge_heads: int = 2, former_heads: int = 4, ffn_ratio: int = 2,
                 dyrelu_reduction: int = 4, drop_path: float = 0.0):
        super().__init__()
        d = token_dim
        self.mobile_to_former = MobileToFormer(in_channels, d, bridge_heads, drop_path)
        self.former = Former(d, former_heads, ffn_ratio, drop_path)
        if kind == 'mf':
            self.mobile = InvertedBottleneck(in_channels, e1, out_channels, groups, d, dyrelu_reduction)
        else:
            self.mobile = DownsampleBottleneck(in_channels, e1, out_channels, e2, groups, d,
                                               dyrelu_reduction, drop_path)
        self.former_to_mobile = FormerToMobile(out_channels, d, bridge_heads, drop_path)
        self.use_skip = kind == 'mf' and in_channels == out_channels
        self.drop_path = DropPath(drop_path)

    def forward(self, x: paddle.Tensor, tokens: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        tokens = self.former(self.mobile_to_former(x, tokens))
        h = self.mobile(x, tokens[:, 0])
        if self.use_skip:
            h = x + self.drop_path(h)
        return self.former_to_mobile(h, tokens), tokens


class ClassifierHead(nn.Layer):
    """[shuffle] -> conv1x1 (C -> e*C) -> ReLU6 -> GAP -> h-swish, concat token 0 -> FC -> BN1D
    -> h-swish -> dropout -> FC. Returns logits (softmax belongs to prediction code)."""

    def __init__(self, channels: int, expansion: int, token_dim: int, hidden: int, groups: int,
                 dropout: float, num_classes: int):
        super().__init__()
        self.shuffle_groups = groups
        self.conv = ConvBNShuffle(channels, channels * expansion, groups=groups)
        self.fc = _linear(channels * expansion + token_dim, hidden)
        self.norm = nn.BatchNorm1D(hidden, momentum=0.9, epsilon=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.classifier = _linear(hidden, num_classes)

    def forward(self, x: paddle.Tensor, token: paddle.Tensor, pre_logits: bool = False) -> paddle.Tensor:
        if self.shuffle_groups > 1:
            x = channel_shuffle(x, self.shuffle_groups)
        # [B, C, 1, 1] -> [B, C]: a reshape (see _merge_heads)
        x = F.hardswish(F.adaptive_avg_pool2d(F.relu6(self.conv(x)), 1)).reshape([0, -1])
        x = self.dropout(F.hardswish(self.norm(self.fc(paddle.concat([x, token], axis=1)))))
        return x if pre_logits else self.classifier(x)


class MobileFormer(Backbone):
    """Stem -> blocks (lite / mf / down) -> final Mobile->Former bridge -> head; returns logits.

    `blocks` holds one row (kind, e1, out_channels, stride, e2) per block, kind in {lite, mf, down}
    (docs/mobileformer.md); `build_mformer` checks them and the widths against the other sizes.

    Backbone interface (mobileformer.models.backbone): `forward_features` gives both branches, the last
    map [B, C, H/32, W/32] and the tokens [B, M, d] after the final bridge (the head reads both);
    the feature outputs are the last block of every stride the blocks reach (4, 8, 16, 32 in the
    released sizes), then the tokens. Any input size works.
    """

    classifier_name = 'head.classifier'
    input_conv_name = 'stem.conv'

    def __init__(self, blocks: Sequence[Row], stem_channels: int = 8, num_tokens: int = 3,
                 token_dim: int = 128, head_hidden: int = 1024, last_expansion: int = 6, groups: int = 1,
                 bridge_heads: int = 2, former_heads: int = 4, ffn_ratio: int = 2, dyrelu_reduction: int = 4,
                 in_channels: int = 3, num_classes: int = 1000, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.tokens = self.create_parameter([num_tokens, token_dim],
                                            default_initializer=nn.initializer.Normal(0.0, 1.0))
        self.stem = ConvBNShuffle(in_channels, stem_channels, 3, 2)
        rates = drop_path_rates(drop_path, len(blocks))
        former = dict(token_dim=token_dim, groups=groups, bridge_heads=bridge_heads, former_heads=former_heads,
                      ffn_ratio=ffn_ratio, dyrelu_reduction=dyrelu_reduction)
        layers, channels = [], stem_channels
        for (kind, e1, out, stride, e2), rate in zip(blocks, rates):
            if kind == 'lite':
                layers.append(LiteBlock(channels, e1, out, stride, groups, rate))
            else:
                layers.append(MobileFormerBlock(kind, channels, e1, out, e2, drop_path=rate, **former))
            channels = out
        self.blocks = nn.LayerList(layers)
        self.final_bridge = MobileToFormer(channels, token_dim, bridge_heads, drop_path)
        self.head = ClassifierHead(channels, last_expansion, token_dim, head_hidden, groups, dropout, num_classes)
        self.num_features, self.num_classes = head_hidden, num_classes
        # the feature outputs: the last block at each stride from 4 on (the detection and
        # segmentation strides; a stride-2 block only refines the stem's map), then the tokens
        strides, stride = [], 2
        for i, (_, _, out, block_stride, _) in enumerate(blocks):
            stride *= block_stride
            if stride >= 4 and (i + 1 == len(blocks) or blocks[i + 1][3] > 1):
                strides.append((i, out, stride))
        self._stage_ends = [i for i, _, _ in strides]
        self._specs = [FeatureInfo(f'stride{s}', out, s) for _, out, s in strides]
        self._specs.append(FeatureInfo('tokens', token_dim, 0))

    def _new_classifier(self, num_classes: int) -> nn.Linear:
        return _linear(self.num_features, num_classes)

    def _run(self, x: paddle.Tensor, last_block: int) -> Tuple[List[paddle.Tensor], paddle.Tensor]:
        """Stem and blocks 0..last_block: (the maps of the stage ends passed, the tokens)."""
        tokens = self.tokens.unsqueeze(0).expand([x.shape[0], -1, -1])  # [B, M, d], shared table
        x = F.relu6(self.stem(x))
        maps = []
        for i in range(last_block + 1):
            x, tokens = self.blocks[i](x, tokens)
            if i in self._stage_ends:
                maps.append(x)
        return maps, tokens

    def forward_features(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """(last map [B, C, H/32, W/32], tokens [B, M, d] after the final bridge)."""
        maps, tokens = self._run(x, len(self.blocks) - 1)
        return maps[-1], self.final_bridge(maps[-1], tokens)

    def forward_head(self, features: Tuple[paddle.Tensor, paddle.Tensor], pre_logits: bool = False) -> paddle.Tensor:
        x, tokens = features
        return self.head(x, tokens[:, 0], pre_logits)

    def feature_specs(self) -> List[FeatureInfo]:
        return list(self._specs)

    def _features(self, x: paddle.Tensor, last: int) -> List[paddle.Tensor]:
        if last < len(self._stage_ends):
            return self._run(x, self._stage_ends[last])[0]
        maps, tokens = self._run(x, len(self.blocks) - 1)
        return maps + [self.final_bridge(maps[-1], tokens)]

    def _unused_layers(self, last: int) -> List[str]:
        if last == len(self._stage_ends):  # the tokens: every block and the final bridge run
            return ['head']
        return ['head', 'final_bridge'] + [f'blocks.{i}' for i in range(self._stage_ends[last] + 1, len(self.blocks))]


# ----------------------------------------------------------------------------- configuration

# MODEL.MF (docs/mobileformer.md, block table). Each BLOCKS row is [kind, e1, out_channels, stride, e2]
# with kind in {lite, mf, down}; hidden = in*e1 (and out*e2 for the second expansion of a `down` block).
MF_DEFAULTS = CfgNode({
    'STEM_CHANNELS': 8,
    'NUM_TOKENS': 3,
    'TOKEN_DIM': 128,
    'HEAD_HIDDEN': 1024,
    'LAST_EXPANSION': 6,
    'GROUPS': 1,
    'BRIDGE_HEADS': 2,
    'FORMER_HEADS': 4,
    'FFN_RATIO': 2,
    'DYRELU_REDUCTION': 4,
    'BLOCKS': [],
})


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'{what} must be a positive integer, got {value!r}')
    return value


def _parse_row(i: int, row) -> Row:
    where = f'MODEL.MF.BLOCKS[{i}]'
    if not isinstance(row, (list, tuple)) or len(row) != 5:
        raise ConfigError(f'{where} must be a row [kind, e1, out, stride, e2], got {row!r}')
    kind, e1, out, stride, e2 = row
    if kind not in BLOCK_KINDS:
        raise ConfigError(f'{where} has unknown block kind {kind!r}; use one of {", ".join(BLOCK_KINDS)}')
    _positive_int(e1, f'{where} expansion e1')
    _positive_int(out, f'{where} output channels')
    if stride not in _STRIDES[kind]:
        raise ConfigError(f'{where}: a {kind} block takes stride {" or ".join(map(str, _STRIDES[kind]))}, '
                          f'got {stride!r}')
    if kind == 'down':
        _positive_int(e2, f'{where} second expansion e2 of a down block')
    elif e2 != 0:
        raise ConfigError(f'{where}: a {kind} block has a single expansion, so e2 must be 0, got {e2!r}')
    return kind, e1, out, stride, e2


def _check_divisible(channels: int, divisor: int, what: str, key: str) -> None:
    if channels % divisor:
        raise ConfigError(f'{what} has {channels} channels, not divisible by {key}={divisor}; '
                          f'change the block table or {key}')


def _check_block_channels(i: int, row: Row, in_channels: int, mf: CfgNode) -> None:
    kind, e1, out, _, e2 = row
    where = f'MODEL.MF.BLOCKS[{i}] ({kind})'
    pointwise = {'lite': (in_channels * e1, out), 'mf': (in_channels, in_channels * e1, out),
                 'down': (in_channels * e1, out, out * e2)}[kind]
    for channels in pointwise:
        _check_divisible(channels, mf.GROUPS, f'a 1x1 conv of {where}', 'MODEL.MF.GROUPS')
    if kind != 'lite':
        for channels in (in_channels, out):
            _check_divisible(channels, mf.BRIDGE_HEADS, f'a bridge of {where}', 'MODEL.MF.BRIDGE_HEADS')


def validate_config(config: CfgNode) -> List[Row]:
    """Checks MODEL / MODEL.MF for a buildable Mobile-Former; returns the parsed block rows."""
    model, mf = config.MODEL, config.MODEL.MF
    for key in ('STEM_CHANNELS', 'NUM_TOKENS', 'TOKEN_DIM', 'HEAD_HIDDEN', 'LAST_EXPANSION', 'GROUPS',
                'BRIDGE_HEADS', 'FORMER_HEADS', 'FFN_RATIO', 'DYRELU_REDUCTION'):
        _positive_int(mf[key], f'MODEL.MF.{key}')
    _positive_int(model.NUM_CLASSES, 'MODEL.NUM_CLASSES')
    _positive_int(config.DATA.IN_CHANNELS, 'DATA.IN_CHANNELS')
    for key in ('DROPOUT', 'DROPPATH'):
        if not 0.0 <= model[key] < 1.0:
            raise ConfigError(f'MODEL.{key} is a probability in [0, 1), got {model[key]!r}')
    if mf.TOKEN_DIM % mf.FORMER_HEADS:
        raise ConfigError(f'MODEL.MF.TOKEN_DIM={mf.TOKEN_DIM} is not divisible by '
                          f'MODEL.MF.FORMER_HEADS={mf.FORMER_HEADS}; change one of them')
    if mf.TOKEN_DIM % mf.DYRELU_REDUCTION:
        raise ConfigError(f'MODEL.MF.TOKEN_DIM={mf.TOKEN_DIM} is not divisible by '
                          f'MODEL.MF.DYRELU_REDUCTION={mf.DYRELU_REDUCTION}; change one of them')
    if not mf.BLOCKS:
        raise ConfigError('MODEL.MF.BLOCKS is empty; give at least one [kind, e1, out, stride, e2] row '
                          '(see configs/mobileformer_26m.yaml)')
    rows = [_parse_row(i, row) for i, row in enumerate(mf.BLOCKS)]
    channels = mf.STEM_CHANNELS
    for i, row in enumerate(rows):
        _check_block_channels(i, row, channels, mf)
        channels = row[2]
    _check_divisible(channels, mf.BRIDGE_HEADS, 'the final bridge', 'MODEL.MF.BRIDGE_HEADS')
    for width in (channels, channels * mf.LAST_EXPANSION):
        _check_divisible(width, mf.GROUPS, 'the head 1x1 conv', 'MODEL.MF.GROUPS')
    return rows


@register_model('mobileformer', defaults={'MF': MF_DEFAULTS})
def build_mformer(config: CfgNode) -> MobileFormer:
    """Mobile-Former from `config.MODEL` (MF subtree, NUM_CLASSES, DROPOUT, DROPPATH) and DATA.IN_CHANNELS."""
    rows, mf = validate_config(config), config.MODEL.MF
    return MobileFormer(rows, mf.STEM_CHANNELS, mf.NUM_TOKENS, mf.TOKEN_DIM, mf.HEAD_HIDDEN, mf.LAST_EXPANSION,
                        mf.GROUPS, mf.BRIDGE_HEADS, mf.FORMER_HEADS, mf.FFN_RATIO, mf.DYRELU_REDUCTION,
                        config.DATA.IN_CHANNELS, config.MODEL.NUM_CLASSES, config.MODEL.DROPOUT,
                        config.MODEL.DROPPATH)


# ----------------------------------------------------------------------------- weight converter

# Release sub-layer name -> ours, per block kind (BN and conv keep their `.0` / `.1` slots).
_CONV_BN = {'0': 'conv', '1': 'bn'}
_LITE = {'conv.0': 'dw.conv', 'conv.1': 'dw.bn', 'conv.4': 'pw.conv', 'conv.5': 'pw.bn'}
_MOBILE = {
    'mf': {'conv1': 'mobile.expand', 'hyper1': 'mobile.act1', 'conv2': 'mobile.dw',
           'hyper2': 'mobile.act2', 'conv3': 'mobile.project'},
    'down': {'conv1': 'mobile.dw1', 'hyper1': 'mobile.act1', 'conv2': 'mobile.pw1',
             'conv3': 'mobile.dw2', 'hyper3': 'mobile.act2', 'conv4': 'mobile.pw2'},
}
_HYPER = {'hyper.0': 'fc1', 'hyper.2': 'fc2'}
_MOBILE_TO_FORMER = {'alpha.0': 'gate', 'q': 'q', 'proj': 'proj', 'layer_norm': 'norm'}
_FORMER = {'q': 'q', 'channel_mlp': 'proj', 'layer_norm': 'norm1', 'ffn.0': 'fc1', 'ffn.2': 'fc2',
           'ffn_norm': 'norm2'}
_FORMER_TO_MOBILE = {'k': 'k', 'proj': 'v'}
_HEAD = {'classifier.conv.1': 'head.conv.conv', 'classifier.conv.2': 'head.conv.bn',
         'classifier.fc.0': 'head.fc', 'classifier.fc.1': 'head.norm',
         'classifier.classifier.1': 'head.classifier', 'stem.0': 'stem.conv', 'stem.1': 'stem.bn'}


def _lookup(table: Dict[str, str], name: str) -> Tuple[str, str] | None:
    """Longest table entry that prefixes `name` (up to a dot): (our prefix, rest)."""
    for prefix in sorted(table, key=len, reverse=True):
        if name.startswith(prefix + '.'):
            return table[prefix], name[len(prefix) + 1:]
    return None


def _map_block_key(kind: str, name: str) -> str | None:
    if kind == 'lite':
        hit = _lookup(_LITE, name)
        return hit and f'{hit[0]}.{hit[1]}'
    bridges = {'local_global': ('mobile_to_former', _MOBILE_TO_FORMER),
               'global_block': ('former', _FORMER), 'global_local': ('former_to_mobile', _FORMER_TO_MOBILE)}
    part, _, rest = name.partition('.')
    if part in bridges:
        ours, table = bridges[part]
        hit = _lookup(table, rest)
        return hit and f'{ours}.{hit[0]}.{hit[1]}'
    hit = _lookup(_MOBILE[kind], name)
    if hit is None:
        return None
    sub = _lookup(_HYPER if name.startswith('hyper') else _CONV_BN, hit[1])
    return sub and f'{hit[0]}.{sub[0]}.{sub[1]}'


def _map_key(name: str, kinds: Sequence[str]) -> str | None:
    """Our parameter name for a release key, None when it has no place in our model."""
    if name == 'tokens.weight':
        return 'tokens'
    if name.startswith('features.'):
        _, index, rest = name.split('.', 2)
        if not index.isdigit() or int(index) >= len(kinds):
            return None
        mapped = _map_block_key(kinds[int(index)], rest)
        return mapped and f'blocks.{index}.{mapped}'
    if name.startswith('local_global.'):
        hit = _lookup(_MOBILE_TO_FORMER, name[len('local_global.'):])
        return hit and f'final_bridge.{hit[0]}.{hit[1]}'
    hit = _lookup(_HEAD, name)
    return hit and f'{hit[0]}.{hit[1]}'


def _detect_official(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return {'tokens.weight', 'local_global.q.weight', 'classifier.classifier.1.weight'} <= keys


@register_converter('official-mobileformer', ['mobileformer'], detect=_detect_official)
def convert_official(state: Dict[str, np.ndarray], config: CfgNode) -> Dict[str, np.ndarray]:
    """Release state dict (PyTorch names/layouts) -> ours for the block kinds `config` describes.

    Linear weights are transposed to Paddle's [in, out]; BN running stats become `_mean` /
    `_variance`; `num_batches_tracked` is dropped. Raises ValueError listing the release keys that
    have no place in the model; keys and shapes are checked by `checkpoint.check_state`."""
    kinds = [row[0] for row in validate_config(config)]
    converted, unplaced = to_paddle_layout(state, lambda name: _map_key(name, kinds))
    if unplaced:
        raise ValueError(f'{len(unplaced)} keys of the checkpoint have no place in {config.MODEL.NAME} '
                         f'(official-mobileformer layout): {list_names(sorted(unplaced))}; '
                         f'check that -cfg matches the checkpoint')
    return converted

"""RepMLPNet ("RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality", Ding et al.,
CVPR 2022, arXiv 2112.11081): hierarchical MLP with structural re-parameterisation, following the
authors' release (github.com/DingXiaoH/RepMLP, repmlpnet.py).

Each RepMLPBlock mixes tokens inside h x w partitions with a grouped fully-connected layer (fc3); during
training, depthwise conv + BN branches run in parallel and are folded into fc3 for deployment
(`re_parameterize()`), so the deployed network is a pure MLP with the conv's locality prior built in.
Parameter names follow the authors' release so their checkpoints convert by renaming BN statistics
only. Differs from the release in the folding API only (PaddleClas `re_parameterize()` / `is_repped`,
MODEL.DEPLOY); the release's partition order is kept. See docs/repmlpnet.md.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from yacs.config import CfgNode

from mobileformer.models.backbone import Backbone, FeatureInfo, check_input_size
from mobileformer.config import ConfigError
from mobileformer.models.model_utils import fuse_conv_bn
from mobileformer.registry import register_converter, register_model
from mobileformer.models.rep_layers import ConvBNAct, PartitionFC3, check_rep_config, deploy_layout_hint
from mobileformer.torch_io import to_paddle_layout


class GlobalPerceptron(nn.Layer):
    """SE-like channel gate: sigmoid(fc2(relu(fc1(avgpool(x))))) -> [N, C, 1, 1]."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2D(channels, hidden, 1)
        self.fc2 = nn.Conv2D(hidden, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = F.adaptive_avg_pool2d(x, 1)
        return F.sigmoid(self.fc2(F.relu(self.fc1(x))))


class RepMLPBlock(PartitionFC3):
    """Global perceptron x (partition-wise fc3 + BN + local conv branches), C channels in and out.

    fc3 is a 1x1 conv with `sharesets` groups over rows of S*h*w values: S independent hw x hw
    matrices, so S channels share one matrix each. The local branches are depthwise k x k ConvBNs
    (groups S) over the same S-channel partitions, with zero padding at partition borders.
    """

    def __init__(self, channels: int, partition: int, sharesets: int, kernels: Sequence[int],
                 gp_reduction: int, deploy: bool = False):
        super().__init__()
        self.channels, self.h, self.w, self.sharesets = channels, partition, partition, sharesets
        self.kernels = list(kernels)
        self.gp = GlobalPerceptron(channels, channels // gp_reduction)
        units = sharesets * partition * partition
        self.fc3 = nn.Conv2D(units, units, 1, groups=sharesets, bias_attr=None if deploy else False)
        self.fc3_bn = None if deploy else nn.BatchNorm2D(sharesets)
        self._add_branches(sharesets, sharesets, sharesets, deploy)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        c, (s, h, w) = self.channels, (self.sharesets, self.h, self.w)
        height, width = x.shape[2], x.shape[3]
        hp, wp = height // h, width // w
        gate = self.gp(x)
        parts = x.reshape([-1, c, hp, h, wp, w]).transpose([0, 2, 4, 1, 3, 5])  # [N, hp, wp, C, h, w]
        out = self.fc3(parts.reshape([-1, s * h * w, 1, 1])).reshape([-1, s, h, w])
        if not self.is_repped:
            out = self.fc3_bn(out)
            if self.kernels:
                local = parts.reshape([-1, s, h, w])
                out = out + paddle.add_n([branch(local) for branch in self._branches()])
        # The release reads the rows (N, hp, wp, C/S) back as (N, C/S, hp, wp): the same thing when
        # hp = wp = 1 or C = S, a fixed shuffle otherwise; kept so released weights work at any size.
        out = out.reshape([-1, hp, wp, s, h, w]).transpose([0, 3, 1, 4, 2, 5])
        return out.reshape([-1, c, height, width]) * gate

    def re_parameterize(self) -> None:
        """Folds fc3's BN and the conv branches into fc3 (which gains a bias)."""
        s, hw = self.sharesets, self.h * self.w
        # fc3's BN has one statistic per share-set: fold it over [S, hw*hw] views of the weight.
        weight, bias = fuse_conv_bn(self.fc3.weight.reshape([s, -1]), self.fc3_bn)
        self._fold_fc3(weight.reshape(self.fc3.weight.shape), paddle.repeat_interleave(bias, hw))


class FFN(nn.Layer):
    """1x1 ConvBN (C -> hidden), GELU, 1x1 ConvBN (hidden -> C); the BNs stay at deploy time."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.ffn_fc1 = ConvBNAct(channels, hidden, 1)
        self.ffn_fc2 = ConvBNAct(hidden, channels, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.ffn_fc2(F.gelu(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Layer):
    """y = x + RepMLPBlock(BN(x)); z = y + FFN(BN(y))."""

    def __init__(self, channels: int, partition: int, sharesets: int, kernels: Sequence[int],
                 gp_reduction: int, ffn_expand: int, deploy: bool = False):
        super().__init__()
        self.repmlp_block = RepMLPBlock(channels, partition, sharesets, kernels, gp_reduction, deploy)
        self.ffn_block = FFN(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2D(channels)
        self.prebn2 = nn.BatchNorm2D(channels)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.repmlp_block(self.prebn1(x))
        return x + self.ffn_block(self.prebn2(x))


class RepMLPNet(Backbone):
    """Stem (patch ConvBN + ReLU), four stages of RepMLPNetUnits joined by 2x2 stride-2 ConvBN + ReLU,
    head BN -> global average pool -> Linear.

    Backbone interface (mobileformer.models.backbone): `forward_features` gives the last stage after the
    head BN, [B, C, H/(P*8), W/(P*8)]; feature output i is stage i (before the next downsampling),
    stride P * 2^i. Input sides must be multiples of every stage's stride x partition size (with the
    default partitions: of the config's image size)."""

    input_conv_name = 'conv_embedding.conv'

    def __init__(self, channels: Sequence[int], depths: Sequence[int], partitions: Sequence[int],
                 sharesets: Sequence[int], kernels: Sequence[int], gp_reduction: int = 4,
                 ffn_expand: int = 4, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        self.num_features, self.num_classes = channels[-1], num_classes
        strides = [patch_size * 2 ** i for i in range(len(depths))]
        self._specs = [FeatureInfo(f'stage{i}', c, s) for i, (c, s) in enumerate(zip(channels, strides))]
        self._input_multiple = int(np.lcm.reduce([s * p for s, p in zip(strides, partitions)]))
        self.conv_embedding = ConvBNAct(in_channels, channels[0], patch_size, stride=patch_size, relu=True)
        self.stages = nn.LayerList([
            nn.LayerList([RepMLPNetUnit(channels[i], partitions[i], sharesets[i], kernels, gp_reduction,
                                        ffn_expand, deploy) for _ in range(depths[i])])
            for i in range(len(depths))])
        self.embeds = nn.LayerList([ConvBNAct(channels[i], channels[i + 1], 2, stride=2, relu=True)
                                    for i in range(len(depths) - 1)])
        self.head_norm = nn.BatchNorm2D(channels[-1])
        self.head = nn.Linear(channels[-1], num_classes)

    def _features(self, x: paddle.Tensor, last: int) -> List[paddle.Tensor]:
        check_input_size(x, 'RepMLPNet', multiple=self._input_multiple)
        x, outputs = self.conv_embedding(x), []
        for i in range(last + 1):
            if i > 0:
                x = self.embeds[i - 1](x)
            for unit in self.stages[i]:
                x = unit(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head_norm(self._features(x, len(self.stages) - 1)[-1])

    def forward_head(self, x: paddle.Tensor, pre_logits: bool = False) -> paddle.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.head(x)

    def feature_specs(self) -> List[FeatureInfo]:
        return list(self._specs)

    def _unused_layers(self, last: int) -> List[str]:
        later = range(last + 1, len(self.stages))
        return ['head_norm', 'head'] + [f'stages.{i}' for i in later] + [f'embeds.{i - 1}' for i in later]


def _stage_partitions(config: CfgNode) -> list:
    """Partition size per stage: MODEL.REPMLPNET.PARTITIONS, or (if empty) each stage's feature-map
    size, i.e. one partition per map as in every official configuration."""
    cfg, size = config.MODEL.REPMLPNET, config.DATA.IMAGE_SIZE
    stages = len(cfg.DEPTHS)
    for name in ('CHANNELS', 'SHARESETS') + (('PARTITIONS',) if cfg.PARTITIONS else ()):
        if len(cfg[name]) != stages:
            raise ConfigError(f'MODEL.REPMLPNET.{name} has {len(cfg[name])} entries but DEPTHS has {stages}; '
                              'give one value per stage')
    stride = cfg.PATCH_SIZE * 2 ** (stages - 1)
    if size % stride:
        raise ConfigError(f'DATA.IMAGE_SIZE {size} must be divisible by {stride} (patch size '
                          f'{cfg.PATCH_SIZE} x 2^{stages - 1} downsamplings) for RepMLPNet')
    maps = [size // cfg.PATCH_SIZE // 2 ** i for i in range(stages)]
    partitions = list(cfg.PARTITIONS) or maps
    for i, (feature, part) in enumerate(zip(maps, partitions)):
        if part <= 0 or feature % part:
            raise ConfigError(f'stage {i} feature map {feature}x{feature} (DATA.IMAGE_SIZE {size}) is not '
                              f'divisible by partition size {part}; change MODEL.REPMLPNET.PARTITIONS '
                              'or DATA.IMAGE_SIZE (an empty PARTITIONS uses the feature-map sizes)')
    return partitions


def _check_config(config: CfgNode) -> None:
    cfg = config.MODEL.REPMLPNET
    for channels, sets in zip(cfg.CHANNELS, cfg.SHARESETS):
        if channels % sets:
            raise ConfigError(f'MODEL.REPMLPNET.SHARESETS {sets} must divide the stage width {channels}')
    check_rep_config(config, 'REPMLPNET', 'RepMLPNet')


# MODEL.REPMLPNET (docs/repmlpnet.md). One entry per stage; PARTITIONS lists the partition size
# h = w per stage, empty = each stage's feature-map size (IMAGE_SIZE / PATCH_SIZE / 2^i), i.e. one
# partition per map as in all official configurations.
REPMLPNET_DEFAULTS = CfgNode({
    'PATCH_SIZE': 4,
    'CHANNELS': [64, 128, 256, 512],
    'DEPTHS': [2, 2, 6, 2],
    'SHARESETS': [1, 4, 16, 128],
    'PARTITIONS': [],
    'REPARAM_KERNELS': [1, 3],
    'GP_REDUCTION': 4,
    'FFN_EXPAND': 4,
})


@register_model('repmlpnet', defaults={'REPMLPNET': REPMLPNET_DEFAULTS},
                reduced=['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLPNET.DEPTHS', [1, 1, 1, 1]])
def build_repmlpnet(config: CfgNode) -> RepMLPNet:
    """RepMLPNet from MODEL.REPMLPNET; MODEL.DEPLOY builds the folded structure directly."""
    partitions = _stage_partitions(config)
    _check_config(config)
    cfg = config.MODEL.REPMLPNET
    return RepMLPNet(cfg.CHANNELS, cfg.DEPTHS, partitions, cfg.SHARESETS, cfg.REPARAM_KERNELS,
                     cfg.GP_REDUCTION, cfg.FFN_EXPAND, cfg.PATCH_SIZE, config.DATA.IN_CHANNELS,
                     config.MODEL.NUM_CLASSES, config.MODEL.DEPLOY)


# ----------------------------------------------------------------------------- weight conversion

def _is_official_repmlpnet(keys) -> bool:
    keys = set(keys)
    return 'conv_embedding.conv.weight' in keys and any('.repmlp_block.fc3.weight' in k for k in keys)


@register_converter('official-repmlpnet', ['repmlpnet'], detect=_is_official_repmlpnet,
                    hint=deploy_layout_hint('fc3_bn.'))
def convert_official_repmlpnet(state: Dict[str, np.ndarray], config: CfgNode) -> Dict[str, np.ndarray]:
    """The authors' RepMLPNet state dict (training or folded) -> ours: same names, Paddle layouts."""
    return to_paddle_layout(state)[0]

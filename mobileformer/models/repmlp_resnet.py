"""RepMLP v1 ("RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image
Recognition", Ding et al., arXiv 2105.01883 v1): the RepMLP block and RepMLP-ResNet-50, following
the authors' original release (github.com/DingXiaoH/RepMLP, before RepMLPNet replaced it).

The RepMLP block mixes each h x w partition of a feature map with one fully-connected layer (fc3),
adds a global perceptron across partitions, and trains with parallel conv + BN branches that fold
into fc3 for deployment. RepMLP-ResNet-50 puts it into the stride-1 bottlenecks of stages 2 and 3
(`light` or `bottleneck` flavour); `plain` is the ResNet-50 baseline of the same release. At deploy
time every ConvBN pair is folded too, so the deployed network holds no BatchNorm.
Parameter names follow the authors' release. Differs from it in the folding API only (PaddleClas
`re_parameterize()` / `is_repped`, MODEL.DEPLOY). See docs/repmlp_resnet.md.
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
from mobileformer.models.rep_layers import FoldableConvBN, PartitionFC3, check_rep_config, deploy_layout_hint
from mobileformer.torch_io import to_paddle_layout

BLOCK_TYPES = ('light', 'bottleneck', 'plain')


class RepMLP(PartitionFC3):
    """RepMLP block: [N, C, H, W] -> [N, O, H, W] through h x w partitions.

    Global perceptron (only with several partitions): AvgPool(h x w) -> BN -> Linear -> ReLU ->
    Linear gives one value per channel and partition, added to that partition. Partition perceptron:
    fc3, a 1x1 conv with `groups` over rows of C*h*w values, then BatchNorm1D over O*h*w. Local
    perceptron: Conv(k, groups) + BN branches on the partitions, summed into fc3's output.
    """

    def __init__(self, in_channels: int, out_channels: int, height: int, width: int, h: int, w: int,
                 kernels: Sequence[int] = (), fc1_fc2_reduction: int = 1, groups: int = 1,
                 deploy: bool = False):
        super().__init__()
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, height, width, h, w
        self.hp, self.wp = height // h, width // w
        self.kernels = list(kernels)
        if (height, width) != (h, w):
            cells = in_channels * self.hp * self.wp
            self.fc1_fc2 = nn.Sequential(('fc1', nn.Linear(cells, cells // fc1_fc2_reduction)), ('relu', nn.ReLU()),
                                         ('fc2', nn.Linear(cells // fc1_fc2_reduction, cells)))
            self.avg = nn.AvgPool2D((h, w)) if deploy else nn.Sequential(
                ('avg', nn.AvgPool2D((h, w))), ('bn', nn.BatchNorm2D(in_channels)))
        else:
            self.fc1_fc2 = None
        # Orthogonal init (the release's) only for training: a deploy fc3 is always loaded or folded,
        # and the QR behind it costs seconds per block on a CPU.
        self.fc3 = nn.Conv2D(in_channels * h * w, out_channels * h * w, 1, groups=groups,
                             weight_attr=None if deploy else nn.initializer.Orthogonal(),
                             bias_attr=None if deploy else False)
        self.fc3_bn = None if deploy else nn.BatchNorm1D(out_channels * h * w)
        self._add_branches(in_channels, out_channels, groups, deploy)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        c, o, h, w, hp, wp = self.C, self.O, self.h, self.w, self.hp, self.wp
        parts = x.reshape([-1, c, hp, h, wp, w])
        if self.fc1_fc2 is not None:
            cells = self.fc1_fc2(self.avg(x).reshape([-1, c * hp * wp]))
            parts = parts + cells.reshape([-1, c, hp, 1, wp, 1])
        parts = parts.transpose([0, 2, 4, 1, 3, 5])  # [N, hp, wp, C, h, w]
        out = self.fc3(parts.reshape([-1, c * h * w, 1, 1])).reshape([-1, o * h * w])
        if not self.is_repped:
            out = self.fc3_bn(out)
            if self.kernels:
                local = parts.reshape([-1, c, h, w])
                out = out + paddle.add_n([branch(local) for branch in self._branches()]).reshape([-1, o * h * w])
        out = out.reshape([-1, hp, wp, o, h, w]).transpose([0, 3, 1, 4, 2, 5])  # [N, O, hp, h, wp, w]
        return out.reshape([-1, o, self.H, self.W])

    def re_parameterize(self) -> None:
        """Folds fc3's BN and the conv branches into fc3 (which gains a bias) and the BN after the
        average pool into fc1."""
        self._fold_fc3(*fuse_conv_bn(self.fc3.weight, self.fc3_bn))
        if self.fc1_fc2 is not None:
            self._fold_pool_bn_into_fc1()

    def _fold_pool_bn_into_fc1(self) -> None:
        # The BN is y = scale * x + shift per channel (fuse_conv_bn of a unit weight); fc1's inputs
        # are channel-major (C, hp, wp), so each channel's factors repeat over its hp*wp cells.
        scale, shift = fuse_conv_bn(paddle.ones([self.C]), self.avg.bn)
        scale = paddle.repeat_interleave(scale, self.hp * self.wp)
        shift = paddle.repeat_interleave(shift, self.hp * self.wp)
        fc1 = self.fc1_fc2.fc1  # Paddle Linear weight: [in, out]
        fc1.bias.set_value(fc1.bias + paddle.matmul(shift, fc1.weight))
        fc1.weight.set_value(fc1.weight * scale.unsqueeze(1))
        self.avg = nn.AvgPool2D((self.h, self.w))


class ResNetBottleneck(nn.Layer):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with a projection ConvBN when the shape changes."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 deploy: bool = False):
        super().__init__()
        self.shortcut = (FoldableConvBN(in_channels, out_channels, 1, stride, deploy=deploy)
                         if stride != 1 or in_channels != out_channels else nn.Identity())
        self.conv1 = FoldableConvBN(in_channels, mid_channels, 1, relu=True, deploy=deploy)
        self.conv2 = FoldableConvBN(mid_channels, mid_channels, 3, stride, 1, relu=True, deploy=deploy)
        self.conv3 = FoldableConvBN(mid_channels, out_channels, 1, deploy=deploy)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class RepMLPLightBlock(nn.Layer):
    """1x1 ConvBNReLU (-> mid) -> RepMLP -> ReLU -> 1x1 ConvBN (-> out) + identity -> ReLU."""

    def __init__(self, channels: int, mid_channels: int, repmlp: dict, deploy: bool = False):
        super().__init__()
        self.light_conv1 = FoldableConvBN(channels, mid_channels, 1, relu=True, deploy=deploy)
        self.light_repmlp = RepMLP(mid_channels, mid_channels, deploy=deploy, **repmlp)
        self.light_conv3 = FoldableConvBN(mid_channels, channels, 1, deploy=deploy)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.light_repmlp(self.light_conv1(x)))
        return F.relu(self.light_conv3(y) + x)


class RepMLPBottleneckBlock(nn.Layer):
    """1x1 ConvBNReLU (-> mid) -> 3x3 ConvBNReLU (-> mid/r) -> RepMLP -> ReLU -> 3x3 ConvBNReLU
    (-> mid) -> 1x1 ConvBN (-> out) + identity -> ReLU."""

    def __init__(self, channels: int, mid_channels: int, r: int, repmlp: dict, deploy: bool = False):
        super().__init__()
        narrow = mid_channels // r
        self.btnk_conv1 = FoldableConvBN(channels, mid_channels, 1, relu=True, deploy=deploy)
        self.btnk_conv2 = FoldableConvBN(mid_channels, narrow, 3, padding=1, relu=True, deploy=deploy)
        self.btnk_repmlp = RepMLP(narrow, narrow, deploy=deploy, **repmlp)
        self.btnk_conv4 = FoldableConvBN(narrow, mid_channels, 3, padding=1, relu=True, deploy=deploy)
        self.btnk_conv5 = FoldableConvBN(mid_channels, channels, 1, deploy=deploy)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.relu(self.btnk_repmlp(self.btnk_conv2(self.btnk_conv1(x))))
        return F.relu(self.btnk_conv5(self.btnk_conv4(y)) + x)


class RepMLPResNet(Backbone):
    """ResNet-50 layout (stem conv7x7/2 + maxpool, widths 256..2048) whose stride-1 blocks in
    stages 2 and 3 are RepMLP blocks (`light` / `bottleneck`), or none of them (`plain`).

    Backbone interface (mobileformer.models.backbone): `forward_features` gives stage 4, [B, 2048, H/32,
    W/32]; feature outputs 0..3 are stages 1..4 (256, 512, 1024, 2048 channels at strides 4, 8,
    16, 32). Inputs must be image_size x image_size (RepMLP's fc3 sees fixed maps); `plain` takes
    any size."""

    classifier_name = 'linear'
    input_conv_name = 'stage0.0.conv'

    WIDTHS = (256, 512, 1024, 2048)

    def __init__(self, depths: Sequence[int], block_type: str, image_size: int, partition: int,
                 kernels: Sequence[int], fc1_fc2_reduction: int, groups: int, bottleneck_r: Sequence[int],
                 in_channels: int = 3, num_classes: int = 1000, deploy: bool = False):
        super().__init__()
        self.num_features, self.num_classes = self.WIDTHS[-1], num_classes
        self.image_size = None if block_type == 'plain' else image_size
        self.stage0 = nn.Sequential(FoldableConvBN(in_channels, 64, 7, 2, 3, relu=True, deploy=deploy),
                                    nn.MaxPool2D(3, 2, 1))
        channels = 64
        for i, (width, depth) in enumerate(zip(self.WIDTHS, depths)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                feature = image_size // (4 * 2 ** i)
                if block_type != 'plain' and stride == 1 and i in (1, 2):
                    repmlp = dict(height=feature, width=feature, h=partition, w=partition, kernels=kernels,
                                  fc1_fc2_reduction=fc1_fc2_reduction, groups=groups)
                    blocks.append(RepMLPLightBlock(channels, width // 8, repmlp, deploy) if block_type == 'light'
                                  else RepMLPBottleneckBlock(channels, width // 4, bottleneck_r[i - 1], repmlp, deploy))
                else:
                    blocks.append(ResNetBottleneck(channels, width // 4, width, stride, deploy))
                channels = width
            setattr(self, f'stage{i + 1}', nn.Sequential(*blocks))
        self.linear = nn.Linear(channels, num_classes)

    def _features(self, x: paddle.Tensor, last: int) -> List[paddle.Tensor]:
        check_input_size(x, 'RepMLP-ResNet', exact=self.image_size)
        x, outputs = self.stage0(x), []
        for i in range(last + 1):
            x = getattr(self, f'stage{i + 1}')(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: paddle.Tensor) -> paddle.Tensor:
        return self._features(x, 3)[-1]

    def forward_head(self, x: paddle.Tensor, pre_logits: bool = False) -> paddle.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)

    def feature_specs(self) -> List[FeatureInfo]:
        return [FeatureInfo(f'stage{i + 1}', width, 4 * 2 ** i) for i, width in enumerate(self.WIDTHS)]

    def _unused_layers(self, last: int) -> List[str]:
        return ['linear'] + [f'stage{i + 1}' for i in range(last + 1, 4)]


def _check_config(config: CfgNode) -> None:
    cfg, size = config.MODEL.REPMLP_RESNET, config.DATA.IMAGE_SIZE
    if cfg.BLOCK not in BLOCK_TYPES:
        raise ConfigError(f'MODEL.REPMLP_RESNET.BLOCK must be one of {BLOCK_TYPES}, got {cfg.BLOCK!r}')
    if len(cfg.DEPTHS) != 4 or len(cfg.BOTTLENECK_R) != 2:
        raise ConfigError('MODEL.REPMLP_RESNET.DEPTHS needs 4 entries and BOTTLENECK_R 2 (stages 2 and 3), '
                          f'got {cfg.DEPTHS} and {cfg.BOTTLENECK_R}')
    if size % 32:
        raise ConfigError(f'DATA.IMAGE_SIZE {size} must be divisible by 32 for RepMLP-ResNet')
    for feature in (size // 8, size // 16):
        if cfg.BLOCK != 'plain' and feature % cfg.PARTITION:
            raise ConfigError(f'the {feature}x{feature} feature map of DATA.IMAGE_SIZE {size} is not divisible '
                              f'by MODEL.REPMLP_RESNET.PARTITION {cfg.PARTITION}; change one of them')
    check_rep_config(config, 'REPMLP_RESNET', 'RepMLP-ResNet')


# MODEL.REPMLP_RESNET (docs/repmlp_resnet.md). BLOCK: light | bottleneck | plain (the ResNet-50
# baseline: the RepMLP keys below then have no effect). RepMLP blocks replace the stride-1 blocks of
# stages 2 and 3 with PARTITION x PARTITION partitions; BOTTLENECK_R is the bottleneck flavour's extra
# channel reduction r in stage 2 and stage 3.
REPMLP_RESNET_DEFAULTS = CfgNode({
    'BLOCK': 'light',
    'DEPTHS': [3, 4, 6, 3],
    'PARTITION': 7,
    'REPARAM_KERNELS': [1, 3, 5],
    'FC1_FC2_REDUCTION': 1,
    'FC3_GROUPS': 4,
    'BOTTLENECK_R': [2, 4],
})


# Reduced: 4x4 partitions on 64 px: stage 2 (8x8) keeps the global perceptron, stage 3 (4x4) has one partition.
@register_model('repmlp_resnet', defaults={'REPMLP_RESNET': REPMLP_RESNET_DEFAULTS},
                reduced=['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLP_RESNET.DEPTHS', [1, 2, 2, 1],
                         'MODEL.REPMLP_RESNET.PARTITION', 4])
def build_repmlp_resnet(config: CfgNode) -> RepMLPResNet:
    """RepMLP-ResNet-50 (light / bottleneck) or the plain ResNet-50 baseline from MODEL.REPMLP_RESNET;
    MODEL.DEPLOY builds the folded structure directly."""
    _check_config(config)
    cfg = config.MODEL.REPMLP_RESNET
    return RepMLPResNet(cfg.DEPTHS, cfg.BLOCK, config.DATA.IMAGE_SIZE, cfg.PARTITION, cfg.REPARAM_KERNELS,
                        cfg.FC1_FC2_REDUCTION, cfg.FC3_GROUPS, cfg.BOTTLENECK_R, config.DATA.IN_CHANNELS,
                        config.MODEL.NUM_CLASSES, config.MODEL.DEPLOY)


# ----------------------------------------------------------------------------- weight conversion

def official_repmlp_to_paddle(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A state of the original release (a whole network or one RepMLP block) -> ours: same names,
    Paddle layouts (its Linear layers are the classifier `linear` and the global perceptron's fc1/fc2)."""
    return to_paddle_layout(state)[0]


def _is_official_repmlp_resnet(keys) -> bool:
    keys = set(keys)
    return 'stage0.0.conv.weight' in keys and 'linear.weight' in keys


@register_converter('official-repmlp', ['repmlp_resnet'], detect=_is_official_repmlp_resnet,
                    hint=deploy_layout_hint('bn.'))
def convert_official_repmlp(state: Dict[str, np.ndarray], config: CfgNode) -> Dict[str, np.ndarray]:
    """The original RepMLP-ResNet release (training or folded checkpoint) -> ours."""
    return official_repmlp_to_paddle(state)

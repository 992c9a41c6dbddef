"""Structural re-parameterisation helpers shared by RepMLPNet and RepMLP-ResNet.

Training-time conv + BatchNorm branches fold into plain convs (`ConvBNAct.fused_kernel_bias`), several
branches of different kernel sizes merge into one kernel (`merge_conv_bn_branches`), and a conv over
an h x w partition turns into the equivalent fully-connected layer (`conv_to_fc`); `PartitionFC3` is
the fold both RepMLP blocks share. The folds are those of the RepMLP papers (arXiv 2105.01883,
2112.11081; code github.com/DingXiaoH/RepMLP), exposed the PaddleClas way; docs/repmlpnet.md and
docs/repmlp_resnet.md describe them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from yacs.config import CfgNode

from mobileformer.config import ConfigError
from mobileformer.models.model_utils import fuse_conv_bn


class ConvBNAct(nn.Layer):
    """Conv2D without bias + BatchNorm2D (+ ReLU if `relu`). With `deploy=True` the pair is built
    directly as its folded form, a Conv2D with bias (parameters `conv.weight`, `conv.bias`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, relu: bool = False, deploy: bool = False):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                              bias_attr=None if deploy else False)
        self.bn = None if deploy else nn.BatchNorm2D(out_channels)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.relu(x) if self.relu is not None else x

    def fused_kernel_bias(self) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """(kernel [O, I/g, k, k], bias [O]) of the single conv equal to conv + BN in eval mode."""
        if self.bn is None:
            return self.conv.weight, self.conv.bias
        return fuse_conv_bn(self.conv.weight, self.bn)


class FoldableConvBN(ConvBNAct):
    """A ConvBNAct that folds itself into a conv with bias (`re_parameterize()`, PaddleClas convention).

    RepMLP-ResNet folds every pair; RepMLPNet uses plain `ConvBNAct` in its FFN because the reference
    deploy model keeps those BatchNorms.
    """

    @property
    def is_repped(self) -> bool:
        return self.bn is None

    def re_parameterize(self) -> None:
        kernel, bias = self.fused_kernel_bias()
        old = self.conv
        self.conv = nn.Conv2D(old._in_channels, old._out_channels, old._kernel_size, old._stride,
                              old._padding, groups=old._groups)
        self.conv.weight.set_value(kernel)
        self.conv.bias.set_value(bias)
        del self.bn
        self.bn = None


def pad_kernel(kernel: paddle.Tensor, size: int) -> paddle.Tensor:
    """Zero-pads a centred k x k kernel [O, I, k, k] to size x size (same output with padding size//2)."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4) if pad else kernel


def merge_conv_bn_branches(branches: Iterable[ConvBNAct]) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """One (kernel, bias) equal to the sum of parallel ConvBNAct branches with centred odd kernels."""
    fused = [branch.fused_kernel_bias() for branch in branches]
    size = max(kernel.shape[-1] for kernel, _ in fused)
    kernel = paddle.add_n([pad_kernel(k, size) for k, _ in fused])
    bias = paddle.add_n([b for _, b in fused])
    return kernel, bias


def conv_to_fc(kernel: paddle.Tensor, bias: paddle.Tensor, height: int, width: int,
               groups: int) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """The fully-connected layer equal to a conv (padding k//2, `groups`) on one height x width map.

    Feeding an identity batch (one one-hot map per input unit of a group, repeated for every group)
    through the conv gives each input unit's response; transposed, that is the FC weight in the
    layout of a grouped 1x1 conv: [O*h*w, C*h*w/groups] (plus [O*h*w] bias, constant per channel).
    """
    in_channels = kernel.shape[1] * groups
    rows = in_channels * height * width // groups
    identity = paddle.eye(rows, dtype=kernel.dtype).tile([1, groups]).reshape([rows, in_channels, height, width])
    response = F.conv2d(identity, kernel, padding=kernel.shape[-1] // 2, groups=groups)  # [rows, O, h, w]
    weight = response.reshape([rows, -1]).t()
    return weight, paddle.repeat_interleave(bias, height * width)


class PartitionFC3(nn.Layer):
    """Base of the RepMLP blocks (RepMLPNet's and RepMLP v1's): a partition-wise fc3 (a grouped 1x1
    conv over rows of h*w values per channel) that trains with a BN `fc3_bn` and parallel ConvBNAct
    branches `repconv{k}` (the local perceptron), all folded into fc3 by `re_parameterize()`.

    A subclass sets `h`, `w`, `kernels`, `fc3` and `fc3_bn` (None when deploying), then calls
    `_add_branches`; its `re_parameterize` folds `fc3_bn` into fc3 and hands the result to `_fold_fc3`.
    """

    def _add_branches(self, in_channels: int, out_channels: int, groups: int, deploy: bool) -> None:
        for k in ([] if deploy else self.kernels):
            setattr(self, f'repconv{k}', ConvBNAct(in_channels, out_channels, k, padding=k // 2, groups=groups))

    @property
    def is_repped(self) -> bool:
        return self.fc3_bn is None

    def _branches(self) -> list:
        return [getattr(self, f'repconv{k}') for k in self.kernels]

    def _fold_fc3(self, weight: paddle.Tensor, bias: paddle.Tensor) -> None:
        """Adds the branches, as an FC, to fc3's BN-folded (weight, bias), makes that fc3 (with a
        bias) and removes `fc3_bn` and the branches."""
        groups = self.fc3._groups
        if self.kernels:
            kernel, conv_bias = merge_conv_bn_branches(self._branches())
            fc_weight, fc_bias = conv_to_fc(kernel, conv_bias, self.h, self.w, groups)
            weight, bias = weight + fc_weight.reshape(weight.shape), bias + fc_bias
        self.fc3 = nn.Conv2D(self.fc3._in_channels, self.fc3._out_channels, 1, groups=groups)
        self.fc3.weight.set_value(weight)
        self.fc3.bias.set_value(bias)
        for k in self.kernels:
            delattr(self, f'repconv{k}')
        del self.fc3_bn
        self.fc3_bn = None


def check_rep_config(config: CfgNode, subtree: str, family: str) -> None:
    """The config checks both Rep families share: odd positive branch kernels (centred, so they
    merge), and no dropout or stochastic depth (neither model has any)."""
    kernels = config.MODEL[subtree].REPARAM_KERNELS
    if any(k % 2 == 0 or k <= 0 for k in kernels):
        raise ConfigError(f'MODEL.{subtree}.REPARAM_KERNELS must be positive odd sizes, got {kernels}')
    if config.MODEL.DROPOUT or config.MODEL.DROPPATH:
        raise ConfigError(f'{family} has no dropout or stochastic depth; set MODEL.DROPOUT and MODEL.DROPPATH to 0')


# --------------------------------------------- converting the authors' (PyTorch) checkpoints

def deploy_layout_hint(training_marker: str) -> Callable[[Iterable[str], CfgNode], Optional[str]]:
    """A converter hint: a checkpoint holds the training layout iff a key contains
    `training_marker` (a BN that folding removes); says so when that disagrees with MODEL.DEPLOY."""
    def hint(keys: Iterable[str], config: CfgNode) -> Optional[str]:
        folded = not any(training_marker in k for k in keys)
        if folded == config.MODEL.DEPLOY:
            return None
        kind = 'folded (deploy)' if folded else 'training'
        return (f'the checkpoint has the {kind} layout but MODEL.DEPLOY is {config.MODEL.DEPLOY}; '
                f'set MODEL.DEPLOY {folded}')
    return hint

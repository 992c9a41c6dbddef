"""Layers and helpers shared by every model family."""
from __future__ import annotations

from typing import List

import numpy as np
import paddle
import paddle.nn as nn

from mobileformer.cpu_ops import depthwise_conv2d


def drop_path_rates(max_rate: float, num_blocks: int) -> List[float]:
    """Linear stochastic-depth ramp: 0 at the first block up to `max_rate` at the last."""
    if num_blocks == 1:
        return [float(max_rate)]
    return [float(r) for r in np.linspace(0.0, max_rate, num_blocks)]


class DropPath(nn.Layer):
    """Stochastic depth: drops a residual branch per sample and rescales the survivors."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = paddle.floor(keep + paddle.rand(shape, dtype=x.dtype))
        return x / keep * mask

    def extra_repr(self) -> str:
        return f'rate={self.rate}'


class DepthwiseConv2D(nn.Conv2D):
    """Bias-free k x k conv with groups = in_channels (out_channels = m * in_channels), padding k // 2,
    run by `cpu_ops.depthwise_conv2d`: the compiled CPU kernel in dygraph, `F.conv2d` elsewhere.
    Same parameter and state-dict name as the nn.Conv2D it replaces."""

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 weight_attr: paddle.ParamAttr | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                         groups=in_channels, weight_attr=weight_attr, bias_attr=False)
        self.stride, self.padding = stride, kernel_size // 2

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return depthwise_conv2d(x, self.weight, self.stride, self.padding)


def count_trainable(model: nn.Layer) -> int:
    """Number of trainable parameters (Paddle's `parameters()` also lists BN statistics)."""
    return int(sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient))


def fuse_conv_bn(weight: paddle.Tensor, bn: nn.Layer, bias: paddle.Tensor | None = None):
    """Folds BatchNorm `bn` (eval statistics) into the conv/fc `weight` [out, ...] and `bias`.

    Returns (weight', bias') with bn(conv(x; weight, bias)) == conv(x; weight', bias').
    """
    scale = bn.weight / paddle.sqrt(bn._variance + bn._epsilon)
    shift = bn.bias - bn._mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape([-1] + [1] * (weight.ndim - 1)), shift


def has_foldable_layers(model: nn.Layer) -> bool:
    """True if `model` holds a re-parameterisable layer (PaddleClas convention)."""
    return any(hasattr(layer, 're_parameterize') and hasattr(layer, 'is_repped')
               for layer in model.sublayers(include_self=True))


def re_parameterize_model(model: nn.Layer) -> nn.Layer:
    """Folds every re-parameterisable layer (PaddleClas convention: `re_parameterize()` and
    `is_repped`) into its deploy structure, in place, outermost first (a block folds its own
    branches); returns `model` in eval mode."""
    model.eval()
    _fold(model)
    return model


def _fold(layer: nn.Layer) -> None:
    if hasattr(layer, 're_parameterize') and hasattr(layer, 'is_repped'):
        if not layer.is_repped:
            layer.re_parameterize()
        return
    for child in layer.children():
        _fold(child)

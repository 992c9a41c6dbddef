"""Layers shared by more than one model family (helpers that act on a whole model: model_utils)."""
from __future__ import annotations

from typing import List, Tuple, Type

import numpy as np
import paddle
import paddle.nn as nn

from mobileformer.cpu_ops import depthwise_conv2d, gelu, layer_norm, linear, linear_halves, token_linear


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


class Linear(nn.Linear):
    """nn.Linear run by `cpu_ops.linear`: oneDNN's GEMM (compiled kernel) in dygraph on the CPU,
    `F.linear` elsewhere. Same parameters and state-dict names as nn.Linear."""

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(x, self.weight, self.bias)


class HalvedLinear(Linear):
    """A Linear whose output is used as two halves: x [..., K] -> ([..., H], [..., H]) for
    out_features 2H, as `paddle.split(linear(x), 2, axis=-1)` but computed half by half where the
    compiled kernel runs (`cpu_ops.linear_halves`). Same parameters and state-dict names as
    nn.Linear."""

    def forward(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        return linear_halves(x, self.weight, self.bias)



class TokenLinear(Linear):
    """A Linear along axis 1 of x [B, N, C] (token mixing): [B, in, C] -> [B, out, C]; the compiled
    kernel multiplies each sample from the left instead of transposing x and the result. Same
    parameters and state-dict names as nn.Linear."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return token_linear(x, self.weight, self.bias)


class GELU(nn.GELU):
    """Exact (erf) GELU run by `cpu_ops.gelu`: the compiled multi-threaded kernel in dygraph on the
    CPU, `F.gelu` elsewhere."""

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return gelu(x)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis run by `cpu_ops.layer_norm`: the compiled multi-threaded
    kernel in dygraph on the CPU, `F.layer_norm` elsewhere. Same parameters as nn.LayerNorm."""

    runs_cpu_kernels = True  # see cpu_ops.prepare

    def __init__(self, normalized_shape: int, epsilon: float = 1e-5):
        super().__init__(normalized_shape, epsilon=epsilon)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return layer_norm(x, self.weight, self.bias, self._epsilon)


class Mlp(nn.Layer):
    """Linear -> exact GELU -> Linear (timm `Mlp`); over the last axis, or over the tokens of
    [B, N, C] with `linear=TokenLinear`."""

    def __init__(self, in_features: int, hidden_features: int, linear: Type[Linear] = Linear):
        super().__init__()
        self.fc1 = linear(in_features, hidden_features)
        self.act = GELU()  # erf form, as the references
        self.fc2 = linear(hidden_features, in_features)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Layer):
    """Non-overlapping P x P patches -> C channels (conv with bias): [B, 3, S, S] -> [B, N, C]."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2D(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.proj(x).flatten(2).transpose([0, 2, 1])

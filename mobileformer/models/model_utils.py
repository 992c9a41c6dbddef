"""Helpers that inspect or transform a built model: parameter counts, BatchNorm folding maths and
re-parameterisation (folding every foldable block into its deploy structure)."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn


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


def _foldable(layer: nn.Layer) -> bool:
    return hasattr(layer, 're_parameterize') and hasattr(layer, 'is_repped')


def has_deploy_structure(model: nn.Layer) -> bool:
    """True if `model` holds a re-parameterisable layer (PaddleClas convention) whose folded form is a
    structure of its own, with its own checkpoints (RepMLP: MODEL.DEPLOY, reparam.py). Layers marked
    `folds_values_only` (Mobile-Former's) fold into the values of their training parameters: that
    state dict could not be told from a training checkpoint, so it is folded at export, never saved."""
    return any(_foldable(layer) and not getattr(layer, 'folds_values_only', False)
               for layer in model.sublayers(include_self=True))


def re_parameterize_model(model: nn.Layer) -> nn.Layer:
    """Folds every re-parameterisable layer (PaddleClas convention: `re_parameterize()` and
    `is_repped`) into its deploy structure, in place, outermost first (a block folds its own
    branches); returns `model` in eval mode."""
    model.eval()
    _fold(model)
    return model


def _fold(layer: nn.Layer) -> None:
    if _foldable(layer):
        if not layer.is_repped:
            layer.re_parameterize()
        return
    for child in layer.children():
        _fold(child)

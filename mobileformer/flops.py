"""Multiply-add counter: conv, linear and every `paddle.matmul` / `paddle.bmm` of one forward,
plus whatever a model family registers for its own layers (e.g. dynamic ReLU).

`paddle.flops` ignores matmuls (attention, token mixing) and breaks with numpy >= 2.4, so we
count ourselves: forward post-hooks on layers by type, and a temporary wrapper around
`paddle.matmul` / `paddle.bmm` (models call those for their matmuls).

    python -m mobileformer.flops -cfg configs/mobileformer_26m.yaml
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, List, Sequence

import numpy as np
import paddle
import paddle.nn as nn

from mobileformer.registry import MADDS_RULES, MaddsRule, register_madds

if TYPE_CHECKING:
    from mobileformer.cli import CommandParser

def _numel(shape: Sequence[int]) -> int:
    return int(np.prod([int(s) for s in shape]))


@register_madds(nn.Conv2D)
def _conv_madds(layer: nn.Conv2D, inputs: tuple, output: paddle.Tensor) -> int:
    in_channels = layer.weight.shape[1]  # already divided by groups
    kernel = _numel(layer.weight.shape[2:])
    return _numel(output.shape) * in_channels * kernel


@register_madds(nn.Conv1D)
def _conv1d_madds(layer: nn.Conv1D, inputs: tuple, output: paddle.Tensor) -> int:
    return _numel(output.shape) * _numel(layer.weight.shape[1:])


@register_madds(nn.Linear)
def _linear_madds(layer: nn.Linear, inputs: tuple, output) -> int:
    # a Linear's output, or the parts it returns it in (layers.HalvedLinear)
    parts = output if isinstance(output, tuple) else (output,)
    return sum(_numel(part.shape) for part in parts) * int(layer.weight.shape[0])


def _matmul_madds(x: paddle.Tensor, y: paddle.Tensor, transpose_x: bool = False,
                  transpose_y: bool = False) -> int:
    x_shape, y_shape = list(x.shape), list(y.shape)
    inner = x_shape[-2] if transpose_x and len(x_shape) > 1 else x_shape[-1]
    rows = (x_shape[-1] if transpose_x else x_shape[-2]) if len(x_shape) > 1 else 1
    cols = (y_shape[-2] if transpose_y else y_shape[-1]) if len(y_shape) > 1 else 1
    batch = np.broadcast_shapes(tuple(x_shape[:-2]), tuple(y_shape[:-2]))
    return _numel(batch) * rows * cols * inner


@contextlib.contextmanager
def _counting_matmuls(total: List[int], inside_rules: List[int]) -> Iterator[None]:
    """Adds the MAdds of every paddle.matmul / paddle.bmm to `total`, except while a layer with a
    rule of its own runs (`inside_rules[0] > 0`): its rule counts its matmuls (a TokenLinear runs
    one where its compiled kernel does not, e.g. on a GPU)."""
    matmul, bmm = paddle.matmul, paddle.bmm

    def counted_matmul(x, y, transpose_x=False, transpose_y=False, name=None):
        if not inside_rules[0]:
            total[0] += _matmul_madds(x, y, transpose_x, transpose_y)
        return matmul(x, y, transpose_x, transpose_y, name)

    def counted_bmm(x, y, name=None):
        if not inside_rules[0]:
            total[0] += _matmul_madds(x, y)
        return bmm(x, y, name)

    paddle.matmul, paddle.bmm = counted_matmul, counted_bmm
    try:
        yield
    finally:
        paddle.matmul, paddle.bmm = matmul, bmm


def count_madds(model: nn.Layer, input_shape: Sequence[int]) -> int:
    """Multiply-adds of one eval-mode forward of `model` on a zero tensor of `input_shape`."""
    total, inside_rules = [0], [0]
    hooks = []

    def enter(layer: nn.Layer, inputs: tuple) -> None:
        inside_rules[0] += 1

    def leave(layer: nn.Layer, inputs: tuple, output, rule: MaddsRule) -> None:
        inside_rules[0] -= 1
        total[0] += rule(layer, inputs, output)

    for layer in model.sublayers(include_self=True):
        # the most derived registered type: a subclass that computes the same (e.g. a Conv2D with a
        # faster kernel) inherits its parent's rule, one that computes more registers its own
        rule = next((MADDS_RULES[t] for t in type(layer).__mro__ if t in MADDS_RULES), None)
        if rule is not None:
            hooks.append(layer.register_forward_pre_hook(enter))
            hooks.append(layer.register_forward_post_hook(
                lambda lyr, inputs, output, rule=rule: leave(lyr, inputs, output, rule)))
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad(), _counting_matmuls(total, inside_rules):
            model(paddle.zeros(list(input_shape), dtype='float32'))
    finally:
        for hook in hooks:
            hook.remove()
        model.train() if was_training else model.eval()
    return total[0]


def build_parser() -> 'CommandParser':
    from mobileformer.cli import CommandParser  # the command's imports stay out of the models' imports

    parser = CommandParser(prog='python -m mobileformer.flops', description='Print parameters and MAdds of a config.')
    parser.add_argument('-cfg', required=True, help='model YAML, e.g. configs/mobileformer_26m.yaml')
    parser.add_argument('-image_size', type=int, default=None, help='default: DATA.IMAGE_SIZE')
    parser.add_argument('-opts', nargs='+', default=None, help='KEY VALUE overrides')
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from mobileformer import build_model, get_config
    from mobileformer.models.model_utils import count_trainable

    args = build_parser().parse_args(argv)
    config = get_config(args.cfg, args.opts)
    size = args.image_size or config.DATA.IMAGE_SIZE
    model = build_model(config)
    madds = count_madds(model, [1, config.DATA.IN_CHANNELS, size, size])
    print(f'{config.MODEL.NAME}: params={count_trainable(model):,} MAdds={madds / 1e6:.1f}M at {size}x{size}')


if __name__ == '__main__':
    main()

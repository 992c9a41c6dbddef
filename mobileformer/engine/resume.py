"""Training checkpoints: which one to resume from, and restoring weights, optimizer state (with the
learning-rate position) and EMA from it."""
from __future__ import annotations

import os
from typing import Dict, Optional

import paddle
import paddle.nn as nn

from mobileformer import checkpoint


def resolve_resume(arg: str, output: str) -> Optional[str]:
    """Checkpoint prefix to resume from: `auto` means `<output>/last` if it exists."""
    if not arg:
        return None
    if arg == 'auto':
        prefix = os.path.join(output, 'last')
        return prefix if os.path.exists(prefix + '.json') else None
    prefix = arg[:-len('.pdparams')] if arg.endswith('.pdparams') else arg
    prefix = prefix[:-len('.json')] if prefix.endswith('.json') else prefix
    if not os.path.exists(prefix + '.json'):
        raise ValueError(f"cannot resume from '{arg}': '{prefix}.json' does not exist; pass "
                         f"<output>/last or -resume auto")
    return prefix


def _rename_optimizer_state(state: dict, names: Dict[str, str]) -> dict:
    """Renames accumulator keys `<param name>_<accumulator>` (and master weights) by `names`."""
    def rename(key: str) -> str:
        for cut in [i for i, c in enumerate(key) if c == '_'][::-1] + [len(key)]:
            if key[:cut] in names:
                return names[key[:cut]] + key[cut:]
        return key
    renamed = {}
    for key, value in state.items():
        if key == 'master_weights':
            value = {rename(k): v for k, v in value.items()}
        renamed[key if key in ('LR_Scheduler', 'master_weights') else rename(key)] = value
    return renamed


def optimizer_state(optimizer: paddle.optimizer.Optimizer, network: nn.Layer) -> dict:
    """The optimizer state keyed by structured parameter names: Paddle keys it by unique tensor
    names (`linear_3.w_0_moment1_0`), which change with how many layers a process has built."""
    names = {p.name: name for name, p in network.named_parameters()}
    return _rename_optimizer_state(optimizer.state_dict(), names)


def set_optimizer_state(optimizer: paddle.optimizer.Optimizer, network: nn.Layer, state: dict) -> None:
    names = {name: p.name for name, p in network.named_parameters()}
    optimizer.set_state_dict(_rename_optimizer_state(state, names))


def load_checkpoint(prefix: str, network: nn.Layer, optimizer: paddle.optimizer.Optimizer,
                    ema: Optional[paddle.callbacks.Callback] = None) -> dict:
    """Restores weights, optimizer state (with the LR schedule position) and EMA from
    `<prefix>.*` (`ema`: the ExponentialMovingAverage callback); returns the `<prefix>.json` record (epoch, history, best_top1)."""
    info = checkpoint.read_file(prefix + '.json')
    checkpoint.load_weights(network, prefix + '.pdparams')
    set_optimizer_state(optimizer, network, checkpoint.read_file(prefix + '.pdopt'))
    if ema is not None:
        if not os.path.exists(prefix + '.pdema'):
            raise ValueError(f"'{prefix}' was trained without TRAIN.EMA; resume with TRAIN.EMA False")
        ema.set_state_dict(checkpoint.read_file(prefix + '.pdema', return_numpy=True))
    return info

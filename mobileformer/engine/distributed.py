"""Processes and seeds: which rank this is, and seeds that make every run repeatable."""
from __future__ import annotations

import random

import numpy as np
import paddle


def rank() -> int:
    return paddle.distributed.ParallelEnv().rank


def world_size() -> int:
    return paddle.distributed.ParallelEnv().world_size


def is_main_process() -> bool:
    """Only the global rank 0 prints summaries and writes files."""
    return rank() == 0


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (e.g. SEED, epoch, rank) without collisions."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    paddle.seed(seed)
    np.random.seed(seed)
    random.seed(seed)

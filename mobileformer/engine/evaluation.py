"""Evaluation over the whole dataset, every rank together."""
from __future__ import annotations

import paddle

from mobileformer.engine.data import SafeLoader


def evaluate_model(model: paddle.Model, loader: SafeLoader, verbose: int = 0) -> dict:
    """Top-1, top-k (`step.top_k`: 5, or fewer with fewer classes) and mean cross-entropy over the
    whole dataset (all ranks together), keyed top1, top<k>, ce."""
    try:
        result = model.evaluate(loader, verbose=verbose)
    finally:
        loader.stop_workers()
    top1_name, top_k_name = model._metrics[0].name()  # acc_top1, acc_top<k>
    return {'top1': float(result[top1_name]), top_k_name[len('acc_'):]: float(result[top_k_name]),
            'ce': float(result['ce']), 'samples': len(loader.dataset)}

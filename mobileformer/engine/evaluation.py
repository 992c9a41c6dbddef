"""Evaluation over the whole dataset, every rank together."""
from __future__ import annotations

import paddle

from mobileformer.engine.data import SafeLoader


def evaluate_model(model: paddle.Model, loader: SafeLoader, verbose: int = 0) -> dict:
    """Top-1, top-5 and mean cross-entropy over the whole dataset (all ranks together)."""
    try:
        result = model.evaluate(loader, verbose=verbose)
    finally:
        loader.stop_workers()
    top1_name, top5_name = model._metrics[0].name()  # acc_top1, acc_top5 (top-k for < 5 classes)
    return {'top1': float(result[top1_name]), 'top5': float(result[top5_name]), 'loss': float(result['ce']),
            'samples': len(loader.dataset)}

"""Deployment: a model ready for inference, its static export, and runners for the exported files.

- `build_for_inference(config, weights)`: builds, loads `.pdparams` (strictly), folds every
  re-parameterisable block (RepMLP) and switches to eval mode.
- `export_inference(model, config, out_dir)`: `paddle.jit.save` with a dynamic batch dimension.
- `InferenceModel(dir, threads)`: runs that export through `paddle.inference` on the CPU with oneDNN.
- `export_onnx(model_dir, file)` / `OnnxModel(file)`: paddle2onnx and onnxruntime (optional packages).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec
from yacs.config import CfgNode

from mobileformer.cpu import cpu_threads, keep_freed_memory
from mobileformer.model_utils import re_parameterize_model
from mobileformer.registry import build_model
from mobileformer.checkpoint import load_weights

INFERENCE_PREFIX = 'inference'
ONNX_FILE = 'inference.onnx'
ONNX_OPSET = 13


def build_for_inference(config: CfgNode, weights: Optional[str] = None) -> nn.Layer:
    """The model of `config` with `weights` loaded, re-parameterised, in eval mode."""
    model = build_model(config)
    if weights:
        load_weights(model, weights)
    return re_parameterize_model(model)


def input_spec(config: CfgNode) -> InputSpec:
    size = config.DATA.IMAGE_SIZE
    return InputSpec([None, config.DATA.IN_CHANNELS, size, size], 'float32', 'x')


def export_inference(model: nn.Layer, config: CfgNode, out_dir: str) -> str:
    """Saves `model` as a static inference model in `out_dir`; returns the path prefix."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, INFERENCE_PREFIX)
    # saving the dygraph layer traces a full-graph copy of forward and leaves `model` in dygraph
    # (to_static on the model itself would re-trace it at every new batch size afterwards)
    paddle.jit.save(model, prefix, input_spec=[input_spec(config)])
    return prefix


def _model_file(model_dir: str) -> str:
    for suffix in ('.json', '.pdmodel'):  # PIR programs (Paddle 3) or the legacy program format
        path = os.path.join(model_dir, INFERENCE_PREFIX + suffix)
        if os.path.isfile(path):
            return path
    raise ValueError(f"'{model_dir}' holds no exported model ({INFERENCE_PREFIX}.json or .pdmodel); "
                     f"create it with export.py")


class InferenceModel:
    """An exported model run by `paddle.inference` (CPU, oneDNN): `model(batch) -> logits`."""

    def __init__(self, model_dir: str, threads: Optional[int] = None):
        from paddle import inference
        config = inference.Config(_model_file(model_dir), os.path.join(model_dir, INFERENCE_PREFIX + '.pdiparams'))
        config.disable_gpu()
        keep_freed_memory()
        # oneDNN kernels plus its fusion passes (conv+BN+act, matmul+bias+act, fc); they also cover
        # the GEMMs, which Paddle's own CPU BLAS runs several times slower on AMD CPUs.
        config.enable_mkldnn()
        config.set_cpu_math_library_num_threads(threads or cpu_threads())
        # enable_memory_optim() is left off: in Paddle 3.3 its pass fails on PIR programs (.json)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        name = self.predictor.get_input_names()[0]
        handle = self.predictor.get_input_handle(name)
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()


def export_onnx(model_dir: str, path: str) -> str:
    """Converts the export in `model_dir` to ONNX at `path` (written atomically)."""
    try:
        import paddle2onnx
    except ImportError:
        raise ValueError('ONNX export needs paddle2onnx: pip install paddle2onnx onnxruntime') from None
    prefix = os.path.join(model_dir, INFERENCE_PREFIX)
    # optimize_tool='None': the default (polygraphy) installs packages from the network at run time
    try:
        data = paddle2onnx.export(_model_file(model_dir), prefix + '.pdiparams', save_file=None,
                                  opset_version=ONNX_OPSET, enable_onnx_checker=True, optimize_tool='None')
    except Exception as e:  # it logs the cause and then fails on its own unset result
        raise ValueError(f"paddle2onnx could not convert '{model_dir}' ({type(e).__name__}; see its log above)") from None
    if not data:
        raise ValueError(f"paddle2onnx could not convert '{model_dir}' (see its log above)")
    temporary = path + f'.{os.getpid()}.tmp'
    with open(temporary, 'wb') as f:
        f.write(data)
    os.replace(temporary, path)
    return path


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU: `model(batch) -> logits`."""

    def __init__(self, path: str):
        try:
            import onnxruntime
        except ImportError:
            raise ValueError('running ONNX needs onnxruntime: pip install onnxruntime') from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: paddle2onnx leaves unused initialisers it warns about
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def dygraph_logits(model: nn.Layer, batch: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(batch, dtype='float32')).numpy()

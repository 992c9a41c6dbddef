"""A model ready for inference and its exports.

- `build_for_inference(config, weights)`: builds, loads `.pdparams` (strictly), folds every
  re-parameterisable block (RepMLP) and switches to eval mode.
- `export_inference(model, config, out_dir)`: `paddle.jit.save` with a dynamic batch dimension.
- `export_onnx(model, config, file)`: the same model as ONNX (paddle2onnx).
- `dygraph_outputs(model, batch)`: what the exports are checked against.
- `read_precision(dir)` / `write_precision(dir, precision)`: which precision the runtimes run from
  an export folder (`precision.json`; fp32 without it). The fp32 files are always there; an INT8
  export adds `inference.int8.onnx` (`mobileformer.deploy.quantize`).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import List, Optional, Set, Union

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec
from yacs.config import CfgNode

from mobileformer.checkpoint import load_weights
from mobileformer.config import COMMAND_LINE, Overrides
from mobileformer.cpu_ops import output_to, tracing_for_onnx
from mobileformer.models.model_utils import re_parameterize_model
from mobileformer.registry import build_model

INFERENCE_PREFIX = 'inference'
ONNX_FILE = 'inference.onnx'
ONNX_OPSET = 13
INT8_ONNX_FILE = 'inference.int8.onnx'
PRECISION_FILE = 'precision.json'
PRECISIONS = ('fp32', 'bf16', 'int8')


def paddle_files(model_dir: str) -> Optional[List[str]]:
    """[program, parameters] of a Paddle inference model in `model_dir`, or None."""
    params = os.path.join(model_dir, INFERENCE_PREFIX + '.pdiparams')
    for suffix in ('.json', '.pdmodel'):  # PIR programs (Paddle 3) or the legacy program format
        program = os.path.join(model_dir, INFERENCE_PREFIX + suffix)
        if os.path.isfile(program) and os.path.isfile(params):
            return [program, params]
    return None


def read_precision_record(model_dir: str) -> dict:
    """`precision.json` of `model_dir`: {'precision': ..., 'runtimes': [those that may run it], ...},
    or {'precision': 'fp32'} without it."""
    path = os.path.join(model_dir, PRECISION_FILE)
    if not os.path.isfile(path):
        return {'precision': 'fp32'}
    try:
        with open(path, encoding='utf-8') as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get('precision') not in PRECISIONS:
        raise ValueError(f"'{path}' does not name a precision ({', '.join(PRECISIONS)}); export the model again "
                         'with export.py')
    return record


def read_precision(model_dir: str) -> str:
    """The precision the export in `model_dir` is run at: fp32 unless `precision.json` says otherwise."""
    return read_precision_record(model_dir)['precision']


def write_precision(model_dir: str, precision: str, runtimes: List[str], details: Optional[dict] = None) -> None:
    """Records `precision`, the `runtimes` that may run it (those whose accuracy was checked and
    found close enough to fp32) and what was measured about it; written atomically, last, so a
    folder never names a precision whose files are incomplete."""
    path = os.path.join(model_dir, PRECISION_FILE)
    temporary = path + f'.{os.getpid()}.tmp'
    with open(temporary, 'w', encoding='utf-8') as f:
        json.dump({'precision': precision, 'runtimes': list(runtimes), **(details or {})}, f, indent=1)
    os.replace(temporary, path)


def build_for_inference(config: CfgNode, weights: Optional[str] = None, overrides: Overrides = COMMAND_LINE) -> nn.Layer:
    """The model of `config` with `weights` loaded, re-parameterised, in eval mode. `overrides` says
    how the user changes the config when the weights do not fit it."""
    model = build_model(config)
    if weights:
        load_weights(model, weights, overrides=overrides)
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


# Operators paddle2onnx 2.1 cannot convert and on which it aborts the whole process (SIGABRT, no
# exception to catch): FNet's FFT. A conversion in a child process would survive that, but on this
# stack the child's exit crashed the parent (SIGSEGV on delivering SIGCHLD, after DataLoader
# workers had run), so the traced program is checked for them instead.
PADDLE2ONNX_ABORTS_ON = ('fft_c2c', 'fft_r2c', 'fft_c2r')


def _ops_paddle2onnx_aborts_on(program: str) -> List[str]:
    """The operators of `PADDLE2ONNX_ABORTS_ON` in a PIR program (.json), sorted."""
    with open(program, encoding='utf-8') as f:
        text = f.read()
    return sorted(op for op in PADDLE2ONNX_ABORTS_ON if f'"1.{op}"' in text)


def export_onnx(model: nn.Layer, config: CfgNode, path: str) -> str:
    """`model` as ONNX at `path` (written atomically), converted by paddle2onnx from a program traced
    in the forms the ONNX runtimes run fastest (`cpu_ops.tracing_for_onnx`), not the oneDNN ones of
    `export_inference`."""
    try:
        import paddle2onnx
    except ImportError:
        raise ValueError('ONNX export needs paddle2onnx: pip install paddle2onnx, or pass -no_onnx') from None
    log = path + '.paddle2onnx.log'
    with tempfile.TemporaryDirectory() as workdir:
        with tracing_for_onnx():
            export_inference(model, config, workdir)
        program, params = paddle_files(workdir)
        unconvertible = _ops_paddle2onnx_aborts_on(program)
        if unconvertible:
            raise ValueError(f"paddle2onnx cannot convert {config.MODEL.NAME} (it has no ONNX form of its "
                             f"{', '.join(unconvertible)}): export it with -no_onnx, for the paddle runtime only")
        # optimize_tool='None': the default (polygraphy) installs packages from the network at run time.
        # Its progress lines go to a log that is kept only when the conversion fails.
        try:
            with output_to(log):
                data = paddle2onnx.export(program, params, save_file=None, opset_version=ONNX_OPSET,
                                          enable_onnx_checker=True, optimize_tool='None')
        except Exception as e:  # it logs the cause and then fails on its own unset result
            raise ValueError(f'paddle2onnx could not convert {config.MODEL.NAME} ({type(e).__name__}; '
                             f"see '{log}')") from None
    if not data:
        raise ValueError(f"paddle2onnx could not convert {config.MODEL.NAME} (see '{log}')")
    os.remove(log)
    temporary = path + f'.{os.getpid()}.tmp'
    with open(temporary, 'wb') as f:
        f.write(without_dead_nodes(data))
    os.replace(temporary, path)
    return path


def _names_read(node) -> Set[str]:
    """The values `node` reads: its inputs and whatever the nodes of its subgraphs (If, Loop) read."""
    import onnx

    names = set(node.input)
    for attribute in node.attribute:
        for graph in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
            for inner in graph.node:
                names |= _names_read(inner)
    return names


def without_dead_nodes(data: bytes) -> bytes:
    """The serialised ONNX model `data` without the nodes no output depends on, and the initializers only
    they read. paddle2onnx leaves a Shape -> Slice pair that nothing reads in every layer norm, and
    onnxruntime keeps them in its optimised graph (MF-26M: 50 of its nodes)."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):  # ONNX nodes are in topological order: readers come after
        if any(output in needed for output in node.output):
            kept.append(node)
            needed |= _names_read(node)
    if len(kept) == len(graph.node):
        return data
    graph.ClearField('node')
    graph.node.extend(reversed(kept))
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    graph.ClearField('initializer')
    graph.initializer.extend(initializers)
    return model.SerializeToString()


def dygraph_outputs(model: nn.Layer, batch: np.ndarray) -> Union[np.ndarray, List[np.ndarray]]:
    """The model's logits, or the list of maps of a feature extractor, as the runtimes return them."""
    with paddle.no_grad():
        outputs = model(paddle.to_tensor(batch, dtype='float32'))
    return [o.numpy() for o in outputs] if isinstance(outputs, (list, tuple)) else outputs.numpy()

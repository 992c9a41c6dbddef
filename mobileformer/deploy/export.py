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

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional, Set, Union

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec
from yacs.config import CfgNode

from mobileformer.checkpoint import load_weights
from mobileformer.cpu_ops import tracing_for_onnx
from mobileformer.model_utils import re_parameterize_model
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


# paddle2onnx, run in a child process: on operators it cannot convert (e.g. FNet's FFT) it aborts the
# process it runs in. optimize_tool='None': the default (polygraphy) installs packages from the
# network at run time.
_CONVERT = ('import sys, paddle2onnx\n'
            'data = paddle2onnx.export(sys.argv[1], sys.argv[2], save_file=None, opset_version=int(sys.argv[4]), '
            'enable_onnx_checker=True, optimize_tool="None")\n'
            'open(sys.argv[3], "wb").write(data) if data else sys.exit(3)\n')


def _conversion_failure(log: str, returncode: int) -> str:
    """What went wrong: paddle2onnx's first error line, and how its process ended."""
    with open(log, errors='replace') as f:
        errors = [line.split(']')[-1].strip().rstrip('.') for line in f if '[ERROR]' in line]
    ending = f'killed by {signal.Signals(-returncode).name}' if returncode < 0 else f'exit status {returncode}'
    return '; '.join(errors[:1] + [ending])


def export_onnx(model: nn.Layer, config: CfgNode, path: str) -> str:
    """`model` as ONNX at `path` (written atomically), converted by paddle2onnx from a program traced
    in the forms the ONNX runtimes run fastest (`cpu_ops.tracing_for_onnx`), not the oneDNN ones of
    `export_inference`."""
    if importlib.util.find_spec('paddle2onnx') is None:
        raise ValueError('ONNX export needs paddle2onnx: pip install paddle2onnx, or pass -no_onnx')
    log = path + '.paddle2onnx.log'  # kept only when the conversion fails
    temporary = path + f'.{os.getpid()}.tmp'
    with tempfile.TemporaryDirectory() as workdir:
        with tracing_for_onnx():
            export_inference(model, config, workdir)
        program, params = paddle_files(workdir)
        with open(log, 'w') as output:
            result = subprocess.run([sys.executable, '-c', _CONVERT, program, params, temporary, str(ONNX_OPSET)],
                                    stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise ValueError(f'paddle2onnx cannot convert {config.MODEL.NAME} ({_conversion_failure(log, result.returncode)}; '
                         f"see '{log}'): export it with -no_onnx, for the paddle runtime only")
    os.remove(log)
    with open(temporary, 'rb') as f:
        data = without_dead_nodes(f.read())
    with open(temporary, 'wb') as f:
        f.write(data)
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

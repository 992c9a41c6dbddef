"""Deployment: a model ready for inference, its static export, and runners for the exported files.

- `build_for_inference(config, weights)`: builds, loads `.pdparams` (strictly), folds every
  re-parameterisable block (RepMLP) and switches to eval mode.
- `export_inference(model, config, out_dir)`: `paddle.jit.save` with a dynamic batch dimension.
- `export_onnx(model, config, file)`: the same model as ONNX (paddle2onnx).
- `InferenceModel(dir, threads, runtime)`: runs that export in the fastest runtime available for it
  on this CPU (measured, cached), or in the one asked for: `PaddleModel` (paddle.inference with
  oneDNN), `OnnxModel` (onnxruntime), `OpenVinoModel` (OpenVINO, optional, float32).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn as nn
from paddle.static import InputSpec
from yacs.config import CfgNode

from mobileformer.cpu import cap_onednn_isa_on_amd_avx512, cpu_description, cpu_threads, keep_freed_memory, users_environ
from mobileformer.cpu_ops import output_to, tracing_for_onnx
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


RUNTIMES = ('paddle', 'onnxruntime', 'openvino')
AUTO = 'auto'
_DISTRIBUTIONS = {'paddle': 'paddlepaddle', 'onnxruntime': 'onnxruntime', 'openvino': 'openvino'}  # pip names
OPENVINO_PRECISION = 'f32'  # OpenVINO's own default is bf16 on CPUs with avx512_bf16 or AMX


def default_threads() -> int:
    """Every CPU unless the user set OMP_NUM_THREADS (Paddle's own default of 1 does not count)."""
    return cpu_threads(users_environ())


def _paddle_files(model_dir: str) -> Optional[List[str]]:
    """[program, parameters] of a Paddle inference model in `model_dir`, or None."""
    params = os.path.join(model_dir, INFERENCE_PREFIX + '.pdiparams')
    for suffix in ('.json', '.pdmodel'):  # PIR programs (Paddle 3) or the legacy program format
        program = os.path.join(model_dir, INFERENCE_PREFIX + suffix)
        if os.path.isfile(program) and os.path.isfile(params):
            return [program, params]
    return None


def runtime_files(runtime: str, model_dir: str) -> List[str]:
    """The files of `model_dir` that `runtime` reads; a ValueError says what is missing."""
    paddle_files = _paddle_files(model_dir)
    if runtime == 'paddle':
        if paddle_files is None:
            raise ValueError(f"'{model_dir}' holds no Paddle inference model ({INFERENCE_PREFIX}.json or "
                             f".pdmodel, with .pdiparams), which runtime paddle needs; create it with export.py")
        return paddle_files
    onnx_file = os.path.join(model_dir, ONNX_FILE)
    if os.path.isfile(onnx_file):
        return [onnx_file]
    # OpenVINO also reads the legacy Paddle program format, but not Paddle 3's .json programs
    if runtime == 'openvino' and paddle_files is not None and paddle_files[0].endswith('.pdmodel'):
        return paddle_files
    raise ValueError(f"'{model_dir}' holds no {ONNX_FILE}, which runtime {runtime} needs; export the model "
                     f"again with export.py (it writes {ONNX_FILE} unless -no_onnx)")


def installed_runtimes() -> List[str]:
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]  # each module is named as its runtime


def runtime_versions() -> Dict[str, str]:
    # Paddle's own attribute: its distribution may be paddlepaddle-gpu
    return {r: paddle.__version__ if r == 'paddle' else importlib.metadata.version(_DISTRIBUTIONS[r])
            for r in installed_runtimes()}


def _not_installed(runtime: str) -> ValueError:
    return ValueError(f'runtime {runtime} needs the {_DISTRIBUTIONS[runtime]} package, which is not installed: '
                      f'pip install {_DISTRIBUTIONS[runtime]}, or choose the runtime auto')


def _paddle_input_shape(program: str) -> Optional[Tuple[int, ...]]:
    """The input shape recorded in a PIR program's data op (-1: dynamic); None where it cannot be
    read (legacy programs): the predictor itself does not report it."""
    if not program.endswith('.json'):
        return None
    try:
        with open(program, encoding='utf-8') as f:
            stack = [json.load(f)]
    except (OSError, ValueError):
        return None
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get('#') == '1.data':
                shapes = [a['AT']['D'] for a in node.get('A', []) if isinstance(a, dict) and a.get('N') == 'shape']
                return tuple(shapes[0]) if shapes else None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


class PaddleModel:
    """An exported model run by `paddle.inference` (CPU, oneDNN): `model(batch) -> logits`."""
    name = 'paddle'

    def __init__(self, model_dir: str, threads: Optional[int] = None):
        from paddle import inference
        program, params = runtime_files('paddle', model_dir)
        config = inference.Config(program, params)
        config.disable_gpu()
        keep_freed_memory()
        # oneDNN kernels plus its fusion passes (conv+BN+act, matmul+bias+act, fc); they also cover
        # the GEMMs, which Paddle's own CPU BLAS runs several times slower on AMD CPUs.
        config.enable_mkldnn()
        cap_onednn_isa_on_amd_avx512()
        config.set_cpu_math_library_num_threads(threads or default_threads())
        # enable_memory_optim() is left off: in Paddle 3.3 its pass fails on PIR programs (.json)
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)
        self.input_shape = _paddle_input_shape(program)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        name = self.predictor.get_input_names()[0]
        handle = self.predictor.get_input_handle(name)
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()


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
        program, params = runtime_files('paddle', workdir)
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
        f.write(data)
    os.replace(temporary, path)
    return path


def _static_shape(dims) -> Tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU: `model(batch) -> logits`."""
    name = 'onnxruntime'

    def __init__(self, path: str, threads: Optional[int] = None):
        try:
            import onnxruntime
        except ImportError:
            raise _not_installed('onnxruntime') from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: paddle2onnx leaves unused initialisers it warns about
        options.intra_op_num_threads = threads or default_threads()
        self.session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        self.input_shape = _static_shape(self.session.get_inputs()[0].shape)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        return self.session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class OpenVinoModel:
    """An ONNX file (or legacy .pdmodel) run by OpenVINO on the CPU, in float32 unless `precision`
    says otherwise: `model(batch) -> logits`."""
    name = 'openvino'

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = OPENVINO_PRECISION):
        try:
            import openvino
        except ImportError:
            raise _not_installed('openvino') from None
        core = openvino.Core()
        model = core.read_model(path)
        # LATENCY: one stream using every thread, as the other runtimes run a batch
        compiled = core.compile_model(model, 'CPU', {'INFERENCE_PRECISION_HINT': precision,
                                                     'INFERENCE_NUM_THREADS': threads or default_threads(),
                                                     'PERFORMANCE_HINT': 'LATENCY'})
        self.request = compiled.create_infer_request()
        self.input_shape = tuple(d.get_length() if d.is_static else -1 for d in model.input(0).get_partial_shape())

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.request.infer([np.ascontiguousarray(batch, dtype=np.float32)])[0]


Engine = Union[PaddleModel, OnnxModel, OpenVinoModel]


def load_runtime(runtime: str, model_dir: str, threads: Optional[int] = None) -> Engine:
    """The export in `model_dir` loaded by `runtime`; any problem is a ValueError saying what to do."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}': choose one of {', '.join((AUTO,) + RUNTIMES)}")
    if runtime not in installed_runtimes():
        raise _not_installed(runtime)
    files = runtime_files(runtime, model_dir)
    try:
        if runtime == 'paddle':
            return PaddleModel(model_dir, threads)
        return (OnnxModel if runtime == 'onnxruntime' else OpenVinoModel)(files[0], threads)
    except Exception as e:  # each runtime has its own exception types for unreadable files
        message = ' '.join(str(e).split())[:300]
        raise ValueError(f"runtime {runtime} could not load '{files[0]}' ({type(e).__name__}: {message}); "
                         f'export the model again with export.py') from None


# ---- automatic choice: every available runtime timed once per model file, CPU and thread count ----

TIMING_BATCHES = (1, 8)  # latency and throughput weigh alike in the score
TIMING_ROUNDS = (3, 10)  # at least, at most: small models get more rounds within the budget
TIMING_BUDGET_S = 3.0


def runtime_cache_file() -> str:
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'mobileformer', 'runtimes.json')


def _cache_key(model_dir: str, runtimes: Sequence[str], threads: int) -> str:
    """The model's files (path, size, modification time), the CPU, the thread count, the ISA limits a
    user set for oneDNN, and the candidate runtimes with their versions."""
    parts = [cpu_description(), str(threads), os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
             os.environ.get('DNNL_MAX_CPU_ISA', '')]
    versions = runtime_versions()
    for runtime in runtimes:
        parts.append(f'{runtime}={versions[runtime]}')
        for path in runtime_files(runtime, model_dir):
            stat = os.stat(path)
            parts.append(f'{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}')
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:24]


def _read_cache(path: str) -> Dict[str, dict]:
    try:
        with open(path, encoding='utf-8') as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Best effort (a read-only home only costs a new measurement next time); atomic, so
    concurrent processes never read a half-written file."""
    cache = _read_cache(path)
    cache[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f'{path}.{os.getpid()}.tmp'
        with open(temporary, 'w', encoding='utf-8') as f:
            json.dump(cache, f, indent=1)
        os.replace(temporary, path)
    except OSError:
        pass


def time_runtimes(engines: Sequence[Engine], shape: Sequence[int]) -> Dict[str, float]:
    """Seconds per image at batch 1 plus seconds per image at batch 8, per runtime: the best of a few
    rounds that alternate the runtimes, so a burst of load on the machine hits all of them alike.
    Each timed run follows an untimed one of the same shape: OpenVINO re-plans a dynamic-shape
    model whenever the shape changes, which a caller feeding one batch size never pays."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((b, *shape), dtype=np.float32) for b in TIMING_BATCHES]
    best = {engine.name: float('inf') for engine in engines}
    start = time.perf_counter()
    for done in range(TIMING_ROUNDS[1]):
        if done >= TIMING_ROUNDS[0] and time.perf_counter() - start > TIMING_BUDGET_S:
            break
        for engine in engines:
            seconds = 0.0
            for x in inputs:
                engine(x)
                begin = time.perf_counter()
                engine(x)
                seconds += (time.perf_counter() - begin) / len(x)
            best[engine.name] = min(best[engine.name], seconds)
    return best


def _summary(seconds: Dict[str, float]) -> str:
    return ', '.join(f'{name} {1000 * s:.3g}' for name, s in sorted(seconds.items(), key=lambda item: item[1]))


def _load_first(order: Sequence[str], model_dir: str, threads: int, log: Callable[[str], None]) -> Engine:
    """The first runtime of `order` that loads; each one that fails is reported in one line."""
    problems = []
    for i, runtime in enumerate(order):
        try:
            return load_runtime(runtime, model_dir, threads)
        except ValueError as e:
            problems.append(str(e))
            if i + 1 < len(order):
                log(f'notice: {e}; falling back to {order[i + 1]}')
    raise ValueError(' '.join(problems))


def choose_runtime(model_dir: str, threads: int, log: Callable[[str], None] = print) -> Engine:
    """The fastest runtime for the export in `model_dir` on this CPU, measured with `time_runtimes`
    the first time and then read from `runtime_cache_file()`; prints the choice in one line."""
    installed = installed_runtimes()
    candidates = []
    for runtime in installed:
        try:
            runtime_files(runtime, model_dir)
            candidates.append(runtime)
        except ValueError:
            pass
    if not candidates:
        raise ValueError(f"'{model_dir}' holds no exported model that an installed runtime "
                         f"({', '.join(installed)}) can run; create it with export.py")
    if len(candidates) == 1:
        engine = load_runtime(candidates[0], model_dir, threads)
        log(f"runtime: {engine.name} (the only installed runtime that has its files in '{model_dir}')")
        return engine
    cache_file, key = runtime_cache_file(), _cache_key(model_dir, candidates, threads)
    entry = _read_cache(cache_file).get(key)
    if entry and sorted(entry.get('seconds', {})) == sorted(candidates):
        seconds, source = entry['seconds'], f'cached in {cache_file}'
        engine = _load_first(sorted(candidates, key=seconds.get), model_dir, threads, log)
    else:
        engines = []
        for runtime in candidates:
            try:
                engines.append(load_runtime(runtime, model_dir, threads))
            except ValueError as e:
                log(f'notice: {e}; timing the other runtimes')
        if not engines:
            raise ValueError(f"no runtime could load '{model_dir}'; export the model again with export.py")
        shape = next((e.input_shape[1:] for e in engines if e.input_shape and -1 not in e.input_shape[1:]), None)
        if shape is None:
            raise ValueError(f"cannot tell the input size of the model in '{model_dir}'; choose a runtime")
        seconds = time_runtimes(engines, shape)
        if len(engines) == len(candidates):  # a runtime that failed to load is measured next time
            _write_cache(cache_file, key, {'seconds': seconds, 'cpu': cpu_description(), 'threads': threads,
                                           'model': os.path.abspath(model_dir)})
        engine = min(engines, key=lambda e: seconds[e.name])
        source = f'measured now, cached in {cache_file}'
    log(f'runtime: {engine.name}, the fastest here for this model (ms per image at batch 1 + at batch 8, '
        f'{threads} threads, {cpu_description()}: {_summary(seconds)}; {source})')
    return engine


class InferenceModel:
    """An export of `export.py` run by the fastest runtime available for it: `model(batch) -> logits`.

    `runtime='auto'` (default) picks among paddle (paddle.inference with oneDNN), onnxruntime and
    OpenVINO (when installed; float32) by timing them on this model once per model files, CPU and
    thread count (`choose_runtime`); a runtime that fails to load falls back to the next fastest with
    a one-line notice. Any other value forces that runtime. The choice is printed in one line through
    `log`, and kept in `self.runtime`. Batches of another image size than the export's are refused."""

    def __init__(self, model_dir: str, threads: Optional[int] = None, runtime: str = AUTO,
                 log: Callable[[str], None] = print):
        if not os.path.isdir(model_dir):
            raise ValueError(f"no such folder '{model_dir}'; create it with export.py")
        self.model_dir = model_dir
        threads = threads or default_threads()
        keep_freed_memory()
        if runtime == AUTO:
            self.engine = choose_runtime(model_dir, threads, log)
        else:
            self.engine = load_runtime(runtime, model_dir, threads)
            log(f'runtime: {runtime} (chosen by the caller)')
        self.runtime = self.engine.name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        expected = self.engine.input_shape
        if expected is not None and (batch.ndim != len(expected) or any(
                e not in (-1, got) for e, got in zip(expected[1:], batch.shape[1:]))):
            size = ', '.join(str(e) if e >= 0 else 'N' for e in expected)
            raise ValueError(f"the model in '{self.model_dir}' was exported for inputs [{size}] but was given "
                             f"{list(batch.shape)}; feed images of its size, or export it again with "
                             f"-opts DATA.IMAGE_SIZE {batch.shape[-1]}")
        return self.engine(batch)


def dygraph_logits(model: nn.Layer, batch: np.ndarray) -> np.ndarray:
    with paddle.no_grad():
        return model(paddle.to_tensor(batch, dtype='float32')).numpy()

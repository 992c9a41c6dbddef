"""The runtimes that run an export of `export.py`, each as `model(batch) -> outputs` (the logits, or
the list of maps of a feature extractor): `PaddleModel` (paddle.inference with oneDNN), `OnnxModel`
(onnxruntime), `OpenVinoModel` (OpenVINO, optional, float32 unless asked).

Each runs the precision its folder records (`read_precision`): fp32 in every runtime; int8 (the
QDQ ONNX of `mobileformer.deploy.quantize`) in onnxruntime and OpenVINO; bf16 in OpenVINO on CPUs
that have bf16 instructions (onnxruntime has no general bf16 CPU kernels, and Paddle's oneDNN runs
its AVX2 kernels on AMD CPUs with AVX-512, see `cap_onednn_isa_on_amd_avx512`, which have no bf16).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import contextlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from mobileformer.cpu import cap_onednn_isa_on_amd_avx512, cpu_threads, keep_freed_memory, paddle_math_threads, users_environ
from mobileformer.cpu_ops import output_to
from mobileformer.deploy.export import (INFERENCE_PREFIX, INT8_ONNX_FILE, ONNX_FILE, paddle_files,
                                        read_precision_record)

Outputs = Union[np.ndarray, List[np.ndarray]]

RUNTIMES = ('paddle', 'onnxruntime', 'openvino')
AUTO = 'auto'
_DISTRIBUTIONS = {'paddle': 'paddlepaddle', 'onnxruntime': 'onnxruntime', 'openvino': 'openvino'}  # pip names
OPENVINO_PRECISION = 'f32'  # OpenVINO's own default is bf16 on CPUs with avx512_bf16 or AMX
# the runtimes that run each low precision (fp32: all of them)
LOW_PRECISION_RUNTIMES = {'int8': ('onnxruntime', 'openvino'), 'bf16': ('openvino',)}
_OPENVINO_CAPABILITY = {'int8': 'INT8', 'bf16': 'BF16'}  # in its CPU plugin's OPTIMIZATION_CAPABILITIES


def default_threads() -> int:
    """Every CPU unless the user set OMP_NUM_THREADS (Paddle's own default of 1 does not count)."""
    return cpu_threads(users_environ())


def openvino_capabilities() -> List[str]:
    """What OpenVINO's CPU plugin can run on this CPU (e.g. FP32, INT8, BF16)."""
    import openvino
    return list(openvino.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))


def precision_problem(runtime: str, precision: str) -> Optional[str]:
    """Why `runtime` cannot run `precision` here (one sentence), or None if it can."""
    if precision == 'fp32':
        return None
    able = LOW_PRECISION_RUNTIMES[precision]
    if runtime not in able:
        return (f"runtime {runtime} does not run {precision} models here (runtimes that do: {', '.join(able)})")
    if runtime == 'openvino' and runtime in installed_runtimes() and \
            _OPENVINO_CAPABILITY[precision] not in openvino_capabilities():
        return (f'this CPU has no {precision} support in OpenVINO (its CPU plugin lists '
                f"{', '.join(openvino_capabilities())})")
    return None


def runtime_files(runtime: str, model_dir: str, precision: Optional[str] = None) -> List[str]:
    """The files of `model_dir` that `runtime` reads to run it at `precision` (default: the one the
    folder records); a ValueError says what is missing or that the runtime cannot run that precision."""
    record = read_precision_record(model_dir)
    precision = precision or record['precision']
    problem = precision_problem(runtime, precision)
    if not problem and precision == record['precision'] and runtime not in record.get('runtimes', RUNTIMES):
        problem = (f"runtime {runtime} was left out at export (its top-1 agreement with fp32 was below "
                   f"export.py's -min_agreement)")
    if problem:
        raise ValueError(f"'{model_dir}' holds an export in {precision}, but {problem}; choose the runtime auto")
    if precision == 'int8':
        int8_file = os.path.join(model_dir, INT8_ONNX_FILE)
        if not os.path.isfile(int8_file):
            raise ValueError(f"'{model_dir}' records int8 but holds no {INT8_ONNX_FILE}; export the model again "
                             'with export.py -precision int8')
        return [int8_file]
    program = paddle_files(model_dir)
    if runtime == 'paddle':
        if program is None:
            raise ValueError(f"'{model_dir}' holds no Paddle inference model ({INFERENCE_PREFIX}.json or "
                             f".pdmodel, with .pdiparams), which runtime paddle needs; create it with export.py")
        return program
    onnx_file = os.path.join(model_dir, ONNX_FILE)
    if os.path.isfile(onnx_file):
        return [onnx_file]
    # OpenVINO also reads the legacy Paddle program format, but not Paddle 3's .json programs
    if runtime == 'openvino' and program is not None and program[0].endswith('.pdmodel'):
        return program
    raise ValueError(f"'{model_dir}' holds no {ONNX_FILE}, which runtime {runtime} needs; export the model "
                     f"again with export.py (it writes {ONNX_FILE} unless -no_onnx)")


def installed_runtimes() -> List[str]:
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]  # each module is named as its runtime


def runtime_versions() -> Dict[str, str]:
    # Paddle's own attribute: its distribution may be paddlepaddle-gpu
    return {r: paddle.__version__ if r == 'paddle' else importlib.metadata.version(_DISTRIBUTIONS[r])
            for r in installed_runtimes()}


def install_command(runtime: str) -> str:
    return f'pip install {_DISTRIBUTIONS[runtime]}'


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


# Single images (the latency case, which `choice` times at batch 1) run with Paddle's executor keeping
# its intermediate tensors (see `_executor_keeps_intermediates`); that costs memory per image (MF-294M
# about 50 MB, Mixer-B/16 about 80 MB), so batches, which `choice` times at 2-32, free them as usual.
KEEP_INTERMEDIATES_UP_TO = 1
_GC_FLAG = 'FLAGS_eager_delete_tensor_gb'  # < 0: the executor frees no intermediate tensor


@contextlib.contextmanager
def _executor_keeps_intermediates(keep: bool) -> Iterator[None]:
    """On CPU, Paddle's executor hands every tensor it frees to a garbage-collector thread, which costs
    a thread hand-off per op: with ~900 ops per image that is 40% of Mobile-Former-26M's batch-1 time
    (27 -> 17 ms, 2 threads, AMD EPYC). The flag is read at each run and is process-wide, so it
    is set for this run only."""
    if not keep:
        yield
        return
    previous = paddle.get_flags([_GC_FLAG])[_GC_FLAG]
    paddle.set_flags({_GC_FLAG: -1.0})
    try:
        yield
    finally:
        paddle.set_flags({_GC_FLAG: previous})


def one_or_all(outputs: List[np.ndarray]) -> Outputs:
    """A classifier's logits, or every map of a feature extractor in the order the model returns them."""
    return outputs[0] if len(outputs) == 1 else outputs


class PaddleModel:
    """An exported model run by `paddle.inference` (CPU, oneDNN): `model(batch) -> outputs`."""
    name = 'paddle'

    def __init__(self, model_dir: str, threads: Optional[int] = None):
        from paddle import inference
        program, params = runtime_files('paddle', model_dir, 'fp32')
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
        if self.input_shape:
            # Paddle 3.3.1 prints 'ReduceMeanCheckIfOneDNNSupport' on stdout at a process's first
            # oneDNN reduce_mean (the MLP heads' mean over tokens); a first run here keeps it out of
            # the output of predict.py and the other commands.
            with output_to(os.devnull):
                self(np.zeros([1 if d < 0 else d for d in self.input_shape], np.float32))

    def __call__(self, batch: np.ndarray) -> Outputs:
        name = self.predictor.get_input_names()[0]
        handle = self.predictor.get_input_handle(name)
        handle.reshape(list(batch.shape))
        handle.copy_from_cpu(np.ascontiguousarray(batch, dtype=np.float32))
        threads = paddle_math_threads()
        with _executor_keeps_intermediates(len(batch) <= KEEP_INTERMEDIATES_UP_TO):
            self.predictor.run()
        if threads is not None and paddle_math_threads() != threads:
            # paddle.inference leaves the calling thread's math at 1 thread after each run: dygraph
            # in the same process (a script that also trains, the runtime choice's neighbours) ran
            # on one thread afterwards (ResMLP-12, batch 32: 0.54 -> 1.02 s per forward)
            paddle.base.core.set_num_threads(threads)
        return one_or_all([self.predictor.get_output_handle(name).copy_to_cpu()
                           for name in self.predictor.get_output_names()])


def _static_shape(dims) -> Tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


def onnxruntime_options(threads: Optional[int] = None):
    """The onnxruntime.SessionOptions `OnnxModel` runs with (benchmarks/profile_ops.py adds profiling)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: paddle2onnx leaves unused initialisers it warns about
    options.intra_op_num_threads = threads or default_threads()
    return options


def openvino_config(threads: Optional[int] = None, precision: str = OPENVINO_PRECISION,
                    streams: int = 1) -> Dict[str, object]:
    """The CPU plugin configuration `OpenVinoModel` compiles with (benchmarks/profile_ops.py adds
    PERF_COUNT): one stream using every thread, as the other runtimes run a batch, or `streams`
    streams sharing them, each running its own part of a batch."""
    config = {'INFERENCE_PRECISION_HINT': precision, 'INFERENCE_NUM_THREADS': threads or default_threads()}
    if streams == 1:
        return {**config, 'PERFORMANCE_HINT': 'LATENCY'}
    return {**config, 'PERFORMANCE_HINT': 'THROUGHPUT', 'NUM_STREAMS': streams}


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU: `model(batch) -> outputs`."""
    name = 'onnxruntime'

    def __init__(self, path: str, threads: Optional[int] = None):
        try:
            import onnxruntime
        except ImportError:
            raise _not_installed('onnxruntime') from None
        self.session = onnxruntime.InferenceSession(path, onnxruntime_options(threads),
                                                    providers=['CPUExecutionProvider'])
        self.input_shape = _static_shape(self.session.get_inputs()[0].shape)

    def __call__(self, batch: np.ndarray) -> Outputs:
        name = self.session.get_inputs()[0].name
        return one_or_all(self.session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)}))


def with_input_shape(model, shape: Sequence[int]):
    """A copy of the OpenVINO model `model` whose (first) input has the static shape `shape`."""
    model = model.clone()
    model.reshape({model.input(0): list(shape)})
    return model


class _Streams:
    """A model compiled for one part of a batch and its requests, run side by side, one part each;
    `infer([batch]) -> outputs` like an infer request."""

    def __init__(self, compiled, parts: int):
        self.requests = [compiled.create_infer_request() for _ in range(parts)]
        self.outputs = len(compiled.outputs)

    def infer(self, inputs: List[np.ndarray]) -> List[np.ndarray]:
        for request, part in zip(self.requests, np.split(inputs[0], len(self.requests))):
            request.start_async([part])
        for request in self.requests:
            request.wait()
        return [np.concatenate([request.get_output_tensor(i).data for request in self.requests])
                for i in range(self.outputs)]


class OpenVinoModel:
    """An ONNX file (or legacy .pdmodel) run by OpenVINO on the CPU, in float32 unless `precision`
    says otherwise: `model(batch) -> outputs`.

    A model whose input shape is not fixed (an export's dynamic batch) is also compiled for each input
    shape it is called with, the first STATIC_SHAPES of them, and run in that form: OpenVINO runs a
    static-shape model faster (the nodes of a dynamic one re-check shapes and buffers every run; the
    per-node profile of benchmarks/profile_ops.py showed Mobile-Former's small token FullyConnected
    layers taking up to 0.9 ms each at batch 1; static / dynamic time, alternating blocks, MF-294M
    0.65 at batch 1 and 0.86 at 32, MF-26M 0.56 and 0.76). Each such shape costs one compilation
    on its first call and a compiled copy of the model in memory; further shapes run the dynamic
    compilation, so a caller feeding ever new shapes never compiles more than STATIC_SHAPES times
    (`static_shapes` replaces that number).

    An even batch of a static shape runs as two halves side by side, in two OpenVINO streams that
    share the threads, when there are at least two: each node then runs on fewer threads, with less
    waiting between nodes (Mobile-Former's 500 nodes are mostly small). Split / whole time, batch
    32, 2 threads, alternating blocks: MF-26M 0.89, MF-294M 0.93-0.94, ResMLP-12 0.98."""
    name = 'openvino'
    STATIC_SHAPES = 4
    STREAMS = 2

    def __init__(self, path: str, threads: Optional[int] = None, precision: str = OPENVINO_PRECISION,
                 static_shapes: Optional[int] = None):
        try:
            import openvino
        except ImportError:
            raise _not_installed('openvino') from None
        # 0: every batch runs on the compilation as read, whole, as a plain script would run the file
        self._static_limit = self.STATIC_SHAPES if static_shapes is None else static_shapes
        self._core = openvino.Core()
        self._model = self._core.read_model(path)
        self._threads = threads or default_threads()
        self._precision = precision
        # the model compiled for its input shape as read (a dynamic batch in an export)
        self._as_read = self._compile_for(self._model).create_infer_request()
        self.input_shape = tuple(d.get_length() if d.is_static else -1
                                 for d in self._model.input(0).get_partial_shape())
        self._outputs = len(self._model.outputs)
        # input shape -> an infer request or _Streams (`infer([batch]) -> outputs`)
        self._static: Dict[Tuple[int, ...], object] = {}

    def static_shapes(self) -> Dict[Tuple[int, ...], int]:
        """The input shapes compiled so far in static form, each with the number of parts its
        batches run in side by side."""
        return {shape: len(runner.requests) if isinstance(runner, _Streams) else 1
                for shape, runner in self._static.items()}

    def _compile_for(self, model, streams: int = 1):
        return self._core.compile_model(model, 'CPU', openvino_config(self._threads, self._precision, streams))

    def _static_runner(self, shape: Tuple[int, ...]):
        if self._threads >= self.STREAMS and shape[0] % self.STREAMS == 0:
            part_shape = (shape[0] // self.STREAMS,) + tuple(shape[1:])
            return _Streams(self._compile_for(with_input_shape(self._model, part_shape), self.STREAMS), self.STREAMS)
        if -1 in self.input_shape:
            return self._compile_for(with_input_shape(self._model, shape)).create_infer_request()
        return self._as_read

    def _runner_for(self, shape: Tuple[int, ...]):
        if shape not in self._static:
            if len(self._static) >= self._static_limit:
                return self._as_read
            self._static[shape] = self._static_runner(shape)
        return self._static[shape]

    def __call__(self, batch: np.ndarray) -> Outputs:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        results = self._runner_for(batch.shape).infer([batch])
        return one_or_all([results[i] for i in range(self._outputs)])


Engine = Union[PaddleModel, OnnxModel, OpenVinoModel]


def load_runtime(runtime: str, model_dir: str, threads: Optional[int] = None,
                 precision: Optional[str] = None) -> Engine:
    """The export in `model_dir` loaded by `runtime` at `precision` (default: the one the folder
    records, see `read_precision`); any problem is a ValueError saying what to do. The engine's
    `precision` attribute says which it runs."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}': choose one of {', '.join((AUTO,) + RUNTIMES)}")
    if runtime not in installed_runtimes():
        raise _not_installed(runtime)
    precision = precision or read_precision_record(model_dir)['precision']
    files = runtime_files(runtime, model_dir, precision)
    try:
        if runtime == 'paddle':
            engine = PaddleModel(model_dir, threads)
        elif runtime == 'onnxruntime':
            engine = OnnxModel(files[0], threads)
        else:
            engine = OpenVinoModel(files[0], threads, 'bf16' if precision == 'bf16' else OPENVINO_PRECISION)
        engine.precision = precision
        return engine
    except Exception as e:  # each runtime has its own exception types for unreadable files
        message = ' '.join(str(e).split())[:300]
        raise ValueError(f"runtime {runtime} could not load '{files[0]}' ({type(e).__name__}: {message}); "
                         f'export the model again with export.py') from None

"""Fast CPU kernels for the operations whose stock Paddle CPU kernels dominate dygraph time, with
a standard-op fallback.

Mobile-Former: depthwise conv2d (Paddle: an im2col + tiny GEMM per sample and group) and the
dynamic ReLU (single-threaded broadcast multiplies for max(x * a1, x * a2)). The MLP family:
`linear` (Paddle's dygraph GEMM is MKL's, without AVX-512 on AMD CPUs; the kernel calls oneDNN's
sgemm), the exact GELU, layer norm over the last axis and ResMLP's per-channel scale/shift (Paddle
runs these, or their parameter gradients, on one thread). `csrc/cpu_ops.cc` implements them,
forward and backward, as Paddle custom operators, compiled just in time on first use and cached.

The kernels run only in dynamic mode on float32 CPU tensors once the library is built. Everywhere
else (`paddle.jit.to_static` and exported programs, other devices or dtypes,
MOBILEFORMER_CPU_OPS=0, or a failed build) the same computation runs with standard Paddle ops,
so exported models never need the custom library.

Threads: the library links Paddle's own OpenMP runtime (libiomp5), so its loops (and oneDNN's)
share MKL's thread pool and follow `paddle.base.core.set_num_threads` (Paddle's default: 1 thread).

Environment: MOBILEFORMER_CPU_OPS=0 disables the kernels; MOBILEFORMER_OPS_CACHE replaces the
cache root `~/.cache/mobileformer/ops` (builds go to `<root>/<hash of source, flags, Paddle>`).
"""
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import sys
import warnings
from types import ModuleType
from typing import Callable, Iterator, List, Optional, Tuple

import paddle
import paddle.nn.functional as F

from mobileformer import processes

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_ops.cc')
_NAME = 'mobileformer_cpu_ops'
_CXX_FLAGS = ['-O3', '-fopenmp']
_LIBMVEC_ERF = '_ZGVbN4v_erff'  # glibc 2.35+: the vector erf the GELU loops need


def _has_libmvec() -> bool:
    """Whether glibc's vector math library (with erf) can vectorise the GELU loops; without it they
    call the scalar functions."""
    name = ctypes.util.find_library('mvec')
    try:
        return name is not None and hasattr(ctypes.CDLL(name), _LIBMVEC_ERF)
    except OSError:
        return False


def _cxx_flags() -> List[str]:
    return _CXX_FLAGS + (['-DMF_LIBMVEC'] if _has_libmvec() else [])
_KERNEL_SIZES = (3, 5)
_STRIDES = (1, 2)

_library: Optional[ModuleType] = None
_failure: Optional[str] = None  # why the build failed
_load_attempted = False  # once per process, successful or not
# A mutable object, not a module-level bool: to_static runs a converted copy of each function
# whose module globals were copied when it was first converted, so a rebound bool would not be seen.
_tracing = {'onnx': False}


@contextlib.contextmanager
def tracing_for_onnx() -> Iterator[None]:
    """Inside: models are traced in the forms onnxruntime and OpenVINO run fastest, for a program
    that is converted to ONNX rather than run by paddle.inference (see `dynamic_relu`)."""
    previous, _tracing['onnx'] = _tracing['onnx'], True
    try:
        yield
    finally:
        _tracing['onnx'] = previous


def traced_for_onnx() -> bool:
    """True while `tracing_for_onnx` is in effect."""
    return _tracing['onnx']


def _cache_dir() -> str:
    root = os.environ.get('MOBILEFORMER_OPS_CACHE') or os.path.join(
        os.path.expanduser('~'), '.cache', 'mobileformer', 'ops')
    digest = hashlib.sha256()
    with open(_SOURCE, 'rb') as f:
        digest.update(f.read())
    digest.update(' '.join([paddle.__version__, *_cxx_flags(), *_link_flags()]).encode())
    return os.path.join(root, digest.hexdigest()[:16])


def _library_file() -> str:
    return os.path.join(_cache_dir(), _NAME, _NAME + '.so')


def _paddle_dir(*parts: str) -> str:
    return os.path.join(os.path.dirname(paddle.__file__), *parts)


def _link_flags() -> List[str]:
    # The oneDNN Paddle ships (and has loaded already) serves the linear layer's GEMMs.
    # libiomp5 also serves the GOMP_* entry points gcc emits for `#pragma omp`: linking it instead
    # of libgomp gives one thread pool shared with MKL rather than two competing ones.
    libs = _paddle_dir('libs')
    common = [f'-L{libs}', '-l:libdnnl.so.3', f'-Wl,-rpath,{libs}'] + (['-lmvec'] if _has_libmvec() else [])
    if os.path.exists(os.path.join(libs, 'libiomp5.so')):
        return common + ['-l:libiomp5.so']
    return common + ['-fopenmp']


@contextlib.contextmanager
def output_to(path: str) -> Iterator[None]:
    """Sends this process's stdout and stderr, at file-descriptor level (the compiler runs in a
    subprocess) and at Python level (sys.stdout may not be fd 1, e.g. under pytest), to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, 'w') as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


# The compile, in a child process: Paddle's `load` runs the compiler under a shell and setup.py, which
# would outlive this process if it were killed (see mobileformer.processes).
_COMPILE = """
import json, sys
from mobileformer.processes import end_group_when_orphaned
end_group_when_orphaned(int(sys.argv[1]))
from paddle.utils.cpp_extension import load
load(**json.loads(sys.argv[2]))
"""


def _compile(arguments: dict) -> None:
    """Builds the library with Paddle's `load(**arguments)` in a child process that ends, with the
    compiler, if this process dies; its output goes where this process's does (the build log)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')]))
    status = processes.run_in_group([sys.executable, '-c', _COMPILE, str(os.getpid()), json.dumps(arguments)],
                                    dict(os.environ, PYTHONPATH=path))
    if status != 0:
        raise RuntimeError(f'the compiler process ended with status {status}')


def _build() -> ModuleType:
    import fcntl  # POSIX only: elsewhere the ImportError becomes the fallback warning
    from paddle.utils.cpp_extension import load

    directory = _cache_dir()
    os.makedirs(directory, exist_ok=True)
    log = os.path.join(directory, 'build.log')
    arguments = dict(name=_NAME, sources=[_SOURCE], extra_cxx_cflags=_cxx_flags(), extra_ldflags=_link_flags(),
                     build_directory=directory)
    # `paddle.distributed.launch` starts every rank at once: one compiles, the others wait here
    # and then find the library built.
    with open(os.path.join(directory, 'lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with warnings.catch_warnings(), output_to(log):
                warnings.simplefilter('ignore')
                if not os.path.exists(_library_file()):
                    _compile(arguments)
                # with the library built, Paddle's setup.py run here compiles nothing (about 2 s)
                return load(**arguments)
        except Exception as error:
            raise RuntimeError(f'{str(error).splitlines()[0][:300]} (build log: {log})') from error


def _to_stderr(line: str) -> None:
    print(f'mobileformer: {line}', file=sys.stderr, flush=True)


def _load(log: Callable[[str], None]) -> None:
    """Loads the library, building it first where the cache has none (saying so in one line
    through `log`: the build takes about 20 s); records a failure."""
    global _library, _failure, _load_attempted
    _load_attempted = True
    if os.environ.get('MOBILEFORMER_CPU_OPS', '1') == '0':
        return
    try:
        if not os.path.exists(_library_file()):
            log(f'Compiling the CPU kernels of mobileformer/csrc once for this machine and Paddle version '
                f'(about 20 s; cached in {_cache_dir()}) ...')
        _library = _build()
    except Exception as error:  # no compiler, no headers, ...: never fatal
        _failure = (f'the CPU kernels did not build, so Mobile-Former runs on the slower Paddle-op fallback: '
                    f'{error}')


def _kernels() -> Optional[ModuleType]:
    """The compiled library, built on first use (a script's first forward; the commands build it
    earlier, in `prepare`), announced and any failure stated on stderr; None if disabled or if the
    build failed."""
    if not _load_attempted:
        _load(_to_stderr)
        if _failure:
            _to_stderr(f'notice: {_failure}')
    return _library


def prepare(network: paddle.nn.Layer, log: Callable[[str], None] = print) -> bool:
    """Builds or loads the kernels `network` runs (layers marked `runs_cpu_kernels`) now, saying so
    while a first build compiles and stating a failed build in one line; returns whether they are
    used. Commands call it before any data-loader worker starts: a build on first use would run
    mid-epoch, where a worker that ends (or a signal) can interrupt the compiler."""
    if _load_attempted or os.environ.get('MOBILEFORMER_CPU_OPS', '1') == '0':
        return _library is not None
    if (not paddle.device.get_device().startswith('cpu')
            or not any(getattr(layer, 'runs_cpu_kernels', False) for layer in network.sublayers())):
        return False
    _load(log)
    if _failure:
        log(f'Notice: {_failure}')
    return _library is not None


def _eligible(*tensors: paddle.Tensor) -> bool:
    return paddle.in_dynamic_mode() and all(
        t.dtype == paddle.float32 and t.place.is_cpu_place() for t in tensors)


def depthwise_conv2d(x: paddle.Tensor, weight: paddle.Tensor, stride: int,
                     padding: int) -> paddle.Tensor:
    """`F.conv2d(x, weight, stride=stride, padding=padding, groups=C)`: x [N, C, H, W], weight
    [C * m, 1, k, k] (output channel o reads input channel o // m); -> [N, C * m, Ho, Wo].
    The compiled kernel covers k in (3, 5), stride in (1, 2), 0 <= padding < k."""
    k = weight.shape[-1]
    if (k in _KERNEL_SIZES and weight.shape[-2] == k and stride in _STRIDES and 0 <= padding < k
            and _eligible(x, weight)):
        library = _kernels()
        if library is not None:
            return library.mf_depthwise_conv2d(x, weight, stride, padding)
    return F.conv2d(x, weight, stride=stride, padding=padding, groups=x.shape[1])


def dynamic_relu(x: paddle.Tensor, slope1: paddle.Tensor, slope2: paddle.Tensor) -> paddle.Tensor:
    """max(x * slope1, x * slope2) per (n, c) plane: x [N, C, H, W], slopes [N, C] or already in the
    broadcast form [N, C, 1, 1] (a traced model then needs no unsqueeze per slope)."""
    broadcast = slope1.ndim == 4 and list(slope1.shape[2:]) == [1, 1]
    if x.ndim != 4 or not (slope1.ndim == 2 or broadcast) or slope2.ndim != slope1.ndim:
        raise ValueError(f'dynamic_relu expects x [N, C, H, W] and slopes [N, C] or [N, C, 1, 1], got shapes '
                         f'{list(x.shape)}, {list(slope1.shape)} and {list(slope2.shape)}.')
    if _eligible(x, slope1, slope2):
        library = _kernels()
        if library is not None:
            if broadcast:  # the kernel takes [N, C]
                slope1, slope2 = slope1.flatten(1), slope2.flatten(1)
            return library.mf_dynamic_relu(x, slope1, slope2)
    if not broadcast:
        slope1, slope2 = slope1.unsqueeze([2, 3]), slope2.unsqueeze([2, 3])
    if _tracing['onnx']:
        # onnxruntime and OpenVINO fuse Max(Mul, Mul) into one pass; the form below costs OpenVINO
        # layout reorders around each multiply (measured, exported MF-294M, batch 32, in turn:
        # OpenVINO 0.85 -> 0.55 s, onnxruntime 1.07 -> 0.79 s on a loaded machine)
        return paddle.maximum(x * slope1, x * slope2)
    # max(u, v) = u + relu(v - u): multiply, add and relu all have oneDNN kernels (and fuse) in
    # paddle.inference, `maximum` has none, and the layout conversions around it cost more than it
    # (measured: Mobile-Former-294M exported, batch 32: 0.76 -> 0.54 s). At a tie (x = 0 or
    # slope1 = slope2) this form gives the whole gradient to slope1, the kernel half to each.
    return x * slope1 + F.relu(x * (slope2 - slope1))


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor]) -> paddle.Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [K, N], bias [N] or None; -> [..., N].
    The compiled kernel (oneDNN's GEMM, forward and backward) takes the layers with a bias."""
    if bias is not None and _eligible(x, weight, bias):
        library = _kernels()
        if library is not None:
            return library.mf_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_halves(x: paddle.Tensor, weight: paddle.Tensor,
                  bias: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """`paddle.split(linear(x, weight, bias), 2, axis=-1)`: x [..., K], weight [K, 2H], bias [2H];
    -> two [..., H]. With the compiled kernel each half is its own GEMM on half of the weight, so
    the output is never copied into its halves nor their gradients joined again (gMLP's gate
    input, [B, N, H] per block)."""
    if weight.shape[1] % 2 == 0 and _eligible(x, weight, bias):
        library = _kernels()
        if library is not None:
            weights, biases = paddle.split(weight, 2, axis=1), paddle.split(bias, 2)
            return library.mf_linear(x, weights[0], biases[0]), library.mf_linear(x, weights[1], biases[1])
    u, v = paddle.split(linear(x, weight, bias), 2, axis=-1)
    return u, v


def token_linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """`linear(x^T, weight, bias)^T` over the token axis: x [B, K, C], weight [K, N], bias [N];
    -> [B, N, C]. Computed as a multiplication from the left, W^T x[b], so that neither x nor the
    result is transposed: in dygraph on the CPU by the compiled kernel, elsewhere (exports, GPUs) by
    one broadcast matmul. In an export this beats the transposed form: against timm's ONNX export
    in OpenVINO, batch 32, ratio 0.820 instead of 0.999 for gMLP-S/16, 0.948 for ResMLP-12 and 0.951
    for Mixer-B/16 (paired blocks)."""
    if x.ndim == 3 and _eligible(x, weight, bias):
        library = _kernels()
        if library is not None:
            return library.mf_token_linear(x, weight, bias)
    return paddle.matmul(weight, x, transpose_x=True) + bias.unsqueeze(-1)


def gelu(x: paddle.Tensor) -> paddle.Tensor:
    """`F.gelu(x)` (the exact, erf form)."""
    if _eligible(x):
        library = _kernels()
        if library is not None:
            return library.mf_gelu(x)
    return F.gelu(x)


def channel_scale(x: paddle.Tensor, scale: paddle.Tensor, shift: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """`x * scale (+ shift)` over the last axis: x [..., C], scale and shift [C]."""
    tensors = (x, scale) if shift is None else (x, scale, shift)
    if x.ndim >= 1 and _eligible(*tensors):
        library = _kernels()
        if library is not None:
            return library.mf_channel_scale(x, scale) if shift is None else library.mf_channel_affine(x, scale, shift)
    return x * scale if shift is None else x * scale + shift


def layer_norm(x: paddle.Tensor, weight: Optional[paddle.Tensor], bias: Optional[paddle.Tensor],
               epsilon: float) -> paddle.Tensor:
    """`F.layer_norm` over the last axis: x [..., C], weight and bias [C] or None."""
    if weight is not None and bias is not None and x.ndim >= 1 and _eligible(x, weight, bias):
        library = _kernels()
        if library is not None:
            return library.mf_layer_norm(x, weight, bias, epsilon)[0]
    return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

"""CPU set-up, applied when `mobileformer` is imported, so that a plain script, a model from
`paddle.hub.load` and a toolkit's trainer run as fast as the commands (which add nothing to it).

Process-wide, each with its opt-out (a user setting always wins over these defaults):

- Paddle's CPU math threads: every CPU the process may run on (Paddle's default is 1), shared
  among the ranks `paddle.distributed.launch` started on this machine (`use_cpu_threads`).
  Opt-out: OMP_NUM_THREADS=n, or `paddle.base.core.set_num_threads(n)` after the import. The
  OMP_NUM_THREADS=1 that importing Paddle sets is removed again (`forget_paddles_omp_default`).
- glibc keeps every freed buffer for reuse: it never trims its heap and serves no block by mmap
  (`keep_freed_memory`). Paddle's CPU allocator, whatever FLAGS_allocator_strategy /
  FLAGS_use_system_allocator / FLAGS_auto_growth_chunk_size_in_mb say, hands every tensor's
  buffer to malloc and frees it at once. glibc serves blocks above its mmap threshold (adaptive,
  at most 32 MiB) by mmap and unmaps them when freed, and returns the heap top to the OS when a
  forward frees more than its trim threshold, so the next forward page-faults the same memory in
  again: ResMLP-12, batch 32: 520,000 minor faults (2 GB) per forward; Mixer-B/16, batch 32, whose
  hidden activations are 77 MB each: 300,000-430,000; 0 with this. Opt-out:
  MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_MAX_ set (glibc then applies the
  user's values).
- MKL_DEBUG_CPU_TYPE=5 on AMD CPUs with AVX2 (`prefer_mkl_avx2_on_amd`). Opt-out:
  MKL_DEBUG_CPU_TYPE set.
- oneDNN capped at AVX2 on AMD AVX-512 CPUs, by `deploy.runtimes.PaddleModel` before its first
  predictor (`cap_onednn_isa_on_amd_avx512`). Opt-out: ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA set.
- Paddle's C++ log below errors is silenced (`quiet_paddle_log`). Opt-out: GLOG_minloglevel set.

Paddle's CPU build runs dense GEMMs (dygraph `matmul`, `linear`, and the im2col GEMMs of `conv2d`)
through Intel MKL. On AMD CPUs MKL picks its generic code path unless `MKL_DEBUG_CPU_TYPE=5` asks for
its AVX2 kernels: measured on a 2-vCPU AMD EPYC, a 2048^3 fp32 GEMM in dygraph went from 44 to
154 GFLOP/s. MKL reads the variable at its first call, so setting it at import is early enough.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from time import perf_counter, sleep
from typing import Callable, Dict, Mapping, MutableMapping, Optional

CPUINFO = '/proc/cpuinfo'


def _cpu_fields(cpuinfo: str) -> Optional[Dict[str, str]]:
    """The `key: value` fields of the first CPU listed, or None where there is no such file."""
    try:
        with open(cpuinfo, encoding='utf-8', errors='replace') as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if ':' in line:
            key, value = line.split(':', 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_flags(cpuinfo: str) -> Optional[tuple]:
    """(vendor_id, set of flags) of the first CPU listed, or None where there is no such file."""
    fields = _cpu_fields(cpuinfo)
    return None if fields is None else (fields.get('vendor_id', ''), set(fields.get('flags', '').split()))


# the instruction sets that decide which kernels the math libraries pick, widest first
_ISA_LEVELS = (('avx512', 'avx512f'), ('avx2', 'avx2'), ('avx', 'avx'), ('sse4.2', 'sse4_2'))
_ISA_EXTRAS = (('bf16', 'avx512_bf16'), ('vnni', 'avx512_vnni'), ('amx', 'amx_tile'))


def cpu_description(cpuinfo: str = CPUINFO) -> str:
    """The CPU's model name and its widest vector instruction set, e.g. 'AMD EPYC (avx512 bf16 vnni)'."""
    fields = _cpu_fields(cpuinfo) or {}
    flags = set(fields.get('flags', '').split())
    isa = next((name for name, flag in _ISA_LEVELS if flag in flags), 'unknown ISA')
    if isa == 'avx512':
        isa = ' '.join([isa] + [name for name, flag in _ISA_EXTRAS if flag in flags])
    return f"{fields.get('model name', 'unknown CPU')} ({isa})"


def prefer_mkl_avx2_on_amd(environ: MutableMapping[str, str] = os.environ, cpuinfo: str = CPUINFO) -> bool:
    """Sets MKL_DEBUG_CPU_TYPE=5 on an AMD CPU with AVX2 unless the user set it; True if it did.

    Intel CPUs are left alone: there MKL already dispatches to its best kernels (AVX-512 included),
    which forcing AVX2 would lose."""
    if 'MKL_DEBUG_CPU_TYPE' in environ:
        return False
    cpu = _cpu_flags(cpuinfo)
    if cpu is None or cpu[0] != 'AuthenticAMD' or not {'avx2', 'fma'} <= cpu[1]:
        return False
    environ['MKL_DEBUG_CPU_TYPE'] = '5'
    return True


def _set_at_start(name: str) -> bool:
    """Whether the environment this process started with (Linux: /proc/self/environ) set `name`;
    True where that cannot be read."""
    try:
        with open('/proc/self/environ', 'rb') as f:
            return any(entry.startswith(name.encode() + b'=') for entry in f.read().split(b'\0'))
    except OSError:
        return True


def cpu_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Threads for Paddle's CPU math in this process: OMP_NUM_THREADS when set, else the CPUs this
    process may run on, shared among the ranks `paddle.distributed.launch` started on this machine."""
    requested = environ.get('OMP_NUM_THREADS', '')
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local_ranks = environ.get('PADDLE_LOCAL_SIZE', '')
    return max(1, cpus // (int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1))


def users_environ(environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """`environ` without the OMP_NUM_THREADS=1 that importing Paddle sets when the user left it
    unset (told apart by the environment the process started with)."""
    environ = dict(environ)
    if environ.get('OMP_NUM_THREADS') == '1' and not _set_at_start('OMP_NUM_THREADS'):
        del environ['OMP_NUM_THREADS']
    return environ


def forget_paddles_omp_default(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Removes the OMP_NUM_THREADS=1 that importing Paddle put into `environ` when the user left it
    unset; True if it did. Importing `mobileformer` calls it, after Paddle's import.

    Left there, it would read as the user's choice: `use_cpu_threads` would run one thread, and
    every process started from this one (a training run a script or test launches, a resumed run)
    would inherit it as a setting of its own, so that two runs of one command could use different
    thread counts, and bit-identical resumption needs the same count in both."""
    if 'OMP_NUM_THREADS' in environ and 'OMP_NUM_THREADS' not in users_environ(environ):
        del environ['OMP_NUM_THREADS']
        return True
    return False


def use_cpu_threads() -> int:
    """Sets Paddle's CPU math threads (its default is 1, where PyTorch uses every core) to
    `cpu_threads()` (every CPU unless the user set OMP_NUM_THREADS: see
    `forget_paddles_omp_default`) and applies `keep_freed_memory()`; returns the thread count. The
    compiled kernels of `cpu_ops` and oneDNN share this thread pool. Importing `mobileformer`
    calls it."""
    import paddle

    threads = cpu_threads()
    paddle.base.core.set_num_threads(threads)
    keep_freed_memory()
    return threads


def _paddle_library(name: str) -> str:
    import paddle
    return os.path.join(os.path.dirname(paddle.__file__), 'libs', name)


@functools.lru_cache(maxsize=None)
def _omp_get_max_threads() -> Optional[Callable[[], int]]:
    try:
        return ctypes.CDLL(_paddle_library('libiomp5.so')).omp_get_max_threads
    except (OSError, AttributeError):
        return None


def paddle_math_threads() -> Optional[int]:
    """The threads Paddle's CPU math (its OpenMP runtime, libiomp5) runs on in the calling thread;
    None where Paddle links OpenMP another way. Looked up once: `PaddleModel` asks at every run."""
    get = _omp_get_max_threads()
    return None if get is None else get()


_DNNL_CPU_ISA_AVX2 = 0x7  # dnnl_cpu_isa_avx2 of oneDNN 3's dnnl_cpu_isa_t


def cap_onednn_isa_on_amd_avx512(environ: Mapping[str, str] = os.environ, cpuinfo: str = CPUINFO,
                                 library: Optional[str] = None) -> bool:
    """Limits Paddle's oneDNN to its AVX2 kernels on an AMD CPU with AVX-512, unless the user set
    ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA; True if applied.

    On such CPUs (measured: AMD EPYC) paddle.inference runs exported Mobile-Former-26M
    2-3x slower with AVX-512: oneDNN's AVX-512 grouped 1x1 convolution writes a 4-channel blocked
    layout for which the following per-sample channel multiply (the dynamic ReLU) only has a
    reference kernel (0.30 of 0.50 s at batch 32). oneDNN fixes its ISA at its first kernel, so
    this must run before the first predictor of the process; later it changes nothing (False).
    Intel CPUs are left alone: there the AVX-512 GEMMs are the fast ones."""
    if 'ONEDNN_MAX_CPU_ISA' in environ or 'DNNL_MAX_CPU_ISA' in environ:
        return False
    cpu = _cpu_flags(cpuinfo)
    if cpu is None or cpu[0] != 'AuthenticAMD' or 'avx512f' not in cpu[1]:
        return False
    if library is None:
        library = _paddle_library('libdnnl.so.3')
    try:
        set_max_cpu_isa = ctypes.CDLL(library).dnnl_set_max_cpu_isa  # the copy Paddle already loaded
    except (OSError, AttributeError):  # oneDNN linked another way: leave it at its default
        return False
    return set_max_cpu_isa(_DNNL_CPU_ISA_AVX2) == 0  # dnnl_success; an error once the ISA is fixed


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_SETTINGS = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_MAX_')


def keep_freed_memory(environ: Mapping[str, str] = os.environ, libc_name: str = 'libc.so.6') -> bool:
    """Lets glibc keep every freed buffer for reuse: no block is served by mmap (which unmaps it when
    freed) and the heap is never trimmed, unless MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ /
    MALLOC_MMAP_MAX_ are set; True if applied.

    Paddle's CPU allocator frees every intermediate tensor back to malloc, so each forward would
    page-fault its buffers in again. mmap's threshold cannot be raised above 32 MiB, below
    Mixer-B/16's 77 MB activations at batch 32; with mmap off glibc takes every block from its heap
    (and still maps memory itself where the heap cannot grow). Measured: exported Mobile-Former-26M,
    batch 32, 0.14-0.19 -> 0.12-0.13 s; Mixer-B/16 dygraph, batch 32, 2.4-2.6 -> 2.1 s. The cost is
    a process that keeps its peak heap."""
    if any(name in environ for name in _MALLOC_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


# the copies of glog that Paddle's libraries link statically (each has its own level)
_GLOG_LIBRARIES = (('base', 'libpaddle.so'), ('libs', 'libphi_core.so'))
_GLOG_MIN_LEVEL = '_ZN3fLI17FLAGS_minloglevelE'  # glog's FLAGS_minloglevel
_GLOG_ERROR = 2


def quiet_paddle_log(environ: Mapping[str, str] = os.environ) -> int:
    """Raises the level of Paddle's C++ log (glog) to errors, unless the user set GLOG_minloglevel;
    returns how many of its copies took it.

    Its INFO and WARNING lines are internal detail, e.g. "Paddle static graph(PIR) not support input
    out tensor for now" at every `paddle.jit.save`. glog reads GLOG_minloglevel once, when Paddle is
    loaded, so where a script imported Paddle first only the level in the loaded libraries can
    still change: set here through their exported flag."""
    if 'GLOG_minloglevel' in environ:
        return 0
    import paddle

    quieted = 0
    for parts in _GLOG_LIBRARIES:
        try:
            level = ctypes.c_int.in_dll(ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), *parts)),
                                        _GLOG_MIN_LEVEL)
        except (OSError, ValueError):  # another build of Paddle: its log stays as it is
            continue
        level.value = max(level.value, _GLOG_ERROR)
        quieted += 1
    return quieted


_TASKS = '/proc/self/task'  # Linux: one entry per thread, with its CPU time in ns (schedstat)
IDLE_WINDOW_S = 0.01
IDLE_CPU_SHARE = 0.1  # other threads using less than this share of one CPU over a window: idle


def other_threads_cpu_seconds() -> float:
    """CPU seconds used so far by the threads of this process other than the caller; 0 where the
    kernel does not report it (no /proc/self/task/*/schedstat)."""
    me = threading.get_native_id()
    try:
        tasks = os.listdir(_TASKS)
    except OSError:
        return 0.0
    total = 0
    for task in tasks:
        if task == str(me):
            continue
        try:
            with open(os.path.join(_TASKS, task, 'schedstat'), encoding='ascii') as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return total / 1e9


def wait_for_idle_threads(timeout_s: float = 1.0) -> bool:
    """Waits until the other threads of this process stop using CPU (at most `timeout_s`); True if
    they did. A runtime's thread pool keeps spinning after its run so that the next run starts at
    once: measured after a batch of exported Mobile-Former-26M (2 threads, AMD EPYC), Paddle's
    OpenMP threads (KMP_BLOCKTIME, 200 ms) and onnxruntime's each burnt 10-40 ms of CPU in the next
    300 ms, OpenVINO's about 1 ms, which took the two cores from whatever ran next."""
    start = perf_counter()
    used, at = other_threads_cpu_seconds(), start
    while at - start < timeout_s:
        sleep(IDLE_WINDOW_S)
        now_used, now = other_threads_cpu_seconds(), perf_counter()
        if now_used - used <= IDLE_CPU_SHARE * (now - at):
            return True
        used, at = now_used, now
    return False

"""CPU math-library set-up, applied when `mobileformer` is imported (before Paddle's first GEMM).

Paddle's CPU build runs dense GEMMs (dygraph `matmul`, `linear`, and the im2col GEMMs of `conv2d`)
through Intel MKL. On AMD CPUs MKL picks its generic code path unless `MKL_DEBUG_CPU_TYPE=5` asks for
its AVX2 kernels: measured on a 2-vCPU AMD EPYC, a 2048^3 fp32 GEMM in dygraph went from 44 to
154 GFLOP/s. MKL reads the variable at its first call, so setting it here is early enough.
"""
from __future__ import annotations

import os
from typing import Mapping, MutableMapping, Optional

CPUINFO = '/proc/cpuinfo'


def _cpu_flags(cpuinfo: str) -> Optional[tuple]:
    """(vendor_id, set of flags) of the first CPU listed, or None where there is no such file."""
    try:
        with open(cpuinfo, encoding='utf-8', errors='replace') as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    fields = dict(line.split(':', 1) for line in text.splitlines() if ':' in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get('vendor_id', ''), set(fields.get('flags', '').split())


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


def cpu_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Threads for Paddle's CPU math in this process: OMP_NUM_THREADS when set, else the CPUs this
    process may run on, shared among the ranks `paddle.distributed.launch` started on this machine."""
    requested = environ.get('OMP_NUM_THREADS', '')
    if requested.isdigit() and int(requested) > 0:
        return int(requested)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local_ranks = environ.get('PADDLE_LOCAL_SIZE', '')
    return max(1, cpus // (int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1))


def use_cpu_threads() -> int:
    """Sets Paddle's CPU math threads (its default is 1, where PyTorch uses every core) to
    `cpu_threads()`; returns the count. The compiled kernels of `cpu_ops` share this thread pool."""
    import paddle

    threads = cpu_threads()
    paddle.base.core.set_num_threads(threads)
    return threads

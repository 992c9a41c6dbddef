"""The fastest runtime for an export, measured once per model files, CPU and thread count, and
`InferenceModel`, the one entry point that runs an export in it (or in the runtime asked for)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from mobileformer.cpu import cpu_description, keep_freed_memory
from mobileformer.deploy import runtimes as runtime_module
from mobileformer.deploy.export import read_precision
from mobileformer.deploy.runtimes import AUTO, Engine, Outputs, default_threads, load_runtime, runtime_files

TIMING_BATCHES = (1, 8)  # latency and throughput weigh alike in the score
TIMING_ROUNDS = (3, 10)  # at least, at most: small models get more rounds within the budget
TIMING_BUDGET_S = 3.0


def runtime_cache_file() -> str:
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'mobileformer', 'runtimes.json')


def _cache_key(model_dir: str, runtimes: Sequence[str], threads: int) -> str:
    """The model's files (path, size, modification time) and precision, the CPU, the thread count, the
    ISA limits a user set for oneDNN, and the candidate runtimes with their versions."""
    parts = [cpu_description(), str(threads), os.environ.get('ONEDNN_MAX_CPU_ISA', ''),
             os.environ.get('DNNL_MAX_CPU_ISA', ''), read_precision(model_dir)]
    versions = runtime_module.runtime_versions()
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
    installed = runtime_module.installed_runtimes()
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
    """An export of `export.py` run by the fastest runtime available for it: `model(batch) -> outputs`
    (the logits, or the list of maps of a feature extractor exported with MODEL.OUT_INDICES).

    `runtime='auto'` (default) picks among paddle (paddle.inference with oneDNN), onnxruntime and
    OpenVINO (when installed) by timing them on this model once per model files, CPU and thread
    count (`choose_runtime`); a runtime that fails to load falls back to the next fastest with a
    one-line notice. Only the runtimes that run the precision the folder records (export.py
    -precision: fp32, int8 or bf16) are candidates. Any other value forces that runtime. The choice
    is printed in one line through `log`, and kept in `self.runtime`. Batches of another image size
    than the export's are refused."""

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

    def __call__(self, batch: np.ndarray) -> Outputs:
        expected = self.engine.input_shape
        if expected is not None and (batch.ndim != len(expected) or any(
                e not in (-1, got) for e, got in zip(expected[1:], batch.shape[1:]))):
            size = ', '.join(str(e) if e >= 0 else 'N' for e in expected)
            raise ValueError(f"the model in '{self.model_dir}' was exported for inputs [{size}] but was given "
                             f"{list(batch.shape)}; feed images of its size, or export it again with "
                             f"-opts DATA.IMAGE_SIZE {batch.shape[-1]}")
        return self.engine(batch)

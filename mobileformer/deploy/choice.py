"""The fastest runtime for an export, measured once per model files, CPU and thread count, and
`InferenceModel`, the one entry point that runs an export in it (or in the runtime asked for)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mobileformer.cpu import cpu_description, keep_freed_memory
from mobileformer.deploy import runtimes as runtime_module
from mobileformer.deploy.export import read_precision
from mobileformer.deploy.runtimes import AUTO, Engine, Outputs, default_threads, load_runtime, runtime_files

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32  # the batch the throughput choice is timed at, unless one run of it would take
# longer than this: then the largest power of two that does not (the large MLPs). Rankings change with
# the batch (2 threads, AMD EPYC Zen 4, ms per image, onnxruntime / OpenVINO): MF-294M 9.2-10.8 /
# 7.9-9.4 at batch 16 but 10.0-11.8 / 8.2-9.7 at 32; gMLP-S/16 57 / 60 at batch 4 but 68-71 / 60-64
# at 8-32. So the bound is as large as a one-time measurement of a few seconds allows.
THROUGHPUT_RUN_S = 1.0
LARGE_BATCH = 2  # batches of this size and more run in the throughput choice
TIMING_ROUNDS = (3, 10)  # at least, at most: small models get more rounds within the budget
TIMING_BUDGET_S = 2.0  # per batch size


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


@dataclass
class Timing:
    """Seconds per image of each runtime at batch 1 (`latency`) and at batch `batch` (`throughput`)."""
    latency: Dict[str, float]
    throughput: Dict[str, float]
    batch: int

    def fastest(self, batch_size: int) -> List[str]:
        """The runtimes, fastest first, for batches of `batch_size`."""
        seconds = self.latency if batch_size < LARGE_BATCH else self.throughput
        return sorted(seconds, key=seconds.get)

    def summary(self) -> str:
        def ranking(seconds: Dict[str, float]) -> str:
            return ', '.join(f'{name} {1000 * seconds[name]:.3g}' for name in sorted(seconds, key=seconds.get))
        return f'batch {LATENCY_BATCH}: {ranking(self.latency)}; batch {self.batch}: {ranking(self.throughput)}'


def best_of_rounds(engines: Dict[str, Engine], batch: np.ndarray) -> Dict[str, float]:
    """Seconds per image per named engine: the best of a few rounds that alternate them, so a burst
    of load on the machine hits all of them alike. Each timed run follows an untimed one of the same
    shape: OpenVINO re-plans a dynamic-shape model whenever the shape changes, which a caller
    feeding one batch size never pays."""
    best = {name: float('inf') for name in engines}
    start = time.perf_counter()
    for done in range(TIMING_ROUNDS[1]):
        if done >= TIMING_ROUNDS[0] and time.perf_counter() - start > TIMING_BUDGET_S:
            break
        for name, engine in engines.items():
            engine(batch)
            begin = time.perf_counter()
            engine(batch)
            best[name] = min(best[name], (time.perf_counter() - begin) / len(batch))
    return best


def throughput_batch(seconds_per_image: float) -> int:
    """THROUGHPUT_BATCH, or the largest power of two below it whose run takes at most THROUGHPUT_RUN_S."""
    batch = THROUGHPUT_BATCH
    while batch > LARGE_BATCH and batch * seconds_per_image > THROUGHPUT_RUN_S:
        batch //= 2
    return batch


def time_runtimes(engines: Sequence[Engine], shape: Sequence[int]) -> Timing:
    """Every engine timed at batch 1 and at a large batch (`throughput_batch` of the fastest)."""
    rng = np.random.default_rng(0)
    named = {engine.name: engine for engine in engines}
    latency = best_of_rounds(named, rng.standard_normal((LATENCY_BATCH, *shape), dtype=np.float32))
    batch = throughput_batch(min(latency.values()))
    throughput = best_of_rounds(named, rng.standard_normal((batch, *shape), dtype=np.float32))
    return Timing(latency, throughput, batch)


def _load_first(order: Sequence[str], model_dir: str, threads: int, log: Callable[[str], None],
                loaded: Dict[str, Engine]) -> Engine:
    """The first runtime of `order` that loads (reusing those in `loaded`, adding to it); each one
    that fails is reported in one line."""
    problems = []
    for i, runtime in enumerate(order):
        if runtime in loaded:
            return loaded[runtime]
        try:
            loaded[runtime] = load_runtime(runtime, model_dir, threads)
            return loaded[runtime]
        except ValueError as e:
            problems.append(str(e))
            if i + 1 < len(order):
                log(f'notice: {e}; falling back to {order[i + 1]}')
    raise ValueError(' '.join(problems))


def _candidates(model_dir: str) -> List[str]:
    """The installed runtimes whose files are in `model_dir`."""
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
    return candidates


def _cached_timing(entry: Optional[dict], candidates: Sequence[str]) -> Optional[Timing]:
    try:
        timing = Timing(**{name: entry[name] for name in ('latency', 'throughput', 'batch')})
    except (TypeError, KeyError):  # none, or written by an earlier version: measure again
        return None
    return timing if sorted(timing.latency) == sorted(timing.throughput) == sorted(candidates) else None


def _measure(candidates: Sequence[str], model_dir: str, threads: int,
             log: Callable[[str], None]) -> Tuple[Timing, Dict[str, Engine]]:
    engines = {}
    for runtime in candidates:
        try:
            engines[runtime] = load_runtime(runtime, model_dir, threads)
        except ValueError as e:
            log(f'notice: {e}; timing the other runtimes')
    if not engines:
        raise ValueError(f"no runtime could load '{model_dir}'; export the model again with export.py")
    shape = next((e.input_shape[1:] for e in engines.values() if e.input_shape and -1 not in e.input_shape[1:]),
                 None)
    if shape is None:
        raise ValueError(f"cannot tell the input size of the model in '{model_dir}'; choose a runtime")
    return time_runtimes(list(engines.values()), shape), engines


def choose_runtimes(model_dir: str, threads: int, log: Callable[[str], None] = print) -> Tuple[Engine, Engine]:
    """The fastest runtimes for the export in `model_dir` on this CPU, (at batch 1, at larger batches):
    often one and the same, but not always (an OpenVINO plan can win at batch 32 and lose at batch 1).
    Measured with `time_runtimes` the first time, then read from `runtime_cache_file()`; the choice is
    printed in one line."""
    candidates = _candidates(model_dir)
    if len(candidates) == 1:
        engine = load_runtime(candidates[0], model_dir, threads)
        log(f"runtime: {engine.name} (the only installed runtime that can run the export in '{model_dir}')")
        return engine, engine
    cache_file, key = runtime_cache_file(), _cache_key(model_dir, candidates, threads)
    timing = _cached_timing(_read_cache(cache_file).get(key), candidates)
    if timing is not None:
        loaded, source = {}, f'cached in {cache_file}'
    else:
        timing, loaded = _measure(candidates, model_dir, threads, log)
        if len(loaded) == len(candidates):  # a runtime that failed to load is measured next time
            _write_cache(cache_file, key, {**asdict(timing), 'cpu': cpu_description(), 'threads': threads,
                                           'model': os.path.abspath(model_dir)})
        source = f'measured now, cached in {cache_file}'
    small = _load_first(timing.fastest(LATENCY_BATCH), model_dir, threads, log, loaded)
    large = _load_first(timing.fastest(LARGE_BATCH), model_dir, threads, log, loaded)
    log(f'runtime: {describe(small, large)}, the fastest here for this model (ms per image, {threads} threads, '
        f'{cpu_description()}: {timing.summary()}; {source})')
    return small, large


def describe(small: Engine, large: Engine) -> str:
    """The runtime name, or which runs which batches when there are two."""
    if small is large:
        return small.name
    return f'{small.name} for batch {LATENCY_BATCH}, {large.name} for larger batches'


class InferenceModel:
    """An export of `export.py` run by the fastest runtime available for it: `model(batch) -> outputs`
    (the logits, or the list of maps of a feature extractor exported with MODEL.OUT_INDICES).

    `runtime='auto'` (default) picks among paddle (paddle.inference with oneDNN), onnxruntime and
    OpenVINO (when installed) by timing them on this model once per model files, CPU and thread
    count (`choose_runtimes`): the fastest at batch 1 runs single images, the fastest at a large
    batch runs the others (the same runtime unless they differ); a runtime that fails to load falls
    back to the next fastest with a one-line notice. Only the runtimes that run the precision the
    folder records (export.py -precision: fp32, int8 or bf16) are candidates. Any other value forces
    that runtime. The choice is printed in one line through `log`, and kept in `self.runtime`.
    Batches of another image size than the export's are refused."""

    def __init__(self, model_dir: str, threads: Optional[int] = None, runtime: str = AUTO,
                 log: Callable[[str], None] = print):
        if not os.path.isdir(model_dir):
            raise ValueError(f"no such folder '{model_dir}'; create it with export.py")
        self.model_dir = model_dir
        threads = threads or default_threads()
        keep_freed_memory()
        if runtime == AUTO:
            self.small, self.large = choose_runtimes(model_dir, threads, log)
        else:
            self.small = self.large = load_runtime(runtime, model_dir, threads)
            log(f'runtime: {runtime} (chosen by the caller)')
        self.runtime = describe(self.small, self.large)
        self.precision = self.small.precision  # the folder's: both engines run it

    def engine_for(self, batch_size: int) -> Engine:
        return self.small if batch_size < LARGE_BATCH else self.large

    def __call__(self, batch: np.ndarray) -> Outputs:
        engine = self.engine_for(len(batch))
        expected = engine.input_shape
        if expected is not None and (batch.ndim != len(expected) or any(
                e not in (-1, got) for e, got in zip(expected[1:], batch.shape[1:]))):
            size = ', '.join(str(e) if e >= 0 else 'N' for e in expected)
            raise ValueError(f"the model in '{self.model_dir}' was exported for inputs [{size}] but was given "
                             f"{list(batch.shape)}; feed images of its size, or export it again with "
                             f"-opts DATA.IMAGE_SIZE {batch.shape[-1]}")
        return engine(batch)

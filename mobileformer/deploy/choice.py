"""The fastest runtime for an export, measured once per model files, CPU and thread count, and
`InferenceModel`, the one entry point that runs an export in it (or in the runtime asked for)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mobileformer.cache import user_cache
from mobileformer.cpu import cpu_description, keep_freed_memory, wait_for_idle_threads
from mobileformer.data import build_transforms
from mobileformer.deploy import runtimes as runtime_module
from mobileformer.deploy.export import read_precision
from mobileformer.deploy.folder import CONFIG_FILE, Prediction, read_class_names, read_config, top_classes
from mobileformer.deploy.runtimes import AUTO, Engine, Outputs, default_threads, load_runtime, runtime_files

LATENCY_BATCH = 1
THROUGHPUT_BATCH = 32  # the batch the throughput choice is timed at, unless one run of it would take
# longer than this: then the largest power of two that does not (the large MLPs). Rankings change with
# the batch (2 threads, AMD EPYC, ms per image, onnxruntime / OpenVINO): MF-294M 9.2-10.8 /
# 7.9-9.4 at batch 16 but 10.0-11.8 / 8.2-9.7 at 32; gMLP-S/16 57 / 60 at batch 4 but 68-71 / 60-64
# at 8-32. So the bound is as large as a one-time measurement of a few seconds allows.
THROUGHPUT_RUN_S = 1.0
LARGE_BATCH = 2  # batches of this size and more run in the throughput choice
TIMING_ROUNDS = (5, 15)  # at least, at most: more while the fastest is not clear of the others' spread
TIMING_BUDGET_S = 3.0  # per batch size: no round starts after it, once TIMING_ROUNDS[0] are done
CACHE_FORMAT = 2
# In use, a runtime whose fastest of its first MISFIT_RUNS runs at a timed batch size is this many
# times slower than its cached timing was measured in another state of the machine: timed again.
MISFIT_RUNS = 3
MISFIT_FACTOR = 2.0


def runtime_cache_file() -> str:
    return user_cache('runtimes.json')


def _cache_key(model_dir: str, runtimes: Sequence[str], threads: int) -> str:
    """The model's files (path, size, modification time) and precision, the thread count, the ISA
    limits a user set for oneDNN, and the candidate runtimes (the machine and versions are checked
    against the entry: see `_stale_reason`)."""
    parts = [str(threads), os.environ.get('ONEDNN_MAX_CPU_ISA', ''), os.environ.get('DNNL_MAX_CPU_ISA', ''),
             read_precision(model_dir)]
    for runtime in runtimes:
        parts.append(runtime)
        for path in runtime_files(runtime, model_dir):
            stat = os.stat(path)
            parts.append(f'{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}')
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:24]


def _machine() -> str:
    return f'{cpu_description()}, {os.cpu_count()} CPUs'


def _versions(runtimes: Sequence[str]) -> Dict[str, str]:
    installed = runtime_module.runtime_versions()
    return {'mobileformer': _package_version(), **{runtime: installed[runtime] for runtime in runtimes}}


def _package_version() -> str:
    try:
        return importlib.metadata.version('mobileformer-paddle')
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return 'source'


def _read_cache(path: str) -> Tuple[Dict[str, dict], Optional[str]]:
    """(the entries of the cache file, why they were dropped: None if they were not, or there was no file)."""
    try:
        with open(path, encoding='utf-8') as f:
            cache = json.load(f)
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as e:
        return {}, f'is unreadable ({type(e).__name__})'
    if not isinstance(cache, dict) or not isinstance(cache.get('entries'), dict):
        return {}, 'was written by another version of mobileformer'
    if cache.get('format') != CACHE_FORMAT:
        return {}, 'was written by another version of mobileformer'
    return cache['entries'], None


def _write_cache(path: str, key: str, entry: dict) -> None:
    """Best effort (a read-only home only costs a new measurement next time); atomic, so
    concurrent processes never read a half-written file."""
    entries, _ = _read_cache(path)
    entries[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f'{path}.{os.getpid()}.tmp'
        with open(temporary, 'w', encoding='utf-8') as f:
            json.dump({'format': CACHE_FORMAT, 'entries': entries}, f, indent=1)
        os.replace(temporary, path)
    except OSError:
        pass


@dataclass
class Timing:
    """Seconds per image of each runtime at batch 1 (`latency`) and at batch `batch` (`throughput`),
    the fastest of its rounds, and whether each ranking's first is clear of the others (`decided`:
    its fastest round beats theirs by more than the spread of either's rounds)."""
    latency: Dict[str, float]
    throughput: Dict[str, float]
    batch: int
    decided: Dict[str, bool] = field(default_factory=lambda: {'latency': True, 'throughput': True})

    def seconds(self, batch_size: int) -> Dict[str, float]:
        return self.latency if batch_size < LARGE_BATCH else self.throughput

    def fastest(self, batch_size: int) -> List[str]:
        """The runtimes, fastest first, for batches of `batch_size`."""
        seconds = self.seconds(batch_size)
        return sorted(seconds, key=seconds.get)

    def summary(self) -> str:
        def ranking(kind: str) -> str:
            seconds = getattr(self, kind)
            text = ', '.join(f'{name} {1000 * seconds[name]:.3g}' for name in sorted(seconds, key=seconds.get))
            return text if self.decided[kind] else f'{text} (the first within the spread of the next)'
        return f'batch {LATENCY_BATCH}: {ranking("latency")}; batch {self.batch}: {ranking("throughput")}'


def spread(samples: Sequence[float]) -> float:
    """How far the fastest of `samples` might be off: the gap to the second fastest (0 for one sample)."""
    fastest_two = sorted(samples)[:2]
    return fastest_two[-1] - fastest_two[0]


def ranking(samples: Dict[str, List[float]]) -> Tuple[List[str], bool]:
    """The runtimes by the fastest of their samples, fastest first, and whether the first is clear:
    its fastest sample beats every other's by more than the spread of either."""
    order = sorted(samples, key=lambda name: min(samples[name]))
    first = order[0]
    decided = all(min(samples[other]) - min(samples[first]) > max(spread(samples[first]), spread(samples[other]))
                  for other in order[1:])
    return order, decided


def _rounds(engines: Dict[str, Engine], batch: np.ndarray) -> Dict[str, List[float]]:
    """Seconds per image of each named engine in each of several rounds. A round runs every engine in
    turn (the turn rotating from round to round), so a burst of load on the machine hits all of them
    alike; each starts once the others' thread pools have stopped spinning (`wait_for_idle_threads`),
    so it is timed as it runs alone, and each timed run follows an untimed one of the same shape
    (OpenVINO re-plans a dynamic-shape model whenever the shape changes, which a caller feeding one
    batch size never pays). Rounds go on while the fastest is within the others' spread, up to
    TIMING_ROUNDS[1] and the budget."""
    samples: Dict[str, List[float]] = {name: [] for name in engines}
    names = list(engines)
    pools_go_idle = True  # until a wait times out (another thread of the caller's keeps a CPU busy)
    start = perf_counter()
    for done in range(TIMING_ROUNDS[1]):
        if done >= TIMING_ROUNDS[0] and (ranking(samples)[1] or perf_counter() - start > TIMING_BUDGET_S):
            break
        for name in names[done % len(names):] + names[:done % len(names)]:
            if pools_go_idle:
                pools_go_idle = wait_for_idle_threads()
            engines[name](batch)
            begin = perf_counter()
            engines[name](batch)
            samples[name].append((perf_counter() - begin) / len(batch))
    return samples


def best_of_rounds(engines: Dict[str, Engine], batch: np.ndarray) -> Dict[str, float]:
    """Seconds per image per named engine: the fastest of its interleaved rounds (`_rounds`)."""
    return {name: min(seconds) for name, seconds in _rounds(engines, batch).items()}


def throughput_batch(seconds_per_image: float) -> int:
    """THROUGHPUT_BATCH, or the largest power of two below it whose run takes at most THROUGHPUT_RUN_S."""
    batch = THROUGHPUT_BATCH
    while batch > LARGE_BATCH and batch * seconds_per_image > THROUGHPUT_RUN_S:
        batch //= 2
    return batch


def time_runtimes(engines: Sequence[Engine], shape: Sequence[int]) -> Timing:
    """Every engine timed at batch 1 and at a large batch (`throughput_batch` of the fastest), over
    interleaved rounds (`_rounds`), each ranked by the fastest of its rounds."""
    rng = np.random.default_rng(0)
    named = {engine.name: engine for engine in engines}
    latency = _rounds(named, rng.standard_normal((LATENCY_BATCH, *shape), dtype=np.float32))
    batch = throughput_batch(min(min(seconds) for seconds in latency.values()))
    throughput = _rounds(named, rng.standard_normal((batch, *shape), dtype=np.float32))
    wait_for_idle_threads()  # the chosen runtime's first run in the caller's hands starts on idle cores
    return Timing({name: min(s) for name, s in latency.items()}, {name: min(s) for name, s in throughput.items()},
                  batch, {'latency': ranking(latency)[1], 'throughput': ranking(throughput)[1]})


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


def _cached_timing(entry: Optional[dict], candidates: Sequence[str]) -> Tuple[Optional[Timing], Optional[str]]:
    """(the timing in a cache entry, None if there is none or it is unfit; why it is unfit)."""
    if entry is None:
        return None, None
    try:
        timing = Timing(*(entry[name] for name in ('latency', 'throughput', 'batch', 'decided')))
        machine, versions = entry['machine'], entry['versions']
        fit = (sorted(timing.latency) == sorted(timing.throughput) == sorted(candidates)
               and all(isinstance(v, (int, float)) and v > 0
                       for v in [*timing.latency.values(), *timing.throughput.values(), timing.batch]))
    except (TypeError, KeyError, AttributeError):
        fit = False
    if not fit:
        return None, 'holds an unreadable timing of this model'
    if machine != _machine():
        return None, f'holds a timing of this model from another machine ({machine})'
    if versions != _versions(candidates):
        changed = ', '.join(f"{name} {versions.get(name, 'unknown')}, now {version}"
                            for name, version in _versions(candidates).items() if versions.get(name) != version)
        return None, f'holds a timing of this model from other versions ({changed})'
    return timing, None


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


@dataclass
class Choice:
    """The engines for single images (`small`) and for batches (`large`), the `timing` they were
    chosen by (None when only one runtime could run the model), and whether it came from the cache."""
    small: Engine
    large: Engine
    timing: Optional[Timing] = None
    cached: bool = False


def choose_runtimes(model_dir: str, threads: int, log: Callable[[str], None] = print,
                    retime: bool = False) -> Choice:
    """The fastest runtimes for the export in `model_dir` on this CPU, (at batch 1, at larger batches):
    often one and the same, but not always (an OpenVINO plan can win at batch 32 and lose at batch 1).
    Measured with `time_runtimes` the first time (or when `retime`), then read from
    `runtime_cache_file()`; a cache written by another version or machine, or unreadable, is measured
    again with a notice. The choice is printed in one line."""
    candidates = _candidates(model_dir)
    if len(candidates) == 1:
        engine = load_runtime(candidates[0], model_dir, threads)
        log(f"runtime: {engine.name} (the only installed runtime that can run the export in '{model_dir}')")
        return Choice(engine, engine)
    cache_file, key = runtime_cache_file(), _cache_key(model_dir, candidates, threads)
    timing = None
    if not retime:
        entries, problem = _read_cache(cache_file)
        if problem is None:
            timing, problem = _cached_timing(entries.get(key), candidates)
        if problem:
            log(f'notice: the runtime cache {cache_file} {problem}; timing the runtimes again')
    if timing is not None:
        loaded, source = {}, f'cached in {cache_file}'
    else:
        timing, loaded = _measure(candidates, model_dir, threads, log)
        if len(loaded) == len(candidates):  # a runtime that failed to load is measured next time
            _write_cache(cache_file, key, {**asdict(timing), 'machine': _machine(), 'versions': _versions(candidates),
                                           'threads': threads, 'model': os.path.abspath(model_dir)})
        source = f'measured now, cached in {cache_file}'
    small = _load_first(timing.fastest(LATENCY_BATCH), model_dir, threads, log, loaded)
    large = _load_first(timing.fastest(LARGE_BATCH), model_dir, threads, log, loaded)
    log(f'runtime: {describe(small, large)}, the fastest here for this model (ms per image, {threads} threads, '
        f'{cpu_description()}: {timing.summary()}; {source})')
    return Choice(small, large, timing, cached=not source.startswith('measured'))


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
    count (`choose_runtimes`; `retime=True` times them again): the fastest at batch 1 runs single
    images, the fastest at a large batch runs the others (the same runtime unless they differ); a
    runtime that fails to load falls back to the next fastest with a one-line notice. A cached
    choice whose runtime then runs MISFIT_FACTOR times slower than cached (the fastest of its first
    MISFIT_RUNS runs at a timed batch size) is timed again, once, with a notice. Only the runtimes
    that run the precision the folder records (export.py -precision: fp32, int8 or bf16) are
    candidates. Any other value forces that runtime. The choice is printed in one line through
    `log`, and kept in `self.runtime`. Batches of another image size than the export's are refused.

    `predict(images)` classifies PIL images with the preprocessing and class names the folder
    records (`mobileformer.deploy.folder`: `self.config`, `self.class_names`)."""

    def __init__(self, model_dir: str, threads: Optional[int] = None, runtime: str = AUTO,
                 log: Callable[[str], None] = print, retime: bool = False):
        if not os.path.isdir(model_dir):
            raise ValueError(f"no such folder '{model_dir}'; create it with export.py")
        self.model_dir, self.threads, self.log = model_dir, threads or default_threads(), log
        keep_freed_memory()
        if runtime == AUTO:
            self._use(choose_runtimes(model_dir, self.threads, log, retime))
        else:
            engine = load_runtime(runtime, model_dir, self.threads)
            log(f'runtime: {runtime} (chosen by the caller)')
            self._use(Choice(engine, engine))
        self.precision = self.small.precision  # the folder's: both engines run it
        self.config = read_config(model_dir)
        self.class_names = read_class_names(model_dir)

    def predict(self, images: Sequence[Image.Image], top_k: int = 5) -> List[List[Prediction]]:
        """The `top_k` classes of each image (most probable first, with names and probabilities),
        preprocessed as the config the model was exported from says."""
        if self.config is None:
            raise ValueError(f"'{self.model_dir}' holds no {CONFIG_FILE} (it was exported before export.py wrote "
                             "one), so its preprocessing is unknown; export the model again with export.py")
        transform = build_transforms(self.config, 'val')
        return top_classes(self(np.stack([transform(image) for image in images])), self.class_names, top_k)

    def _use(self, choice: Choice) -> None:
        self.small, self.large = choice.small, choice.large
        self.runtime = describe(self.small, self.large)
        # per batch size the cached timing covers: the seconds of its first runs here
        self._runs: Dict[int, List[float]] = {}
        if choice.cached:
            self._runs = {LATENCY_BATCH: [], choice.timing.batch: []}
        self._timing = choice.timing

    def engine_for(self, batch_size: int) -> Engine:
        return self.small if batch_size < LARGE_BATCH else self.large

    def __call__(self, batch: np.ndarray) -> Outputs:
        engine = self.engine_for(len(batch))
        expected = engine.input_shape
        if expected is not None and (batch.ndim != len(expected) or any(
                e not in (-1, got) for e, got in zip(expected[1:], batch.shape[1:]))):
            size = ', '.join(str(e) if e >= 0 else 'N' for e in expected)
            if batch.ndim == len(expected) and expected[1] not in (-1, batch.shape[1]):
                remedy = (f'it takes {expected[1]}-channel images: preprocess them with the config it was exported '
                          f'from ({CONFIG_FILE} in the folder; predict.py -model reads it)')
            else:
                remedy = f'feed images of its size, or export it again with -opts DATA.IMAGE_SIZE {batch.shape[-1]}'
            raise ValueError(f"the model in '{self.model_dir}' was exported for inputs [{size}] but was given "
                             f"{list(batch.shape)}; {remedy}")
        runs = self._runs.get(len(batch))
        if runs is None or len(runs) >= MISFIT_RUNS:
            return engine(batch)
        begin = perf_counter()
        outputs = engine(batch)
        runs.append(perf_counter() - begin)
        if len(runs) == MISFIT_RUNS:
            self._check_cached_timing(engine.name, len(batch), min(runs))
        return outputs

    def _check_cached_timing(self, runtime: str, batch_size: int, seconds: float) -> None:
        """Times the runtimes again (once) when `runtime` ran batches of `batch_size` much slower than
        the cached timing it was chosen by."""
        cached = self._timing.seconds(batch_size)[runtime] * batch_size
        if seconds <= MISFIT_FACTOR * cached:
            return
        self.log(f'notice: {runtime} ran batches of {batch_size} in {1000 * seconds:.3g} ms, {seconds / cached:.1f}x '
                 f'its cached timing ({1000 * cached:.3g} ms); timing the runtimes again')
        self.small = self.large = None  # released before the new timing loads them again
        self._use(choose_runtimes(self.model_dir, self.threads, self.log, retime=True))
        self._runs = {}  # measured now: nothing left to check

"""The runtime choice on fake runtimes and a fake clock: it picks the truly faster runtime whatever the
machine's drift, times each runtime with the others' thread pools idle (a pool that spins after its
run no longer slows the next runtime's timing), ranks on the fastest of interleaved rounds, and its
cache is re-measured when unreadable, stale, or wrong in use."""
import json
import os
import threading
import time

import numpy as np
import pytest

from mobileformer import cpu
from mobileformer.deploy import InferenceModel, choice, runtime_cache_file, runtimes, time_runtimes

SHAPE = (3, 8, 8)


class Machine:
    """A fake clock and CPU: runs advance the clock; on a noisy machine (seeded) a `load` factor
    between 1 and 2 drifts from one LOAD_PERIOD_S to the next, and each run is a few percent slower
    still, or up to twice as slow in a burst of other work; a pool spinning after its run takes both
    cores from other runtimes (they run twice as long) and shows as CPU time of other threads."""
    LOAD_PERIOD_S = 2.0
    BURSTS = 0.2  # of the runs

    def __init__(self, seed=None, noise=0.0):  # noise: the spread of a run's slowdown
        self.now = 0.0
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.loads = {}
        self.spins = []  # (owner, start, end)

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def load(self):
        if not self.noise:
            return 1.0
        period = int(self.now / self.LOAD_PERIOD_S)
        if period not in self.loads:
            self.loads[period] = 1.0 + min(1.0, self.rng.exponential(0.3))
        return self.loads[period]

    def spinning_besides(self, name):
        return any(owner != name and start <= self.now < end for owner, start, end in self.spins)

    def other_threads_cpu_seconds(self):
        return sum(2 * max(0.0, min(end, self.now) - start) for _, start, end in self.spins)


class FakeRuntime:
    precision = 'fp32'
    input_shape = (-1, *SHAPE)

    def __init__(self, machine, name, seconds_per_image, spin_s=0.0):
        self.machine, self.name, self.seconds_per_image, self.spin_s = machine, name, seconds_per_image, spin_s
        self.calls = 0

    def __call__(self, batch):
        m = self.machine
        seconds = self.seconds_per_image * len(batch) * m.load()
        if m.noise:
            seconds *= 1.0 + abs(m.rng.normal(0.0, m.noise))
            if m.rng.random() < m.BURSTS:
                seconds *= 1.0 + m.rng.random()
        if m.spinning_besides(self.name):
            seconds *= 2.0
        m.now += seconds
        if self.spin_s:
            m.spins.append((self.name, m.now, m.now + self.spin_s))
        self.calls += 1
        return np.zeros((len(batch), 10), np.float32)


@pytest.fixture
def machine_factory(monkeypatch):
    """Installs a fresh Machine's clock (and thread CPU times) where the choice reads them."""
    def install(seed=None, noise=0.0):
        machine = Machine(seed, noise)
        monkeypatch.setattr(choice, 'perf_counter', machine.clock)
        monkeypatch.setattr(cpu, 'perf_counter', machine.clock)
        monkeypatch.setattr(cpu, 'sleep', machine.sleep)
        monkeypatch.setattr(cpu, 'other_threads_cpu_seconds', machine.other_threads_cpu_seconds)
        return machine
    return install


def test_noisy_runtimes_the_truly_faster_one_is_chosen_in_19_of_20_seeds(machine_factory):
    right = 0
    for seed in range(20):
        machine = machine_factory(seed, noise=0.05)
        faster = ('first', 'second')[seed % 2]  # the faster one is timed first in half of the trials
        engines = [FakeRuntime(machine, name, 0.010 if name == faster else 0.011) for name in ('first', 'second')]
        timing = time_runtimes(engines, SHAPE)
        right += timing.fastest(1)[0] == faster and timing.fastest(32)[0] == faster
    assert right >= 19


@pytest.mark.parametrize('disturbance_waited_out', [False, True])
def test_a_pool_spinning_after_its_run_no_longer_slows_the_next_runtimes_timing(machine_factory, monkeypatch,
                                                                                disturbance_waited_out):
    """Paddle's OpenMP threads spin for 200 ms after a run (KMP_BLOCKTIME): timed right after it,
    a runtime twice as fast as paddle alone measured as slow, and the choice went to paddle."""
    machine = machine_factory()
    if not disturbance_waited_out:  # the choice as it was: no wait for the pools to go idle
        monkeypatch.setattr(choice, 'wait_for_idle_threads', lambda: True)
    # seconds per image alone, as exported Mobile-Former-26M ran at batch 32 (2 threads, AMD EPYC)
    spinning = FakeRuntime(machine, 'paddle', 0.0028, spin_s=0.2)
    quiet = FakeRuntime(machine, 'onnxruntime', 0.0015)
    timing = time_runtimes([spinning, quiet], SHAPE)
    if disturbance_waited_out:
        for seconds in (timing.latency, timing.throughput):
            assert seconds == pytest.approx({'paddle': 0.0028, 'onnxruntime': 0.0015})
        assert timing.fastest(1)[0] == timing.fastest(32)[0] == 'onnxruntime'
    else:  # the disturbance reproduced: onnxruntime measured at twice its time alone, so paddle chosen
        assert timing.latency == pytest.approx({'paddle': 0.0028, 'onnxruntime': 0.003})
        assert timing.fastest(1)[0] == 'paddle'


def test_rounds_go_on_while_the_fastest_is_within_the_spread(machine_factory):
    machine = machine_factory()
    clear = {r.name: r for r in (FakeRuntime(machine, 'a', 0.010), FakeRuntime(machine, 'b', 0.012))}
    assert [len(s) for s in choice._rounds(clear, np.zeros((1, *SHAPE), np.float32)).values()] == [5, 5]
    tied = {r.name: r for r in (FakeRuntime(machine, 'a', 0.010), FakeRuntime(machine, 'b', 0.010))}
    samples = choice._rounds(tied, np.zeros((1, *SHAPE), np.float32))
    assert [len(s) for s in samples.values()] == [15, 15]  # the most rounds: 0.6 s, within the budget
    samples = choice._rounds(tied, np.zeros((32, *SHAPE), np.float32))
    assert [len(s) for s in samples.values()] == [5, 5]  # 1.3 s per round: the budget (3 s) ends them
    timing = time_runtimes(list(tied.values()), SHAPE)
    assert timing.decided == {'latency': False, 'throughput': False}
    assert timing.summary().endswith('(the first within the spread of the next)')


def test_ranking_is_decided_only_when_the_gap_exceeds_the_spread():
    assert choice.ranking({'a': [1.0, 1.05, 1.3], 'b': [1.02, 1.5]}) == (['a', 'b'], False)
    assert choice.ranking({'a': [1.0, 1.01, 1.3], 'b': [1.5, 1.1, 1.12]}) == (['a', 'b'], True)
    assert choice.ranking({'a': [1.0], 'b': [1.1], 'c': [0.9, 0.95]}) == (['c', 'a', 'b'], True)


def test_other_threads_cpu_seconds_counts_a_busy_thread():
    """The CPU time of another thread's work shows (Linux /proc/self/task/*/schedstat)."""
    if not os.path.isdir('/proc/self/task'):
        pytest.skip('no /proc/self/task')
    before = cpu.other_threads_cpu_seconds()
    used, worked, release = [], threading.Event(), threading.Event()

    def busy():
        while time.thread_time() < 0.05:
            pass
        used.append(time.thread_time())
        worked.set()
        release.wait()  # alive (and idle) while its CPU time is read
    worker = threading.Thread(target=busy)
    worker.start()
    worked.wait()
    try:
        assert cpu.other_threads_cpu_seconds() - before >= 0.9 * used[0]
    finally:
        release.set()
        worker.join()


@pytest.fixture
def fake_export(tmp_path, monkeypatch, machine_factory):
    """(folder, machine, {name: seconds per image}) with two fake runtimes 'fast' and 'slow' as the
    candidates of InferenceModel; the runtime cache in tmp_path."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    machine = machine_factory()
    speeds = {'fast': 0.001, 'slow': 0.002}
    monkeypatch.setattr(choice, '_candidates', lambda model_dir: sorted(speeds))
    monkeypatch.setattr(choice, '_cache_key', lambda model_dir, candidates, threads: 'the export')
    monkeypatch.setattr(runtimes, 'runtime_versions', lambda: {'fast': '1.0', 'slow': '2.0'})
    monkeypatch.setattr(choice, 'load_runtime', lambda name, model_dir, threads: FakeRuntime(machine, name, speeds[name]))
    folder = tmp_path / 'export'
    folder.mkdir()
    return str(folder), machine, speeds


def chosen(folder, **kwargs):
    """(InferenceModel's runtime, the lines it logged)."""
    lines = []
    return InferenceModel(folder, threads=2, log=lines.append, **kwargs), lines


def test_the_choice_is_cached_and_timed_again_on_request(fake_export):
    folder, machine, speeds = fake_export
    model, lines = chosen(folder)
    assert model.runtime == 'fast' and len(lines) == 1 and 'measured now' in lines[0]
    with open(runtime_cache_file()) as f:
        cache = json.load(f)
    entry = cache['entries']['the export']
    assert cache['format'] == choice.CACHE_FORMAT and entry['latency'] == pytest.approx(speeds)
    assert entry['machine'] == choice._machine() and entry['versions'] == choice._versions(['fast', 'slow'])
    model, lines = chosen(folder)
    assert model.runtime == 'fast' and len(lines) == 1 and 'cached in' in lines[0]
    model, lines = chosen(folder, retime=True)
    assert len(lines) == 1 and 'measured now' in lines[0]


@pytest.mark.parametrize('damage, problem', [
    (lambda cache: 'not json{', 'is unreadable (JSONDecodeError)'),
    (lambda cache: json.dumps(cache['entries']), 'was written by another version of mobileformer'),  # format 1
    (lambda cache: json.dumps({**cache, 'format': 1}), 'was written by another version of mobileformer'),
    (lambda cache: json.dumps({**cache, 'entries': {'the export': {'latency': 'fast'}}}),
     'holds an unreadable timing of this model'),
    (lambda cache: json.dumps({**cache, 'entries': {'the export': {**cache['entries']['the export'],
                                                                   'machine': 'Intel Xeon (avx2), 64 CPUs'}}}),
     'holds a timing of this model from another machine (Intel Xeon (avx2), 64 CPUs)'),
    (lambda cache: json.dumps({**cache, 'entries': {'the export': {**cache['entries']['the export'],
                                                                   'versions': {**cache['entries']['the export']['versions'],
                                                                                'fast': '0.9'}}}}),
     'holds a timing of this model from other versions (fast 0.9, now 1.0)'),
])
def test_a_bad_cache_is_measured_again_with_a_one_line_notice(fake_export, damage, problem):
    folder, machine, speeds = fake_export
    chosen(folder)
    with open(runtime_cache_file()) as f:
        cache = json.load(f)
    with open(runtime_cache_file(), 'w') as f:
        f.write(damage(cache))
    model, lines = chosen(folder)
    assert lines[0] == f'notice: the runtime cache {runtime_cache_file()} {problem}; timing the runtimes again'
    assert len(lines) == 2 and 'measured now' in lines[1] and model.runtime == 'fast'
    model, lines = chosen(folder)  # written anew
    assert len(lines) == 1 and 'cached in' in lines[0]


def test_a_cached_choice_much_slower_in_use_is_timed_again_once(fake_export):
    folder, machine, speeds = fake_export
    chosen(folder)
    images = np.zeros((1, *SHAPE), np.float32)
    model, lines = chosen(folder)
    for _ in range(2 * choice.MISFIT_RUNS):  # as cached: nothing happens
        model(images)
    assert len(lines) == 1
    model, lines = chosen(folder)
    speeds['fast'] = model.small.seconds_per_image = 0.005  # 5x its cached 1 ms: now the slower one
    for run in range(choice.MISFIT_RUNS):
        assert len(lines) == 1
        model(images)
    assert lines[1] == ('notice: fast ran batches of 1 in 5 ms, 5.0x its cached timing (1 ms); '
                        'timing the runtimes again')
    assert 'measured now' in lines[2] and model.runtime == 'slow'
    for _ in range(2 * choice.MISFIT_RUNS):
        model(images)
    assert len(lines) == 3

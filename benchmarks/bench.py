"""CPU benchmark: parameters, MAdds, throughput and peak memory of every registered config.

    python benchmarks/bench.py                                   # every configs/*.yaml
    python benchmarks/bench.py -cfg configs/mobileformer_26m.yaml -modes dygraph inference -batches 32
    python benchmarks/bench.py -cfg configs/mixer_s32_224.yaml -iters 1 -warmup 0 -json out.jsonl
    python benchmarks/bench.py -cfg configs/mobileformer_26m.yaml -modes inference -compare reference.onnx -rounds 3

Modes: `dygraph` / `static` (`paddle.jit.to_static`) / `inference` (the export of `export.py`
run by each runtime of `-runtimes`: paddle.inference with oneDNN, onnxruntime, OpenVINO in
float32, or `auto`, the one `InferenceModel` picks) time eval-mode forwards; `train` /
`train_static` time one training step (forward, cross-entropy, backward, AdamW step).
`-precisions fp32 int8 bf16` adds, to the inference mode, the export quantized as `export.py
-precision int8` does (calibrated on random images: the timing does not depend on the ranges) in
each runtime that runs INT8, and bf16 in each runtime with a bf16 mode on this CPU; their columns
are named `<runtime> int8` / `<runtime> bf16`.
`-compare FILE.onnx ...` times other ONNX models (e.g. a PyTorch model exported with
torch.onnx.export) in the same runtimes, batches and threads, in the same run.
Each figure is the median of `-iters` timed runs after `-warmup` untimed ones; with `-rounds R`
every config and compare file is measured R times in turn (so slow phases of a shared machine hit
all of them alike) and the median over the rounds is reported. The machine's matmul GFLOP/s is
measured in the same run, and every result states the fraction of it the model achieves:
MAdds x 2 x images/s / peak (training counts 3x the forward MAdds: forward + backward).

Output: one JSON object per line (a `machine` record naming the CPU and its instruction set, then
one `result` per config x mode x runtime x batch) on stdout or to `-json`, then a markdown table
(batch 1 as latency in ms, larger batches as images/s; also written to `-markdown` if given).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.static import InputSpec

from mobileformer import build_model, get_config
from mobileformer.cli import CommandParser, summary
from mobileformer.cpu import cpu_description
from mobileformer.deploy import (AUTO, INFERENCE_PREFIX, LOW_PRECISION_RUNTIMES, ONNX_FILE, PRECISIONS, RUNTIMES,
                                 InferenceModel, OnnxModel, OpenVinoModel, PaddleModel, build_for_inference, default_threads,
                                 export_inference, export_onnx, installed_runtimes, load_runtime, precision_problem,
                                 runtime_versions)
from mobileformer.deploy.quantize import MIN_CALIBRATION_IMAGES, quantize_int8
from mobileformer.flops import count_madds
from mobileformer.models.model_utils import count_trainable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INFERENCE_MODES = ('dygraph', 'static', 'inference')
TRAIN_MODES = ('train', 'train_static')
MODES = INFERENCE_MODES + TRAIN_MODES
TRAIN_PASSES = 3  # a training step costs about three forwards: forward, input grads, weight grads


def build_parser() -> CommandParser:
    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-cfg', nargs='+', default=None, help='config YAMLs (default: every configs/*.yaml)')
    parser.add_argument('-modes', nargs='+', default=['dygraph', 'static', 'inference', 'train'], choices=MODES)
    parser.add_argument('-runtimes', nargs='+', default=None, choices=(AUTO,) + RUNTIMES,
                        help='runtimes of the inference mode (default: every installed one)')
    parser.add_argument('-precisions', nargs='+', default=['fp32'], choices=PRECISIONS,
                        help='precisions of the inference mode (fp32: every runtime of -runtimes; int8, bf16: '
                             'every installed runtime that runs them here)')
    parser.add_argument('-compare', nargs='+', default=[], metavar='FILE.onnx',
                        help='ONNX models to time beside the configs (onnxruntime and OpenVINO of -runtimes)')
    parser.add_argument('-rounds', type=int, default=1, help='measure everything this many times in turn; report the median')
    parser.add_argument('-batches', nargs='+', type=int, default=[1, 32], help='inference batch sizes')
    parser.add_argument('-train_batch', type=int, default=32, help='training batch size')
    parser.add_argument('-iters', type=int, default=5, help='timed runs per figure (the median is reported)')
    parser.add_argument('-warmup', type=int, default=2, help='untimed runs before timing')
    parser.add_argument('-threads', type=int, default=default_threads(),
                        help="CPU threads for every mode (default: what importing mobileformer sets, every CPU unless OMP_NUM_THREADS)")
    parser.add_argument('-image_size', type=int, default=None, help='default: each config\'s DATA.IMAGE_SIZE')
    parser.add_argument('-matmul_size', type=int, default=2048, help='side of the square GEMM measuring the peak')
    parser.add_argument('-json', default=None, help='write the JSON lines here instead of stdout')
    parser.add_argument('-markdown', default=None, help='also write the markdown table here')
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('iters', 'threads', 'train_batch', 'matmul_size', 'rounds'):
        if getattr(args, name) < 1:
            parser.error(f'-{name} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'-warmup must be 0 or more, got {args.warmup}')
    if any(b < 1 for b in args.batches):
        parser.error(f'-batches must all be at least 1, got {args.batches}')
    installed = installed_runtimes()
    args.runtimes = args.runtimes or installed
    absent = [r for r in args.runtimes if r != AUTO and r not in installed]
    if absent:
        parser.error(f'runtime {", ".join(absent)} is not installed: pip install {" ".join(absent)}, or leave it out of -runtimes')
    args.cfg = args.cfg if args.cfg is not None else ([] if args.compare else sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml'))))
    missing = [c for c in args.cfg + args.compare if not os.path.isfile(c)]
    if missing:
        parser.error(f'no such file: {", ".join(missing)}')
    return args


# ---- peak memory: the kernel's resident high-water mark, reset before every measurement ---------

def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak is the process's."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def peak_rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- timing -----------------------------------------------------------------------------------

def median_seconds(run: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MatMul(paddle.nn.Layer):
    """x @ W as a layer, so the GEMM can go through the same export and engine as the models."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = self.create_parameter([size, size])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, self.weight)


def matmul_gflops(size: int, threads: int, with_inference: bool, iters: int = 7) -> Dict[str, float]:
    """float32 GEMM rate (size^3) through dygraph `paddle.matmul` and, `with_inference`, through
    `paddle.inference` (oneDNN), with the models' thread count; the larger is the machine's peak.
    Without inference no predictor is made: the first one caps oneDNN at AVX2 on AMD AVX-512 CPUs
    (`cap_onednn_isa_on_amd_avx512`) for the whole process, dygraph's oneDNN GEMMs included."""
    flop = 2 * size ** 3
    layer = MatMul(size)
    x = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    x_tensor = paddle.to_tensor(x)
    with paddle.no_grad():
        rates = {'matmul_gflops_dygraph': flop / median_seconds(lambda: layer(x_tensor).numpy(), iters, warmup=2) / 1e9}
    if with_inference:
        with tempfile.TemporaryDirectory() as workdir:
            paddle.jit.save(layer, os.path.join(workdir, INFERENCE_PREFIX),
                            input_spec=[InputSpec([None, size], 'float32', 'x')])
            engine = PaddleModel(workdir, threads=threads)
            rates['matmul_gflops_inference'] = flop / median_seconds(lambda: engine(x), iters, warmup=2) / 1e9
    return {**rates, 'matmul_gflops': max(rates.values())}


# ---- one runner per mode: returns a zero-argument function doing one timed unit of work ---------

def _forward_runner(model, batch):
    x = paddle.to_tensor(batch)

    def run():
        with paddle.no_grad():
            model(x).numpy()  # .numpy() waits for the result
    return run


def _train_runner(model, batch, num_classes: int):
    model.train()
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    x = paddle.to_tensor(batch)
    labels = paddle.to_tensor(np.random.default_rng(0).integers(0, num_classes, len(batch)))

    def run():
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # waits for the step
    return run


def _result(config: str, model: str, mode: str, batch_size: int, seconds: float, args: argparse.Namespace,
            runtime: Optional[str] = None, **fields) -> Dict:
    return {'record': 'result', 'config': config, 'model': model, 'mode': mode, 'runtime': runtime,
            'batch': batch_size, 'threads': args.threads, 'iters': args.iters, 'seconds_per_batch': seconds,
            'images_per_s': batch_size / seconds, 'peak_rss_mb': peak_rss_mb(),
            'load_avg_1m': os.getloadavg()[0],  # other processes on the machine skew every figure
            **fields}


def _engine(runtime: str, model_dir: str, threads: int):
    """The runtime itself, not InferenceModel's wrapper, so every runtime is timed alike; `auto`
    is InferenceModel, which runs each batch size in the runtime it chose for it."""
    if runtime == AUTO:
        return InferenceModel(model_dir, threads=threads)
    if runtime == 'paddle':
        return PaddleModel(model_dir, threads)
    onnx_file = os.path.join(model_dir, ONNX_FILE)
    return OnnxModel(onnx_file, threads) if runtime == 'onnxruntime' else OpenVinoModel(onnx_file, threads)


def _low_precision_engines(model_dir: str, args: argparse.Namespace, shape: Sequence[int]) -> Dict[str, Callable]:
    """{'<runtime> <precision>': engine} for each low precision of -precisions in each installed
    runtime that runs it here; INT8 is quantized first (random calibration images)."""
    engines = {}
    for precision in [p for p in args.precisions if p != 'fp32']:
        if precision == 'int8':
            images = np.random.default_rng(0).standard_normal((MIN_CALIBRATION_IMAGES, *shape), dtype=np.float32)
            quantize_int8(model_dir, images, log=lambda line: None)
        for runtime in LOW_PRECISION_RUNTIMES[precision]:
            if runtime in installed_runtimes() and precision_problem(runtime, precision) is None:
                engines[f'{runtime} {precision}'] = load_runtime(runtime, model_dir, args.threads, precision)
    return engines


def _time_engines(engines: Dict[str, Callable], shape: Sequence[int], args: argparse.Namespace,
                  rng: np.random.Generator) -> Dict[tuple, float]:
    """{(runtime, batch): median seconds} for every engine at every inference batch size."""
    seconds = {}
    for batch_size in args.batches:
        batch = rng.standard_normal((batch_size, *shape), dtype=np.float32)
        for runtime, engine in engines.items():
            seconds[runtime, batch_size] = median_seconds(lambda: engine(batch), args.iters, args.warmup)
    return seconds


def measure_config(cfg_file: str, args: argparse.Namespace, peak_gflops: float) -> List[Dict]:
    opts = ['DATA.IMAGE_SIZE', args.image_size] if args.image_size else None
    config = get_config(cfg_file, opts)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    paddle.seed(0)
    params = count_trainable(build_model(config))
    deployed = build_for_inference(config)  # folded where re-parameterisable: what users deploy
    madds = count_madds(deployed, [1, channels, size, size])
    rng = np.random.default_rng(0)
    results = []
    name = os.path.relpath(cfg_file, ROOT)
    fields = {'image_size': size, 'params': params, 'madds': madds}

    def add(mode: str, batch_size: int, seconds: float, runtime: Optional[str] = None) -> None:
        flop_per_image = 2 * madds * (TRAIN_PASSES if mode in TRAIN_MODES else 1)
        results.append(_result(name, config.MODEL.NAME, mode, batch_size, seconds, args, runtime, **fields,
                               peak_fraction=flop_per_image * batch_size / seconds / (peak_gflops * 1e9)))

    for mode in args.modes:
        reset_peak_rss()
        if mode == 'inference':
            with tempfile.TemporaryDirectory() as workdir:
                export_inference(deployed, config, workdir)
                runtimes = list(args.runtimes)
                if set(args.runtimes) - {'paddle'} or set(args.precisions) - {'fp32'}:
                    try:
                        export_onnx(deployed, config, os.path.join(workdir, ONNX_FILE))
                    except ValueError as e:  # e.g. FNet's FFT: only the paddle runtime runs it
                        print(f'notice: {name}: {e}; timing the paddle runtime only', file=sys.stderr)
                        runtimes = [r for r in runtimes if r in ('paddle', AUTO)]
                engines = {}
                if 'fp32' in args.precisions:
                    engines = {runtime: _engine(runtime, workdir, args.threads) for runtime in runtimes}
                if os.path.exists(os.path.join(workdir, ONNX_FILE)):  # what int8 and bf16 run
                    engines.update(_low_precision_engines(workdir, args, [channels, size, size]))
                for (runtime, batch_size), seconds in _time_engines(engines, [channels, size, size], args, rng).items():
                    add(mode, batch_size, seconds, runtime)
                    if runtime == AUTO:  # the runtime it chose for this batch size
                        results[-1]['chosen'] = engines[AUTO].engine_for(batch_size).name
            continue
        batches = [args.train_batch] if mode in TRAIN_MODES else args.batches
        for batch_size in batches:
            batch = rng.standard_normal((batch_size, channels, size, size), dtype=np.float32)
            if mode in TRAIN_MODES:
                model = build_model(config)
                model = paddle.jit.to_static(model, full_graph=True) if mode == 'train_static' else model
                run = _train_runner(model, batch, config.MODEL.NUM_CLASSES)
            else:
                model = build_for_inference(config)
                model = paddle.jit.to_static(model, full_graph=True) if mode == 'static' else model
                run = _forward_runner(model, batch)
            add(mode, batch_size, median_seconds(run, args.iters, args.warmup))
    return results


def measure_onnx(path: str, args: argparse.Namespace) -> List[Dict]:
    """Another ONNX model (input [N, C, H, W], dynamic N) in the ONNX runtimes of -runtimes."""
    runtimes = [r for r in args.runtimes if r in ('onnxruntime', 'openvino')]
    engines = {r: (OnnxModel if r == 'onnxruntime' else OpenVinoModel)(path, args.threads) for r in runtimes}
    if not engines:
        return []
    shape = next(iter(engines.values())).input_shape[1:]
    seconds = _time_engines(engines, shape, args, np.random.default_rng(0))
    return [_result(path, os.path.splitext(os.path.basename(path))[0], 'inference', batch_size, s, args, runtime,
                    image_size=shape[-1])
            for (runtime, batch_size), s in seconds.items()]


def median_over_rounds(rounds: List[List[Dict]]) -> List[Dict]:
    """The first round's records with each timing replaced by its median over the rounds."""
    results = []
    for records in zip(*rounds):
        seconds = [r['seconds_per_batch'] for r in records]
        result = dict(records[0], rounds=len(records), seconds_per_round=seconds,
                      seconds_per_batch=statistics.median(seconds))
        scale = records[0]['seconds_per_batch'] / result['seconds_per_batch']
        result['images_per_s'] = records[0]['images_per_s'] * scale
        if result.get('peak_fraction') is not None:
            result['peak_fraction'] = records[0]['peak_fraction'] * scale
        results.append(result)
    return results


# ---- report -----------------------------------------------------------------------------------

def _column(r: Dict) -> tuple:
    return r['mode'], r['runtime'], r['batch']


def _column_title(mode: str, runtime: Optional[str], batch: int) -> str:
    name = mode if runtime is None else f'{mode} {runtime}'
    return f'{name} b{batch} ' + ('(ms)' if batch == 1 else '(img/s)')


def _cell(r: Dict) -> str:
    value = f'{1000 * r["seconds_per_batch"]:.1f}' if r['batch'] == 1 else f'{r["images_per_s"]:.1f}'
    return value + (f' ({r["chosen"]})' if r.get('chosen') else '')


def markdown_table(machine: Dict, results: List[Dict]) -> str:
    """One row per config or compared file; a column per mode x runtime x batch (batch 1: latency
    in ms, else images/s); the matmul-peak fraction and the peak RSS of the fastest largest-batch
    inference run (else the last forward mode measured)."""
    columns = list(dict.fromkeys(_column(r) for r in results))
    rows: Dict[str, Dict] = {}
    for r in results:
        rows.setdefault(r['config'], {'first': r})[_column(r)] = r
    header = ['config', 'params (M)', 'MAdds (M)'] + [_column_title(*c) for c in columns] \
        + ['% of matmul peak', 'peak RSS (MB)']
    isa_cap = f', oneDNN capped at {machine["onednn_max_cpu_isa"]}' if machine['onednn_max_cpu_isa'] else ''
    lines = [f'CPU: {machine["cpu"]}{isa_cap}, {machine["threads"]} threads, measured matmul peak '
             f'{machine["matmul_gflops"]:.0f} GFLOP/s (fp32 {machine["matmul_size"]}^3 GEMM; dygraph '
             f'{machine["matmul_gflops_dygraph"]:.0f}'
             + (f', paddle.inference {machine["matmul_gflops_inference"]:.0f}' if 'matmul_gflops_inference' in machine
                else '') + '); median of '
             f'{machine["iters"]} runs after {machine["warmup"]} warm-up'
             + (f', median over {machine["rounds"]} rounds.' if machine['rounds'] > 1 else '.'), '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for config, row in rows.items():
        first = row['first']
        forward = [row[c] for c in columns if c in row and c[0] in INFERENCE_MODES]
        chosen = max(forward, key=lambda r: (r['mode'] == 'inference', r['batch'], r['images_per_s'])) if forward else first
        cells = [os.path.splitext(os.path.basename(config))[0]]
        cells += [f'{first["params"] / 1e6:.2f}', f'{first["madds"] / 1e6:.0f}'] if 'params' in first else ['-', '-']
        cells += [_cell(row[c]) if c in row else '-' for c in columns]
        where = f'{chosen["mode"]}{" " + chosen["runtime"] if chosen["runtime"] else ""} b{chosen["batch"]}'
        cells += [f'{100 * chosen["peak_fraction"]:.0f}% ({where})' if 'peak_fraction' in chosen else '-',
                  f'{chosen["peak_rss_mb"]:.0f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    # Nothing else is set up: the models run as in a user's script, with what importing
    # `mobileformer` applies (mobileformer/cpu.py); only a -threads other than that is set here.
    if args.threads != default_threads():
        paddle.base.core.set_num_threads(args.threads)

    out = open(args.json, 'w') if args.json else sys.stdout
    try:
        machine = {'record': 'machine', 'cpu': cpu_description(), 'threads': args.threads, 'iters': args.iters,
                   'warmup': args.warmup, 'rounds': args.rounds, 'runtimes': runtime_versions(),
                   'onednn_max_cpu_isa': os.environ.get('ONEDNN_MAX_CPU_ISA') or os.environ.get('DNNL_MAX_CPU_ISA'),
                   'load_avg_1m': os.getloadavg()[0], 'matmul_size': args.matmul_size,
                   'mkl_debug_cpu_type': os.environ.get('MKL_DEBUG_CPU_TYPE'),
                   **matmul_gflops(args.matmul_size, args.threads, 'inference' in args.modes)}
        print(json.dumps(machine), file=out, flush=True)
        rounds = []
        for number in range(args.rounds):
            records = []
            for cfg_file in args.cfg:
                records += measure_config(cfg_file, args, machine['matmul_gflops'])
            for path in args.compare:
                records += measure_onnx(path, args)
            if args.rounds > 1:  # single rounds are reported below, medians after the last round
                for record in records:
                    print(json.dumps(dict(record, record='round', round=number)), file=out, flush=True)
            rounds.append(records)
        results = median_over_rounds(rounds) if args.rounds > 1 else rounds[0]
        for result in results:
            print(json.dumps(result), file=out, flush=True)
    finally:
        if args.json:
            out.close()
    table = markdown_table(machine, results)
    print(table)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(table)
    return [machine] + results


if __name__ == '__main__':
    main()

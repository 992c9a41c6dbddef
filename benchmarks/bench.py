"""CPU benchmark: parameters, MAdds, throughput and peak memory of every registered config.

    python benchmarks/bench.py                                   # every configs/*.yaml
    python benchmarks/bench.py -cfg configs/mobileformer_26m.yaml -modes dygraph inference -batches 32
    python benchmarks/bench.py -cfg configs/mixer_s32_224.yaml -iters 1 -warmup 0 -json out.jsonl

Modes: `dygraph` / `static` (`paddle.jit.to_static`) / `inference` (the export of
`mobileformer.deploy` run by `paddle.inference`, oneDNN on) time eval-mode forwards;
`train` / `train_static` time one training step (forward, cross-entropy, backward, AdamW step).
Each figure is the median of `-iters` timed runs after `-warmup` untimed ones. The machine's
matmul GFLOP/s is measured in the same run, and every result states the fraction of it the model
achieves: MAdds x 2 x images/s / peak (training counts 3x the forward MAdds: forward + backward).

Output: one JSON object per line (a `machine` record, then one `result` per config x mode x
batch) on stdout or to `-json`, then a markdown table (also written to `-markdown` if given).
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

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.static import InputSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mobileformer import build_model, get_config  # noqa: E402  (after the path)
from mobileformer.cpu import keep_freed_memory  # noqa: E402
from mobileformer.deploy import INFERENCE_PREFIX, InferenceModel, build_for_inference, export_inference  # noqa: E402
from mobileformer.flops import count_madds  # noqa: E402
from mobileformer.model_utils import count_trainable  # noqa: E402

INFERENCE_MODES = ('dygraph', 'static', 'inference')
TRAIN_MODES = ('train', 'train_static')
MODES = INFERENCE_MODES + TRAIN_MODES
TRAIN_PASSES = 3  # a training step costs about three forwards: forward, input grads, weight grads


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('-cfg', nargs='+', default=None, help='config YAMLs (default: every configs/*.yaml)')
    parser.add_argument('-modes', nargs='+', default=['dygraph', 'static', 'inference', 'train'], choices=MODES)
    parser.add_argument('-batches', nargs='+', type=int, default=[1, 32], help='inference batch sizes')
    parser.add_argument('-train_batch', type=int, default=32, help='training batch size')
    parser.add_argument('-iters', type=int, default=5, help='timed runs per figure (the median is reported)')
    parser.add_argument('-warmup', type=int, default=2, help='untimed runs before timing')
    parser.add_argument('-threads', type=int, default=2, help='CPU threads for every mode')
    parser.add_argument('-image_size', type=int, default=None, help='default: each config\'s DATA.IMAGE_SIZE')
    parser.add_argument('-matmul_size', type=int, default=2048, help='side of the square GEMM measuring the peak')
    parser.add_argument('-json', default=None, help='write the JSON lines here instead of stdout')
    parser.add_argument('-markdown', default=None, help='also write the markdown table here')
    args = parser.parse_args(argv)
    for name in ('iters', 'threads', 'train_batch', 'matmul_size'):
        if getattr(args, name) < 1:
            parser.error(f'-{name} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0:
        parser.error(f'-warmup must be 0 or more, got {args.warmup}')
    if any(b < 1 for b in args.batches):
        parser.error(f'-batches must all be at least 1, got {args.batches}')
    args.cfg = args.cfg or sorted(glob.glob(os.path.join(ROOT, 'configs', '*.yaml')))
    missing = [c for c in args.cfg if not os.path.isfile(c)]
    if missing:
        parser.error(f'no such config file: {", ".join(missing)}')
    return args


def cpu_name() -> str:
    with open('/proc/cpuinfo') as f:
        names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    return names[0] if names else 'unknown CPU'


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


def matmul_gflops(size: int, threads: int, iters: int = 7) -> Dict[str, float]:
    """float32 GEMM rate (size^3) through dygraph `paddle.matmul` and through
    `paddle.inference` (oneDNN), with the models' thread count; the larger is the machine's peak."""
    flop = 2 * size ** 3
    layer = MatMul(size)
    x = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    x_tensor = paddle.to_tensor(x)
    with paddle.no_grad():
        dygraph = flop / median_seconds(lambda: layer(x_tensor).numpy(), iters, warmup=2) / 1e9
    with tempfile.TemporaryDirectory() as workdir:
        paddle.jit.save(layer, os.path.join(workdir, INFERENCE_PREFIX),
                        input_spec=[InputSpec([None, size], 'float32', 'x')])
        engine = InferenceModel(workdir, threads=threads)
        inference = flop / median_seconds(lambda: engine(x), iters, warmup=2) / 1e9
    return {'matmul_gflops_dygraph': dygraph, 'matmul_gflops_inference': inference,
            'matmul_gflops': max(dygraph, inference)}


# ---- one runner per mode: returns a zero-argument function doing one timed unit of work ---------

def _forward_runner(model, batch):
    x = paddle.to_tensor(batch)

    def run():
        with paddle.no_grad():
            model(x).numpy()  # .numpy() waits for the result
    return run


def _inference_runner(model, config, batch, threads: int, workdir: str):
    export_inference(model, config, workdir)
    predictor = InferenceModel(workdir, threads=threads)
    return lambda: predictor(batch)


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
    for mode in args.modes:
        batches = [args.train_batch] if mode in TRAIN_MODES else args.batches
        for batch_size in batches:
            batch = rng.standard_normal((batch_size, channels, size, size), dtype=np.float32)
            reset_peak_rss()
            with tempfile.TemporaryDirectory() as workdir:
                if mode in TRAIN_MODES:
                    model = build_model(config)
                    model = paddle.jit.to_static(model, full_graph=True) if mode == 'train_static' else model
                    run = _train_runner(model, batch, config.MODEL.NUM_CLASSES)
                elif mode == 'inference':
                    run = _inference_runner(deployed, config, batch, args.threads, workdir)
                else:
                    model = build_for_inference(config)
                    model = paddle.jit.to_static(model, full_graph=True) if mode == 'static' else model
                    run = _forward_runner(model, batch)
                seconds = median_seconds(run, args.iters, args.warmup)
            images_per_s = batch_size / seconds
            flop_per_image = 2 * madds * (TRAIN_PASSES if mode in TRAIN_MODES else 1)
            results.append({
                'record': 'result', 'config': os.path.relpath(cfg_file, ROOT), 'model': config.MODEL.NAME,
                'image_size': size, 'params': params, 'madds': madds, 'mode': mode, 'batch': batch_size,
                'threads': args.threads, 'iters': args.iters, 'seconds_per_batch': seconds,
                'images_per_s': images_per_s, 'peak_rss_mb': peak_rss_mb(),
                'peak_fraction': flop_per_image * images_per_s / (peak_gflops * 1e9),
                'load_avg_1m': os.getloadavg()[0],  # other processes on the machine skew every figure
            })
    return results


# ---- report -----------------------------------------------------------------------------------

def markdown_table(machine: Dict, results: List[Dict]) -> str:
    """One row per config; a throughput column per mode x batch; the matmul-peak fraction and the
    peak RSS of the largest-batch inference-engine run (else the last forward mode measured)."""
    columns = list(dict.fromkeys((r['mode'], r['batch']) for r in results))
    rows: Dict[str, Dict] = {}
    for r in results:
        rows.setdefault(r['config'], {'first': r})[(r['mode'], r['batch'])] = r
    header = ['config', 'params (M)', 'MAdds (M)'] + [f'{m} b{b} (img/s)' for m, b in columns] \
        + ['% of matmul peak', 'peak RSS (MB)']
    lines = [f'CPU: {machine["cpu"]}, {machine["threads"]} threads, measured matmul peak '
             f'{machine["matmul_gflops"]:.0f} GFLOP/s (fp32 {machine["matmul_size"]}^3 GEMM; dygraph '
             f'{machine["matmul_gflops_dygraph"]:.0f}, paddle.inference {machine["matmul_gflops_inference"]:.0f}); median of '
             f'{machine["iters"]} runs after {machine["warmup"]} warm-up.', '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for config, row in rows.items():
        first = row['first']
        forward = [row[c] for c in columns if c in row and c[0] in INFERENCE_MODES]
        chosen = max(forward, key=lambda r: (r['mode'] == 'inference', r['batch'])) if forward else first
        cells = [os.path.splitext(os.path.basename(config))[0], f'{first["params"] / 1e6:.2f}',
                 f'{first["madds"] / 1e6:.0f}']
        cells += [f'{row[c]["images_per_s"]:.1f}' if c in row else '-' for c in columns]
        cells += [f'{100 * chosen["peak_fraction"]:.0f}% ({chosen["mode"]} b{chosen["batch"]})',
                  f'{chosen["peak_rss_mb"]:.0f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    args = parse_args(argv)
    # before the first computation starts the math libraries' thread pools
    os.environ['OMP_NUM_THREADS'] = os.environ['MKL_NUM_THREADS'] = str(args.threads)
    paddle.set_device('cpu')
    paddle.base.core.set_num_threads(args.threads)
    keep_freed_memory()  # as every command and InferenceModel do

    out = open(args.json, 'w') if args.json else sys.stdout
    try:
        machine = {'record': 'machine', 'cpu': cpu_name(), 'threads': args.threads, 'iters': args.iters,
                   'warmup': args.warmup, 'paddle': paddle.__version__, 'load_avg_1m': os.getloadavg()[0],
                   'matmul_size': args.matmul_size, 'mkl_debug_cpu_type': os.environ.get('MKL_DEBUG_CPU_TYPE'),
                   **matmul_gflops(args.matmul_size, args.threads)}
        print(json.dumps(machine), file=out, flush=True)
        results = []
        for cfg_file in args.cfg:
            for result in measure_config(cfg_file, args, machine['matmul_gflops']):
                print(json.dumps(result), file=out, flush=True)
                results.append(result)
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

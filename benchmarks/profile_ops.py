"""Where an exported model spends its time, op type by op type, in onnxruntime and OpenVINO, beside
another ONNX model (e.g. the reference exported from PyTorch).

    python benchmarks/profile_ops.py -cfg configs/mobileformer_294m.yaml -compare official_mobile_former_294m.onnx -batch 32

Each node's time is the fastest of its `-runs` runs (onnxruntime's profiler; OpenVINO's PERF_COUNT),
so the busy moments of a shared machine drop out of it; the tables sum those per op type as the
runtime ran them (onnxruntime: the nodes of its optimised graph, fused ones under their fused name;
OpenVINO: node type and kernel), with node counts, ours beside the other model. Relative shares are
what to compare; absolute times still carry the machine's load (printed before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mobileformer  # noqa: F401  (before Paddle: it filters notices Paddle prints when imported)
import numpy as np

from mobileformer import get_config
from mobileformer.cli import CommandParser, summary
from mobileformer.cpu import cpu_description
from mobileformer.deploy import build_for_inference, default_threads, export_onnx, installed_runtimes
from mobileformer.deploy.runtimes import onnxruntime_options, openvino_config, with_input_shape

PROFILED_RUNTIMES = ('onnxruntime', 'openvino')
NodeTimes = Dict[str, Tuple[str, float]]       # node name -> (op type, fastest run in ms)
OpTypeTimes = Dict[str, Tuple[int, float]]     # op type -> (nodes, summed ms)


def fastest_per_node(samples: Iterable[Tuple[str, str, float]]) -> NodeTimes:
    """(node, op type, ms) samples of several runs -> each node's op type and fastest time."""
    fastest: NodeTimes = {}
    for node, op_type, ms in samples:
        if node not in fastest or ms < fastest[node][1]:
            fastest[node] = (op_type, ms)
    return fastest


def per_op_type(nodes: NodeTimes) -> OpTypeTimes:
    """Node count and summed time of each op type."""
    counts: Dict[str, int] = defaultdict(int)
    totals: Dict[str, float] = defaultdict(float)
    for op_type, ms in nodes.values():
        counts[op_type] += 1
        totals[op_type] += ms
    return {op_type: (counts[op_type], totals[op_type]) for op_type in counts}


def onnxruntime_samples(trace: List[dict]) -> List[Tuple[str, str, float]]:
    """(node, op type, ms) of every kernel run in an onnxruntime profile (its JSON trace events)."""
    return [(event['name'][:-len('_kernel_time')], event['args']['op_name'], event['dur'] / 1000)
            for event in trace if event.get('cat') == 'Node' and event['name'].endswith('_kernel_time')]


def _fastest_run(run: Callable[[], object], runs: int) -> float:
    """Runs `run` once untimed, then `runs` times; the fastest in ms."""
    run()
    seconds = []
    for _ in range(runs):
        begin = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - begin)
    return 1000 * min(seconds)


def profile_onnxruntime(path: str, batch: np.ndarray, runs: int, threads: int) -> Tuple[NodeTimes, float]:
    """Per-node fastest times of `path` in onnxruntime (as `OnnxModel` runs it), and its fastest whole run (ms)."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as workdir:
        options = onnxruntime_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(workdir, 'profile')
        session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {session.get_inputs()[0].name: batch}
        fastest = _fastest_run(lambda: session.run(None, feed), runs)
        with open(session.end_profiling(), encoding='utf-8') as f:
            trace = json.load(f)
    return fastest_per_node(onnxruntime_samples(trace)), fastest


def profile_openvino(path: str, batch: np.ndarray, runs: int, threads: int) -> Tuple[NodeTimes, float]:
    """Per-node fastest times of `path` in OpenVINO f32 as `OpenVinoModel` runs it (compiled for the
    batch's shape), and its fastest whole run (ms)."""
    import openvino

    core = openvino.Core()
    model = with_input_shape(core.read_model(path), batch.shape)
    compiled = core.compile_model(model, 'CPU', {**openvino_config(threads), 'PERF_COUNT': True})
    request = compiled.create_infer_request()
    samples: List[Tuple[str, str, float]] = []

    def run() -> None:
        request.infer([batch])
        # keyed by position too: fused nodes can share a generated name
        samples.extend((f'{position}:{info.node_name}', f'{info.node_type} ({info.exec_type})',
                        1000 * info.real_time.total_seconds())
                       for position, info in enumerate(request.get_profiling_info())
                       if info.status == info.Status.EXECUTED)

    fastest = _fastest_run(run, runs)
    return fastest_per_node(samples), fastest


PROFILERS = {'onnxruntime': profile_onnxruntime, 'openvino': profile_openvino}


def table(runtime: str, profiles: Dict[str, Tuple[NodeTimes, float]]) -> List[str]:
    """A markdown table of op types (rows, the most expensive first) by model (columns)."""
    by_model = {name: per_op_type(nodes) for name, (nodes, _) in profiles.items()}
    op_types = sorted({op for types in by_model.values() for op in types},
                      key=lambda op: -max(types.get(op, (0, 0.0))[1] for types in by_model.values()))
    names = list(profiles)
    lines = [f'| {runtime} op type | ' + ' | '.join(f'{name}: nodes | {name}: ms' for name in names) + ' |',
             '|---|' + '---|---|' * len(names)]
    for op in op_types:
        cells = [by_model[name].get(op, (0, 0.0)) for name in names]
        lines.append(f'| {op} | ' + ' | '.join(f'{count} | {ms:.3f}' for count, ms in cells) + ' |')
    lines.append('| **sum of per-node fastest** | ' + ' | '.join(
        f'{len(profiles[name][0])} | {sum(ms for _, ms in profiles[name][0].values()):.3f}' for name in names) + ' |')
    lines.append('| **fastest whole run (profiling on)** | ' + ' | '.join(f' | {profiles[name][1]:.3f}' for name in names) + ' |')
    return lines


def build_parser() -> CommandParser:
    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-cfg', required=True, help='config YAML of our model (random weights unless -pretrained)')
    parser.add_argument('-pretrained', help='weights for -cfg')
    parser.add_argument('-compare', metavar='FILE.onnx', help='another ONNX model profiled beside ours')
    parser.add_argument('-runtimes', nargs='+', choices=PROFILED_RUNTIMES, default=None,
                        help='default: every installed one of onnxruntime and openvino')
    parser.add_argument('-batch', type=int, default=1)
    parser.add_argument('-runs', type=int, default=10, help='timed runs per model and runtime, after one untimed')
    parser.add_argument('-threads', type=int, default=None, help='default: every CPU unless OMP_NUM_THREADS')
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and not os.path.isfile(args.compare):
        parser.error(f"-compare '{args.compare}' does not exist")
    if args.batch < 1 or args.runs < 1:
        parser.error('-batch and -runs must be positive')
    runtimes = [r for r in args.runtimes or PROFILED_RUNTIMES if r in installed_runtimes()]
    if not runtimes:
        parser.error('neither onnxruntime nor openvino is installed: pip install onnxruntime')
    args.runtimes = runtimes
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Tuple[NodeTimes, float]]]:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    config = get_config(args.cfg)
    size, channels = config.DATA.IMAGE_SIZE, config.DATA.IN_CHANNELS
    batch = np.random.default_rng(0).standard_normal((args.batch, channels, size, size), dtype=np.float32)
    print(f'CPU: {cpu_description()}, {threads} threads, batch {args.batch}, fastest of {args.runs} runs per node; '
          f'load average before: {os.getloadavg()[0]:.1f}')
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        ours = export_onnx(build_for_inference(config, args.pretrained), config, os.path.join(workdir, 'ours.onnx'))
        models = {config.MODEL.NAME: ours}
        if args.compare:
            models[os.path.splitext(os.path.basename(args.compare))[0]] = args.compare
        for runtime in args.runtimes:
            results[runtime] = {name: PROFILERS[runtime](path, batch, args.runs, threads) for name, path in models.items()}
            print('\n'.join(['', *table(runtime, results[runtime])]), flush=True)
    print(f'\nload average after: {os.getloadavg()[0]:.1f}')
    return results


if __name__ == '__main__':
    main()

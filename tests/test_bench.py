"""Smoke test of benchmarks/bench.py: one tiny config, every mode and runtime, an ONNX file beside
it, one iteration, two rounds. Checks that each JSON record carries its fields with positive values;
timings are never asserted."""
import json
import os

import pytest
from conftest import CONFIGS, FIXTURES

import benchmarks.bench as bench
import benchmarks.paired as paired
from mobileformer import get_config
from mobileformer.deploy import build_for_inference, export_onnx, installed_runtimes

RESULT_FIELDS = ('params', 'madds', 'batch', 'threads', 'seconds_per_batch', 'images_per_s', 'peak_rss_mb',
                 'peak_fraction')

pytestmark = pytest.mark.openvino  # InferenceModel and the benchmark load every installed runtime


@pytest.mark.timeout(300)
def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # auto's measurement
    config = get_config(os.path.join(FIXTURES, 'timm_mixer_tiny.yaml'))
    other = export_onnx(build_for_inference(config), config, str(tmp_path / 'other.onnx'))
    out, table = tmp_path / 'bench.jsonl', tmp_path / 'bench.md'
    cfg = os.path.join(CONFIGS, 'mixer_s32_224.yaml')
    runtimes = ['auto'] + installed_runtimes()
    bench.main(['-cfg', cfg, '-modes', *bench.MODES, '-runtimes', *runtimes, '-compare', other, '-rounds', '2',
                '-batches', '2', '-train_batch', '2', '-iters', '1', '-warmup', '0', '-threads', '1',
                '-matmul_size', '256', '-image_size', '64', '-json', str(out), '-markdown', str(table)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    machine, results = records[0], [r for r in records if r['record'] == 'result']
    assert machine['record'] == 'machine' and machine['threads'] == 1 and machine['rounds'] == 2
    assert machine['cpu'].endswith(')') and sorted(machine['runtimes']) == sorted(installed_runtimes())
    for key in ('matmul_gflops', 'matmul_gflops_dygraph', 'matmul_gflops_inference'):
        assert machine[key] > 0
    modes = [(mode, None) for mode in bench.MODES if mode != 'inference']
    modes[2:2] = [('inference', runtime) for runtime in runtimes]
    ours = [r for r in results if r['model'] == 'mixer_s32_224']
    assert [(r['mode'], r['runtime'], r['batch']) for r in ours] == [(m, r, 2) for m, r in modes]
    assert len([r for r in records if r['record'] == 'round']) == 2 * len(results)
    for r in ours:
        assert r['image_size'] == 64 and r['rounds'] == 2 and len(r['seconds_per_round']) == 2
        assert all(r[field] > 0 for field in RESULT_FIELDS) and r['load_avg_1m'] >= 0, r
    assert next(r for r in ours if r['runtime'] == 'auto')['chosen'] in installed_runtimes()
    compared = [r for r in results if r['config'] == other]
    assert [r['runtime'] for r in compared] == [r for r in installed_runtimes() if r != 'paddle']
    assert all(r['image_size'] == 32 and r['seconds_per_batch'] > 0 for r in compared)
    # token MLPs hold 513 weights per token and block: 8 blocks at 4 tokens instead of 49
    assert ours[0]['params'] == 19_104_624 - 8 * 513 * (49 - 4)
    lines = table.read_text().splitlines()
    assert lines[0].startswith('CPU: ') and lines[-2].startswith('| mixer_s32_224 |') and lines[-1].startswith('| other |')
    assert len(lines) == 6


@pytest.mark.timeout(120)
def test_a_dygraph_only_run_makes_no_predictor(tmp_path, monkeypatch):
    """The first predictor of a process caps oneDNN at AVX2 on AMD AVX-512 CPUs, dygraph's oneDNN
    GEMMs included, so a run without the inference mode must not make one (not even for the peak)."""
    def no_predictor(*args, **kwargs):
        raise AssertionError('a paddle.inference predictor was made')
    monkeypatch.setattr(bench, 'PaddleModel', no_predictor)
    table = tmp_path / 'bench.md'
    records = bench.main(['-cfg', os.path.join(CONFIGS, 'mixer_s32_224.yaml'), '-modes', 'dygraph', 'train',
                          '-batches', '2', '-train_batch', '2', '-iters', '1', '-warmup', '0', '-threads', '1',
                          '-matmul_size', '256', '-image_size', '64', '-markdown', str(table)])
    machine = records[0]
    assert 'matmul_gflops_inference' not in machine and machine['matmul_gflops'] == machine['matmul_gflops_dygraph'] > 0
    assert f'GEMM; dygraph {machine["matmul_gflops_dygraph"]:.0f}); median of 1 runs' in table.read_text()


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        bench.main(['-cfg', 'configs/nope.yaml'])
    assert 'no such file' in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_paired_comparison_reports_a_ratio_per_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    cfg = os.path.join(FIXTURES, 'timm_mixer_tiny.yaml')
    config = get_config(cfg)
    other = export_onnx(build_for_inference(config), config, str(tmp_path / 'other.onnx'))
    results = paired.main(['-cfg', cfg, '-compare', other, '-batches', '1', '3', '-blocks', '4', '-threads', '1'])
    assert [r['batch'] for r in results] == [1, 3]
    for r in results:
        assert r['ours_runtime'] in installed_runtimes() and r['other_best'] in ('onnxruntime', 'openvino')
        assert r['ours_s'] > 0 and r['other_best_s'] > 0 and 0 < r['ratio_iqr'][0] <= r['ratio'] <= r['ratio_iqr'][1]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('CPU: ') and [line.split(':')[0] for line in lines[1:]] == ['batch 1', 'batch 3']
    results = paired.main(['-cfg', cfg, '-compare', other, '-batches', '2', '-blocks', '4', '-threads', '2',
                           '-other_as_exported'])
    assert [r['batch'] for r in results] == [2] and results[0]['ratio'] > 0
    assert '(as exported)' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paired.main(['-cfg', cfg, '-compare', str(tmp_path / 'missing.onnx')])
    assert "-compare '" in capsys.readouterr().err


@pytest.mark.timeout(200)
def test_teacher_cost_smoke(tmp_path):
    """benchmarks/teacher_cost.py with the tiny model as student, a YAML teacher and its ONNX export."""
    import paddle
    import benchmarks.teacher_cost as teacher_cost
    from mobileformer import build_model
    tiny = os.path.join(FIXTURES, 'tiny_mobileformer.yaml')
    teacher_yaml = tmp_path / 'teacher.yaml'
    teacher_yaml.write_text(json.dumps({'_BASE_': tiny, 'DATA': {'IMAGE_SIZE': 12}}))
    config = get_config(str(teacher_yaml))
    network = build_model(config)
    paddle.save(network.state_dict(), str(tmp_path / 'teacher.pdparams'))
    onnx_file = export_onnx(build_for_inference(config, str(tmp_path / 'teacher.pdparams')), config,
                            str(tmp_path / 'teacher.onnx'))
    results = teacher_cost.main(['-cfg', tiny, '-teacher', str(teacher_yaml), str(tmp_path / 'teacher.pdparams'),
                                 '-teacher', onnx_file, '-blocks', '4', '-steps', '1'])
    assert list(results) == ['no teacher', f"{teacher_yaml} {tmp_path / 'teacher.pdparams'}", onnx_file]
    assert results['no teacher']['ratio'] == results['no teacher']['fastest_ratio'] == 1.0
    assert all(r['step_s'] > 0 and r['fastest_s'] > 0 for r in results.values())

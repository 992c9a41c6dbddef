"""Smoke test of benchmarks/bench.py: one tiny config, every mode, one iteration. Checks that each
JSON record carries its fields with positive values; timings are never asserted."""
import json
import os

import pytest
from conftest import CONFIGS

import benchmarks.bench as bench

RESULT_FIELDS = ('params', 'madds', 'batch', 'threads', 'seconds_per_batch', 'images_per_s', 'peak_rss_mb',
                 'peak_fraction')


@pytest.mark.timeout(300)
def test_bench_smoke(tmp_path):
    out, table = tmp_path / 'bench.jsonl', tmp_path / 'bench.md'
    cfg = os.path.join(CONFIGS, 'mixer_s32_224.yaml')
    bench.main(['-cfg', cfg, '-modes', *bench.MODES, '-batches', '2', '-train_batch', '2', '-iters', '1',
                '-warmup', '0', '-threads', '1', '-matmul_size', '256', '-image_size', '64', '-json', str(out), '-markdown', str(table)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    machine, results = records[0], records[1:]
    assert machine['record'] == 'machine' and machine['threads'] == 1
    for key in ('matmul_gflops', 'matmul_gflops_dygraph', 'matmul_gflops_inference'):
        assert machine[key] > 0
    assert [(r['mode'], r['batch']) for r in results] == [(mode, 2) for mode in bench.MODES]
    for r in results:
        assert r['record'] == 'result' and r['model'] == 'mixer_s32_224' and r['image_size'] == 64
        assert all(r[field] > 0 for field in RESULT_FIELDS) and r['load_avg_1m'] >= 0, r
    # token MLPs hold 513 weights per token and block: 8 blocks at 4 tokens instead of 49
    assert results[0]['params'] == 19_104_624 - 8 * 513 * (49 - 4)
    lines = table.read_text().splitlines()
    assert lines[-1].startswith('| mixer_s32_224 |') and len(lines) == 5


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        bench.main(['-cfg', 'configs/nope.yaml'])
    assert 'no such config file' in capsys.readouterr().err

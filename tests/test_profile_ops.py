"""benchmarks/profile_ops.py: per-node fastest times summed per op type (exact on given samples), and
a real profile of the same export twice, whose op-type tables must agree node for node (in OpenVINO:
its convolutions, matrix products and Linears)."""
import os

import paddle
import pytest
from conftest import FIXTURES

import benchmarks.profile_ops as profile_ops
from mobileformer import build_model, get_config
from mobileformer.deploy import build_for_inference, export_onnx, installed_runtimes

TINY = os.path.join(FIXTURES, 'tiny_mobileformer.yaml')
OPENVINO_HEAVY_OPS = ('Convolution', 'GroupConvolution', 'FullyConnected', 'MatMul')


def test_fastest_run_of_each_node_summed_per_op_type():
    trace = [{'cat': 'Session', 'name': 'model_run', 'dur': 900},
             {'cat': 'Node', 'name': 'conv_1_kernel_time', 'dur': 300, 'args': {'op_name': 'Conv'}},
             {'cat': 'Node', 'name': 'conv_1_fence_before', 'dur': 1, 'args': {'op_name': 'Conv'}},
             {'cat': 'Node', 'name': 'conv_2_kernel_time', 'dur': 250, 'args': {'op_name': 'Conv'}},
             {'cat': 'Node', 'name': 'relu_kernel_time', 'dur': 40, 'args': {'op_name': 'Relu'}},
             {'cat': 'Node', 'name': 'conv_1_kernel_time', 'dur': 200, 'args': {'op_name': 'Conv'}},   # second run
             {'cat': 'Node', 'name': 'conv_2_kernel_time', 'dur': 350, 'args': {'op_name': 'Conv'}},
             {'cat': 'Node', 'name': 'relu_kernel_time', 'dur': 30, 'args': {'op_name': 'Relu'}}]
    samples = profile_ops.onnxruntime_samples(trace)
    assert samples[0] == ('conv_1', 'Conv', 0.3) and len(samples) == 6
    nodes = profile_ops.fastest_per_node(samples)
    assert nodes == {'conv_1': ('Conv', 0.2), 'conv_2': ('Conv', 0.25), 'relu': ('Relu', 0.03)}
    assert profile_ops.per_op_type(nodes) == {'Conv': (2, pytest.approx(0.45)), 'Relu': (1, 0.03)}
    lines = profile_ops.table('onnxruntime', {'a': (nodes, 1.5), 'b': ({'relu': ('Relu', 0.5)}, 0.7)})
    assert lines[2] == '| Relu | 1 | 0.030 | 1 | 0.500 |'          # the most expensive op type first
    assert lines[3] == '| Conv | 2 | 0.450 | 0 | 0.000 |'
    assert lines[4] == '| **sum of per-node fastest** | 3 | 0.480 | 1 | 0.500 |'


@pytest.mark.openvino
@pytest.mark.timeout(300)
def test_the_same_export_profiles_to_the_same_nodes(tmp_path, capsys):
    config = get_config(TINY)
    weights = str(tmp_path / 'tiny.pdparams')
    paddle.save(build_model(config).state_dict(), weights)  # both exports from the same weights
    other = export_onnx(build_for_inference(config, weights), config, str(tmp_path / 'other.onnx'))
    results = profile_ops.main(['-cfg', TINY, '-pretrained', weights, '-compare', other, '-batch', '2', '-runs', '2',
                                '-threads', '1'])
    assert list(results) == [r for r in profile_ops.PROFILED_RUNTIMES if r in installed_runtimes()]
    for runtime, profiles in results.items():
        (ours, ours_run), (theirs, their_run) = profiles['tiny_mobileformer'], profiles['other']
        ours_counts = {op: n for op, (n, _) in profile_ops.per_op_type(ours).items()}
        their_counts = {op: n for op, (n, _) in profile_ops.per_op_type(theirs).items()}
        if runtime == 'openvino':  # which element-wise nodes it fuses (Subgraph, MVN) varies between compilations
            ours_counts, their_counts = ({op: n for op, n in counts.items() if op.split()[0] in OPENVINO_HEAVY_OPS}
                                         for counts in (ours_counts, their_counts))
            assert sum(ours_counts.values()) > 20, ours_counts
        assert ours_counts == their_counts, runtime
        ours_types = profile_ops.per_op_type(ours)
        assert sum(n for n, _ in ours_types.values()) > 50 and ours_run > 0 and their_run > 0
        assert all(ms >= 0 for _, ms in ours.values())
    out = capsys.readouterr().out
    assert out.startswith('CPU: ') and '| onnxruntime op type | tiny_mobileformer: nodes |' in out
    with pytest.raises(SystemExit):
        profile_ops.main(['-cfg', TINY, '-compare', str(tmp_path / 'missing.onnx')])
    assert "-compare '" in capsys.readouterr().err

"""The compiled CPU kernels (mobileformer/cpu_ops.py) against the standard Paddle ops they replace:
forward and gradients, the export path (standard ops only), the disabled and failed-build paths."""
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from mobileformer import cpu_ops

TOL = dict(rtol=1e-5, atol=1e-5)


class _CountingLibrary:
    """Stands in for the compiled library and counts the kernel calls that reach it."""

    def __init__(self, library):
        self.library, self.calls = library, 0

    def __getattr__(self, name):
        function = getattr(self.library, name)

        def counted(*args):
            self.calls += 1
            return function(*args)
        return counted


@pytest.fixture(scope='session')
def compiled():
    library = cpu_ops._kernels()  # the one-time build (cached across runs)
    assert library is not None, 'the CPU kernels did not build (see the warning above)'
    return library


@pytest.fixture
def kernels(compiled, monkeypatch):
    counting = _CountingLibrary(compiled)
    monkeypatch.setattr(cpu_ops, '_library', counting)
    return counting


def _leaf(array: np.ndarray) -> paddle.Tensor:
    tensor = paddle.to_tensor(array)
    tensor.stop_gradient = False
    return tensor


def _value_and_grads(fn, arrays, upstream):
    inputs = [_leaf(a) for a in arrays]
    out = fn(*inputs)
    grads = paddle.grad(out, inputs, paddle.to_tensor(upstream))
    return [out.numpy()] + [g.numpy() for g in grads]


def _assert_matches(fn, reference, arrays, out_shape):
    upstream = np.random.randn(*out_shape).astype('float32')
    for got, want in zip(_value_and_grads(fn, arrays, upstream),
                         _value_and_grads(reference, arrays, upstream)):
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize('n, h, w', [(1, 7, 7), (3, 8, 13), (3, 13, 8)])
@pytest.mark.parametrize('k', [3, 5])
@pytest.mark.parametrize('multiplier', [1, 3, 6])
@pytest.mark.parametrize('stride', [1, 2])
def test_depthwise_matches_conv2d(kernels, n, h, w, k, multiplier, stride):
    c, padding = 4, k // 2
    x = np.random.randn(n, c, h, w).astype('float32')
    weight = np.random.randn(c * multiplier, 1, k, k).astype('float32')
    out_shape = (n, c * multiplier, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
    _assert_matches(lambda a, b: cpu_ops.depthwise_conv2d(a, b, stride, padding),
                    lambda a, b: F.conv2d(a, b, stride=stride, padding=padding, groups=c),
                    [x, weight], out_shape)
    assert kernels.calls == 1


@pytest.mark.parametrize('k, padding, stride, h, w', [
    (3, 0, 1, 9, 10), (3, 2, 2, 9, 10), (5, 0, 2, 9, 10), (5, 4, 1, 9, 10),  # unused last column
    (3, 1, 1, 1, 1), (3, 1, 2, 2, 2), (5, 2, 2, 3, 1)])  # planes smaller than the kernel
def test_depthwise_other_paddings_and_tiny_planes(kernels, k, padding, stride, h, w):
    x = np.random.randn(2, 3, h, w).astype('float32')
    weight = np.random.randn(6, 1, k, k).astype('float32')
    out_shape = (2, 6, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
    _assert_matches(lambda a, b: cpu_ops.depthwise_conv2d(a, b, stride, padding),
                    lambda a, b: F.conv2d(a, b, stride=stride, padding=padding, groups=3),
                    [x, weight], out_shape)
    assert kernels.calls == 1


def test_non_contiguous_inputs(kernels):
    # e.g. after channel_shuffle, whose transpose is a strided view in Paddle 3
    x = np.random.randn(2, 4, 6, 9).astype('float32')
    weight = np.random.randn(4, 1, 3, 3).astype('float32')
    slopes = np.random.randn(2, 4).astype('float32')

    def ours(a, b, s):
        view = a.transpose([0, 1, 3, 2])
        assert not view.is_contiguous()
        return cpu_ops.dynamic_relu(cpu_ops.depthwise_conv2d(view, b, 1, 1), s, -s)

    def reference(a, b, s):
        y = F.conv2d(a.transpose([0, 1, 3, 2]), b, padding=1, groups=4)
        return _dynamic_relu_reference(y, s, -s)
    _assert_matches(ours, reference, [x, weight, slopes], (2, 4, 9, 6))
    assert kernels.calls == 2


def _dynamic_relu_reference(x, slope1, slope2):
    return paddle.maximum(x * slope1[:, :, None, None], x * slope2[:, :, None, None])


@pytest.mark.parametrize('shape', [(1, 5, 7, 7), (3, 6, 8, 13)])
def test_dynamic_relu_matches_maximum(kernels, shape):
    n, c = shape[:2]
    x = np.random.randn(*shape).astype('float32')
    x[:, :, 0, :3] = 0.0  # ties x * a1 == x * a2: Paddle's maximum splits the gradient in half
    slope1 = np.random.randn(n, c).astype('float32')  # mixed signs, a1 < a2 and a1 > a2
    slope2 = np.random.randn(n, c).astype('float32')
    slope2[0, 1] = slope1[0, 1]  # a whole plane of ties
    assert (slope1 < slope2).any() and (slope1 > slope2).any()
    _assert_matches(cpu_ops.dynamic_relu, _dynamic_relu_reference, [x, slope1, slope2], shape)
    assert kernels.calls == 1


def test_dynamic_relu_takes_slopes_in_the_broadcast_form(kernels):
    x = np.random.randn(2, 3, 4, 5).astype('float32')
    slope1, slope2 = np.random.randn(2, 3).astype('float32'), np.random.randn(2, 3).astype('float32')
    expected = cpu_ops.dynamic_relu(*map(paddle.to_tensor, (x, slope1, slope2))).numpy()
    broadcast = cpu_ops.dynamic_relu(*map(paddle.to_tensor, (x, slope1[:, :, None, None], slope2[:, :, None, None])))
    np.testing.assert_array_equal(broadcast.numpy(), expected)
    assert kernels.calls == 2


@pytest.mark.parametrize('slope_shape', [[1, 2, 3, 3], [1, 2, 1], [2]])
def test_dynamic_relu_rejects_slopes_not_per_plane(slope_shape):
    with pytest.raises(ValueError, match=r'slopes \[N, C\] or \[N, C, 1, 1\]'):
        cpu_ops.dynamic_relu(paddle.ones([1, 2, 3, 3]), paddle.ones(slope_shape), paddle.ones(slope_shape))


@pytest.mark.parametrize('x_shape, n', [((5, 7), 3), ((2, 9, 33), 70), ((3, 4, 2, 8), 1)])
def test_linear_matches_paddles(kernels, x_shape, n):
    x = np.random.randn(*x_shape).astype('float32')
    weight = np.random.randn(x_shape[-1], n).astype('float32')
    bias = np.random.randn(n).astype('float32')
    _assert_matches(cpu_ops.linear, F.linear, [x, weight, bias], (*x_shape[:-1], n))
    assert kernels.calls == 1


def test_linear_over_a_transposed_view_and_an_empty_batch(kernels):
    # the token-mixing layers of the MLP models read x [B, N, C] transposed: a strided view
    x = np.random.randn(2, 6, 5).astype('float32')
    weight, bias = np.random.randn(6, 4).astype('float32'), np.random.randn(4).astype('float32')

    def ours(a, w, b):
        view = a.transpose([0, 2, 1])
        assert not view.is_contiguous()
        return cpu_ops.linear(view, w, b)
    _assert_matches(ours, lambda a, w, b: F.linear(a.transpose([0, 2, 1]), w, b), [x, weight, bias], (2, 5, 4))
    empty = _leaf(np.zeros((0, 6), 'float32'))
    w, b = _leaf(weight), _leaf(bias)
    out = cpu_ops.linear(empty, w, b)
    out.sum().backward()
    assert out.shape == [0, 4] and not w.grad.numpy().any() and not b.grad.numpy().any()
    assert kernels.calls == 2


@pytest.mark.parametrize('x_shape, n', [((2, 6, 5), 4), ((3, 9, 33), 9), ((1, 4, 1), 7)])
def test_token_linear_matches_a_linear_over_the_transposed_tokens(kernels, x_shape, n):
    x = np.random.randn(*x_shape).astype('float32')
    weight = np.random.randn(x_shape[1], n).astype('float32')
    bias = np.random.randn(n).astype('float32')

    def reference(a, w, b):
        return F.linear(a.transpose([0, 2, 1]), w, b).transpose([0, 2, 1])
    _assert_matches(cpu_ops.token_linear, reference, [x, weight, bias], (x_shape[0], n, x_shape[2]))
    assert kernels.calls == 1


def test_token_linear_in_standard_ops_is_the_same_linear(monkeypatch):
    """The form exports trace (and GPUs run): one matmul from the left, no transposes of x."""
    monkeypatch.setattr(cpu_ops, '_eligible', lambda *tensors: False)
    x = np.random.randn(3, 9, 5).astype('float32')
    weight, bias = np.random.randn(9, 4).astype('float32'), np.random.randn(4).astype('float32')

    def reference(a, w, b):
        return F.linear(a.transpose([0, 2, 1]), w, b).transpose([0, 2, 1])
    _assert_matches(cpu_ops.token_linear, reference, [x, weight, bias], (3, 4, 5))


def test_token_linear_over_an_empty_batch(kernels):
    x, w, b = _leaf(np.zeros((0, 6, 5), 'float32')), _leaf(np.ones((6, 4), 'float32')), _leaf(np.ones(4, 'float32'))
    out = cpu_ops.token_linear(x, w, b)
    out.sum().backward()
    assert out.shape == [0, 4, 5] and not w.grad.numpy().any() and not b.grad.numpy().any()
    assert kernels.calls == 1


@pytest.mark.parametrize('x_shape, n', [((2, 6, 5), 8), ((3, 4), 2)])
def test_linear_halves_are_the_halves_of_the_linear(kernels, x_shape, n):
    x = np.random.randn(*x_shape).astype('float32')
    weight, bias = np.random.randn(x_shape[-1], n).astype('float32'), np.random.randn(n).astype('float32')

    def joined(a, w, b):
        u, v = cpu_ops.linear_halves(a, w, b)
        assert u.shape == v.shape == [*x_shape[:-1], n // 2]
        return paddle.concat([u, v], axis=-1)
    _assert_matches(joined, F.linear, [x, weight, bias], (*x_shape[:-1], n))
    assert kernels.calls == 2  # one GEMM per half


def test_linear_without_bias_uses_paddles(kernels):
    x, weight = paddle.randn([3, 4]), paddle.randn([4, 2])
    np.testing.assert_allclose(cpu_ops.linear(x, weight, None).numpy(), F.linear(x, weight).numpy(), **TOL)
    assert kernels.calls == 0


def test_linear_layer_keeps_nn_linears_parameters(kernels):
    from mobileformer.models.layers import Linear

    layer = Linear(6, 3)
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias']
    x = paddle.randn([2, 6])
    np.testing.assert_allclose(layer(x).numpy(), F.linear(x, layer.weight, layer.bias).numpy(), **TOL)
    assert kernels.calls == 1


def test_gelu_matches_paddles_exact_gelu(kernels):
    x = (np.random.randn(3, 5, 67) * 3).astype('float32')
    x[0, 0, :4] = [0.0, -10.0, 10.0, -0.5]
    _assert_matches(cpu_ops.gelu, F.gelu, [x], x.shape)
    assert kernels.calls == 1


def test_gelu_layer_is_the_exact_form(kernels):
    from mobileformer.models.layers import GELU

    x = paddle.randn([4, 9])
    np.testing.assert_allclose(GELU()(x).numpy(), F.gelu(x, approximate=False).numpy(), **TOL)
    assert kernels.calls == 1


@pytest.mark.parametrize('shape', [(7,), (3, 5, 70), (2, 3, 4, 130)])
def test_channel_scale_and_shift_match_broadcast_ops(kernels, shape):
    x = np.random.randn(*shape).astype('float32')
    scale, shift = np.random.randn(shape[-1]).astype('float32'), np.random.randn(shape[-1]).astype('float32')
    _assert_matches(cpu_ops.channel_scale, lambda a, s: a * s, [x, scale], shape)
    _assert_matches(cpu_ops.channel_scale, lambda a, s, b: a * s + b, [x, scale, shift], shape)
    assert kernels.calls == 2


@pytest.mark.parametrize('shape, epsilon', [((5, 7), 1e-5), ((2, 3, 130), 1e-6)])
def test_layer_norm_matches_paddles(kernels, shape, epsilon):
    x = (np.random.randn(*shape) * 2 + 1).astype('float32')
    weight, bias = np.random.randn(shape[-1]).astype('float32'), np.random.randn(shape[-1]).astype('float32')
    _assert_matches(lambda a, w, b: cpu_ops.layer_norm(a, w, b, epsilon),
                    lambda a, w, b: F.layer_norm(a, shape[-1:], w, b, epsilon), [x, weight, bias], shape)
    assert kernels.calls == 1


def test_layer_norm_layer_keeps_nn_layer_norms_parameters(kernels):
    from mobileformer.models.layers import LayerNorm

    layer = LayerNorm(6, epsilon=1e-6)
    assert [name for name, _ in layer.named_parameters()] == ['weight', 'bias']
    x = paddle.randn([2, 3, 6])
    np.testing.assert_allclose(layer(x).numpy(), F.layer_norm(x, [6], layer.weight, layer.bias, 1e-6).numpy(), **TOL)
    assert kernels.calls == 1


class _TinyBlock(paddle.nn.Layer):
    def __init__(self, channels: int = 4, multiplier: int = 2):
        super().__init__()
        self.weight = self.create_parameter([channels * multiplier, 1, 3, 3])
        self.slopes = paddle.nn.Linear(channels * multiplier, 2 * channels * multiplier)

    def forward(self, x):
        x = cpu_ops.depthwise_conv2d(x, self.weight, 2, 1)
        slope1, slope2 = paddle.split(self.slopes(x.mean([2, 3])), 2, axis=1)
        return cpu_ops.dynamic_relu(x, slope1, slope2)


def _saved_op_names(model, path, x):
    """Saves `model` for inference at `path`; checks the program against dygraph; its op names."""
    paddle.jit.save(model, path, input_spec=[paddle.static.InputSpec([None, *x.shape[1:]], 'float32')])
    np.testing.assert_allclose(paddle.jit.load(path)(x).numpy(), model(x).numpy(), **TOL)
    paddle.enable_static()
    try:
        program = paddle.static.load_inference_model(path, paddle.static.Executor(paddle.CPUPlace()))[0]
        return {op.name() for op in program.global_block().ops}
    finally:
        paddle.disable_static()


def test_export_uses_only_standard_ops(kernels, tmp_path):
    model = _TinyBlock()
    model.eval()
    x = paddle.randn([3, 4, 9, 9])
    model(x)
    assert kernels.calls == 2
    names = _saved_op_names(model, str(tmp_path / 'tiny'), x)
    # the dynamic ReLU is exported as u + relu(v - u): no `maximum`, which has no oneDNN kernel
    assert {'pd_op.depthwise_conv2d', 'pd_op.relu'} <= names and 'pd_op.maximum' not in names
    assert all(name.split('.')[0] in ('pd_op', 'builtin') for name in names), names


def test_programs_for_onnx_keep_the_maximum(tmp_path):
    model = _TinyBlock()
    model.eval()
    x = paddle.randn([3, 4, 9, 9])
    with cpu_ops.tracing_for_onnx():
        names = _saved_op_names(model, str(tmp_path / 'onnx'), x)
    assert 'pd_op.maximum' in names and 'pd_op.relu' not in names
    assert 'pd_op.maximum' not in _saved_op_names(model, str(tmp_path / 'again'), x)  # traced anew


def _fresh_state(monkeypatch):
    monkeypatch.setattr(cpu_ops, '_library', None)
    monkeypatch.setattr(cpu_ops, '_failure', None)
    monkeypatch.setattr(cpu_ops, '_load_attempted', False)


def _check_fallback_result():
    x, weight = paddle.randn([2, 3, 8, 8]), paddle.randn([3, 1, 3, 3])
    np.testing.assert_allclose(cpu_ops.depthwise_conv2d(x, weight, 1, 1).numpy(),
                               F.conv2d(x, weight, padding=1, groups=3).numpy(), **TOL)


def test_disabled_by_environment(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setenv('MOBILEFORMER_CPU_OPS', '0')
    monkeypatch.setattr(cpu_ops, '_build', lambda: pytest.fail('built although disabled'))
    _check_fallback_result()
    assert cpu_ops._load_attempted and cpu_ops._library is None


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path, capfd):
    broken = tmp_path / 'broken.cc'
    broken.write_text('#error this source is broken on purpose\n')
    _fresh_state(monkeypatch)
    monkeypatch.setattr(cpu_ops, '_SOURCE', str(broken))
    monkeypatch.setenv('MOBILEFORMER_OPS_CACHE', str(tmp_path / 'cache'))
    builds = []
    build = cpu_ops._build
    monkeypatch.setattr(cpu_ops, '_build', lambda: builds.append(1) or build())
    _check_fallback_result()
    _check_fallback_result()  # no second attempt, no second warning
    out, err = capfd.readouterr()
    assert builds == [1]
    assert out == ''
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith('mobileformer: Compiling the CPU kernels'), err
    assert lines[1].startswith('mobileformer: notice: ') and 'runs on the slower Paddle-op fallback' in lines[1], err
    log = lines[1].split('build log: ')[1].rstrip(')')
    assert os.path.exists(log) and 'broken on purpose' in open(log).read()


class _KernelUser(paddle.nn.Layer):
    runs_cpu_kernels = True


def test_prepare_says_it_compiles_then_builds_before_training(monkeypatch, tmp_path):
    _fresh_state(monkeypatch)
    monkeypatch.setenv('MOBILEFORMER_OPS_CACHE', str(tmp_path / 'empty cache'))
    monkeypatch.setattr(cpu_ops, '_build', lambda: 'library')
    network, lines = paddle.nn.Sequential(_KernelUser()), []
    assert cpu_ops.prepare(network, lines.append) and cpu_ops._library == 'library'
    assert len(lines) == 1 and lines[0].startswith('Compiling the CPU kernels') and 'empty cache' in lines[0]
    assert cpu_ops.prepare(network, lines.append) and len(lines) == 1  # once per process


def test_first_use_in_a_script_announces_the_build_in_one_line(monkeypatch, tmp_path, capfd):
    """A script's first forward builds the kernels (about 20 s) where the commands' `prepare` would
    have: it says so on stderr, once, and says nothing where the cache has the library."""
    _fresh_state(monkeypatch)
    monkeypatch.setenv('MOBILEFORMER_OPS_CACHE', str(tmp_path / 'empty cache'))
    monkeypatch.setattr(cpu_ops, '_build', lambda: 'library')
    assert cpu_ops._kernels() == 'library' and cpu_ops._kernels() == 'library'
    out, err = capfd.readouterr()
    assert out == '' and len(err.splitlines()) == 1, err
    assert err.startswith('mobileformer: Compiling the CPU kernels') and 'empty cache' in err

    _fresh_state(monkeypatch)
    built = os.path.join(cpu_ops._cache_dir(), cpu_ops._NAME, cpu_ops._NAME + '.so')
    os.makedirs(os.path.dirname(built))
    open(built, 'w').close()
    assert cpu_ops._kernels() == 'library'
    assert capfd.readouterr() == ('', '')


def test_prepare_skips_models_without_kernel_layers(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(cpu_ops, '_build', lambda: pytest.fail('built for a model that does not use the kernels'))
    assert not cpu_ops.prepare(paddle.nn.Sequential(paddle.nn.Linear(2, 2)), pytest.fail)


def test_failed_build_is_stated_in_one_line_when_training_starts(monkeypatch, capfd):
    _fresh_state(monkeypatch)

    def failing_build():
        raise RuntimeError('no compiler (build log: /x/build.log)')

    monkeypatch.setattr(cpu_ops, '_build', failing_build)
    lines = []
    assert not cpu_ops.prepare(paddle.nn.Sequential(_KernelUser()), lines.append)
    assert lines[-1] == ('Notice: the CPU kernels did not build, so Mobile-Former runs on the slower Paddle-op '
                         'fallback: no compiler (build log: /x/build.log)')
    _check_fallback_result()  # the fallback computes, without a second attempt or a second notice
    assert capfd.readouterr().err == ''

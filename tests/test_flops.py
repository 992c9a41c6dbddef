import paddle
import paddle.nn as nn

from mobileformer.flops import count_madds, register_madds


class TinyNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1, groups=1)
        self.dw = nn.Conv2D(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.dw(self.conv(x))                      # [B, 8, 4, 4]
        tokens = x.flatten(2).transpose([0, 2, 1])     # [B, 16, 8]
        attn = paddle.matmul(tokens, tokens, transpose_y=True)   # [B, 16, 16]
        mixed = paddle.bmm(attn, tokens)               # [B, 16, 8]
        return self.fc(mixed.mean(1))


def test_counts_conv_linear_and_matmuls():
    madds = count_madds(TinyNet(), [2, 3, 8, 8])
    conv = 2 * 8 * 8 * 8 * 3 * 9
    depthwise = 2 * 8 * 4 * 4 * 1 * 9
    scores = 2 * 16 * 16 * 8
    mixing = 2 * 16 * 8 * 16
    linear = 2 * 5 * 8
    assert madds == conv + depthwise + scores + mixing + linear


def test_registered_rule_and_matmul_is_restored():
    original = paddle.matmul
    class Scale(nn.Layer):
        def forward(self, x):
            return x * 2

    register_madds(Scale)(lambda layer, inputs, output: int(output.size))
    assert count_madds(Scale(), [3, 4]) == 12
    assert paddle.matmul is original


def test_token_mixing_is_counted_once_where_its_kernel_does_not_run(monkeypatch):
    """Without the compiled kernels (a GPU, MOBILEFORMER_CPU_OPS=0) a TokenLinear runs a matmul,
    which its Linear rule already counts."""
    from mobileformer import cpu_ops
    from mobileformer.models.layers import TokenLinear

    layer = TokenLinear(6, 4)
    expected = 2 * 4 * 5 * 6  # [2, 6, 5] -> [2, 4, 5], 6 inputs per output
    assert count_madds(layer, [2, 6, 5]) == expected
    monkeypatch.setattr(cpu_ops, '_eligible', lambda *tensors: False)
    assert count_madds(layer, [2, 6, 5]) == expected

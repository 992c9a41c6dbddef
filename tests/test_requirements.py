"""requirements-gpu.txt is requirements.txt with the GPU build of Paddle from Paddle's own package index
(PyPI's paddlepaddle-gpu stops at 2.6.2): every other line is the same, so the two cannot drift."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirement_lines(name):
    with open(os.path.join(ROOT, name), encoding='utf-8') as f:
        return [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]


def test_the_gpu_requirements_differ_only_in_paddle():
    cpu, gpu = requirement_lines('requirements.txt'), requirement_lines('requirements-gpu.txt')
    cpu_paddle = [line for line in cpu if line.startswith('paddlepaddle')]
    gpu_paddle = [line for line in gpu if line.startswith(('paddlepaddle', '--extra-index-url'))]
    assert [line for line in cpu if line not in cpu_paddle] == [line for line in gpu if line not in gpu_paddle]
    version = re.fullmatch(r'paddlepaddle==([\d.]+)', cpu_paddle[0]).group(1)
    assert gpu_paddle == ['--extra-index-url https://www.paddlepaddle.org.cn/packages/stable/cu126/',
                          f'paddlepaddle-gpu=={version}']

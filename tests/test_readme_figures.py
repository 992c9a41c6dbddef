"""benchmarks/readme_figures.py against the pages: every figure README.md and docs/ mark is one the
script can re-measure, and its parsing and rewriting of the pages and of the commands' output.
Parsing only: nothing is trained here (the script itself runs the commands)."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import readme_figures as figures  # noqa: E402


def test_every_marked_figure_in_the_pages_is_one_the_script_produces():
    quoted = list(figures.documented())
    assert {page for page, _, _ in quoted} >= {'README.md', 'docs/deploy.md', 'docs/backbones.md'}
    assert [name for _, name, _ in quoted if name not in figures.FIGURES] == []


def test_no_figure_marker_is_left_open_or_unfilled():
    for page in figures.page_files():
        with open(page, encoding='utf-8') as f:
            text = f.read()
        assert text.count('<!-- figure:') == len(figures.marked_figures(text)), page
        assert text.count('<!-- /figure -->') == len(figures.marked_figures(text)), page
        assert all(value not in ('', '-') for _, value in figures.marked_figures(text)), page


def test_an_unclosed_marker_is_an_error():
    with pytest.raises(ValueError, match='not closed'):
        figures.marked_figures('| <!-- figure: mobileformer_26m.top1 --> |')


def test_rewrite_replaces_only_the_marked_values_and_keeps_code_spans():
    text = ('top-1 <!-- figure: a.b -->0.90<!-- /figure --> and <!-- figure: c -->`top1=0.9`<!-- /figure -->, '
            'not 0.90; <!-- figure: d -->1<!-- /figure -->')
    assert figures.marked_figures(text) == [('a.b', '0.90'), ('c', 'top1=0.9'), ('d', '1')]
    assert figures.rewrite(text, {'a.b': '0.95', 'c': 'top1=0.95'}) == (
        'top-1 <!-- figure: a.b -->0.95<!-- /figure --> and <!-- figure: c -->`top1=0.95`<!-- /figure -->, '
        'not 0.90; <!-- figure: d -->1<!-- /figure -->')


# what the commands print, as they print it (the last lines of train.py, eval.py, export.py, segment_digits.py)
TRAIN = 'epoch=16 lr=5.35955e-05 val_top1=0.955556\nDone: top1=0.9556 (best 0.9611); weights in out/best.pdparams and last.pdparams\n'
EVAL = 'eval: 6/6\ntop1=0.9556 top5=1.0000 loss=0.2349 samples=360\n'
EXPORT = ('INT8 keeps 32 layers in fp32: ...\n'
          'int8 in onnxruntime on 360 validation images: top-1 0.9556 (fp32 0.9583), top-1 agreement with fp32 99.72%\n'
          'int8 in openvino on 360 validation images: top-1 0.9250 (fp32 0.9583), top-1 agreement with fp32 93.33%\n'
          'notice: int8 is not faster than fp32 here: ...\n'
          'export/x runs int8 in onnxruntime (recorded in precision.json)\n')
SEGMENT = 'step 600/600 loss 0.1801\nloss 0.7166 -> 0.1801; held-out mIoU 0.5217 (true ink with random digits: 0.1402)\n'


def test_the_commands_outputs_are_parsed():
    assert figures.training_top1(TRAIN) == ('0.9556', '0.9611')
    assert figures.metrics_line(EVAL) == 'top1=0.9556 top5=1.0000 loss=0.2349 samples=360'
    checks = figures.precision_check(EXPORT, 'int8')
    assert checks['onnxruntime']['fp32'] == '0.9583' and not checks['onnxruntime']['left_out']
    assert figures._pair(checks, 'top1') == '0.9556 / 0.9250 (openvino left out by the check)'
    assert figures._pair(checks, 'agreement') == '99.72% / 93.33% (openvino left out by the check)'
    assert figures.segmentation(SEGMENT) == {'loss': '0.7166 -> 0.1801', 'miou': '0.5217', 'chance': '0.1402'}


def test_output_without_the_figure_is_an_error_naming_it():
    with pytest.raises(ValueError, match="train.py's Done line"):
        figures.training_top1('error: the loss is nan at epoch 3 step 5\n')
    with pytest.raises(ValueError, match='no bf16 accuracy check'):
        figures.precision_check(EXPORT, 'bf16')


def test_the_figures_are_produced_from_the_runs_they_name(tmp_path):
    """Each figure reads the log of its command; logs of complete runs are reused, not re-run."""
    logs = {'mobileformer_26m.train': TRAIN, 'mobileformer_26m.eval': EVAL, 'mobileformer_26m.int8': EXPORT}
    for name, text in logs.items():
        (tmp_path / f'{name}.log').write_text(text)
        (tmp_path / f'{name}.log.complete').write_text('')
    runs = figures.Runs(str(tmp_path), log=pytest.fail)  # would fail if any command ran
    produced = {name: figures.FIGURES[name](runs, 1) for name in
                ('mobileformer_26m.top1', 'mobileformer_26m.eval', 'mobileformer_26m.fp32_top1',
                 'mobileformer_26m.int8_top1', 'mobileformer_26m.int8_check', 'quickstart.seeds_best')}
    assert produced == {'mobileformer_26m.top1': '0.9556 / 0.9611',
                        'mobileformer_26m.eval': 'top1=0.9556 top5=1.0000 loss=0.2349 samples=360',
                        'mobileformer_26m.fp32_top1': '0.9583',
                        'mobileformer_26m.int8_top1': '0.9556 / 0.9250 (openvino left out by the check)',
                        'mobileformer_26m.int8_check': re.search(r'^int8 in onnxruntime.*$', EXPORT, re.M).group(0),
                        'quickstart.seeds_best': '0.9611 (0.9611-0.9611)'}

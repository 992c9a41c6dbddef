"""Re-measures the figures README.md and docs/ quote from the repository's own commands and prints
each beside the value the page shows; `-write` puts the measured values into the pages.

    python benchmarks/readme_figures.py                      # every marked figure: measure and compare
    python benchmarks/readme_figures.py -only 'quickstart*'  # some of them
    python benchmarks/readme_figures.py -write               # and rewrite the pages

A quoted figure is marked in the markdown by an HTML comment around its value, invisible on the
rendered page: `<!-- figure: NAME -->0.9556<!-- /figure -->`, or around a code span,
<!-- figure: NAME -->`top1=...`<!-- /figure --> (the backticks stay). Every NAME is one of `FIGURES`, the
output of a command that is cheap and repeats exactly on one CPU and thread count (the digits
recipes' training, evaluation and INT8 / bf16 export, examples/segment_digits.py). Speed figures
are not here: they change from run to run and are measured by bench.py and paired.py.

The commands run from the repository root, one after the other, with this Python, with their
outputs in `-workdir` (default: a temporary folder); a command whose log is already there from a
complete run is not run again, so an interrupted measurement continues with `-workdir DIR`.
"""
from __future__ import annotations

import fnmatch
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md', 'docs']  # files, or folders whose *.md files are read
MARKER = re.compile(r'<!-- figure: (?P<name>[\w.]+) -->(?P<tick>`?)(?P<value>.*?)(?P=tick)<!-- /figure -->')
DIGITS_MODELS = ('mobileformer_26m', 'mobileformer_26m_g1', 'resmlp_tiny')  # configs/digits/<name>.yaml
QUICKSTART = 'mobileformer_26m'  # train.py's default config
DEFAULT_SEEDS = 5


# ---- the pages ------------------------------------------------------------------------------------

def page_files(root: str = ROOT) -> List[str]:
    files = []
    for entry in PAGES:
        path = os.path.join(root, entry)
        files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith('.md')) if os.path.isdir(path) \
            else [path]
    return files


def marked_figures(text: str) -> List[Tuple[str, str]]:
    """(name, value) of every marked figure in `text`, in order. A marker without its end is an error."""
    found = [(m.group('name'), m.group('value')) for m in MARKER.finditer(text)]
    opened = text.count('<!-- figure:')
    if opened != len(found):
        raise ValueError(f'{opened - len(found)} figure marker(s) not closed by <!-- /figure --> on the same line')
    return found


def rewrite(text: str, values: Dict[str, str]) -> str:
    """`text` with the value of every marked figure named in `values` replaced; the rest unchanged."""
    def replace(match: re.Match) -> str:
        name = match.group('name')
        value = values.get(name, match.group('value'))
        tick = match.group('tick')
        return f'<!-- figure: {name} -->{tick}{value}{tick}<!-- /figure -->'
    return MARKER.sub(replace, text)


# ---- parsing what the commands print ---------------------------------------------------------------

def _search(pattern: str, output: str, what: str) -> re.Match:
    match = None
    for match in re.finditer(pattern, output, flags=re.M):
        pass  # the last one: a command's final summary comes last
    if match is None:
        raise ValueError(f'no {what} in the output (pattern {pattern!r})')
    return match


def training_top1(output: str) -> Tuple[str, str]:
    """(last, best) held-out top-1 of train.py's final line `Done: top1=0.9556 (best 0.9556); ...`."""
    match = _search(r'^Done: top1=([\d.]+) \(best ([\d.]+)\)', output, "train.py's Done line")
    return match.group(1), match.group(2)


def metrics_line(output: str) -> str:
    """eval.py's last line, `top1=... top5=... loss=... samples=N`."""
    return _search(r'^top1=\S+ top5=\S+ loss=\S+ samples=\d+$', output, "eval.py's metrics line").group(0)


def precision_check(output: str, precision: str) -> Dict[str, Dict[str, str]]:
    """Per runtime, export.py's accuracy check of `precision`: {'line', 'top1', 'fp32', 'agreement'};
    runtimes the check left out of the folder are marked `left_out`."""
    checks = {}
    pattern = (rf'^{precision} in (\w+) on \d+ validation images: top-1 ([\d.]+) \(fp32 ([\d.]+)\), '
               r'top-1 agreement with fp32 ([\d.]+%)$')
    for match in re.finditer(pattern, output, flags=re.M):
        checks[match.group(1)] = {'line': match.group(0), 'top1': match.group(2), 'fp32': match.group(3),
                                  'agreement': match.group(4), 'left_out': False}
    if not checks:
        raise ValueError(f"no {precision} accuracy check in export.py's output")
    runs = _search(rf'^\S+ runs {precision} in ([\w, ]+) \(recorded in precision.json\)$', output,
                   'line naming the runtimes of the export').group(1).split(', ')
    for runtime, check in checks.items():
        check['left_out'] = runtime not in runs
    return checks


def segmentation(output: str) -> Dict[str, str]:
    """examples/segment_digits.py's last line: losses, held-out mIoU, and the mIoU of a guess."""
    match = _search(r'^loss ([\d.]+) -> ([\d.]+); held-out mIoU ([\d.]+) \(true ink with random digits: ([\d.]+)\)$',
                    output, "segment_digits.py's result line")
    return {'loss': f'{match.group(1)} -> {match.group(2)}', 'miou': match.group(3), 'chance': match.group(4)}


# ---- running the commands --------------------------------------------------------------------------

class Runs:
    """Runs each command once into `workdir` (a log per command) and returns its output; a log
    left by a complete earlier run is read instead."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print) -> None:
        self.workdir, self.log = workdir, log

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def output(self, name: str, args: Sequence[str]) -> str:
        log_file = self.path(f'{name}.log')
        if os.path.exists(log_file + '.complete'):
            with open(log_file, encoding='utf-8') as f:
                return f.read()
        command = [sys.executable] + list(args)
        self.log(f'running: {" ".join(args)}')
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with open(log_file, 'w', encoding='utf-8') as f:
            f.write(done.stdout)
        if done.returncode != 0:
            tail = done.stdout.strip().splitlines()[-1:] or ['no output']
            raise RuntimeError(f'{" ".join(args)} exited with status {done.returncode}: {tail[0]} (log: {log_file})')
        open(log_file + '.complete', 'w').close()
        return done.stdout

    # the commands behind the figures
    def train(self, model: str, seed: int = 0) -> str:
        run = model if seed == 0 else f'{model}_seed{seed}'
        return self.output(f'{run}.train', ['train.py', '-cfg', f'configs/digits/{model}.yaml', '-output',
                                            self.path(run)] + (['-opts', 'SEED', str(seed)] if seed else []))

    def evaluate(self, model: str) -> str:
        self.train(model)
        return self.output(f'{model}.eval', ['eval.py', '-cfg', f'configs/digits/{model}.yaml', '-pretrained',
                                             self.path(f'{model}/best.pdparams')])

    def export(self, model: str, precision: str) -> str:
        self.train(model)
        return self.output(f'{model}.{precision}', ['export.py', '-cfg', f'configs/digits/{model}.yaml', '-pretrained',
                                                    self.path(f'{model}/best.pdparams'), '-output',
                                                    self.path(f'{model}_{precision}'), '-precision', precision])

    def evaluate_export(self, model: str, precision: str) -> str:
        self.export(model, precision)
        return self.output(f'{model}.{precision}.eval', ['eval.py', '-cfg', f'configs/digits/{model}.yaml', '-model',
                                                         self.path(f'{model}_{precision}')])

    def segment_digits(self) -> str:
        return self.output('segment_digits', ['examples/segment_digits.py'])


# ---- the figures -----------------------------------------------------------------------------------

def _pair(checks: Dict[str, Dict[str, str]], field: str) -> str:
    """'onnxruntime / openvino' values of `field`, noting a runtime the check left out."""
    text = ' / '.join(checks[r][field] for r in ('onnxruntime', 'openvino') if r in checks)
    left_out = [r for r in ('onnxruntime', 'openvino') if checks.get(r, {}).get('left_out')]
    return text + (f' ({", ".join(left_out)} left out by the check)' if left_out else '')


def _spread(values: List[float]) -> str:
    return f'{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})'


def _quickstart_seeds(runs: Runs, seeds: int, which: int) -> str:
    """Mean (min-max) over seeds 0..seeds-1 of the quickstart's last (which=0) or best (1) top-1."""
    return _spread([float(training_top1(runs.train(QUICKSTART, seed))[which]) for seed in range(seeds)])


def _digits_figures(model: str) -> Dict[str, Callable[[Runs, int], str]]:
    return {
        f'{model}.top1': lambda runs, seeds: ' / '.join(training_top1(runs.train(model))),
        f'{model}.eval': lambda runs, seeds: metrics_line(runs.evaluate(model)),
        f'{model}.fp32_top1': lambda runs, seeds: precision_check(runs.export(model, 'int8'), 'int8')['onnxruntime']['fp32'],
        f'{model}.int8_top1': lambda runs, seeds: _pair(precision_check(runs.export(model, 'int8'), 'int8'), 'top1'),
        f'{model}.int8_agreement': lambda runs, seeds: _pair(precision_check(runs.export(model, 'int8'), 'int8'),
                                                             'agreement'),
        f'{model}.int8_check': lambda runs, seeds: precision_check(runs.export(model, 'int8'), 'int8')['onnxruntime']['line'],
        f'{model}.int8_eval': lambda runs, seeds: metrics_line(runs.evaluate_export(model, 'int8')),
        f'{model}.bf16': lambda runs, seeds: '{top1}, {agreement}'.format(
            **precision_check(runs.export(model, 'bf16'), 'bf16')['openvino']),
    }


# name -> how to measure it (from the runs, and the number of quickstart seeds)
FIGURES: Dict[str, Callable[[Runs, int], str]] = {
    **{name: figure for model in DIGITS_MODELS for name, figure in _digits_figures(model).items()},
    'quickstart.seeds_last': lambda runs, seeds: _quickstart_seeds(runs, seeds, 0),
    'quickstart.seeds_best': lambda runs, seeds: _quickstart_seeds(runs, seeds, 1),
    'segment_digits.loss': lambda runs, seeds: segmentation(runs.segment_digits())['loss'],
    'segment_digits.miou': lambda runs, seeds: segmentation(runs.segment_digits())['miou'],
    'segment_digits.chance': lambda runs, seeds: segmentation(runs.segment_digits())['chance'],
}


def documented(root: str = ROOT) -> Iterator[Tuple[str, str, str]]:
    """(page, name, value) of every marked figure in the pages."""
    for page in page_files(root):
        with open(page, encoding='utf-8') as f:
            for name, value in marked_figures(f.read()):
                yield os.path.relpath(page, root), name, value


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mobileformer.cli import CommandParser, run, summary
    from mobileformer.cpu import cpu_description, cpu_threads

    parser = CommandParser(description=summary(__doc__))
    parser.add_argument('-only', nargs='+', default=['*'], metavar='PATTERN',
                        help="figures whose names match (fnmatch, e.g. 'quickstart*' 'mobileformer_26m.*')")
    parser.add_argument('-seeds', type=int, default=DEFAULT_SEEDS, help='quickstart seeds of quickstart.seeds_*')
    parser.add_argument('-workdir', default='', help='where the runs are kept (and reused); default a temporary folder')
    parser.add_argument('-write', action='store_true', help='rewrite the pages with the measured values')

    def measure(args: List[str]) -> int:
        options = parser.parse_args(args)
        quoted = list(documented())
        unknown = sorted({name for _, name, _ in quoted if name not in FIGURES})
        if unknown:
            raise ValueError(f'the pages mark figures this script cannot produce: {", ".join(unknown)}; '
                             f'known: {", ".join(FIGURES)}')
        names = [n for n in dict.fromkeys(name for _, name, _ in quoted)
                 if any(fnmatch.fnmatch(n, pattern) for pattern in options.only)]
        workdir = options.workdir or tempfile.mkdtemp(prefix='readme_figures_')
        os.makedirs(workdir, exist_ok=True)
        runs = Runs(workdir)
        # the figures repeat exactly on one CPU and thread count, not across them
        print(f'CPU: {cpu_description()}, {cpu_threads()} threads')
        values = {name: FIGURES[name](runs, options.seeds) for name in names}
        differ = 0
        for page, name, value in quoted:
            if name in values:
                same = value == values[name]
                differ += not same
                print(f'{page}: {name}: {"same" if same else "DIFFERENT"}: measured {values[name]!r}, page {value!r}')
        if options.write:
            for page in page_files():
                with open(page, encoding='utf-8') as f:
                    text = f.read()
                if rewrite(text, values) != text:
                    with open(page, 'w', encoding='utf-8') as f:
                        f.write(rewrite(text, values))
                    print(f'rewrote {os.path.relpath(page, ROOT)}')
        print(f'{len(values)} figures measured ({workdir}), {differ} quoted value(s) differ'
              + (' and were rewritten' if options.write and differ else ''))
        return 1 if differ and not options.write else 0

    return run(measure, argv)


if __name__ == '__main__':
    sys.exit(main())

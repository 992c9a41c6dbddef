"""README.md and docs/ against the code: every relative link reaches a file (and heading), every
path they name exists, every command in their bash blocks parses with its script's own argument
parser, and docs/configuration.md lists exactly the config keys and defaults the code has."""
from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shlex
import sys
from typing import Iterator, List, Tuple

import pytest

from mobileformer.config import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))

# `python <script>` and `python -m <module>` as the documents write them
SCRIPTS = {'train.py', 'eval.py', 'predict.py', 'export.py', 'benchmarks/bench.py', 'benchmarks/paired.py',
           'benchmarks/profile_ops.py', 'benchmarks/readme_figures.py', 'benchmarks/teacher_cost.py',
           'benchmarks/toolkit_step.py', 'examples/segment_digits.py'}
MODULES = {'mobileformer.convert', 'mobileformer.reparam', 'mobileformer.flops'}


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r'[`*_]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(page: str) -> set:
    text = re.sub(r'```.*?```', '', _read(page), flags=re.S)
    return {_slug(line.lstrip('#')) for line in text.splitlines() if re.match(r'#{1,6} ', line)}


def _links() -> Iterator[Tuple[str, str]]:
    for page in PAGES:
        text = re.sub(r'```.*?```', '', _read(page), flags=re.S)  # code blocks hold no links
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if not re.match(r'[a-z]+:', target):
                yield page, target


@pytest.mark.parametrize('page,target', list(_links()))
def test_every_relative_link_reaches_a_file_and_heading(page, target):
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
    assert os.path.exists(resolved), f'{page}: link to {target}: no such file'
    if anchor:
        assert anchor in _anchors(os.path.relpath(resolved, ROOT)), f'{page}: link to {target}: no such heading'


def test_every_named_config_and_repository_file_exists():
    pattern = re.compile(r'(?<![\w/.])((?:configs|docs|benchmarks|examples|mobileformer|tests|datasets)/[\w/.-]+\.(?:yaml|md|py|txt|npz|cc))')
    missing = [(page, path) for page in PAGES for path in pattern.findall(_read(page))
               if '/mine/' not in path and not os.path.exists(os.path.join(ROOT, path))]
    assert not missing


def _commands() -> Iterator[Tuple[str, List[str]]]:
    """(page, argv) of every `python ...` line in a bash block, continuation lines joined."""
    for page in PAGES:
        for block in re.findall(r'```bash\n(.*?)```', _read(page), flags=re.S):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split(' #')[0].strip()
                if line.startswith('python') and ' ... ' not in line + ' ':
                    yield page, shlex.split(line)


class _Parsed(BaseException):
    """Raised instead of running a command once its arguments are parsed."""


def _parse_only(monkeypatch) -> None:
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real_parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)


def _target(argv: List[str]) -> Tuple[str, str, List[str]]:
    """('script' | 'module', name, arguments) of a documented command line."""
    argv = argv[1:]
    if argv[:2] == ['-m', 'paddle.distributed.launch']:
        argv = argv[next(i for i, a in enumerate(argv) if a.endswith('.py')):]
    elif argv[:2] == ['-m', 'pytest']:
        return 'pytest', '', []
    if argv[0] == '-m':
        assert argv[1] in MODULES, f'undocumented module {argv[1]}'
        return 'module', argv[1], argv[2:]
    assert argv[0] in SCRIPTS, f'unknown script {argv[0]}'
    return 'script', argv[0], argv[1:]


@pytest.mark.parametrize('page,argv', list(_commands()), ids=lambda v: ' '.join(v) if isinstance(v, list) else v)
def test_every_documented_command_parses_with_its_own_parser(page, argv, monkeypatch):
    kind, name, args = _target(argv)
    if kind == 'pytest':
        return
    _parse_only(monkeypatch)
    monkeypatch.setattr(sys, 'argv', [name] + args)
    with pytest.raises(_Parsed):
        if kind == 'module':
            runpy.run_module(name, run_name='__main__', alter_sys=True)
        else:
            monkeypatch.chdir(ROOT)
            runpy.run_path(os.path.join(ROOT, name), run_name='__main__')


def _defaults(node, prefix: str = '') -> Iterator[Tuple[str, object]]:
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _defaults(value, f'{prefix}{key}.')
        else:
            yield prefix + key, value


def test_configuration_page_lists_every_key_with_its_default():
    rows = re.findall(r'^\| `([A-Z0-9_.]+)` \| `(.*?)` \|', _read('docs/configuration.md'), flags=re.M)
    documented = dict(rows)
    assert len(documented) == len(rows), 'a key is listed twice'
    assert documented == {key: repr(value) for key, value in _defaults(_C)}

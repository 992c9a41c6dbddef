"""What a new user meets first: one flag style in every command, images PIL refuses to open,
fine-tuning onto another input-channel count, and output free of noise."""
import argparse

import pytest

import benchmarks.bench as bench
import benchmarks.paired as paired
import eval as eval_script
import export as export_script
import predict as predict_script
import train as train_script
from mobileformer import cli, convert, flops, reparam, torch_io

# ------------------------------------------------------------------------------ one flag style
PARSERS = {'train.py': train_script.build_parser, 'eval.py': eval_script.build_parser,
           'predict.py': predict_script.build_parser, 'export.py': export_script.build_parser,
           'mobileformer.convert': convert.build_parser, 'mobileformer.reparam': reparam.build_parser,
           'mobileformer.flops': flops.build_parser, 'mobileformer.torch_io': torch_io.build_parser,
           'benchmarks/bench.py': bench.build_parser, 'benchmarks/paired.py': paired.build_parser}


def _values(action: argparse.Action) -> list:
    """Words that give `action` a value other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        value = [c for c in action.choices if c != action.default][0]
    else:
        value = {int: '3', float: '0.5'}.get(action.type, 'word')
    return [value, value] if action.nargs in ('+', '*') else [value]


def _minimal_argv(parser: argparse.ArgumentParser, tested: argparse.Action) -> list:
    """The required positionals and options other than `tested`, so that the parser accepts it."""
    argv = [w for a in parser._actions if not a.option_strings and a.nargs is None for w in _values(a)]
    for action in parser._actions:
        if action.option_strings and action.required and action is not tested:
            argv += [action.option_strings[0], *_values(action)]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            chosen = next(a for a in group._group_actions if a is not tested)
            argv += [chosen.option_strings[0], *_values(chosen)] if tested not in group._group_actions else []
    return argv


def _spellings(option: str) -> list:
    name = option.lstrip('-')
    return sorted({'-' + name, '--' + name, '--' + name.replace('_', '-')})


@pytest.mark.parametrize('command', PARSERS)
def test_every_option_takes_one_or_two_dashes(command):
    parser = PARSERS[command]()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert options
    for action in options:
        long_name = next(o for o in action.option_strings if len(o.lstrip('-')) > 1)
        parsed = []
        for spelling in _spellings(long_name):
            values = _values(action)
            namespace = parser.parse_args(_minimal_argv(parser, action) + [spelling, *values])
            parsed.append(getattr(namespace, action.dest))
        assert parsed[0] != action.default and all(p == parsed[0] for p in parsed), (long_name, parsed)


def test_two_dashes_with_equals_and_after_a_separator():
    parser = train_script.build_parser()
    assert parser.parse_args(['--epochs=2']).epochs == 2
    predict = predict_script.build_parser()
    args = predict.parse_args(['-cfg', 'c.yaml', '--model', 'm', '--', '--runtime'])
    assert args.images == ['--runtime'] and args.runtime == 'auto'


@pytest.mark.parametrize('command', PARSERS)
def test_help_ends_in_whole_sentences(command):
    parser = PARSERS[command]()
    assert parser.description.endswith('.') and '\n' not in parser.description, parser.description
    assert ' '.join(parser.format_help().split()).endswith(cli.FLAG_STYLE)

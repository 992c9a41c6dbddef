"""Converts released PyTorch weights into a Paddle `.pdparams` for one of our configs.

    python -m mobileformer.convert SRC -cfg FILE -output OUT.pdparams [-from NAME] [-key ENTRY] [-opts KEY VALUE ...]

SRC is a torch zip checkpoint (.pth / .pth.tar / .bin) or a .safetensors file, read without torch
(mobileformer.torch_io), or its URL: downloaded once into ~/.cache/mobileformer/weights and checked
against `-sha256` (or the checksum `mobileformer.weights.RELEASES` knows for that URL). The source format is detected from its keys unless `-from` names it. Every
converted key and shape is checked against the model the config builds; when MODEL.NUM_CLASSES
differs from the checkpoint's classifier (fine-tuning 1000 -> 10 classes), the classifier is left
out with a notice and keeps the model's fresh initialisation. OUT is written atomically.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import paddle
from yacs.config import CfgNode

from mobileformer import build_model, cli, get_config
from mobileformer.registry import Converter, converters
from mobileformer.torch_io import load_state_dict
from mobileformer.checkpoint import cast_like, check_state, classifier_to_drop, read_state_dict, save_weights
from mobileformer.weights import RELEASES, download, is_url


def _names(items: Iterable[str]) -> str:
    return ', '.join(sorted(items)) or '(none registered)'


def pick_converter(keys: Iterable[str], model_type: str, name: Optional[str] = None,
                   source: str = 'the checkpoint') -> Converter:
    """The converter `name`, else the one whose `detect` accepts `keys` and that feeds `model_type`."""
    registry = converters()
    if name is not None:
        if name not in registry:
            raise ValueError(f'unknown converter -from {name!r}; available: {_names(registry)}')
        chosen = registry[name]
        if model_type not in chosen.model_types:
            raise ValueError(f"converter {name!r} produces MODEL.TYPE {_names(chosen.model_types)}, but the config "
                             f"builds {model_type!r}; use a config of that family")
        return chosen
    keys = frozenset(keys)
    detected = [c for c in registry.values() if c.detect(keys)]
    fitting = [c for c in detected if model_type in c.model_types]
    if len(fitting) == 1:
        return fitting[0]
    if len(fitting) > 1:
        raise ValueError(f'{source} matches several converters ({_names(c.name for c in fitting)}); '
                         f'choose one with -from')
    if detected:
        raise ValueError(f"{source} is a checkpoint for converter {_names(c.name for c in detected)} "
                         f"(MODEL.TYPE {_names(t for c in detected for t in c.model_types)}), but the config "
                         f"builds MODEL.TYPE {model_type!r}; use a config of the checkpoint's model")
    raise ValueError(f"no converter recognises the keys of {source} (first keys: {_names(sorted(keys)[:3])}); "
                     f"pass -from with one of: {_names(registry)}")


def _lazy_model(config: CfgNode):
    """The model of `config` with shapes and dtypes but no allocated weights."""
    with paddle.LazyGuard():
        return build_model(config)


def convert_state(reference: Mapping[str, np.ndarray], config: CfgNode, converter: Converter,
                  what: str = 'the checkpoint', log: Callable[[str], None] = print) -> Dict[str, np.ndarray]:
    """`reference` mapped by `converter` and checked against the model of `config` (every key and
    shape); a classifier for another class count is left out with a notice. Returns our state in
    the model's dtypes."""
    state = converter.convert(reference, config)
    model = _lazy_model(config)
    dropped, source_classes = classifier_to_drop(state, model)
    if dropped:
        log(f'notice: classifier ({", ".join(dropped)}) left out: the checkpoint has {source_classes} classes, '
            f'MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES}; it keeps its fresh initialisation')
        state = {k: v for k, v in state.items() if k not in dropped}
    hint = converter.hint(reference.keys(), config) if converter.hint else None
    check_state(state, model, f'{what} converted by {converter.name!r}', allow_missing=dropped, hint=hint)
    return cast_like(state, model)


def local_file(src: str, sha256: Optional[str] = None, log: Callable[[str], None] = print) -> str:
    """`src` itself, or for a URL the downloaded file (checked against `sha256`, else against the
    checksum of the release with that URL when one is known)."""
    if not is_url(src):
        return src
    known = next((release.sha256 for release in RELEASES.values() if release.url == src), None)
    return download(src, sha256 or known, log)


PDPARAMS = '.pdparams'


def weights_state(src: str, config: CfgNode, sha256: Optional[str] = None,
                  log: Callable[[str], None] = print) -> Tuple[Dict[str, np.ndarray], Optional[str]]:
    """(our state dict, a hint for when it does not fit) from `src`: a .pdparams, or a PyTorch
    checkpoint mapped by the converter its keys call for; either may be a URL (see `local_file`).
    Not yet checked against a model: `mobileformer.checkpoint.fit_state` does that."""
    path = local_file(src, sha256, log)
    if path.endswith(PDPARAMS):
        return read_state_dict(path), None
    reference = load_state_dict(path)
    converter = pick_converter(reference, config.MODEL.TYPE, source=f"'{src}'")
    hint = converter.hint(reference.keys(), config) if converter.hint else None
    return converter.convert(reference, config), hint


def convert_checkpoint(src: str, config: CfgNode, out: str, source: Optional[str] = None,
                       key: Optional[str] = None, log: Callable[[str], None] = print,
                       sha256: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Reads `src` (a file or URL), converts and checks it against the model of `config`, writes
    `out`; returns our state."""
    reference = load_state_dict(local_file(src, sha256, log), key)
    converter = pick_converter(reference, config.MODEL.TYPE, source, source=f"'{src}'")
    state = convert_state(reference, config, converter, f"'{src}'", log)
    save_weights(state, out)
    count = sum(int(v.size) for v in state.values())
    log(f"converted '{src}' ({len(reference)} tensors, format {converter.name!r}) -> '{out}': "
        f'{len(state)} tensors, {count:,} values for {config.MODEL.NAME} ({config.MODEL.TYPE})')
    return state


def build_parser() -> cli.CommandParser:
    parser = cli.CommandParser(prog='python -m mobileformer.convert', description=cli.summary(__doc__))
    parser.add_argument('src', help='PyTorch checkpoint: .pth / .pth.tar / .bin (zip format) or .safetensors, or its '
                                    'URL (downloaded into ~/.cache/mobileformer/weights)')
    parser.add_argument('-cfg', required=True, help='config YAML of the target model')
    parser.add_argument('-output', '-o', required=True, help='output .pdparams')
    parser.add_argument('-from', dest='source', default=None,
                        help=f'source format (default: detected from the keys): {_names(converters())}')
    parser.add_argument('-key', default=None,
                        help='checkpoint entry holding the weights (default: state_dict, state_dict_ema, model)')
    parser.add_argument('-sha256', default=None,
                        help='checksum of a downloaded SRC: 64 hex digits or a prefix of at least 8')
    parser.add_argument('-opts', nargs='+', default=[], help='config overrides: KEY VALUE ...')
    return parser


def run(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    config = get_config(args.cfg, args.opts)
    convert_checkpoint(args.src, config, args.output, args.source, args.key, sha256=args.sha256)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

"""Turns a trained checkpoint into a deploy checkpoint by structural re-parameterisation.

    python -m mobileformer.reparam -cfg configs/repmlpnet_t224.yaml -pretrained trained.pdparams -o deploy.pdparams
    python eval.py -cfg configs/repmlpnet_t224.yaml -pretrained deploy.pdparams -opts MODEL.DEPLOY True

Builds the training structure of `-cfg`, loads the checkpoint (every key must match), folds every
re-parameterisable block (`re_parameterize_model`) and writes the folded state atomically (a temporary
file in the output's folder, then `os.replace`), so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import paddle
import paddle.nn as nn

from mobileformer import build_model, cli, get_config
from mobileformer.model_utils import has_foldable_layers, re_parameterize_model
from mobileformer.weights import save_atomic


def load_exact(model: nn.Layer, path: str) -> None:
    """Loads `path` into `model`, raising a ValueError unless every key and shape matches."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint '{path}' does not exist; pass the trained .pdparams file with -pretrained")
    try:
        state = paddle.load(path)
    except Exception as e:  # paddle raises assorted types for foreign or truncated files
        raise ValueError(f"checkpoint '{path}' could not be read as a Paddle state dict ({e}); "
                         'pass a .pdparams file written by paddle.save') from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict; "
                         'pass a .pdparams file of model.state_dict()')
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint '{path}' does not fit this config's training structure: "
                         f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(extra)} unexpected keys "
                         f"(e.g. {extra[:3]}); pass the config the model was trained with")
    wrong = [k for k in expected if list(state[k].shape) != list(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"checkpoint '{path}' has {len(wrong)} tensors of the wrong shape (e.g. {k}: "
                         f"{list(state[k].shape)} instead of {list(expected[k].shape)}); "
                         'pass the config the model was trained with')
    model.set_state_dict(state)


def reparameterize_checkpoint(cfg_file: str, pretrained: str, output: str,
                              opts: Optional[Sequence[str]] = None) -> nn.Layer:
    """Folds the checkpoint `pretrained` of the training model `cfg_file` into `output`; returns the
    folded model."""
    config = get_config(cfg_file, opts)
    if config.MODEL.DEPLOY:
        raise ValueError(f"{cfg_file} sets MODEL.DEPLOY True; pass the training config (DEPLOY False): "
                         'the command folds a training checkpoint into the deploy structure')
    model = build_model(config)
    if not has_foldable_layers(model):
        raise ValueError(f"MODEL.TYPE {config.MODEL.TYPE!r} has no re-parameterisable blocks; "
                         'its checkpoint is already a deploy checkpoint')
    load_exact(model, pretrained)
    re_parameterize_model(model)
    save_atomic(model.state_dict(), output)
    return model


def run(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description='Fold a trained checkpoint into its deploy structure.')
    parser.add_argument('-cfg', required=True, help='the training config, e.g. configs/repmlpnet_t224.yaml')
    parser.add_argument('-pretrained', required=True, help='trained checkpoint (.pdparams)')
    parser.add_argument('-o', '--output', required=True, help='where to write the deploy checkpoint')
    parser.add_argument('-opts', nargs='+', default=None, help='KEY VALUE config overrides')
    args = parser.parse_args(argv)
    reparameterize_checkpoint(args.cfg, args.pretrained, args.output, args.opts)
    print(f'wrote {args.output}: load it with -cfg {args.cfg} -opts MODEL.DEPLOY True')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

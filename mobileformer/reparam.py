"""Turns a trained checkpoint into a deploy checkpoint by structural re-parameterisation.

    python -m mobileformer.reparam -cfg configs/repmlpnet_t224.yaml -pretrained trained.pdparams -output deploy.pdparams
    python eval.py -cfg configs/repmlpnet_t224.yaml -pretrained deploy.pdparams -opts MODEL.DEPLOY True

Builds the training structure of `-cfg`, loads the checkpoint (every key must match), folds every
re-parameterisable block (`re_parameterize_model`) and writes the folded state atomically (a temporary
file in the output's folder, then `os.replace`), so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

from typing import Optional, Sequence

import paddle.nn as nn

from mobileformer import build_model, cli, get_config
from mobileformer.checkpoint import load_weights, save_weights
from mobileformer.models.model_utils import has_deploy_structure, re_parameterize_model


def reparameterize_checkpoint(cfg_file: str, pretrained: str, output: str,
                              opts: Optional[Sequence[str]] = None) -> nn.Layer:
    """Folds the checkpoint `pretrained` of the training model `cfg_file` into `output`; returns the
    folded model."""
    config = get_config(cfg_file, opts)
    if config.MODEL.DEPLOY:
        raise ValueError(f"{cfg_file} sets MODEL.DEPLOY True; pass the training config (DEPLOY False): "
                         'the command folds a training checkpoint into the deploy structure')
    model = build_model(config)
    if not has_deploy_structure(model):
        raise ValueError(f"MODEL.TYPE {config.MODEL.TYPE!r} has no deploy structure to fold into; its checkpoint "
                         'is already a deploy checkpoint (export.py applies inference folds by itself)')
    load_weights(model, pretrained)
    re_parameterize_model(model)
    save_weights(model.state_dict(), output)
    return model


def build_parser() -> cli.CommandParser:
    parser = cli.CommandParser(prog='python -m mobileformer.reparam',
                               description='Fold a trained checkpoint into its deploy structure.')
    parser.add_argument('-cfg', required=True, help='the training config, e.g. configs/repmlpnet_t224.yaml')
    parser.add_argument('-pretrained', required=True, help='trained checkpoint (.pdparams)')
    parser.add_argument('-output', '-o', required=True,
                        help='where to write the deploy checkpoint')
    parser.add_argument('-opts', nargs='+', default=None, help='KEY VALUE config overrides')
    return parser


def run(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    reparameterize_checkpoint(args.cfg, args.pretrained, args.output, args.opts)
    print(f'wrote {args.output}: load it with -cfg {args.cfg} -opts MODEL.DEPLOY True')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Errors the user can fix end the process with one line (mobileformer.cli; --debug: traceback)."""
    return cli.run(run, argv)


if __name__ == '__main__':
    main()

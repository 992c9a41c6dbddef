"""paddle.hub entry points: one per config file, named after it (configs/mobileformer_26m.yaml ->
`mobileformer_26m`).

    model = paddle.hub.load(REPO_DIR, 'mobileformer_26m', source='local', pretrained='mf26m.pdparams')
    paddle.hub.list(REPO_DIR, source='local'); paddle.hub.help(REPO_DIR, 'mobileformer_26m', source='local')

Every entry takes `pretrained` (a .pdparams, checked key by key) and `opts` (config overrides,
[KEY, VALUE, ...], e.g. ['MODEL.NUM_CLASSES', 10]). paddle.hub lists every public callable here, so
helpers are private.
"""
import glob as _glob
import os as _os

import mobileformer as _mobileformer
from mobileformer.checkpoint import load_weights as _load_weights

dependencies = ['paddle', 'yacs', 'yaml', 'numpy']

_CONFIGS = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), 'configs')


def _entry(name: str, cfg_file: str):
    def build(pretrained: str = None, opts: list = None):
        config = _mobileformer.get_config(cfg_file, opts)
        model = _mobileformer.build_model(config)
        if pretrained:
            _load_weights(model, pretrained)
            model.eval()
        return model

    config = _mobileformer.get_config(cfg_file)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f'{config.MODEL.NAME} ({config.MODEL.TYPE}, {config.MODEL.NUM_CLASSES} classes, '
                     f'{config.DATA.IMAGE_SIZE} px) from configs/{_os.path.basename(cfg_file)}.\n\n'
                     f'    pretrained: weights (.pdparams) to load; opts: config overrides [KEY, VALUE, ...].')
    return build


for _path in sorted(_glob.glob(_os.path.join(_CONFIGS, '*.yaml'))):
    _name = _os.path.splitext(_os.path.basename(_path))[0]
    globals()[_name] = _entry(_name, _path)

"""paddle.hub entry points: one per shipped model config, named after it (configs/mobileformer_26m.yaml ->
`mobileformer_26m`), each `mobileformer.create_model` of that name.

    model = paddle.hub.load(REPO_DIR, 'mobileformer_26m', source='local', pretrained='mf26m.pdparams')
    paddle.hub.list(REPO_DIR, source='local'); paddle.hub.help(REPO_DIR, 'mobileformer_26m', source='local')

Every entry takes create_model's arguments: `pretrained` (a .pdparams, checked key by key),
`num_classes`, `img_size`, `drop_rate`, `drop_path_rate`, `features_only`, `out_indices` and `opts`
(other config overrides, [KEY, VALUE, ...]). paddle.hub lists every public callable here, so
helpers are private.
"""
import mobileformer as _mobileformer

dependencies = ['paddle', 'yacs', 'yaml', 'numpy']


def _entry(name: str):
    def build(pretrained=None, **kwargs):
        return _mobileformer.create_model(name, pretrained, **kwargs)

    config = _mobileformer.get_config(name)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f'{config.MODEL.NAME} ({config.MODEL.TYPE}, {config.MODEL.NUM_CLASSES} classes, '
                     f'{config.DATA.IMAGE_SIZE} px) from configs/{name}.yaml.\n\n'
                     f'    mobileformer.create_model({name!r}, pretrained, **kwargs): pretrained weights (.pdparams), '
                     f'num_classes, img_size, features_only, out_indices, opts [KEY, VALUE, ...].')
    return build


for _name in _mobileformer.list_models():
    globals()[_name] = _entry(_name)

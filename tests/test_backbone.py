"""The backbone interface beyond the generic suite (tests/test_all_models.py): the strides and
channels of the released sizes, the token -> map layout, input sizes, bad input, the toolkit
adapters (against stand-ins for PaddleSeg and PaddleDetection, which are not dependencies) and a
dense head that learns (examples/segment_digits.py)."""
import os
import sys
import types
from collections import namedtuple

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from conftest import CONFIGS, load_example

from mobileformer import ConfigError, build_model, get_config, registry
from mobileformer.models.backbone import FeatureInfo, tokens_to_map
from mobileformer.checkpoint import load_weights



segment_digits = load_example('segment_digits')

MF26 = os.path.join(CONFIGS, 'mobileformer_26m.yaml')


def _cfg(name, *opts):
    return get_config(os.path.join(CONFIGS, name), list(opts))


def test_mobileformer_26m_features_are_the_four_stages_and_the_tokens():
    model = build_model(get_config(MF26), features_only=True)
    assert model.feature_info == [FeatureInfo('stride4', 12, 4), FeatureInfo('stride8', 24, 8),
                                  FeatureInfo('stride16', 64, 16), FeatureInfo('stride32', 96, 32)]
    assert model.feat_channels == [12, 24, 64, 96] and model.removed_layers == ('head', 'final_bridge')
    with_tokens = build_model(get_config(MF26, ['MODEL.OUT_INDICES', [1, 4]]))
    assert with_tokens.feature_info == [FeatureInfo('stride8', 24, 8), FeatureInfo('tokens', 128, 0)]
    assert with_tokens.removed_layers == ('head',)
    model.eval()
    # any input size, odd ones too: each stride-2 conv rounds the side up
    outputs = model(paddle.randn([1, 3, 100, 68]))
    assert [o.shape for o in outputs] == [[1, 12, 25, 17], [1, 24, 13, 9], [1, 64, 7, 5], [1, 96, 4, 3]]


def test_default_outputs_of_the_other_families():
    mixer = build_model(_cfg('mixer_s16_224.yaml'), features_only=True)
    assert mixer.out_indices == [1, 3, 5, 7] and mixer.feature_info[0] == FeatureInfo('block1', 512, 16)
    assert build_model(_cfg('resmlp_12_224.yaml'), features_only=True).out_indices == [2, 5, 8, 11]
    repmlpnet = build_model(_cfg('repmlpnet_t224.yaml', 'MODEL.REPMLPNET.DEPTHS', [1, 1, 1, 1]), features_only=True)
    assert [(i.channels, i.stride) for i in repmlpnet.feature_info] == [(64, 4), (128, 8), (256, 16), (512, 32)]


def test_token_features_are_the_patch_grid_in_row_major_order():
    config = _cfg('fnet_cifar_64.yaml', 'MODEL.FNET.DEPTH', 2)
    model = build_model(config)
    model.eval()
    x = paddle.randn([2, 3, 64, 64])
    tokens = model.forward_features(x).numpy()                      # [B, 64, C], 8x8 patches of 8 px
    last = model.forward_intermediates(x, [1])[0].numpy()            # [B, C, 8, 8]
    assert last.shape == (2, 256, 8, 8)
    for row, col in [(0, 0), (0, 7), (3, 5), (7, 0)]:
        np.testing.assert_array_equal(last[:, :, row, col], tokens[:, row * 8 + col, :])
    np.testing.assert_array_equal(tokens_to_map(paddle.to_tensor(tokens), 8, 8).numpy(), last)


@pytest.mark.parametrize('name, opts, size, message', [
    ('mixer_s16_224.yaml', ['DATA.IMAGE_SIZE', 64, 'MODEL.MIXER.DEPTH', 1], 80,
     'MlpMixer was built for 64x64 inputs, got 80x80; resize or pad'),
    ('fnet_cifar_64.yaml', ['MODEL.FNET.DEPTH', 1], 32, 'FNet was built for 64x64 inputs, got 32x32'),
    ('repmlpnet_t224.yaml', ['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLPNET.DEPTHS', [1, 1, 1, 1]], 96,
     'RepMLPNet was built for inputs whose sides are multiples of 64, got 96x96'),
    ('repmlp_res50_light_224.yaml', ['DATA.IMAGE_SIZE', 64, 'MODEL.REPMLP_RESNET.DEPTHS', [1, 2, 2, 1],
                                     'MODEL.REPMLP_RESNET.PARTITION', 4], 96, 'RepMLP-ResNet was built for 64x64'),
])
def test_an_input_size_a_fixed_size_model_cannot_take_is_one_sentence(name, opts, size, message):
    for features_only in (False, True):
        model = build_model(_cfg(name, *opts), features_only=features_only)
        with pytest.raises(ValueError, match=message):
            model(paddle.randn([1, 3, size, size]))


def test_sizes_a_family_accepts_work():
    repmlpnet = build_model(_cfg('repmlpnet_t224.yaml', 'DATA.IMAGE_SIZE', 64, 'MODEL.REPMLPNET.DEPTHS', [1, 1, 1, 1]),
                            features_only=True)
    assert [o.shape[2] for o in repmlpnet(paddle.randn([1, 3, 128, 192]))] == [32, 16, 8, 4]
    plain = build_model(_cfg('resnet50_repmlp_base.yaml', 'MODEL.REPMLP_RESNET.DEPTHS', [1, 1, 1, 1]))
    assert plain(paddle.randn([1, 3, 72, 72])).shape == [1, 1000]


@pytest.mark.parametrize('indices', [[4], [-5], [0, 0], [0, -4], [1.5]])
def test_out_indices_out_of_range_is_one_sentence(indices):
    with pytest.raises(ConfigError, match=r'MODEL.OUT_INDICES .* does not fit RepMLPResNet, which has 4 feature '
                                          r'outputs \(0 stage1, 1 stage2, 2 stage3, 3 stage4\); give distinct'):
        build_model(_cfg('resnet50_repmlp_base.yaml', 'MODEL.REPMLP_RESNET.DEPTHS', [1, 1, 1, 1]), out_indices=indices)


def test_out_indices_on_a_model_without_stages_is_one_sentence(monkeypatch):
    monkeypatch.setitem(registry._BUILDERS, 'mobileformer', lambda config: nn.Linear(4, 2))
    with pytest.raises(ConfigError, match='MODEL.TYPE mobileformer has no feature outputs'):
        build_model(get_config(opts=['MODEL.OUT_INDICES', [0]]))
    monkeypatch.undo()
    mf_without_stride4 = ['MODEL.MF.BLOCKS', [['lite', 3, 12, 1, 0]], 'MODEL.MF.GROUPS', 1]
    with pytest.raises(ConfigError, match='has no feature maps'):
        build_model(get_config(MF26, mf_without_stride4), features_only=True)


def test_feature_extractor_refuses_a_checkpoint_whose_trunk_does_not_fit(tmp_path):
    narrow = build_model(get_config(MF26, ['MODEL.MF.TOKEN_DIM', 64]))
    path = str(tmp_path / 'narrow.pdparams')
    paddle.save(narrow.state_dict(), path)
    with pytest.raises(ValueError, match=r"narrow.pdparams' does not fit the model: .*tokens: \[3, 64\] vs model "
                                          r"\[3, 128\].*; check that -cfg matches the checkpoint"):
        load_weights(build_model(get_config(MF26), features_only=True), path)
    with pytest.raises(ValueError, match='a feature extractor has no classifier'):
        build_model(get_config(MF26), features_only=True).reset_classifier(3)


def _install(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


def test_paddleseg_and_paddledetection_conventions(monkeypatch):
    from mobileformer import toolkits
    components = {}
    manager = types.SimpleNamespace(BACKBONES=types.SimpleNamespace(
        components_dict=components, add_component=lambda f: components.setdefault(f.__name__, f)))
    _install(monkeypatch, 'paddleseg')
    _install(monkeypatch, 'paddleseg.cvlibs', manager=manager)
    toolkits.register_paddleseg()
    seg = components['feature_backbone'](config=MF26, out_indices=[0, 3])
    assert seg.feat_channels == [12, 96]
    x = paddle.randn([1, 3, 64, 64])
    assert [o.shape for o in seg(x)] == [[1, 12, 16, 16], [1, 96, 2, 2]]

    registered = {}
    ShapeSpec = namedtuple('ShapeSpec', ['channels', 'height', 'width', 'stride'], defaults=[None] * 4)
    _install(monkeypatch, 'ppdet')
    _install(monkeypatch, 'ppdet.core')
    _install(monkeypatch, 'ppdet.core.workspace', global_config=registered, serializable=lambda cls: cls,
             register=lambda cls: registered.setdefault(cls.__name__, cls))
    _install(monkeypatch, 'ppdet.modeling')
    _install(monkeypatch, 'ppdet.modeling.shape_spec', ShapeSpec=ShapeSpec)
    cls = toolkits.register_paddledet()
    assert toolkits.register_paddledet() is cls and registered == {'DetBackbone': cls}
    det = cls(config=MF26, out_indices=[1, 2, 3])
    assert det.out_shape == [ShapeSpec(channels=24, stride=8), ShapeSpec(channels=64, stride=16),
                             ShapeSpec(channels=96, stride=32)]
    assert [o.shape for o in det({'image': x, 'im_shape': None})] == [[1, 24, 8, 8], [1, 64, 4, 4], [1, 96, 2, 2]]
    with pytest.raises(ConfigError, match='take feature maps, but out_indices \\[3, 4\\] include the tokens'):
        cls(config=MF26, out_indices=[3, 4])


def test_dense_head_on_features_learns_to_segment_digits():
    # from scratch, 300 steps of 8 canvases (about 20 s); measured: loss 0.94 -> 0.31, mIoU 0.37 on
    # canvases of held-out writers, where knowing the ink but guessing the digits gives 0.14
    result = segment_digits.train_and_evaluate(steps=300, batch_size=8, size=40, eval_canvases=128,
                                               log=lambda line: None)
    assert result.last_loss < 0.5 * result.first_loss, result
    assert result.miou > 2 * result.chance_miou, result

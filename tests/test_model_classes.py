"""Every model class built directly from plain arguments equals the model its builder makes from the
config that says the same: same parameter names and, after the same seed, the same values (the
initialisation lives in the classes, not in the builders)."""
import numpy as np
import paddle
import pytest

from mobileformer import build_model, get_config
from mobileformer.models.fnet import FNet
from mobileformer.models.mlp_mixer import MlpMixer
from mobileformer.models.mobile_former import MobileFormer
from mobileformer.models.repmlp_resnet import RepMLPResNet
from mobileformer.models.repmlpnet import RepMLPNet

MF_ROWS = [('lite', 3, 12, 2, 0), ('down', 6, 16, 2, 4), ('mf', 4, 16, 1, 0)]
SMALL_MIXER = ['DATA.IMAGE_SIZE', 32, 'MODEL.MIXER.PATCH_SIZE', 8, 'MODEL.MIXER.EMBED_DIM', 32, 'MODEL.MIXER.DEPTH', 2]
SMALL_REPMLPNET = ['DATA.IMAGE_SIZE', 32, 'MODEL.REPMLPNET.CHANNELS', [8, 16, 32, 64],
                   'MODEL.REPMLPNET.DEPTHS', [1, 1, 1, 1], 'MODEL.REPMLPNET.SHARESETS', [1, 2, 4, 8]]
# channels, depths, partitions (each stage's map at 32 px: 8, 4, 2, 1), sharesets, kernels
REPMLPNET_ARGS = ([8, 16, 32, 64], [1, 1, 1, 1], [8, 4, 2, 1], [1, 2, 4, 8], [1, 3])

# name: (-opts for build_model, the same model from the class)
CASES = {
    'mobileformer': (['MODEL.MF.BLOCKS', [list(row) for row in MF_ROWS], 'MODEL.MF.TOKEN_DIM', 32,
                      'MODEL.MF.GROUPS', 2, 'MODEL.NUM_CLASSES', 10, 'MODEL.DROPPATH', 0.1, 'MODEL.DROPOUT', 0.2],
                     lambda: MobileFormer(MF_ROWS, token_dim=32, groups=2, num_classes=10, drop_path=0.1, dropout=0.2)),
    'mixer': (['MODEL.TYPE', 'mixer'] + SMALL_MIXER,
              lambda: MlpMixer('mixer', image_size=32, patch_size=8, embed_dim=32, depth=2)),
    'gmlp': (['MODEL.TYPE', 'gmlp', 'MODEL.NUM_CLASSES', 10, 'MODEL.DROPPATH', 0.1] + SMALL_MIXER,
             lambda: MlpMixer('gmlp', image_size=32, patch_size=8, embed_dim=32, depth=2, num_classes=10,
                              drop_path=0.1)),
    'resmlp': (['MODEL.TYPE', 'resmlp', 'MODEL.MIXER.LAYERSCALE_INIT', 1e-5, 'DATA.IN_CHANNELS', 1,
                'DATA.MEAN', [0.5], 'DATA.STD', [0.5]] + SMALL_MIXER,
               lambda: MlpMixer('resmlp', image_size=32, patch_size=8, embed_dim=32, depth=2, layerscale_init=1e-5,
                                in_channels=1)),
    'fnet': (['MODEL.TYPE', 'fnet', 'DATA.IMAGE_SIZE', 32, 'MODEL.FNET.PATCH_SIZE', 8, 'MODEL.FNET.EMBED_DIM', 32,
              'MODEL.FNET.DEPTH', 2, 'MODEL.FNET.MLP_RATIO', 2.0],
             lambda: FNet(3, 32, 8, 32, 2, 2.0, 1000)),
    'repmlpnet': (['MODEL.TYPE', 'repmlpnet'] + SMALL_REPMLPNET + ['MODEL.NUM_CLASSES', 10],
                  lambda: RepMLPNet(*REPMLPNET_ARGS, num_classes=10)),
    'repmlpnet_deploy': (['MODEL.TYPE', 'repmlpnet'] + SMALL_REPMLPNET + ['MODEL.DEPLOY', True],
                         lambda: RepMLPNet(*REPMLPNET_ARGS, deploy=True)),
    'repmlp_resnet': (['MODEL.TYPE', 'repmlp_resnet', 'DATA.IMAGE_SIZE', 64, 'MODEL.REPMLP_RESNET.DEPTHS', [1, 2, 2, 1],
                       'MODEL.REPMLP_RESNET.PARTITION', 4],
                      lambda: RepMLPResNet([1, 2, 2, 1], 'light', 64, 4, [1, 3, 5], 1, 4, [2, 4])),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_class_built_directly_equals_the_builders_model(name):
    opts, make = CASES[name]
    paddle.seed(0)
    built = build_model(get_config(opts=opts)).state_dict()
    paddle.seed(0)
    direct = make().state_dict()
    assert list(direct) == list(built)
    for key, value in built.items():
        assert direct[key].shape == value.shape, key
        np.testing.assert_array_equal(direct[key].numpy(), value.numpy(), err_msg=key)

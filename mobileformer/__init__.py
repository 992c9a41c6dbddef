"""Efficient vision backbones in PaddlePaddle: Mobile-Former and the MLP family.

Importing a model module registers its builder (and weight converters) with `build_model`.
"""
import importlib
import os
import sys
import warnings

# Notices of Paddle that tell a user of this repository nothing: ccache (for compiling custom
# operators) is missing, printed at every `import paddle`; BatchNorm tracks running statistics,
# printed by every training forward; paddle.Model copies label tensors; its own zeros_like asks a
# traced tensor for its place (FNet's export, once per layer). Filtered before Paddle is imported:
# every command imports this package first.
warnings.filterwarnings('ignore', message='No ccache found')
warnings.filterwarnings('ignore', message='When training, we now always track global mean and variance')
warnings.filterwarnings('ignore', message='To copy construct from a tensor')
warnings.filterwarnings('ignore', message="Tensor do not have 'place' interface for pir graph mode")
# Paddle's C++ log below errors (glog INFO and WARNING) is internal detail, e.g. a notice that PIR
# "not support input out tensor" at every export; GLOG_minloglevel=0 brings it back.
os.environ.setdefault('GLOG_minloglevel', '2')

from mobileformer.cpu import forget_paddles_omp_default, prefer_mkl_avx2_on_amd  # noqa: E402  (after the filters)

prefer_mkl_avx2_on_amd()
import paddle  # noqa: E402,F401  (sets OMP_NUM_THREADS=1 where it is unset, undone below)

forget_paddles_omp_default()

from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models
from mobileformer.models import FAMILIES, SHARED  # noqa: E402
from mobileformer.models.mobile_former import build_mformer
from mobileformer.models.mlp_mixer import build_gmlp, build_mixer, build_resmlp
from mobileformer.models.fnet import build_fnet
from mobileformer.models.repmlpnet import RepMLPNet, build_repmlpnet
from mobileformer.models.repmlp_resnet import RepMLP, RepMLPResNet, build_repmlp_resnet

# Until release 0.3 the model modules sat directly in this package: their old paths
# (`from mobileformer.mobile_former import MobileFormer`) stay importable as the same modules.
for _name in FAMILIES + SHARED:
    globals()[_name] = sys.modules[f'{__name__}.{_name}'] = importlib.import_module(f'{__name__}.models.{_name}')

__all__ = ['ConfigError', 'get_config', 'build_model', 'register_model', 'registered_models',
           'build_mformer', 'build_mixer', 'build_gmlp', 'build_resmlp', 'build_fnet',
           'RepMLPNet', 'build_repmlpnet', 'RepMLP', 'RepMLPResNet', 'build_repmlp_resnet']

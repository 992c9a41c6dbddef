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
# every command imports this package first (a script that imported Paddle before has seen the ccache one).
warnings.filterwarnings('ignore', message='No ccache found')
warnings.filterwarnings('ignore', message='When training, we now always track global mean and variance')
warnings.filterwarnings('ignore', message='To copy construct from a tensor')
warnings.filterwarnings('ignore', message="Tensor do not have 'place' interface for pir graph mode")

from mobileformer.cpu import (forget_paddles_omp_default, prefer_mkl_avx2_on_amd, quiet_paddle_log,  # noqa: E402
                              use_cpu_threads)  # (after the filters)

# The CPU set-up every user of the package gets, documented with its opt-outs in mobileformer/cpu.py.
prefer_mkl_avx2_on_amd()
import paddle  # noqa: E402,F401  (sets OMP_NUM_THREADS=1 where it is unset, undone below)

forget_paddles_omp_default()
use_cpu_threads()
quiet_paddle_log()

from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models
from mobileformer.models import FAMILIES, SHARED  # noqa: E402
from mobileformer.models.mobile_former import build_mformer
from mobileformer.models.mlp_mixer import build_gmlp, build_mixer, build_resmlp
from mobileformer.models.fnet import build_fnet
from mobileformer.models.repmlpnet import RepMLPNet, build_repmlpnet
from mobileformer.models.repmlp_resnet import RepMLP, RepMLPResNet, build_repmlp_resnet
from mobileformer.factory import create_model, list_models

# The model modules used to sit directly in this package: their old paths
# (`from mobileformer.mobile_former import MobileFormer`) stay importable as the same modules.
for _name in FAMILIES + SHARED:
    globals()[_name] = sys.modules[f'{__name__}.{_name}'] = importlib.import_module(f'{__name__}.models.{_name}')

__all__ = ['ConfigError', 'get_config', 'create_model', 'list_models', 'build_model', 'register_model', 'registered_models',
           'build_mformer', 'build_mixer', 'build_gmlp', 'build_resmlp', 'build_fnet',
           'RepMLPNet', 'build_repmlpnet', 'RepMLP', 'RepMLPResNet', 'build_repmlp_resnet']

"""Efficient vision backbones in PaddlePaddle: Mobile-Former and the MLP family."""
from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models

__all__ = ['ConfigError', 'get_config', 'build_model', 'register_model', 'registered_models']

from mobileformer.repmlp_resnet import RepMLP, RepMLPResNet, build_repmlp_resnet  # noqa: E402
from mobileformer.repmlpnet import RepMLPNet, build_repmlpnet  # noqa: E402

__all__ += ['RepMLPNet', 'build_repmlpnet', 'RepMLP', 'RepMLPResNet', 'build_repmlp_resnet']

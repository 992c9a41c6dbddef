"""Efficient vision backbones in PaddlePaddle: Mobile-Former and the MLP family."""
from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models

__all__ = ['ConfigError', 'get_config', 'build_model', 'register_model', 'registered_models']
from mobileformer.mobile_former import build_mformer  # noqa: E402  (registers 'mobileformer')

__all__ += ['build_mformer']

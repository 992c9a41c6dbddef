"""Efficient vision backbones in PaddlePaddle: Mobile-Former and the MLP family."""
from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models
from mobileformer.repmlp_resnet import RepMLP, RepMLPResNet, build_repmlp_resnet
from mobileformer.repmlpnet import RepMLPNet, build_repmlpnet

__all__ = ['ConfigError', 'get_config', 'build_model', 'register_model', 'registered_models',
           'RepMLPNet', 'build_repmlpnet', 'RepMLP', 'RepMLPResNet', 'build_repmlp_resnet']

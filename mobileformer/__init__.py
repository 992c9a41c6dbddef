"""Efficient vision backbones in PaddlePaddle: Mobile-Former and the MLP family."""
from mobileformer.config import ConfigError, get_config
from mobileformer.registry import build_model, register_model, registered_models
from mobileformer.mlp_mixer import build_gmlp, build_mixer, build_resmlp
from mobileformer.fnet import build_fnet
from mobileformer.repmlp_resnet import RepMLP, RepMLPResNet, build_repmlp_resnet
from mobileformer.repmlpnet import RepMLPNet, build_repmlpnet

__all__ = ['ConfigError', 'get_config', 'build_model', 'register_model', 'registered_models',
           'build_mixer', 'build_gmlp', 'build_resmlp', 'build_fnet', 'RepMLPNet', 'build_repmlpnet',
           'RepMLP', 'RepMLPResNet', 'build_repmlp_resnet']
from mobileformer.mobile_former import build_mformer  # noqa: E402  (registers 'mobileformer')

__all__ += ['build_mformer']

"""Flax models: the UNet with its PPD user branch (and, from other modules, the VAE and CLIP)."""
from ppd_jax.models.family import build_model, init_params
from ppd_jax.models.personalized import PersonalizedUNet, is_user_param, merge_params, split_params
from ppd_jax.models.unet import UNet2DConditionModel, UNetConfig
from ppd_jax.models.user_projector import UserProjector

__all__ = [
    "PersonalizedUNet", "UNet2DConditionModel", "UNetConfig", "UserProjector", "build_model",
    "init_params", "is_user_param", "merge_params", "split_params",
]

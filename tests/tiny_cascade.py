"""Tiny random diffusers StableCascadeUNets (Stage C and Stage B) and their Flax params.

TINY_C / TINY_B are the reference doc's configs (shared/reference/stable-cascade.md 5.1): every
block type, Stage C's 1x1 level switch, Stage B's k2 s2 (de)convs, repeat mappers (3, 3, 2, 2),
the effnet and pixels mappers. Every parameter is random: PyTorch's default init for the Linear
and Conv weights and biases, normal noise for GlobalResponseNorm's zero-initialised gamma/beta
(zeros would make every GRN the identity and hide its bugs).
"""
import torch_layout

# The layout helpers, as the cascade tests call them (tc.nchw, tc.nhwc, tc.state_dict).
nchw, nhwc, state_dict = torch_layout.nchw, torch_layout.nhwc, torch_layout.state_dict

R, T, A = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"

TINY_C = dict(
    in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
    conditioning_dim=32, block_out_channels=[32, 32], num_attention_heads=[2, 2],
    down_num_layers_per_block=[1, 2], up_num_layers_per_block=[2, 1],
    down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[[R, T, A], [R, T, A]], clip_text_in_channels=24,
    clip_text_pooled_in_channels=24, clip_image_in_channels=16, clip_seq=4, kernel_size=3,
    dropout=[0.0, 0.0], self_attn=True, timestep_conditioning_type=["sca", "crp"],
    switch_level=[False])
TINY_B = dict(
    in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=2,
    conditioning_dim=32, block_out_channels=[8, 16, 32, 32], num_attention_heads=[0, 0, 2, 2],
    down_num_layers_per_block=[1, 1, 2, 1], up_num_layers_per_block=[1, 2, 1, 1],
    down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[3, 3, 2, 2],
    block_types_per_layer=[[R, T], [R, T], [R, T, A], [R, T, A]],
    clip_text_pooled_in_channels=24, clip_seq=4, effnet_in_channels=16,
    pixel_mapper_in_channels=3, kernel_size=3, dropout=[0.0] * 4, self_attn=True,
    timestep_conditioning_type=["sca"])


def torch_unet(config: dict, seed: int = 0, grn_std: float = 0.5):
  """diffusers' StableCascadeUNet(**config) in eval mode, GRN gamma/beta randomised."""
  import torch
  from diffusers import StableCascadeUNet
  torch.manual_seed(seed)
  model = StableCascadeUNet(**config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith((".gamma", ".beta")):
        p.copy_(grn_std * torch.randn(p.shape, generator=gen))
  return model


def patch_r_embedding(model):
  """diffusers' r embedding with our float32 frequency table (the reference doc, 5.1): its exp
  differs from XLA's by an ulp, which moves the 1e4-rad phases by up to 5e-4. Tested apart
  (test_cascade_unet.py, against the unpatched torch and a float64 formula)."""
  import types

  import torch

  from ppd_jax.models import cascade_ops

  def embed(self, r, max_positions=10000):
    dim = self.config.timestep_ratio_embedding_dim
    phase = (r * max_positions)[:, None] * torch.from_numpy(cascade_ops.ratio_frequencies(dim))
    return torch.cat([phase.sin(), phase.cos()], dim=1)
  model.get_timestep_ratio_embedding = types.MethodType(embed, model)
  return model


def flax_params(state: dict, cfg, what: str = "tiny StableCascadeUNet") -> dict:
  """torch state dict (numpy) -> StableCascadeUNet params, the target tree from jax.eval_shape."""
  from ppd_jax.models import cascade
  from ppd_jax.models import personalized_cascade
  from ppd_jax.weights import convert
  target = personalized_cascade.abstract_params(cascade.StableCascadeUNet(cfg))
  return convert.to_flax(state, target, what=what, transposed=cascade.TRANSPOSED)



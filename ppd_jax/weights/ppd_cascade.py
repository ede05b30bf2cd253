"""PPD's user branch on diffusers' StableCascadeUNet (Stage C, the prior), in PyTorch.

`python -m ppd_jax.export` copies this file next to the exported weights; it needs only torch and
diffusers (ppd_jax never imports it). diffusers has no IP-Adapter loader for Stable Cascade, so
this file sets an attention processor on every SDCascadeAttnBlock's Attention that computes what
ppd_jax's CascadeAttention (models/cascade_blocks.py) computes:

    out = to_out( A(q, to_k(kv), to_v(kv)) + s m_b A(q, to_k_user(u), to_v_user(u)) ),  q = to_q(x)

u = user_projector(user embedding): the user tokens [n, K, conditioning_dim]; s the user scale;
m_b the row mask. StableCascadePriorPipeline runs classifier-free guidance as one batch in the
order [cond; uncond] (the reverse of Stable Diffusion's), and PPD samples with the user branch off
in the unconditional half, so with 2n rows m = [1]*n + [0]*n; with n rows (guidance_scale <= 1)
m = 1. The weights file holds, keyed by diffusers' module paths:

    user_projector.proj.weight [K*D, E], .proj.bias, .norm.weight, .norm.bias   (one-token E)
    user_projector.proj_0 / proj_2 / proj_3 .weight, .bias                       (T-token E)
    <block>.attention.to_k_user.weight, <block>.attention.to_v_user.weight [C, D]

Use:
    import ppd_cascade
    from safetensors.torch import load_file
    user = ppd_cascade.attach(pipe.prior, load_file("ppd_cascade_user.safetensors"))
    user.set(user_embedding, num_images=len(prompts) * num_images_per_prompt, scale=1.0)
    out = pipe(prompts, num_images_per_prompt=num_images_per_prompt, guidance_scale=4.0)
    user.set(None)    # the base model again (or user.detach() to restore diffusers' processors)
"""
import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR = "user_projector."
TO_K, TO_V = ".to_k_user.weight", ".to_v_user.weight"


class UserProjector(nn.Module):
  """ppd_jax's models/user_projector.py: a one-token embedding [n, 1, E] -> K tokens
  LayerNorm(reshape(W e + b, [K, D])); a T-token one [n, T, E] -> T tokens
  LayerNorm(W2 gelu(W1 e + b1) + b2) (exact GELU). LayerNorm eps 1e-5."""

  def __init__(self, state_dict):
    super().__init__()
    self.single = PROJECTOR + "proj.weight" in state_dict
    get = lambda name: state_dict[PROJECTOR + name]
    if self.single:
      kd, e = get("proj.weight").shape
      self.dim = get("norm.weight").shape[0]
      self.tokens = kd // self.dim
      self.proj = nn.Linear(e, kd)
      self.norm = nn.LayerNorm(self.dim, eps=1e-5)
      names = ("proj", "norm")
    else:
      d, e = get("proj_2.weight").shape
      self.dim = d
      self.proj_0, self.proj_2 = nn.Linear(e, e), nn.Linear(e, d)
      self.proj_3 = nn.LayerNorm(d, eps=1e-5)
      names = ("proj_0", "proj_2", "proj_3")
    self.embed_dim = e
    with torch.no_grad():
      for name in names:
        module = getattr(self, name)
        module.weight.copy_(get(name + ".weight"))
        module.bias.copy_(get(name + ".bias"))

  def forward(self, embedding):
    if self.single:
      if embedding.shape[1] != 1:
        raise ValueError(f"this export takes a one-token user embedding [n, 1, "
                         f"{self.embed_dim}], got {tuple(embedding.shape)}")
      x = self.proj(embedding[:, 0])
      return self.norm(x.reshape(x.shape[0], self.tokens, self.dim))
    return self.proj_3(self.proj_2(F.gelu(self.proj_0(embedding))))


class UserBranch:
  """The user state every processor of one prior reads: tokens [n, K, D] (None: off), scale."""

  def __init__(self, projector, originals):
    self.projector, self._originals = projector, originals
    self.tokens, self.scale = None, 0.0

  def set(self, user_embedding, num_images=None, scale=1.0):
    """user_embedding: [T, E] (one user for every image), [n, T, E] (one per image, e.g. a
    mix), or None (the base model). num_images: n = len(prompts) * num_images_per_prompt,
    needed for [T, E]; the prior's batch must then be n (no CFG) or 2n ([cond; uncond])."""
    if user_embedding is None:
      self.tokens, self.scale = None, 0.0
      return
    p = next(self.projector.parameters())
    e = torch.as_tensor(user_embedding).to(device=p.device, dtype=p.dtype)
    if e.ndim == 2:
      if num_images is None:
        raise ValueError("set: a [T, E] user embedding needs num_images "
                         "(len(prompts) * num_images_per_prompt)")
      e = e[None].expand(int(num_images), -1, -1)
    elif e.ndim != 3 or (num_images is not None and e.shape[0] != num_images):
      raise ValueError(f"set: user_embedding {tuple(e.shape)} must be [T, E] or "
                       f"[num_images={num_images}, T, E]")
    if e.shape[-1] != self.projector.embed_dim:
      raise ValueError(f"set: user_embedding has width {e.shape[-1]}, the export takes "
                       f"{self.projector.embed_dim}")
    with torch.no_grad():
      self.tokens = self.projector(e)
    self.scale = float(scale)

  def rows(self, batch: int):
    """(tokens [batch, K, D], mask [batch, 1, 1, 1]) for a prior batch of n or 2n rows."""
    n = self.tokens.shape[0]
    if batch == n:
      return self.tokens, None
    if batch == 2 * n:   # [cond; uncond]: the user branch is off in the uncond half
      mask = torch.cat([torch.ones(n), torch.zeros(n)]).to(self.tokens)
      return torch.cat([self.tokens, self.tokens]), mask.view(2 * n, 1, 1, 1)
    raise ValueError(f"the prior got a batch of {batch} rows but the user was set for {n} "
                     f"images: set(..., num_images=len(prompts) * num_images_per_prompt)")

  def detach(self):
    """Gives every attention block its processor from before `attach` back."""
    for attn, processor in self._originals:
      attn.set_processor(processor)
    self._originals = []


class PPDCascadeAttnProcessor(nn.Module):
  """AttnProcessor2_0 for SDCascadeAttnBlock's Attention plus the user branch (module doc)."""

  def __init__(self, to_k_user, to_v_user, user: UserBranch):
    super().__init__()
    channels, token_dim = to_k_user.shape
    self.to_k_user = nn.Linear(token_dim, channels, bias=False)
    self.to_v_user = nn.Linear(token_dim, channels, bias=False)
    with torch.no_grad():
      self.to_k_user.weight.copy_(to_k_user)
      self.to_v_user.weight.copy_(to_v_user)
    self.user = user

  def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
              temb=None, *args, **kwargs):
    if attention_mask is not None or attn.group_norm is not None or attn.norm_cross or \
            attn.spatial_norm is not None or attn.residual_connection:
      raise ValueError("PPDCascadeAttnProcessor supports SDCascadeAttnBlock's plain "
                       "Attention only (no mask, norms or residual)")
    x = hidden_states
    shape = x.shape
    if x.ndim == 4:   # [B, C, H, W] -> [B, HW, C]
      x = x.view(shape[0], shape[1], -1).transpose(1, 2)
    kv = x if encoder_hidden_states is None else encoder_hidden_states
    b, heads = x.shape[0], attn.heads

    def split(t):   # [B, L, C] -> [B, heads, L, C / heads]
      return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    q = split(attn.to_q(x))
    out = F.scaled_dot_product_attention(q, split(attn.to_k(kv)), split(attn.to_v(kv)))
    if self.user.tokens is not None and self.user.scale != 0.0:
      tokens, mask = self.user.rows(b)
      tokens = tokens.to(q.dtype)
      user = F.scaled_dot_product_attention(q, split(self.to_k_user(tokens)),
                                            split(self.to_v_user(tokens)))
      out = out + self.user.scale * (user if mask is None else mask.to(q.dtype) * user)
    out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
    out = attn.to_out[1](attn.to_out[0](out))
    if len(shape) == 4:
      out = out.transpose(-1, -2).reshape(shape)
    return out / attn.rescale_output_factor


def _attention_modules(prior) -> dict:
  from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock
  return {name + ".attention": module.attention for name, module in prior.named_modules()
          if isinstance(module, SDCascadeAttnBlock)}


def attach(prior, state_dict) -> UserBranch:
  """Sets PPDCascadeAttnProcessor on every attention block of `prior` (a StableCascadeUNet)
  with the exported weights, in the prior's dtype and device; returns the UserBranch to `set`.
  The file's layers must be exactly the prior's attention blocks (else: the wrong prior)."""
  blocks = _attention_modules(prior)
  layers = {k[:-len(TO_K)] for k in state_dict if k.endswith(TO_K)}
  known = {layer + suffix for layer in layers for suffix in (TO_K, TO_V)}
  unknown = sorted(k for k in state_dict if k not in known and not k.startswith(PROJECTOR))
  missing, extra = sorted(set(blocks) - layers), sorted(layers - set(blocks))
  if missing or extra or unknown:
    raise ValueError(f"attach: the weights do not fit this prior: {len(missing)} attention "
                     f"block(s) without user weights {missing[:3]}, {len(extra)} layer(s) the "
                     f"prior lacks {extra[:3]}, unknown keys {unknown[:3]}")
  p = next(prior.parameters())
  projector = UserProjector(state_dict).to(device=p.device, dtype=p.dtype)
  if projector.dim != prior.config.conditioning_dim:
    raise ValueError(f"attach: the user tokens are {projector.dim} wide, the prior's "
                     f"conditioning_dim is {prior.config.conditioning_dim}")
  user = UserBranch(projector, [(a, a.processor) for a in blocks.values()])
  for name, attn in blocks.items():
    k, v = state_dict[name + TO_K], state_dict[name + TO_V]
    want = (attn.to_q.out_features, projector.dim)
    if tuple(k.shape) != want or tuple(v.shape) != want:
      raise ValueError(f"attach: {name} user weights {tuple(k.shape)}, {tuple(v.shape)}; "
                       f"the prior needs {want}")
    attn.set_processor(PPDCascadeAttnProcessor(k, v, user).to(device=p.device, dtype=p.dtype))
  return user

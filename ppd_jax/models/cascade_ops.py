"""Stable Cascade's tensor helpers on NHWC arrays, each equal to the PyTorch op diffusers uses.

    pixel_unshuffle / pixel_shuffle   torch's PixelUnshuffle / PixelShuffle channel order
    resize_align_corners              F.interpolate(mode="bilinear", align_corners=True);
                                      jax.image.resize samples at half-pixel centres instead
    timestep_ratio_embedding          StableCascadeUNet.get_timestep_ratio_embedding, float32
"""
import jax
import jax.numpy as jnp
import numpy as np


def pixel_unshuffle(x: jax.Array, p: int) -> jax.Array:
  """[B, H p, W p, C] -> [B, H, W, C p^2]; out channel c p^2 + i p + j = in pixel (h p + i, w p + j)
  of channel c, as torch's PixelUnshuffle."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c)            # [B, H, i, W, j, C]
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // p, w // p, c * p * p)


def pixel_shuffle(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C p^2] -> [B, H p, W p, C]: the inverse of pixel_unshuffle (torch's PixelShuffle)."""
  if p == 1:
    return x
  b, h, w, cpp = x.shape
  x = x.reshape(b, h, w, cpp // (p * p), p, p)         # [B, H, W, C, i, j]
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * p, w * p, cpp // (p * p))


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] linear interpolation weights with the end pixels' centres aligned:
  output i samples s = i (n_in - 1) / (n_out - 1) (s = 0 when n_out == 1), between floor(s) and
  floor(s) + 1 with weights 1 - frac(s), frac(s)."""
  src = np.zeros(1) if n_out == 1 else np.arange(n_out) * ((n_in - 1) / (n_out - 1))
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m.astype(np.float32)


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of [B, H, W, C] to `size`, align_corners=True: y = M_h x M_w^T per channel.

  Computed in float32 at full matmul precision (diffusers upcasts too), returned in x's dtype."""
  h, w = size
  if (h, w) == tuple(x.shape[1:3]):
    return x
  hp = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,bhwc->bowc", align_corners_matrix(x.shape[1], h), x.astype(jnp.float32),
                 precision=hp)
  y = jnp.einsum("pw,bowc->bopc", align_corners_matrix(x.shape[2], w), y, precision=hp)
  return y.astype(x.dtype)


def ratio_frequencies(dim: int, max_positions: float = 10000.0) -> np.ndarray:
  """f_i = exp(-ln(max_positions) i / (dim // 2 - 1)), i < dim // 2: float64, rounded to float32.

  Why a constant: the phases r 1e4 f_i reach 1e4 rad, so one ulp of f_i moves them by up to 5e-4;
  XLA's and torch's float32 exp differ by that ulp. A fixed table makes the error only sin/cos's."""
  half = dim // 2
  return np.exp(-np.log(max_positions) / (half - 1) * np.arange(half)).astype(np.float32)


def timestep_ratio_embedding(r: jax.Array, dim: int, max_positions: float = 10000.0) -> jax.Array:
  """r [B] in [0, 1] -> [sin(r 1e4 f), cos(r 1e4 f)] [B, dim] (zero-padded when dim is odd).

  Always float32, whatever the model's compute dtype: in bf16, r 1e4 = 9500 becomes 9472."""
  r = jnp.asarray(r, jnp.float32) * np.float32(max_positions)
  phase = r[:, None] * ratio_frequencies(dim, max_positions)[None, :]
  emb = jnp.concatenate([jnp.sin(phase), jnp.cos(phase)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))

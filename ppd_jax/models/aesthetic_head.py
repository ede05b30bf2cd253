"""The LAION improved aesthetic predictor v2 head (`sac+logos+ava1-l14-linearMSE.pth`) in Flax.

    e     = visual_projection(CLIP ViT-L/14 image tower(pixels))        [B, 768] (OpenAI weights)
    score = MLP(e / |e|)                                                 [B], about 1..10

The L2 normalisation is the caller's (the aesthetic reward, rewards/), as in the reference
(`simple_inference.py`, Diffusion-DPO's aes_utils.py): this module takes the normalised embedding.

The MLP is torch's nn.Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)). Dropout is the identity at
evaluation and there are no activations, so the whole head is one affine map, score = w.x + b with
w = W0^T W2^T W4^T W6^T W7^T (a 768-vector). The five layers are kept as trained so the params
map one to one onto the file's keys `layers.{0,2,4,6,7}.{weight,bias}` (weights/convert.py's
naming rule: layers.2.weight -> layers_2/kernel); weights/aesthetic_head.py loads them.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

# (index in the torch Sequential, output width); the indices between them are Dropouts.
LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))


class AestheticHead(nn.Module):
  """[B, input_dim] L2-normalised CLIP image embeddings -> [B] aesthetic scores (float32 params)."""
  input_dim: int = 768

  @nn.compact
  def __call__(self, embeds: jax.Array) -> jax.Array:
    if embeds.shape[-1] != self.input_dim:
      raise ValueError(f"AestheticHead: embeddings of width {embeds.shape[-1]}, the head takes "
                       f"{self.input_dim}")
    x = embeds.astype(jnp.float32)
    for index, width in LAYERS:
      x = nn.Dense(width, name=f"layers_{index}")(x)   # no activation: see the module docstring
    return x[..., 0]


def init_shapes(module: AestheticHead) -> dict:
  """The param tree's shapes (jax.eval_shape: nothing is allocated)."""
  x = jax.ShapeDtypeStruct((1, module.input_dim), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)["params"]

"""weights/convert.py's layout rules against PyTorch modules: a ConvTranspose2d's weight, named
by `transposed=`, run by models/layers.ConvTranspose, and torch_key's inverse of the naming rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ppd_jax.models import layers
from ppd_jax.weights import convert


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1), (3, 1, 1)])
def test_a_transposed_conv_matches_torch(kernel, stride, padding):
  torch.manual_seed(kernel)
  ref = torch.nn.ConvTranspose2d(3, 5, kernel, stride=stride, padding=padding)
  x = torch.randn(2, 3, 6, 7)
  want = ref(x).detach().numpy().transpose(0, 2, 3, 1)
  module = layers.ConvTranspose(5, kernel, stride, padding)
  xx = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  target = jax.eval_shape(module.init, jax.random.key(0), xx)["params"]
  state = {f"up_scalers.0.1.{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
  params = convert.to_flax(state, {"up_scalers_0_1": target}, transposed=r"up_scalers_\d+_1")
  got = module.apply({"params": params["up_scalers_0_1"]}, xx)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # Without `transposed` the weight is read as a Conv2d's and the shapes no longer fit.
  with pytest.raises(convert.WeightsError, match="wrong shape"):
    convert.to_flax(state, {"up_scalers_0_1": target})


def test_torch_key_inverts_the_naming_rule():
  for key in ("down_blocks.1.5.attention.to_out.0.weight", "time_embedding.linear_1.bias",
              "text_model.encoder.layers.3.mlp.fc1.bias", "up_upscalers.0.1.blocks.1.weight"):
    assert convert.torch_key(convert.flax_path(key)) == key

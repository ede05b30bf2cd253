"""Dense and Conv layers that gather their FSDP-sharded kernel where it is used.

With a ("data", "fsdp") mesh and `mesh.fsdp > 1`, every kernel is stored split over "fsdp"
(sharding.py) and the batch is split over both axes. Left to itself, XLA's partitioner meets a
batch-sharded input and a channel-sharded kernel by gathering the *activations* over "fsdp" and
computing 1/fsdp of the channels for the whole batch (then all-reducing partial sums): tensor
parallelism, with activation traffic that grows with the batch. FSDP is the other choice:
all-gather the kernel, layer by layer, and keep every activation split over data x fsdp. These
layers make that choice explicit: the kernel, as read from the param tree, is constrained to be
replicated right where the layer uses it, so the all-gather sits next to its one consumer (and,
under remat, is redone in the backward pass instead of being kept alive).

Outside a mesh context with an "fsdp" axis of size > 1 (init, single-device runs, the VAE in
precompute) nothing changes.
"""
import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

FSDP_AXIS = "fsdp"


def gather_for_use(value: jax.Array) -> jax.Array:
  """An FSDP-sharded parameter, replicated for its consumer (a no-op without an fsdp mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or FSDP_AXIS not in mesh.axis_names or mesh.shape[FSDP_AXIS] == 1:
    return value
  return jax.lax.with_sharding_constraint(value, P())


class _GatherKernel:
  """Mixin: `kernel` comes back from `self.param` gathered (see the module docstring)."""

  def param(self, name, init_fn, *args, **kwargs):
    value = super().param(name, init_fn, *args, **kwargs)
    return gather_for_use(value) if name == "kernel" else value


class Dense(_GatherKernel, nn.Dense):
  """flax.linen.Dense whose kernel is gathered at use under FSDP."""


class Conv(_GatherKernel, nn.Conv):
  """flax.linen.Conv whose kernel is gathered at use under FSDP."""


class ConvTranspose(nn.Module):
  """PyTorch's ConvTranspose2d(k, stride, padding) on NHWC, with the kernel in the layout
  weights/convert.py gives a transposed conv ([kh, kw, in, out], `transposed=`):

      y = conv_transpose(x, flip_hw(kernel), stride, pad k - 1 - padding on every side) + bias

  (the transpose of a stride-s conv: PyTorch's kernel is the forward conv's, so it is flipped).
  The kernel is gathered at use under FSDP like Dense's and Conv's."""
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  dtype: object = None
  param_dtype: object = jax.numpy.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = gather_for_use(self.param("kernel", nn.initializers.lecun_normal(),
                                       (k, k, x.shape[-1], self.features), self.param_dtype))
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    dtype = self.dtype or x.dtype
    pad = ((k - 1 - self.padding,) * 2,) * 2
    y = jax.lax.conv_transpose(x.astype(dtype), kernel[::-1, ::-1].astype(dtype),
                               (self.stride, self.stride), pad,
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(dtype)

"""Device mesh, batch sharding and regex partition rules for parameters.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose devices
also split the parameters and optimizer state); on TPU the device grid follows the chips' physical
topology and slices (device_grid). A batch is split over both. A parameter's
PartitionSpec comes from the first rule whose regex matches its path ("a/b/kernel"); the spec is
right-aligned to the array (P("fsdp") on a conv kernel [kh, kw, in, out] shards `out`). A parameter
that no rule matches, or whose sharded dimension the axis does not divide, is an error.
"""
import re
from typing import Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Biases, norms and small output layers are replicated; every other kernel is split on its output
# dimension over "fsdp" (with fsdp=1 this is replication too).
UNET_RULES: tuple[tuple[str, P], ...] = (
    (r"(bias|scale|embedding|gamma|beta)$", P()),   # gamma, beta: Stable Cascade's GRN
    (r"conv_out/kernel$", P()),
    (r"kernel$", P("fsdp")),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh over all devices; data=-1 takes every device fsdp leaves."""
  devices = list(devices if devices is not None else jax.devices())
  grid = device_grid(data, fsdp, devices)
  return Mesh(grid, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def device_grid(data: int, fsdp: int, devices: Sequence) -> np.ndarray:
  """The [data, fsdp] array of devices behind make_mesh.

  TPU: from the physical topology, so that each fsdp group (a row: the parameter all-gathers)
  is a ring of neighbouring chips. One slice: mesh_utils.create_device_mesh((data, fsdp)).
  Several slices (devices carry slice_index): "data" is the axis across the slow data-centre
  network, mesh_utils.create_hybrid_device_mesh((data / slices, fsdp), (slices, 1)), so each
  fsdp group stays inside one slice; only the gradient all-reduce of "data" crosses slices.
  Elsewhere (CPU, GPU), or where mesh_utils cannot place the devices: the devices in order
  (by slice first on TPU), reshaped.
  """
  if data == -1:
    if fsdp < 1 or len(devices) % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp != len(devices):
    raise ValueError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} != {len(devices)} "
                     "devices")
  if not devices or devices[0].platform != "tpu":
    return np.asarray(devices, dtype=object).reshape(data, fsdp)
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if data % len(slices):
    raise ValueError(f"config.mesh.data={data} is not a multiple of the {len(slices)} TPU "
                     f"slices: each fsdp group (config.mesh.fsdp={fsdp}) must stay in one slice")
  from jax.experimental import mesh_utils  # pylint: disable=C0415
  try:
    if len(slices) == 1:
      return mesh_utils.create_device_mesh((data, fsdp), devices)
    return mesh_utils.create_hybrid_device_mesh((data // len(slices), fsdp), (len(slices), 1),
                                                devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topologies mesh_utils does not place (holes, odd shapes: jax/_src/mesh_utils.py raises
    # these three); slices stay contiguous, so fsdp groups still never cross a slice.
    ordered = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
    return np.asarray(ordered, dtype=object).reshape(data, fsdp)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules) -> P:
  for pattern, spec in rules:
    if re.search(pattern, path):
      if len(spec) > len(shape):
        raise ValueError(f"partition rule {pattern!r} -> {spec} has more axes than parameter "
                         f"{path} of shape {shape}")
      full = (None,) * (len(shape) - len(spec)) + tuple(spec)
      for dim, axis in zip(shape, full):
        size = 1 if axis is None else mesh.shape[axis]
        if dim % size:
          raise ValueError(f"parameter {path} of shape {shape}: dimension {dim} is not divisible "
                           f"by mesh axis {axis!r} of size {size} (rule {pattern!r})")
      return P(*full)
  raise ValueError(f"no partition rule matches parameter {path} (shape {shape})")


def param_shardings(params, mesh: Mesh, rules=UNET_RULES):
  """NamedSharding for every leaf of a nested param dict (arrays or ShapeDtypeStructs)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {k: NamedSharding(mesh, _spec_for(k, tuple(v.shape), mesh, rules)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(out, sep="/")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of the global batch -> global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)

"""sharding.make_mesh / device_grid: the plain device order on CPU, the physical topology on TPU.

TPU devices are simulated with objects that carry what jax's mesh_utils reads
(jax/_src/mesh_utils.py): create_device_mesh takes `platform` and `device_kind`, and for a kind
without its own handler ("TPU v4") _get_physical_tpu_mesh places devices by `coords` (x, y, z)
with one device per chip (`core_on_chip` 0); create_hybrid_device_mesh groups devices by
`slice_index`. mesh_utils itself runs unpatched on them.
"""
import dataclasses
import random

import jax
import numpy as np
import pytest

from ppd_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  coords: tuple[int, int, int]
  slice_index: int = 0
  platform: str = "tpu"
  device_kind: str = "TPU v4"
  core_on_chip: int = 0
  process_index: int = 0


def tpu_slice(shape, slice_index=0, first_id=0, coords=None):
  """Chips of one slice with physical shape (x, y, z), ids in z, y, x order."""
  coords = coords or [(x, y, z) for z in range(shape[2]) for y in range(shape[1])
                      for x in range(shape[0])]
  return [FakeTpu(first_id + i, c, slice_index) for i, c in enumerate(coords)]


def on_one_line(group) -> bool:
  """Chips that differ in one coordinate only, each the next one's neighbour (no torus wrap)."""
  coords = np.asarray([d.coords for d in group])
  varying = (coords != coords[0]).any(axis=0)
  return varying.sum() <= 1 and bool(np.all(np.abs(np.diff(coords, axis=0)).sum(axis=1) == 1))


def test_cpu_mesh_is_the_devices_in_order():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = shd.make_mesh(2, 4)
  assert mesh.axis_names == ("data", "fsdp")
  assert [d.id for d in mesh.devices.ravel()] == [d.id for d in devices]
  assert mesh.devices.shape == (2, 4)
  assert shd.make_mesh(-1, 2).devices.shape == (4, 2)
  with pytest.raises(ValueError, match=r"config\.mesh\.fsdp=3 does not divide"):
    shd.make_mesh(-1, 3)
  with pytest.raises(ValueError, match=r"config\.mesh\.data=3 x config\.mesh\.fsdp=2"):
    shd.make_mesh(3, 2)


@pytest.mark.parametrize("data,fsdp", [(2, 4), (4, 2)])
def test_one_tpu_slice_puts_each_fsdp_group_on_a_physical_line(data, fsdp):
  """A 4 x 2 slice listed in a shuffled order: rows of the grid are lines of neighbouring chips
  (a plain reshape of this order is not), and every chip is used once."""
  devices = tpu_slice((4, 2, 1))
  random.Random(0).shuffle(devices)
  assert not all(on_one_line(g) for g in np.asarray(devices, object).reshape(data, fsdp))
  grid = shd.device_grid(data, fsdp, devices)
  assert grid.shape == (data, fsdp)
  assert sorted(d.id for d in grid.ravel()) == list(range(8))
  assert all(on_one_line(group) for group in grid)


@pytest.mark.parametrize("data,fsdp", [(2, 4), (4, 2), (8, 1)])
def test_two_slices_split_data_and_keep_each_fsdp_group_in_one_slice(data, fsdp):
  """2 slices x 4 chips, listed alternating between slices: "data" crosses the slices (slice 0's
  rows first), each fsdp group is inside one slice and on a line of neighbouring chips."""
  first, second = tpu_slice((2, 2, 1), 0, 0), tpu_slice((2, 2, 1), 1, 4)
  devices = [d for pair in zip(first, second) for d in pair]
  grid = shd.device_grid(data, fsdp, devices)
  assert grid.shape == (data, fsdp)
  assert sorted(d.id for d in grid.ravel()) == list(range(8))
  row_slice = [{d.slice_index for d in group} for group in grid]
  assert row_slice == [{0}] * (data // 2) + [{1}] * (data // 2)
  if fsdp < 4:                     # fsdp = 4: each group is a whole 2 x 2 slice
    assert all(on_one_line(group) for group in grid)


def test_fsdp_across_slices_is_an_error_naming_the_config():
  devices = tpu_slice((2, 2, 1), 0, 0) + tpu_slice((2, 2, 1), 1, 4)
  with pytest.raises(ValueError, match=r"config\.mesh\.data=1 is not a multiple of the 2 TPU"):
    shd.device_grid(1, 8, devices)


def test_topology_mesh_utils_cannot_place_falls_back_by_slice():
  """Chips whose coordinates leave a hole in the cuboid (mesh_utils raises AssertionError in
  _get_physical_tpu_mesh): the devices by (slice, id), so fsdp groups still stay in a slice."""
  holey = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (2, 1, 0)]
  devices = tpu_slice(None, 1, 4, holey) + tpu_slice(None, 0, 0, holey)
  grid = shd.device_grid(4, 2, devices)
  assert [d.id for d in grid.ravel()] == list(range(8))
  assert [{d.slice_index for d in group} for group in grid] == [{0}, {0}, {1}, {1}]

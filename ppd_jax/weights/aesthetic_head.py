"""Weights of the LAION aesthetic head (models/aesthetic_head.py): a `.pth` once, safetensors after.

  python -m ppd_jax.weights.aesthetic_head sac+logos+ava1-l14-linearMSE.pth OUT.safetensors

The head is published as a torch pickle (an OrderedDict of 10 tensors, storages tagged cuda:0).
The CLI converts it once through torch's restricted unpickler (weights/torch_pickle.py) to a
safetensors file keyed as the .pth (`layers.{0,2,4,6,7}.{weight,bias}`), with the source's sha256
in its metadata; `load` reads either form, so evaluation need not touch torch or a pickle.
"""
import os
import sys

import numpy as np

from ppd_jax import cli_logging
from ppd_jax.models import aesthetic_head
from ppd_jax.weights import convert
from ppd_jax.weights import torch_pickle

# sha256 of the published sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor repo).
KNOWN_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


def read_state(path: str) -> dict[str, np.ndarray]:
  """{torch key: array} from a .safetensors file (numpy API), else from a torch pickle."""
  if path.endswith(".safetensors"):
    if not os.path.isfile(path):
      raise convert.WeightsError(f"{path}: no such file")
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise convert.WeightsError(f"{path}: not a readable safetensors file ({e})") from e
  return torch_pickle.load_state_dict(path)


def load(path: str, input_dim: int = 768) -> dict:
  """Float32 Flax params of AestheticHead(input_dim) from `path` (.pth or .safetensors); missing,
  unexpected or mis-shaped keys are errors naming the key and the file."""
  module = aesthetic_head.AestheticHead(input_dim)
  return convert.to_flax(read_state(path), aesthetic_head.init_shapes(module), what=path)


def convert_file(in_path: str, out_path: str, overwrite: bool = False) -> str:
  """Check IN (a .pth) against the head's shapes and write OUT.safetensors; returns IN's sha256."""
  if os.path.lexists(out_path) and not overwrite:
    raise FileExistsError(f"{out_path} exists; pass --overwrite to replace it")
  state = torch_pickle.load_state_dict(in_path)
  convert.to_flax(state, aesthetic_head.init_shapes(aesthetic_head.AestheticHead()), what=in_path,
                  dtype=None)
  digest = torch_pickle.sha256(in_path)
  from safetensors.numpy import save_file
  tmp = f"{out_path}.partial-{os.getpid()}"
  try:
    save_file(state, tmp,
              metadata={"format": "pt", "source": os.path.basename(in_path),
                        "source_sha256": digest})
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return digest


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  from absl import flags
  flags.DEFINE_bool("overwrite", False, "replace an existing OUT.safetensors")


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  if len(argv) != 3:
    raise app.UsageError("usage: python -m ppd_jax.weights.aesthetic_head IN.pth OUT.safetensors")
  try:
    digest = convert_file(argv[1], argv[2], flags.FLAGS.overwrite)
  except (convert.WeightsError, OSError) as e:
    sys.exit(f"ppd_jax.weights.aesthetic_head: {e}")
  if digest != KNOWN_SHA256:
    print(f"note: {argv[1]} has sha256 {digest}, not that of the published "
          f"sac+logos+ava1-l14-linearMSE.pth ({KNOWN_SHA256})")
  print(f"wrote {argv[2]} (source sha256 {digest})")


if __name__ == "__main__":
  from absl import app as _app
  _define_flags()
  _app.run(main)

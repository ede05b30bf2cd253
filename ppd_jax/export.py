"""Export a trained run's user branch as diffusers IP-Adapter weights (ppd_jax/weights/export.py).

  python -m ppd_jax.export --workdir=W --out=DIR [--step=S] [--weight_name=NAME.safetensors]

Writes DIR/NAME.safetensors (load it with `pipe.load_ip_adapter(DIR, subfolder="",
weight_name=NAME, image_encoder_folder=None)`) and DIR/NAME.json (embedding size, tokens, step,
the call), then prints the diffusers code that generates for a user.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

from ppd_jax import checkpoint
from ppd_jax import inference
from ppd_jax.models import split_params
from ppd_jax.weights import export as export_lib
from ppd_jax.weights.convert import WeightsError

flags.DEFINE_string("workdir", None, "the training run's folder (holds checkpoints/)")
flags.DEFINE_string("out", None, "folder to write the IP-Adapter file and its JSON into")
flags.DEFINE_integer("step", None, "checkpoint step to export (default: the latest)")
flags.DEFINE_string("weight_name", "ip-adapter_ppd.safetensors",
                    "file name of the weights in --out (must end in .safetensors)")
flags.mark_flags_as_required(["workdir", "out"])


def _check_flags(workdir: str, out: str, weight_name: str) -> None:
  """Fails before any loading; also keeps Orbax from creating checkpoints/ in a wrong folder."""
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} does not exist")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir} has no checkpoints/ folder: not a training run")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a folder")
  if os.path.basename(weight_name) != weight_name or not weight_name.endswith(".safetensors"):
    raise ValueError(f"--weight_name={weight_name} must be a file name ending in .safetensors")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  try:
    _check_flags(f.workdir, f.out, f.weight_name)
    run = inference.load_trained(f.workdir, f.step)
    cfg = run.model.config
    state_dict = export_lib.ip_adapter_state_dict(split_params(run.params)[1], cfg)
  except (ValueError, KeyError, checkpoint.CheckpointError, WeightsError) as e:
    sys.exit(f"ppd_jax.export: {e}")

  model_cfg = run.config.model
  base = model_cfg.get("pretrained") or model_cfg.get("base")
  metadata = export_lib.export_metadata(
      cfg, step=run.step, variant=run.config.get("variant"), base=base,
      weight_name=f.weight_name, folder=os.path.abspath(f.out))
  weights, info = export_lib.save_ip_adapter(os.path.join(f.out, f.weight_name), state_dict,
                                             metadata)
  layers = sum(k.endswith("to_k_ip.weight") for k in state_dict)
  size = sum(v.nbytes for v in state_dict.values())
  print(f"wrote {weights} ({layers} cross-attention layers, {size / 2**20:.2f} MiB, step "
        f"{run.step}, base {base}) and {info}")
  print(f"user embedding: [{cfg.user_tokens}, {cfg.user_embed_dim}]; use it in diffusers with:\n")
  print("\n".join(metadata["usage"]))


if __name__ == "__main__":
  app.run(main)

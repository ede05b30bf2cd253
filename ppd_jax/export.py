"""Export a trained run's user branch for diffusers.

  python -m ppd_jax.export --workdir=W --out=DIR [--step=S] [--weight_name=NAME.safetensors]

Stable Diffusion runs (weights/export.py): DIR/NAME.safetensors as IP-Adapter weights (load it
with `pipe.load_ip_adapter(DIR, subfolder="", weight_name=NAME, image_encoder_folder=None)`).
Stable Cascade runs (weights/export_cascade.py): DIR/NAME.safetensors keyed by diffusers' module
paths plus DIR/ppd_cascade.py, the attention processor that attaches them to the prior. Both write
DIR/NAME.json (embedding size, tokens, step, the call) and print the diffusers script that
generates for a user from the embedding file `python -m ppd_jax.users.embedding` writes (for
Stable Diffusion with the run's config.sample: scheduler, timesteps, steps, guidance).
"""
import os
import sys

from absl import app
from absl import flags

from ppd_jax import checkpoint
from ppd_jax import cli_logging
from ppd_jax import inference
from ppd_jax import storage
from ppd_jax.models import cascade
from ppd_jax.models import split_params
from ppd_jax.weights import export as export_lib
from ppd_jax.weights import export_cascade
from ppd_jax.weights.convert import WeightsError

flags.DEFINE_string("workdir", None, "the training run's folder (holds checkpoints/)")
flags.DEFINE_string("out", None, "folder to write the IP-Adapter file and its JSON into")
flags.DEFINE_integer("step", None, "checkpoint step to export (default: the latest)")
flags.DEFINE_string("weight_name", None,
                    "file name of the weights in --out (must end in .safetensors; default "
                    "ip-adapter_ppd.safetensors, or ppd_cascade_user.safetensors for Stable "
                    "Cascade)")
flags.mark_flags_as_required(["workdir", "out"])


def _check_flags(workdir: str, out: str, weight_name: str | None) -> None:
  """Fails before any loading; also keeps Orbax from creating checkpoints/ in a wrong folder.
  Both folders may be URLs (gs://...): they go through ppd_jax.storage."""
  if not storage.path(workdir).is_dir():
    raise ValueError(f"--workdir={workdir} does not exist")
  if not (storage.path(workdir) / "checkpoints").is_dir():
    raise ValueError(f"--workdir={workdir} has no checkpoints/ folder: not a training run")
  if storage.exists(out) and not storage.path(out).is_dir():
    raise ValueError(f"--out={out} is a file, not a folder")
  if weight_name is not None and (os.path.basename(weight_name) != weight_name
                                  or not weight_name.endswith(".safetensors")):
    raise ValueError(f"--weight_name={weight_name} must be a file name ending in .safetensors")


def _export_cascade(run, out: str, weight_name: str | None, workdir: str) -> None:
  """Stable Cascade: diffusers-keyed weights, their JSON and ppd_cascade.py in --out."""
  cfg, model_cfg = run.model.config, run.config.model
  weight_name = weight_name or export_cascade.DEFAULT_WEIGHT_NAME
  state_dict = export_cascade.cascade_state_dict(split_params(run.params)[1], cfg)
  base, subfolder = model_cfg.pretrained, model_cfg.get("prior_subfolder", "prior_lite")
  metadata = export_cascade.export_metadata(
      cfg, step=run.step, variant=run.config.get("variant"), base=base,
      prior_subfolder=subfolder, decoder=model_cfg.get("decoder") or None,
      weight_name=weight_name, folder=str(storage.path(out)),
      decoder_subfolder=model_cfg.get("decoder_subfolder", "decoder"), workdir=workdir,
      sample=run.config.sample)
  weights, info, processor = export_cascade.save(out, weight_name, state_dict, metadata)
  _report(run, state_dict, ".to_k_user.weight", "attention blocks", f"prior {base} {subfolder}",
          f"{weights}, {info} and {processor}", metadata)


def _export_ip_adapter(run, out: str, weight_name: str | None, workdir: str) -> None:
  """Stable Diffusion: IP-Adapter weights and their JSON in --out."""
  cfg = run.model.config
  weight_name = weight_name or "ip-adapter_ppd.safetensors"
  state_dict = export_lib.ip_adapter_state_dict(split_params(run.params)[1], cfg)
  model_cfg = run.config.model
  base = model_cfg.get("pretrained") or model_cfg.get("base")
  metadata = export_lib.export_metadata(
      cfg, step=run.step, variant=run.config.get("variant"), base=base,
      weight_name=weight_name, folder=str(storage.path(out)), workdir=workdir,
      sample=run.config.sample)
  weights, info = export_lib.save_ip_adapter(str(storage.path(out) / weight_name), state_dict,
                                             metadata)
  _report(run, state_dict, "to_k_ip.weight", "cross-attention layers", f"base {base}",
          f"{weights} and {info}", metadata)


def _report(run, state_dict, layer_suffix: str, layers_are: str, source: str, files: str,
            metadata: dict) -> None:
  """What was written (layers, size, step, where the base came from) and the diffusers call."""
  cfg = run.model.config
  layers = sum(k.endswith(layer_suffix) for k in state_dict)
  size = sum(v.nbytes for v in state_dict.values())
  print(f"wrote {files} ({layers} {layers_are}, {size / 2**20:.2f} MiB, step {run.step}, "
        f"{source})")
  print(f"user embedding: [{cfg.user_tokens}, {cfg.user_embed_dim}]; use it in diffusers with:\n")
  print("\n".join(metadata["usage"]))


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    _check_flags(f.workdir, f.out, f.weight_name)
    run = inference.load_trained(f.workdir, f.step)
    if isinstance(run.model.config, cascade.CascadeConfig):
      _export_cascade(run, f.out, f.weight_name, f.workdir)
    else:
      _export_ip_adapter(run, f.out, f.weight_name, f.workdir)
  except (ValueError, KeyError, checkpoint.CheckpointError, WeightsError) as e:
    sys.exit(f"ppd_jax.export: {e}")


if __name__ == "__main__":
  app.run(main)

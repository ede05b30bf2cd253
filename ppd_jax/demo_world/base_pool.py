"""The pool of frozen-base samples that synthetic users label: the pairs are the base's own images.

For every caption of the shape world, `data.pool_per_caption` images are sampled from the frozen
base (config.model.base) with the run's sampler settings and seed. Users' pairs are two pool images
of one caption (demo_world/synthetic.py), so what DPO learns to prefer is what the base
really draws.

Sampling a pool costs about a minute on a 2-core CPU for the demo, so the result is cached under
$PPD_JAX_CACHE (default ~/.cache/ppd_jax) by a hash of everything it depends on: training, the
baseline, evaluation and sampling of one run then share one pool. The cache is only a cache: the
same inputs give the same pool bit for bit, and a corrupt or missing file is re-made.
"""
import dataclasses
import hashlib
import json
import os
import time

import numpy as np

from ppd_jax.data import shards
from ppd_jax.demo_world import synthetic

_VERSION = 2   # 2: latents stored beside the decoded images
_STREAM_POOL_NOISE = 7


@dataclasses.dataclass
class Pool:
  images: np.ndarray        # [P, S, S, 3] float32 in [-1, 1] (decoded, what users look at)
  caption_ids: np.ndarray   # [P] int32, index into synthetic.captions_list()
  latents: np.ndarray       # [P, s, s, C]: the UNet's x0 (the images themselves in pixel space)


def cache_dir() -> str:
  return os.environ.get("PPD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                       "ppd_jax"))


def _folder_fingerprint(folder: str) -> list:
  """Paths, sizes and mtimes of a pretrained folder's files: hashing gigabytes costs too much."""
  out = []
  for root, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      out.append((os.path.relpath(os.path.join(root, name), folder), st.st_size, st.st_mtime_ns))
  return out


def pool_key(config, backbone) -> str:
  """Hash of every input the pool depends on (seed, base weights, architecture, sampler)."""
  from ppd_jax.models import base_weights
  base = config.model.base
  if config.model.get("pretrained"):
    base = [_folder_fingerprint(folder) for folder in backbone.weight_folders()]
  fields = {
      "version": _VERSION, "seed": config.seed, "per_caption": config.data.pool_per_caption,
      "text_length": config.data.text_length, "text_seed": synthetic.TEXT_ENCODER_SEED,
      "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
      "sample": config.sample.to_dict(),
      "base": base if not isinstance(base, str) or base == "random" else shards.sha256(
          base_weights.resolve(base)),
  }
  fields["model"].pop("base", None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def make_pool(config, backbone, log=print) -> Pool:
  """Samples the pool from the frozen base (no cache)."""
  from ppd_jax import state as state_lib
  from ppd_jax.diffusion import generation, schedules
  from ppd_jax.models import build_model

  model = build_model(config.model)
  params = state_lib.initial_base_params(model, config.seed, config.model.base,
                                         config.model.pretrained, config.model.variant,
                                         config.model.get("prior_subfolder", "prior_lite"))
  captions = synthetic.captions_list()
  caption_ids = np.repeat(np.arange(len(captions), dtype=np.int32), config.data.pool_per_caption)
  seed = int(np.random.SeedSequence([_STREAM_POOL_NOISE, config.seed]).generate_state(1)[0])
  noise = generation.initial_noise(seed, len(caption_ids), config.model)
  start = time.perf_counter()
  log(f"sampling the base-model pool: {len(caption_ids)} images ({len(captions)} captions x "
      f"{config.data.pool_per_caption}), {config.sample.num_steps} {config.sample.sampler} steps")
  text = backbone.encode_captions(captions)
  latents = generation.sample_images(
      model, schedules.schedule_from_config(config.diffusion), params,
      {k: v[caption_ids] for k, v in text.items()}, backbone.encode_captions([""]), noise, None,
      guidance_scale=config.sample.guidance_scale, num_steps=config.sample.num_steps,
      eta=config.sample.eta, clip_sample=config.sample.clip_sample,
      sampler=config.sample.sampler, seed=seed, progress=log)
  images = backbone.to_images(latents)
  log(f"pool sampled in {time.perf_counter() - start:.0f}s")
  return Pool(images=images.astype(np.float32), caption_ids=caption_ids,
              latents=latents.astype(np.float32))


def load_or_make(config, backbone, log=print) -> Pool:
  """The cached pool for this config, sampled and cached first if there is none (or it is bad)."""
  path = os.path.join(cache_dir(), "pools", f"{pool_key(config, backbone)}.npz")
  if os.path.exists(path):
    try:
      with np.load(path) as f:
        return Pool(images=f["images"], caption_ids=f["caption_ids"], latents=f["latents"])
    except (OSError, ValueError, KeyError) as e:
      log(f"ignoring unreadable pool cache {path} ({e}); sampling it again")
  pool = make_pool(config, backbone, log)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, images=pool.images, caption_ids=pool.caption_ids, latents=pool.latents)
  os.replace(tmp, path)
  return pool


def with_backbone(config, backbone=None, log=print):
  """(backbone, pool): the run's caption encoder and decoder (built from config when None) and
  the cached pool sampled with it, what every demo-world source starts from."""
  if backbone is None:
    from ppd_jax import backbones
    backbone = backbones.build_backbone(config)
  return backbone, load_or_make(config, backbone, log)

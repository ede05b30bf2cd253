"""Shared set-up for the Pick-a-Pic tests: synthetic parquet, a tiny SD 1.5 folder, a config."""
import os

import numpy as np

import tiny_sd
from configs import ppd
from ppd_jax.data import make_pickapic
from ppd_jax.data import user_store as store_lib


def make_inputs(root: str, **generator_args) -> dict:
  """root/parquet (Pick-a-Pic layout) and root/tiny-sd15; the generator's ground truth."""
  args = dict(num_users=16, pairs_per_user=(2, 10), num_files=3, corrupt_jpegs=2,
              empty_file=True, bad_schema_file=True, row_group_size=8, seed=0)
  args.update(generator_args)
  truth = make_pickapic.write_synthetic_pickapic(os.path.join(root, "parquet"), **args)
  folder = os.path.join(root, "tiny-sd15")
  if not os.path.exists(folder):
    tiny_sd.save_pipeline(folder, "sd15")
  return {"parquet": os.path.join(root, "parquet"), "pretrained": folder, "truth": truth}


def config(pretrained: str, **data):
  """pickapic_sd15 on the tiny folder, small enough for a CPU test."""
  c = ppd.get_config("pickapic_sd15")
  c.model.pretrained = pretrained
  c.model.dtype = "float32"
  c.model.remat = False
  c.batch_size = 4
  c.grad_accum_steps = 1
  c.total_steps = 2
  c.log_every = 1
  c.checkpoint_every = 1
  c.async_checkpointing = False
  d = c.data
  d.worker_count = 0
  d.precompute_batch = 8
  d.text_chunk = 4                   # several text units
  d.validation_fraction = 0.15
  d.test_fraction = 0.15
  d.storage_dtype = "float32"
  for k, v in data.items():
    setattr(d, k, v)
  return c


def write_user_store(path: str, shard_folder: str, dim: int = 16, leave_out=(), seed: int = 0):
  """Random embeddings for every indexed user (minus `leave_out`): the loader's join is what is
  under test, not the embedder."""
  users = np.load(os.path.join(shard_folder, "index", "users.npz"))["user_id"]
  users = np.array([u for u in users if u not in set(leave_out)])
  emb = np.random.default_rng(seed).standard_normal((len(users), 1, dim)).astype(np.float32)
  store_lib.write_store(path, users, emb, source={"embedder": "random (test)"})
  return dict(zip(users.tolist(), emb))


_TASTES = ("bright", "dark", "big", "small")


def write_profile_store(path: str, shard_folder: str, dim: int = 16, leave_out=(), seed: int = 0,
                        style: str = "likes"):
  """A store like write_user_store's that also holds a profile text per user (what the
  caption-augmentation baseline appends); -> {user_id: profile}."""
  users = np.load(os.path.join(shard_folder, "index", "users.npz"))["user_id"]
  users = np.array([u for u in users if u not in set(leave_out)])
  emb = np.random.default_rng(seed).standard_normal((len(users), 1, dim)).astype(np.float32)
  profiles = [f"{style} {_TASTES[i % len(_TASTES)]} things, user {u}" for i, u in enumerate(users)]
  store_lib.write_store(path, users, emb, profiles=profiles, source={"embedder": "random (test)"})
  return dict(zip(users.tolist(), profiles))


class _PoisonedVAE:
  """A VAE module stand-in whose encoder mean is `value` for each image equal to one of
  `images` (what an fp16 overflow gives), the real mean for every other image."""

  def __init__(self, vae, images: np.ndarray, values):
    import jax.numpy as jnp
    self._vae, self.config = vae, vae.config
    self._images = jnp.asarray(images)
    self._values = jnp.asarray(values, jnp.float32)

  def apply(self, variables, x, method=None):
    import jax.numpy as jnp
    mean, logvar = self._vae.apply(variables, x, method=method)
    same = (x[:, None] == self._images[None]).reshape(len(x), len(self._images), -1).all(-1)
    value = self._values[jnp.argmax(same, 1)]
    hit = same.any(1).reshape((-1,) + (1,) * (mean.ndim - 1))
    return jnp.where(hit, value.reshape(hit.shape), mean), logvar


class PoisonedBackbone:
  """The test backbone, but its VAE gives non-finite latents for chosen images (a list of
  (image, value)) and its text encoder a non-finite value in one key for chosen captions
  ({caption: (key, value)}); everything else is the wrapped backbone's, identity included."""

  def __init__(self, backbone, bad_images=(), bad_captions=None):
    self._inner = backbone
    self.vae = backbone.vae
    if bad_images:
      self.vae = _PoisonedVAE(backbone.vae, np.stack([im for im, _ in bad_images]),
                              [v for _, v in bad_images])
    self.bad_captions = dict(bad_captions or {})

  def __getattr__(self, name):
    return getattr(self._inner, name)

  @property
  def latent_encoder(self):
    from ppd_jax.models import vae as vae_lib
    return (lambda p, x: vae_lib.images_to_latents(self.vae, p, x)), self._inner.vae_params

  def encode_captions(self, captions: list[str]) -> dict:
    out = {k: np.array(v) for k, v in self._inner.encode_captions(captions).items()}
    for i, caption in enumerate(captions):
      if caption in self.bad_captions:
        key, value = self.bad_captions[caption]
        out[key][i].flat[-1] = value
    return out

"""The web demo's model side: what the page shows and asks for, with no HTTP in it.

A new user here is made exactly as `sample --pairs` makes one: the picks become the pairs file
that command reads (a JSON list, images inline as PNG data URIs), and the embedding comes from
that file's text through users/new_user.py, with the run's own embedder (the demo's stand-in, or
the VLM recorded in a Pick-a-Pic run's store).
"""
import base64
import dataclasses
import io
import json
import time

import numpy as np
from PIL import Image

from ppd_jax import backbones
from ppd_jax import images as images_lib
from ppd_jax import inference
from ppd_jax.serve import jobs
from ppd_jax.users import new_user

# For runs whose world has no caption list of its own (Pick-a-Pic): short everyday prompts.
DEFAULT_PROMPTS = (
    "a cat sitting on a windowsill", "a mountain lake at sunrise", "a bowl of fruit on a table",
    "a lighthouse in a storm", "a city street at night", "a portrait of an old sailor",
    "a red sports car", "a forest path in autumn", "a cozy cabin in the snow",
    "a robot reading a book")
MAX_STORED_USERS = 64   # listed on the page for mixing
SCALE_MAX = 3.0         # the largest user scale /api/generate accepts (and the page's slider)
THUMBNAIL = 64          # pixels, the longer side of a stored user's preferred-image thumbnail
FAMILIES = {"cascade": "Stable Cascade", "stable_diffusion": "Stable Diffusion", "demo": "Demo"}


@dataclasses.dataclass(frozen=True)
class PairSet:
  """Four captions, each with two images of the frozen base (uint8 [4, 2, H, W, 3])."""
  captions: tuple[str, ...]
  images: np.ndarray


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG file bytes."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def thumbnail(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> at most THUMBNAIL px on its longer side (never enlarged)."""
  im = Image.fromarray(image)
  im.thumbnail((THUMBNAIL, THUMBNAIL))
  return np.asarray(im)


def family(config) -> str:
  """"cascade", "stable_diffusion" or "demo" (pixel space), as backbones.build_backbone picks."""
  if backbones.is_cascade(config.model):
    return "cascade"
  return "stable_diffusion" if config.model.get("pretrained") else "demo"


def data_uri(image: np.ndarray) -> str:
  return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def world_prompts(run) -> list[str]:
  """The run's own captions (the demo's synthetic world), else DEFAULT_PROMPTS."""
  captions = getattr(run.users, "captions", None)
  return list(captions) if captions else list(DEFAULT_PROMPTS)


def stored_users(run) -> list[int]:
  """Training users whose embeddings the run has (the first MAX_STORED_USERS)."""
  ids = getattr(run.users, "train_user_ids", ())
  return [int(u) for u in list(ids)[:MAX_STORED_USERS]]


class Engine:
  """One trained run. Every method is one model call; the caller runs one at a time."""

  def __init__(self, run, prompts: list[str] | None = None):
    self.run = run
    self.fewshot = int(run.config.data.fewshot)
    self.prompts = list(prompts) if prompts else world_prompts(run)
    self.users = stored_users(run)
    self.num_steps = int(run.config.sample.num_steps)
    self.family = family(run.config)
    self._vlm = None
    self._compiled = set()      # image counts whose sampler this process has run once
    m = run.config.model
    self._zero_user = np.zeros((m.user_tokens, m.user_embed_dim), np.float32)

  def facts(self) -> dict:
    c = self.run.config
    return {"variant": c.get("variant"), "step": self.run.step, "fewshot": self.fewshot,
            "prompts": self.prompts, "users": self.users, "num_steps": self.num_steps,
            "guidance_scale": float(c.sample.guidance_scale),
            "sampler": c.sample.get("sampler", "ddim"), "scale_max": SCALE_MAX,
            "family": self.family, "title": f"{FAMILIES[self.family]} run, step {self.run.step}"}

  def _images(self, stage: str, prompts: list[str], user: np.ndarray, scale: float, seed: int):
    """One stage of the running job (jobs.stage); "compiling" until the first step of an image
    count this process has not sampled yet. Stable Cascade's chain is "<stage>: stage C" here,
    then "<stage>: stage B" and "<stage>: decode" (Stage A) noticed by its backbone."""
    first = len(prompts) not in self._compiled
    jobs.stage(f"{stage}: stage C" if self.family == "cascade" else stage, self.num_steps,
               compiling=first)
    out = images_lib.to_uint8(inference.generate(self.run, prompts, user, user_scale=scale,
                                                 seed=seed))
    self._compiled.add(len(prompts))
    return out

  def make_pairs(self, seed: int) -> PairSet:
    """fewshot prompts of the run's world (chosen by seed), two base images each (user off)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(self.prompts), size=self.fewshot,
                       replace=len(self.prompts) < self.fewshot)
    captions = tuple(self.prompts[i] for i in picks)
    doubled = [c for c in captions for _ in range(2)]
    images = self._images("pairs", doubled, self._zero_user, 0.0, seed)
    return PairSet(captions=captions,
                   images=images.reshape((self.fewshot, 2) + images.shape[1:]))

  def pairs_file(self, pairs: PairSet, preferred: list[int]) -> str:
    """The JSON `sample --pairs` reads: [{"caption", "image_1", "image_2", "preferred"}]."""
    if len(preferred) != self.fewshot or any(p not in (1, 2) for p in preferred):
      raise ValueError(f"pick the preferred image (1 or 2) of each of the {self.fewshot} pairs")
    rows = [{"caption": c, "image_1": data_uri(im[0]), "image_2": data_uri(im[1]),
             "preferred": int(p)} for c, im, p in zip(pairs.captions, pairs.images, preferred)]
    return json.dumps(rows, indent=1) + "\n"

  def embed(self, pairs_text: str) -> np.ndarray:
    """[tokens, dim]: users/new_user.py on the pairs file's text (the VLM loaded once)."""
    if self._vlm is None and self.run.config.data.source != "synthetic":
      self._vlm = new_user.load_vlm(self.run)
    embedding, _ = new_user.embed_pairs_text(self.run, pairs_text, vlm=self._vlm)
    return embedding

  def mix(self, embedding: np.ndarray, weight: float, others: list[tuple[int, float]]):
    """weight on the new user, the rest on stored users (inference.mix_users, the paper's
    interpolation); others: [(user id, weight)]."""
    if not others:
      return embedding
    for uid, _ in others:
      if uid not in self.users:
        raise ValueError(f"user {uid} is not one of this run's listed users")
    stored = [self.run.users.user_embedding(uid) for uid, _ in others]
    return inference.mix_users([embedding] + stored, [weight] + [w for _, w in others])

  def base_key(self, prompt: str, seed: int) -> tuple:
    """What the base image depends on (scale 0: the user branch is off): a cache key."""
    return (prompt, int(seed), self.num_steps, float(self.run.config.sample.guidance_scale))

  def generate(self, prompt: str, embedding: np.ndarray, scale: float, seed: int,
               with_base: bool = True) -> dict:
    """The base's image (unless with_base is False: the caller has it) and the personalised one
    from the same x_T (seed), each timed."""
    out = {}
    for name, s in (("base", 0.0), ("personal", scale))[0 if with_base else 1:]:
      start = time.perf_counter()
      out[name] = self._images(name, [prompt], embedding, s, seed)[0]
      out[f"{name}_s"] = time.perf_counter() - start
    return out

  def user_cards(self) -> list[dict]:
    """The stored users shown for mixing: {id, name, profile, thumbnails} with thumbnails the
    uint8 images each preferred in its first fewshot pairs where the run has them (the demo
    world's pool), and profile text where its store keeps one (a Pick-a-Pic run)."""
    users, cards = self.run.users, []
    store = getattr(users, "store", None)
    names = {v: k for k, v in getattr(users, "names", {}).items()}
    for uid in self.users:
      profile = store.profile(uid) if store is not None and store.has_profiles else None
      thumbs = []
      if hasattr(users, "fewshot_pairs"):
        thumbs = [thumbnail(im) for im in images_lib.to_uint8(users.fewshot_pairs(uid)["winners"])]
      cards.append({"id": uid, "name": names.get(uid, f"user {uid}"), "profile": profile or None,
                    "thumbnails": thumbs})
    return cards

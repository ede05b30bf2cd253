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

from ppd_jax import images as images_lib
from ppd_jax import inference
from ppd_jax.users import new_user

# For runs whose world has no caption list of its own (Pick-a-Pic): short everyday prompts.
DEFAULT_PROMPTS = (
    "a cat sitting on a windowsill", "a mountain lake at sunrise", "a bowl of fruit on a table",
    "a lighthouse in a storm", "a city street at night", "a portrait of an old sailor",
    "a red sports car", "a forest path in autumn", "a cozy cabin in the snow",
    "a robot reading a book")
MAX_STORED_USERS = 64   # listed on the page for mixing


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
    self._vlm = None
    m = run.config.model
    self._zero_user = np.zeros((m.user_tokens, m.user_embed_dim), np.float32)

  def facts(self) -> dict:
    c = self.run.config
    return {"variant": c.get("variant"), "step": self.run.step, "fewshot": self.fewshot,
            "prompts": self.prompts, "users": self.users, "num_steps": self.num_steps,
            "guidance_scale": float(c.sample.guidance_scale),
            "sampler": c.sample.get("sampler", "ddim")}

  def _images(self, prompts: list[str], user: np.ndarray, scale: float, seed: int):
    return images_lib.to_uint8(inference.generate(self.run, prompts, user, user_scale=scale,
                                                  seed=seed))

  def make_pairs(self, seed: int) -> PairSet:
    """fewshot prompts of the run's world (chosen by seed), two base images each (user off)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(self.prompts), size=self.fewshot,
                       replace=len(self.prompts) < self.fewshot)
    captions = tuple(self.prompts[i] for i in picks)
    doubled = [c for c in captions for _ in range(2)]
    images = self._images(doubled, self._zero_user, 0.0, seed)
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

  def generate(self, prompt: str, embedding: np.ndarray, scale: float, seed: int) -> dict:
    """The base's image and the personalised one from the same x_T (seed), each timed."""
    out = {}
    for name, s in (("base", 0.0), ("personal", scale)):
      start = time.perf_counter()
      out[name] = self._images([prompt], embedding, s, seed)[0]
      out[f"{name}_s"] = time.perf_counter() - start
    return out

"""A user the run has never seen, from N labelled pairs at sampling time (sample.py --pairs).

The embedding has to come from the same producer as the training users', or the user branch
reads it as noise: for a Pick-a-Pic run, the VLM extraction with the model, prompt template,
decoding and layers recorded in the run's store (users/embed.py); for the demo, its stand-in
embedder over the images' pixels (users/fewshot.py).

The pairs file is a JSON list (or JSONL) of {"caption", "image_1", "image_2", "preferred": 1|2}
with image paths relative to it or data URIs (users/shots.py); the first N readable pairs are
used. The web demo (ppd_jax/serve) embeds through `embed_pairs_text` on the very file it offers
for download, so `sample --pairs` on that file gives the same user.
"""
import numpy as np
from PIL import Image

from ppd_jax.users import embed as embed_lib
from ppd_jax.users import prompts
from ppd_jax.users import shots
from ppd_jax.users import vlm as vlm_lib


def read_pairs(path: str, n: int, log=print) -> list[prompts.Pair]:
  """The first n readable pairs of the file; an error naming the file when there are fewer."""
  return _first_pairs(*shots.read_rows(path), path, n, log)


def _first_pairs(rows, problems, path: str, n: int, log) -> list[prompts.Pair]:
  out = []
  for r in rows:
    try:
      out.append(prompts.Pair(r["caption"], shots.decode_image(r["image_1"], r["where"]),
                              shots.decode_image(r["image_2"], r["where"]), r["preferred"]))
    except shots.UnreadablePair as e:
      problems.append(str(e))
    if len(out) == n:
      break
  for p in problems:
    log(f"--pairs: skipping {p}")
  if len(out) < n:
    raise shots.PairsError(f"--pairs={path}: {len(out)} readable pair(s), the run's users are "
                           f"made from {n}")
  return out


def vlm_settings(store) -> tuple[str, vlm_lib.Decoding, str, str]:
  """(model, decoding, layers, dtype) the store's users were made with; refuses stores the VLM
  extraction did not make, or made with another prompt template."""
  src = store.source
  if src.get("producer") != embed_lib.PRODUCER:
    raise ValueError(f"{store.path} was not made by the VLM extraction (producer "
                     f"{src.get('producer')!r}), so a new user cannot be embedded like its users")
  if src.get("template") != prompts.TEMPLATE_VERSION:
    raise ValueError(f"{store.path} was made with prompt template {src.get('template')!r}, this "
                     f"code has {prompts.TEMPLATE_VERSION!r}")
  return src["model"], vlm_lib.Decoding(**src["decoding"]), src["layers"], src.get("dtype", "auto")


def embed_new_user(run, path: str, *, vlm_model: str | None = None, log=print):
  """-> ([tokens, dim] float32 embedding, profile text or None) for the pairs in `path`."""
  return embed_pairs(run, read_pairs(path, run.config.data.fewshot, log), vlm_model=vlm_model)


def embed_pairs_text(run, text: str, name: str = "pairs.json", *, vlm=None, log=print):
  """embed_new_user on a pairs file's content (a JSON list; images as data URIs)."""
  rows, problems = shots.parse_rows(text, name, as_json_list=True)
  return embed_pairs(run, _first_pairs(rows, problems, name, run.config.data.fewshot, log),
                     vlm=vlm)


def load_vlm(run, vlm_model: str | None = None):
  """The VLM the run's users were embedded with (None for the demo's stand-in embedder)."""
  if run.config.data.source == "synthetic":
    return None
  model, _, _, dtype = vlm_settings(run.users.store)
  return vlm_lib.VLM.load(vlm_model or model, dtype=dtype)


def embed_pairs(run, pairs: list[prompts.Pair], *, vlm_model: str | None = None, vlm=None):
  """-> ([tokens, dim] embedding, profile or None): the run's embedder on the labelled pairs
  (vlm: an already loaded load_vlm(run), else it is loaded here)."""
  source = run.users   # a Pick-a-Pic run's users come from its workdir, not its shards
  if run.config.data.source == "synthetic":
    return _stand_in(source, pairs, run.config.model), None
  _, decoding, layers, _ = vlm_settings(source.store)
  vlm = vlm or load_vlm(run, vlm_model)
  emb, response = vlm_lib.embed_pairs(vlm, pairs, decoding, layers, seed=decoding.seed)
  if emb.shape != (source.store.tokens, source.store.dim):
    raise ValueError(f"the VLM gave a [{emb.shape[0]}, {emb.shape[1]}] embedding, the run's "
                     f"users are [{source.store.tokens}, {source.store.dim}]")
  return emb, prompts.profile_of(response)


def _stand_in(source, pairs: list[prompts.Pair], m) -> np.ndarray:
  """The demo's embedder on the pairs' pixels, at the demo world's resolution."""
  from ppd_jax.users import fewshot
  side = source.pool_images.shape[1]

  def pixels(im: Image.Image) -> np.ndarray:
    x = np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), np.float32)
    return x / 127.5 - 1.0

  won = [p.image_1 if p.preferred == 1 else p.image_2 for p in pairs]
  lost = [p.image_2 if p.preferred == 1 else p.image_1 for p in pairs]
  return fewshot.embed_user(np.stack([pixels(i) for i in won]),
                            np.stack([pixels(i) for i in lost]),
                            [p.caption for p in pairs], m.user_tokens, m.user_embed_dim)

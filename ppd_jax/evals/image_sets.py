"""Image sets kept on disk, and their reward scores: the resumable unit of Table 1, the
interpolation and the win rates.

A set is one PNG per prompt in a folder (with prompts.jsonl listing them, as `ppd_jax.sample`
writes), made chunk by chunk so that chunk c always draws x_T from seed + c: every model given
the same prompts, seed and chunking starts from the same noise. Scores of a reward are kept next
to the images in a file named by the reward's identity (its weights' hashes), so other weights
never reuse them. The folders may be URLs (gs://...): every file goes through ppd_jax.storage.
"""
import hashlib
import json
import os

import numpy as np

from ppd_jax import images as image_io
from ppd_jax import storage
from ppd_jax.evals import manifest as manifest_lib
from ppd_jax.evals import score_files
from ppd_jax.evals import stats


def generate_set(run, embedding, user_scale: float, prompts, folder, seed: int, chunk: int,
                 log=print) -> list[str]:
  """PNG paths, one per prompt, made chunk by chunk (chunk c with seed + c); chunks whose files
  all exist are not redone. folder/prompts.jsonl lists them (evals/score.py reads it)."""
  from ppd_jax import inference
  from ppd_jax import sample
  where = storage.makedirs(folder)
  paths = [os.fspath(where / f"{i:05d}.png") for i in range(len(prompts))]
  for c in range(0, len(prompts), chunk):
    if all(storage.exists(p) for p in paths[c:c + chunk]):
      continue
    texts = [p.text for p in prompts[c:c + chunk]]
    batch = inference.generate(run, texts, embedding, user_scale=user_scale, seed=seed + c // chunk)
    for path, image in zip(paths[c:c + chunk], batch):
      image_io.save_png(image, path)
    sample.update_listing(where, [{"image": storage.path(p).name, "prompt": t}
                                  for p, t in zip(paths[c:c + chunk], texts)])
    log(f"{folder}: {min(c + chunk, len(prompts))}/{len(prompts)} images")
  return paths


def score_file_name(name: str, reward) -> str:
  """scores-<name>-<hash of the reward's identity>.jsonl: other weights, another file."""
  identity = manifest_lib.reward_identity(reward, name)
  digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
  return f"scores-{name}-{digest}.jsonl"


def score_set(paths, prompts, name: str, reward, folder) -> np.ndarray:
  """[P] scores of one reward, kept in folder/scores-<name>-<hash>.jsonl (resumable)."""
  log_file = score_files.ScoreLog(os.fspath(storage.path(folder) / score_file_name(name, reward)),
                                  name)
  items = [score_files.Item(storage.path(p).name, p, q.text) for p, q in zip(paths, prompts)]
  todo = [it for it in items if it.key not in log_file.scores]
  for c in range(0, len(todo), 64):
    part = todo[c:c + 64]
    log_file.append(part, reward.score([it.path for it in part], [it.prompt for it in part]))
  return np.array([log_file.scores[it.key] for it in items], np.float64)


def cell(scores: np.ndarray) -> dict:
  s = stats.mean_ci(scores)
  return {"mean": s["mean"], "ci95": [s["ci_low"], s["ci_high"]], "n": s["n"]}


def prompts_identity(prompts) -> dict | None:
  """What a prompt list is, for the manifest: its size, a hash of its texts in order, and the
  rows of its file it was drawn from (prompt_sets.Prompt.index, where known)."""
  if prompts is None:
    return None
  texts = "\n".join(p.text for p in prompts)
  indices = [getattr(p, "index", None) for p in prompts]
  return {"count": len(prompts), "texts_sha256": hashlib.sha256(texts.encode()).hexdigest(),
          "indices": None if any(i is None for i in indices) else indices}

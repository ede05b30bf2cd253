"""Pick-a-Pic pairs scored by reward models: the score table behind the reward users (Section 5.1).

  python -m ppd_jax.data.relabel --shards=SHARD_DIR --out=RELABEL_DIR \
      [--rewards=clip_h14,aesthetic,hps_v2] [--model=hps_v2=FOLDER] [--aesthetic_head=PATH] \
      [--min_margin=0] [--assign=hash|all] [--seed=0]

Every pair of the shard folder's train and validation records (the pairs that have latents) has
both JPEGs decoded from the parquet files of its index and scored by each reward, under its
caption. `scores/<reward>/file-<id>.npz` holds {pair [n], score [n, 2]}, with NaN for an image that
does not decode (that pair is dropped and counted later). A unit is one (reward, input file),
written atomically with a done-file (data/shards.py): a killed run resumes, redoing only missing
or damaged units; the same reward with other weights is refused; a reward added later scores only
itself. Then data/reward_users.py turns the scores into each reward user's labels. No latent is
recomputed or copied: the loader reads the shard folder's records under the new labels.

--out (and --shards, whose index and record tables are read) may be a URL (gs://...): every
file goes through ppd_jax.storage and data/shards.py, where an object is only ever whole.
"""
import io
import os

import numpy as np
from PIL import Image

from ppd_jax import cli_logging
from ppd_jax import storage
from ppd_jax.data import pickapic
from ppd_jax.data import pair_progress
from ppd_jax.data import shards
from ppd_jax.data.reward_scores import SPLITS, read_scores  # noqa: F401  (the score table)

PAPER_REWARDS = ("clip_h14", "aesthetic", "hps_v2")   # CLIP, Aesthetic, HPS: Table 1's columns
CHUNK = 512                                            # pairs read and scored at a time


def record_pairs(shard_dir: str) -> np.ndarray:
  """Sorted unique index positions of the train and validation records."""
  pairs = [shards.read_npz(os.path.join(shard_dir, f"records-{s}.npz"))["pair"] for s in SPLITS
           if storage.exists(os.path.join(shard_dir, f"records-{s}.npz"))]
  if not pairs:
    raise shards.ShardsError(f"{shard_dir}: no records-train.npz or records-validation.npz "
                             "(make the folder with python -m ppd_jax.data.precompute)")
  return np.unique(np.concatenate(pairs)).astype(np.int64)


def _decode(data: bytes) -> Image.Image | None:
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.convert("RGB")
  except Exception:  # noqa: BLE001 - PIL raises several types for bad bytes
    return None


def score_pairs(rows: list[dict], rewards: dict) -> dict[str, np.ndarray]:
  """Rows of pickapic.read_pairs -> {reward: [n, 2] scores of (jpg_0, jpg_1)}, NaN where an
  image does not decode."""
  images = [[_decode(r[c]) for c in pickapic.IMAGE_COLUMNS] for r in rows]
  ok = np.array([a is not None and b is not None for a, b in images])
  flat = [im for pair, good in zip(images, ok) for im in pair if good]
  prompts = [r["caption"] for r, good in zip(rows, ok) for _ in range(2) if good]
  out = {}
  for name, reward in rewards.items():
    scores = np.full((len(rows), 2), np.nan, np.float32)
    if flat:
      scores[ok] = reward.score(flat, prompts).reshape(-1, 2)
    out[name] = scores
  return out


def _unit(reward: str, file_id: int) -> str:
  return f"{reward}-file-{file_id:05d}"


def _check_settings(out: str, wanted: dict) -> dict:
  """settings.json maps each reward to its weights; a reward's weights may not change."""
  path = os.path.join(out, shards.SETTINGS)
  have = shards.read_json(path) if storage.exists(path) else {}
  for name, setting in wanted.items():
    if name in have and have[name] != setting:
      raise shards.ShardsError(f"{out} scored reward {name!r} with {have[name]}, this run asks "
                               f"for {setting}; use another --out or the same weights")
  merged = {**have, **wanted}
  storage.makedirs(out)
  shards.write_json(path, merged)
  return merged


def run(shard_dir: str, out: str, rewards: dict, settings: dict, *, log=print,
        process_index: int = 0, process_count: int = 1, after_unit=None) -> None:
  """Scores every (reward, file) unit this process owns that is not done yet.

  rewards: name -> Reward (rewards/); settings: name -> what identifies its weights.
  """
  positions = record_pairs(shard_dir)
  index = pickapic.PickapicIndex.load(os.path.join(shard_dir, "index"))
  _check_settings(out, settings)
  files = np.unique(index.pairs["file_id"][positions])
  units = [(name, int(f)) for f in files for name in rewards]
  mine = [u for i, u in enumerate(units) if i % process_count == process_index]
  todo = [u for u in mine if shards.unit_done(out, _unit(*u)) is None]
  by_file: dict[int, list[str]] = {}
  for name, f in todo:
    by_file.setdefault(f, []).append(name)
  total = int(sum(np.sum(index.pairs["file_id"][positions] == f) for f in by_file))
  log(f"relabel: {len(units)} units ({len(mine)} on this process, {len(mine) - len(todo)} "
      f"already done); {total} pairs of {len(by_file)} files to score")
  progress = pair_progress.Progress(total, log, what="relabel")
  for f, names in sorted(by_file.items()):
    removed = shards.remove_temporaries(out, *(p for n in names for p in (
        f"scores/{n}/file-{f:05d}.npz", f"done/{_unit(n, f)}.json")))
    if removed:
      log(f"relabel: file {f}: removed {removed} half-written file(s) of an interrupted run")
    mine_pairs = positions[index.pairs["file_id"][positions] == f]
    scores = {n: [] for n in names}
    for start in range(0, len(mine_pairs), CHUNK):
      chunk = mine_pairs[start:start + CHUNK]
      got = score_pairs(pickapic.read_pairs(index, chunk), {n: rewards[n] for n in names})
      for n in names:
        scores[n].append(got[n])
      progress.add(len(chunk))
    for n in names:
      storage.makedirs(os.path.join(out, "scores", n))
      info = shards.commit_npz(os.path.join(out, "scores", n, f"file-{f:05d}.npz"),
                               {"pair": mine_pairs, "score": np.concatenate(scores[n])})
      shards.mark_done(out, _unit(n, f), {"files": [{**info, "dir": os.path.join("scores", n)}]})
      if after_unit is not None:
        after_unit(_unit(n, f))
  progress.add(0, force=True)


def all_done(shard_dir: str, out: str, rewards) -> bool:
  index = pickapic.PickapicIndex.load(os.path.join(shard_dir, "index"))
  files = np.unique(index.pairs["file_id"][record_pairs(shard_dir)])
  return all(shards.unit_done(out, _unit(n, int(f)), verify=False) is not None
             for n in rewards for f in files)


def _parse_models(values) -> dict:
  out = {}
  for value in values or ():
    name, sep, folder = value.partition("=")
    if not sep or not folder:
      raise ValueError(f"--model={value!r}: expected REWARD=FOLDER (e.g. hps_v2=converted/hps)")
    out[name] = folder
  return out


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  import sys
  from absl import flags
  from ppd_jax.data import reward_users
  from ppd_jax.rewards import registry
  from ppd_jax.weights import convert
  from ppd_jax.weights import hf_folder
  del argv
  f = flags.FLAGS
  names = [n.strip() for n in f.rewards.split(",") if n.strip()]
  try:
    unknown = [n for n in names if n not in registry.SPECS]
    if unknown or not names:
      raise ValueError(f"--rewards: unknown reward(s) {unknown} (one of "
                       f"{', '.join(registry.NAMES)})")
    models = _parse_models(f.model)
    stray = sorted(set(models) - set(names))
    if stray:
      raise ValueError(f"--model names rewards not in --rewards: {stray}")
    if f.assign not in reward_users.ASSIGN:
      raise ValueError(f"--assign={f.assign!r}: one of {', '.join(reward_users.ASSIGN)}")
    shards.read_manifest(f.shards)
    settings = {n: {"model": models.get(n) or registry.SPECS[n].model,
                    "aesthetic_head": os.path.basename(f.aesthetic_head or "")
                    if n == "aesthetic" else None} for n in names}
    rewards = {n: registry.load(n, models.get(n), f.aesthetic_head if n == "aesthetic" else None,
                                batch_size=f.batch_size) for n in names}
    run(f.shards, f.out, rewards, settings, log=lambda m: print(m, flush=True),
        process_index=f.task_index, process_count=f.task_count)
    if all_done(f.shards, f.out, names):
      reward_users.build(f.shards, f.out, names, f.min_margin, f.assign, f.seed)
    else:
      print("relabel: other tasks still have units to score; the last one to finish (or a "
            "rerun) writes the labels")
  except (ValueError, shards.ShardsError, registry.RewardConfigError, hf_folder.FolderError,
          convert.WeightsError, storage.StorageError) as e:
    sys.exit(f"ppd_jax.data.relabel: {e}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("shards", None, "the shard folder of python -m ppd_jax.data.precompute")
  flags.DEFINE_string("out", None, "the relabel folder (scores, labels; a rerun resumes it)")
  flags.DEFINE_string("rewards", ",".join(PAPER_REWARDS), "comma-separated reward names")
  flags.DEFINE_multi_string("model", None, "REWARD=FOLDER: weights of one reward, if not its "
                            "default (hps_v2 needs its converted folder)")
  flags.DEFINE_string("aesthetic_head", None, "the aesthetic reward's head file")
  flags.DEFINE_integer("batch_size", 64, "images per device batch")
  flags.DEFINE_float("min_margin", 0.0, "pairs whose two scores differ by less are dropped")
  flags.DEFINE_string("assign", "hash", "hash: each pair to one reward user; all: to every one")
  flags.DEFINE_integer("seed", 0, "seed of the hash assignment")
  flags.DEFINE_integer("task_index", 0, "this job's share of the units (independent jobs)")
  flags.DEFINE_integer("task_count", 1, "how many independent jobs share the units")
  flags.mark_flags_as_required(["shards", "out"])
  app.run(main)

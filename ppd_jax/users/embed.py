"""Users' labelled pairs -> a user-embedding store (data/user_store.py), with LLaVA-OneVision.

  python -m ppd_jax.users.embed --model=llava-hf/llava-onevision-qwen2-7b-ov-hf \
      --pairs=SHARDS_OR_PARQUET_OR_JSONL_OR_RELABEL_DIR --out=users.safetensors \
      [--layers=all|last --decoding=sample|greedy --samples=1 --sample_users=0 --batch_size=4
       --shard_index=0 --num_shards=1 --max_new_tokens=1024 --seed=0]
  python -m ppd_jax.users.merge --out=users.safetensors users-*-of-*.safetensors

Kill-safe and resumable: each batch of entries is committed to OUT.parts/ as it finishes; a rerun
with the same settings skips finished batches (a changed setting is refused, naming it), and the
store is written atomically from the parts at the end. Batches are fixed by the plan and
--batch_size, and each batch's sampling seed comes from --seed and its first entry, so a resumed
run writes the same store as an uninterrupted one. --shard_index / --num_shards give each job
every num_shards-th user; merge joins the shards' stores.

Progress (entries, entries/s, ETA) goes to the log and to OUT.progress.jsonl, one row per batch.

--out and --pairs may be URLs (gs://...): every file goes through ppd_jax.storage. In a bucket
each part is one object, which exists only once complete, so resuming works the same there.
"""
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import metrics
from ppd_jax import storage
from ppd_jax.data import shards as shards_lib
from ppd_jax.users import prompts
from ppd_jax.users import shots as shots_lib
from ppd_jax.data import user_store as store_lib
from ppd_jax.users import vlm as vlm_lib

PRODUCER = "ppd_jax.users.embed"


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything that decides the store's contents (recorded in it) or the job's share of it."""
  model: str
  pairs: str
  out: str
  layers: str = "all"
  decoding: vlm_lib.Decoding = vlm_lib.Decoding()
  shots: int = 4
  samples: int = 1
  sample_users: int = 0
  batch_size: int = 4
  shard_index: int = 0
  num_shards: int = 1
  dtype: str = "auto"
  storage_dtype: str = "float32"

  def check(self) -> None:
    """Flag values, before any model or data is touched."""
    bad = []
    if self.layers not in vlm_lib.LAYERS:
      bad.append(f"--layers must be one of {vlm_lib.LAYERS}, got {self.layers!r}")
    for name in ("shots", "samples", "batch_size", "num_shards"):
      if getattr(self, name) < 1:
        bad.append(f"--{name} must be >= 1, got {getattr(self, name)}")
    if self.sample_users < 0:
      bad.append(f"--sample_users must be >= 0, got {self.sample_users}")
    if not 0 <= self.shard_index < max(self.num_shards, 1):
      bad.append(f"--shard_index must be in [0, --num_shards={self.num_shards}), got "
                 f"{self.shard_index}")
    if self.storage_dtype not in ("float32", "float16"):
      bad.append(f"--storage_dtype must be float32 or float16, got {self.storage_dtype!r}")
    if not self.out.endswith(".safetensors"):
      bad.append(f"--out must name a .safetensors file, got {self.out!r}")
    if bad:
      raise ValueError("; ".join(bad))
    if os.path.isdir(self.model):   # a hub id is checked when it is loaded (vlm.VLM.load)
      vlm_lib.check_model_type(self.model)


def settings(opt: Options, pairs, model_info: dict | None = None) -> dict:
  """The store's `source`: what made it. Resuming and merging compare it."""
  s = {"producer": PRODUCER, "model": opt.model, "template": prompts.TEMPLATE_VERSION,
       "system_prompt": prompts.SYSTEM_PROMPT, "decoding": opt.decoding.as_dict(),
       "layers": opt.layers, "shots": opt.shots, "samples": opt.samples,
       "sample_users": opt.sample_users, "batch_size": opt.batch_size, "dtype": opt.dtype,
       "storage_dtype": opt.storage_dtype, "pairs": pairs.describe()}
  if model_info is not None:
    s["model_info"] = model_info
  if opt.num_shards > 1:
    s["shard"] = {"index": opt.shard_index, "count": opt.num_shards}
  return s


def _differing(a: dict, b: dict) -> list[str]:
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _batches(entries: list, size: int) -> list[list]:
  return [entries[i:i + size] for i in range(0, len(entries), size)]


def _part_path(work: str, b: int) -> str:
  return os.path.join(work, f"part-{b:06d}.npz")


def _remove_tree(path: str) -> None:
  """Deletes a folder (a URL's objects under it) if it is there."""
  if not storage.is_url(path):
    shutil.rmtree(path, ignore_errors=True)
  elif storage.exists(path):
    storage.path(path).rmtree()


def _read_part(path: str, batch: list, keys_only: bool = False) -> dict | None:
  """A committed part, or None if it belongs to another batch (a changed plan). keys_only reads
  just its entry keys (npz members load lazily), enough to tell whether the batch is done."""
  try:
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    with np.load(source) as f:
      if [str(k) for k in f["planned"]] != [e.key for e in batch]:
        return None
      return {"planned": f["planned"]} if keys_only else {k: f[k] for k in f.files}
  except (OSError, ValueError, KeyError):
    return None


def run(opt: Options, *, log=print, vlm=None, after_batch=None) -> store_lib.UserEmbeddingStore:
  """The CLI's work; `vlm` (an already loaded users.vlm.VLM) saves loading it again in tests and
  in sampling, `after_batch(b)` lets a test stop the run midway."""
  opt.check()
  pairs = shots_lib.open_pairs(opt.pairs, opt.shots, split_params=_split_params(), log=log)
  entries = shots_lib.plan(pairs, shots=opt.shots, samples=opt.samples,
                           sample_users=opt.sample_users, seed=opt.decoding.seed)
  mine = set(pairs.users[opt.shard_index::opt.num_shards].tolist())
  entries = [e for e in entries if e.user_id in mine]
  short = short_of_samples(pairs, entries, opt)
  if short:
    log(f"embed: {len(short)} user(s) have fewer distinct {opt.shots}-pair subsets than "
        f"--samples={opt.samples} (C(pairs, {opt.shots}) < {opt.samples}); each gets every subset "
        "it has: " + ", ".join(f"user {u} {c}" for u, c in list(short.items())[:10])
        + (", ..." if len(short) > 10 else ""))
  if not entries:
    raise shots_lib.PairsError(f"--pairs={opt.pairs}: no user with >= {opt.shots} pairs in "
                               f"shard {opt.shard_index} of {opt.num_shards}")
  wanted = settings(opt, pairs)
  if storage.exists(opt.out):
    done = store_lib.UserEmbeddingStore(opt.out)
    have = {k: v for k, v in done.source.items() if k not in ("model_info", "report")}
    if have != wanted:
      raise ValueError(f"--out={opt.out} exists and was made with other settings "
                       f"({', '.join(_differing(have, wanted))} differ); choose another --out")
    log(f"embed: {opt.out} is complete ({done.num_users} users, {done.num_entries} entries)")
    _remove_tree(opt.out + ".parts")
    return done

  work = opt.out + ".parts"
  storage.makedirs(work)
  settings_path = os.path.join(work, "settings.json")
  if storage.exists(settings_path):
    before = shards_lib.read_json(settings_path)
    if before != wanted:
      raise ValueError(f"{work} holds a run with other settings "
                       f"({', '.join(_differing(before, wanted))} differ); rerun with those, "
                       "or delete the folder to start over")
  else:
    shards_lib.write_json(settings_path, wanted)
  shards_lib.remove_temporaries(work, "part-*.npz")

  batches = _batches(entries, opt.batch_size)
  todo = [b for b, batch in enumerate(batches)
          if _read_part(_part_path(work, b), batch, keys_only=True) is None]
  log(f"embed: {len(entries)} entries of {len(mine)} users in {len(batches)} batches; "
      f"{len(batches) - len(todo)} done before, {len(todo)} to go")
  if todo and vlm is None:
    vlm = vlm_lib.VLM.load(opt.model, dtype=opt.dtype)
  model_info = vlm.describe() if vlm is not None else None
  progress = _Progress(sum(len(batches[b]) for b in todo), opt.out + ".progress.jsonl", log)
  problems = []
  for b in todo:
    problems += _embed_batch(vlm, pairs, batches[b], opt, _part_path(work, b))
    progress.add(len(batches[b]))
    if after_batch is not None:
      after_batch(b)
  return _assemble(opt, batches, work, wanted, model_info, pairs, problems, log, short)


def short_of_samples(pairs, entries: list, opt: Options) -> dict:
  """{user: entries planned} for the users given extra samples (all, or the --sample_users with
  the most pairs, as shots.plan chooses) whose C(pairs, shots) distinct few-shot sets are fewer
  than --samples: they get every set there is, and the run says so."""
  if opt.samples <= 1:
    return {}
  users = pairs.users
  counts = np.asarray([len(pairs.candidates(u)) for u in users])
  entitled = users
  if opt.sample_users:
    entitled = users[np.lexsort((users, -counts))[:opt.sample_users]]
  made = {}
  for e in entries:
    made[e.user_id] = made.get(e.user_id, 0) + 1
  n_of = dict(zip(users.tolist(), counts.tolist()))
  return {u: made[u] for u in entitled.tolist()
          if u in made and math.comb(n_of[u], opt.shots) < opt.samples}


def _split_params() -> dict:
  """A parquet folder is indexed with the training config's split parameters."""
  from configs import common
  d = common.get_base_config().data
  return {"validation_fraction": d.validation_fraction, "test_fraction": d.test_fraction,
          "seed": d.split_seed}


def _embed_batch(vlm, pairs, batch: list, opt: Options, path: str) -> list[str]:
  """One batch through the VLM, committed as one part file; -> problems met."""
  entries, pair_lists, problems = shots_lib.resolve(pairs, batch)
  n = len(entries)
  emb = np.zeros((n, 0, 0), np.float32)
  texts = []
  if n:
    seed = vlm_lib.batch_seed(opt.decoding.seed, batch[0].key)
    emb, texts = vlm.embed([prompts.user_prompt(p) for p in pair_lists], opt.decoding,
                           opt.layers, seed)
  if not np.isfinite(emb.astype(opt.storage_dtype)).all():
    raise ValueError(f"non-finite embedding in --storage_dtype={opt.storage_dtype} for users "
                     f"{sorted({e.user_id for e in entries})}; use --storage_dtype=float32")
  shards_lib.commit_npz(path, {
      "planned": np.asarray([e.key for e in batch]),
      "user_ids": np.asarray([e.user_id for e in entries], np.int64).reshape(n),
      "samples": np.asarray([e.sample for e in entries], np.int64).reshape(n),
      "shot_ids": np.asarray([e.shot_ids for e in entries], np.int64).reshape(n, opt.shots),
      "embeddings": emb.astype(opt.storage_dtype),
      "responses": np.asarray(texts, dtype=str).reshape(n),
      "problems": np.asarray(problems, dtype=str)})
  return problems


def _assemble(opt: Options, batches: list, work: str, wanted: dict, model_info, pairs,
              problems_now: list, log, short: dict) -> store_lib.UserEmbeddingStore:
  """All parts -> the store (atomic), then the parts folder is removed."""
  parts = [_read_part(_part_path(work, b), batch) for b, batch in enumerate(batches)]
  if any(p is None for p in parts):
    raise RuntimeError(f"{work}: a part is missing after the run; rerun to redo it")
  parts = [p for p in parts if p["user_ids"].size]
  problems = [str(x) for p in parts for x in p["problems"]]
  for line in problems[:10]:
    log(f"embed: {line}")
  responses = [str(r) for p in parts for r in p["responses"]]
  cat = lambda k: np.concatenate([p[k] for p in parts])
  ids = cat("user_ids")
  lacking = np.setdiff1d(ids, ids[cat("samples") == 0])
  keep = ~np.isin(ids, lacking)     # a user whose sample 0 had too few readable pairs: left out
  source = {**wanted, "report": {**pairs.report, "problems": len(problems),
                                 "users_left_out": lacking.tolist()[:100],
                                 "users_short_of_samples": len(short),
                                 "short_of_samples": {str(u): c for u, c in
                                                      list(short.items())[:100]}}}
  if model_info is not None:
    source["model_info"] = model_info
  kept = [r for r, k in zip(responses, keep) if k]
  # Responses first: once the store exists, a rerun counts the job as done.
  _write_responses(opt.out + ".responses.jsonl", ids[keep], cat("samples")[keep], kept)
  store_lib.write_store(opt.out, ids[keep], cat("embeddings")[keep], samples=cat("samples")[keep],
                        shot_ids=cat("shot_ids")[keep],
                        profiles=[prompts.profile_of(r) for r in kept], source=source)
  _remove_tree(work)
  done = store_lib.UserEmbeddingStore(opt.out)
  log(f"embed: wrote {opt.out}: {done.num_users} users, {done.num_entries} entries of "
      f"[{done.tokens}, {done.dim}]; {len(problems)} problem(s)")
  return done


def _write_responses(path: str, ids, samples, responses: list[str]) -> None:
  """The VLM's whole answers (the store keeps the profile section), for reading."""
  text = "".join(json.dumps({"user_id": u, "sample": s, "response": r}, ensure_ascii=False) + "\n"
                 for u, s, r in zip(ids.tolist(), samples.tolist(), responses))
  if storage.is_url(path):
    storage.write_text(path, text)
    return
  tmp = shards_lib.temporary(path)
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  shards_lib.commit(tmp, path)


class _Progress:
  """entries done, entries/s and ETA, to the log and one JSON row per batch."""

  def __init__(self, total: int, path: str, log):
    self.total, self.done, self.path, self.log = total, 0, path, log
    self.start = time.time()

  def add(self, n: int) -> None:
    self.done += n
    elapsed = max(time.time() - self.start, 1e-9)
    rate = self.done / elapsed
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    self.log(f"embed: {self.done}/{self.total} entries ({100 * self.done / self.total:.1f}%), "
             f"{rate:.2f} entries/s, ETA {metrics.format_duration(eta)}")
    # A URL's object is rewritten whole per row (storage.append_text): one small row per batch.
    storage.append_text(self.path, json.dumps({
        "time": time.time(), "entries_done": self.done, "total": self.total,
        "entries_per_s": rate, "eta_s": eta}) + "\n")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model", None, "LLaVA-OneVision checkpoint: hub id or local folder")
  flags.DEFINE_string("pairs", None, "precompute output folder (its index), Pick-a-Pic parquet "
                      "folder, JSONL/JSON file of {user_id, caption, image_1, image_2, "
                      "preferred}, or a relabel folder (the reward users, Section 5.1)")
  flags.DEFINE_string("out", None, "the store to write (.safetensors)")
  flags.DEFINE_enum("layers", "all", list(vlm_lib.LAYERS),
                    "final-token state of every layer [L + 1, H] (authors' code) or the last "
                    "[1, H]")
  flags.DEFINE_enum("decoding", "sample", ["sample", "greedy"],
                    "sample: temperature/top-p, seeded (the paper); greedy: the authors' code")
  flags.DEFINE_float("temperature", 0.7, "sampling temperature")
  flags.DEFINE_float("top_p", 1.0, "nucleus probability (1.0: none)")
  flags.DEFINE_integer("top_k", 0, "keep only the k likeliest tokens (0: off, the paper)")
  flags.DEFINE_integer("seed", 0, "sampling seed (and the extra samples' shot choice)")
  flags.DEFINE_integer("max_new_tokens", 1024, "cap on the generated response")
  flags.DEFINE_integer("shots", 4, "pairs per embedding (the paper's N)")
  flags.DEFINE_integer("samples", 1, "embeddings per user, each from another few-shot set (a "
                       "user with fewer distinct sets gets those it has: logged, and counted in "
                       "the store's report, users_short_of_samples)")
  flags.DEFINE_integer("sample_users", 0, "give the extra samples only to the K users with the "
                       "most pairs (0: all)")
  flags.DEFINE_integer("batch_size", 4, "users per generate() call")
  flags.DEFINE_integer("shard_index", 0, "this job's share of the users")
  flags.DEFINE_integer("num_shards", 1, "jobs the users are spread over")
  flags.DEFINE_string("dtype", "auto", "model dtype: auto (bfloat16 on GPU, float32 on CPU), "
                      "float32, bfloat16, float16")
  flags.DEFINE_enum("storage_dtype", "float32", ["float32", "float16"], "embeddings as stored")
  flags.mark_flags_as_required(["model", "pairs", "out"])


def options_from_flags(f) -> Options:
  decoding = vlm_lib.Decoding(mode=f.decoding, temperature=f.temperature, top_p=f.top_p,
                              top_k=f.top_k, seed=f.seed, max_new_tokens=f.max_new_tokens)
  return Options(model=f.model, pairs=f.pairs, out=f.out, layers=f.layers, decoding=decoding,
                 shots=f.shots, samples=f.samples, sample_users=f.sample_users,
                 batch_size=f.batch_size, shard_index=f.shard_index, num_shards=f.num_shards,
                 dtype=f.dtype, storage_dtype=f.storage_dtype)


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run(options_from_flags(flags.FLAGS))
  except (ValueError, OSError, storage.StorageError) as e:   # Pairs/Store/ShardsError too
    sys.exit(f"ppd_jax.users.embed: {e}")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)

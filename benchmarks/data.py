"""Data-loader throughput on SD 1.5-sized Pick-a-Pic records, against what an 8-GPU host consumes.

  python benchmarks/data.py [--pairs=4096] [--batch=64] [--batches=50] [--workers=0,2]
  python benchmarks/data.py --folder=/tmp/ppd_bench_shards    # keep (and reuse) the shard folder

The loader must never be what a GPU waits for. The performance target is 100 pairs/s on one GPU
for SD 1.5 (--target_pairs_per_s, docs/performance.md); one host feeds its --gpus (8) GPUs, so
it must deliver 8 x 100 = 800 pairs/s, and the benchmark asks for 2x that as headroom.

The benchmark writes a shard folder as ppd_jax.data.precompute would, but from a seeded numpy rng
instead of a VAE and text encoder: float16 latents [64, 64, 4] per image, CLIP-L text embeddings
float16 [77, 768] per caption, and per user a float32 [29, 3584] embedding: what the pickapic_*
configs train on by default (model.user_tokens=0 takes the store's shape, and users.embed's
default --layers=all keeps the final token's state of every layer of LLaVA-OneVision 7b: Qwen2-7B's
28 layers + the embeddings = 29 tokens of 3584, float32 its default storage). It then reads it the
way the trainer does, PickapicPairs (ArrayRecord random access, text-store and user-store joins,
float32 outputs) inside pipeline.make_dataset's Grain pipeline, for each --workers count, and
prints pairs/s, MB/s of stored latent bytes and:
  x 1 GPU           measured pairs/s / --target_pairs_per_s
  x 8-GPU host      measured pairs/s / (--gpus x --target_pairs_per_s): must be >= 2
  loader / raw      against a bare loop over the same index batches, same run: ArrayRecord
                    __getitems__ + records.decode only (no joins, no float32 casts, no Grain), so
                    the cost of the joins and of the pipeline shows.
The consumer does nothing with a batch, so these are the loader's ceilings. The folder has just
been written (or was read before), so its files are in the OS page cache: a cold disk is not
timed. At 64 KiB of latents per pair, 800 pairs/s is 52 MB/s from disk.
"""
import json
import os
import platform
import shutil
import tempfile
import time

import grain
import numpy as np
from absl import app
from absl import flags

from configs import ppd as ppd_configs
from ppd_jax.data import pickapic
from ppd_jax.data import pickapic_source
from ppd_jax.data import pipeline
from ppd_jax.data import records
from ppd_jax.data import shards
from ppd_jax.data import user_store as store_lib

LATENT_SHAPE = (64, 64, 4)          # SD 1.5 at 512 px
TEXT_SHAPE = (77, 768)              # CLIP ViT-L/14 last hidden state
USER_DIM = 3584                     # LLaVA-OneVision 7b (Qwen2-7B) hidden size
USERS_FILE = "users.safetensors"

flags.DEFINE_integer("pairs", 4096, "pairs written (all in the train split)")
flags.DEFINE_integer("shards", 4, "ArrayRecord shard files the pairs are split over")
flags.DEFINE_integer("captions", 2048, "distinct captions in the text store")
flags.DEFINE_integer("text_chunk", 1024, "captions per text-store file")
flags.DEFINE_integer("users", 256, "users in the user-embedding store")
flags.DEFINE_integer("user_tokens", 29, "tokens per user embedding: 29 = users.embed's default "
                     "(every layer of Qwen2-7B + the embeddings); 1 = --layers=last")
flags.DEFINE_integer("batch", 64, "global batch (pairs)")
flags.DEFINE_integer("batches", 50, "timed batches per measurement")
flags.DEFINE_integer("warmup", 3, "batches read before timing (worker start-up included)")
flags.DEFINE_list("workers", ["0", "2"], "Grain worker_count values to time")
flags.DEFINE_float("target_pairs_per_s", 100.0, "pairs/s one GPU consumes at the target")
flags.DEFINE_integer("gpus", 8, "GPUs one host's loader feeds")
flags.DEFINE_float("headroom", 2.0, "loader pairs/s asked for, in units of what the host consumes")
flags.DEFINE_string("folder", "", "shard folder to write and keep (reused when it was made with "
                    "the same sizes); default a temporary folder, deleted at the end")
flags.DEFINE_integer("seed", 0, "random data")
FLAGS = flags.FLAGS


# The shard folder ---------------------------------------------------------------------------------

def _sizes() -> dict:
  return {"pairs": FLAGS.pairs, "shards": FLAGS.shards, "captions": FLAGS.captions,
          "text_chunk": FLAGS.text_chunk, "users": FLAGS.users, "user_tokens": FLAGS.user_tokens,
          "seed": FLAGS.seed}


def user_shape(sizes: dict) -> tuple[int, int]:
  return (sizes["user_tokens"], USER_DIM)


def build_folder(folder: str, sizes: dict) -> None:
  """Writes a finished shard folder of random data with precompute's layout and manifest.

  Mirrors what ppd_jax.data.precompute leaves behind (encode_file's record fields,
  encode_text_chunk's text files, finalize()'s records-{split}.npz and manifest.json, the
  pickapic index's users.npz) plus a user store (data/user_store.py), so PickapicPairs reads it as
  it reads a real one; only the numbers are random (no VAE, no text encoder, no parquet).
  """
  rng = np.random.default_rng(sizes["seed"])
  n, n_shards = sizes["pairs"], sizes["shards"]
  n_cap, chunk = sizes["captions"], sizes["text_chunk"]
  for sub in ("pairs", "text", "index"):
    os.makedirs(os.path.join(folder, sub), exist_ok=True)

  # Users: ids as sparse as Pick-a-Pic's, split 80/10/10; the pairs belong to training users.
  user_ids = np.sort(rng.choice(1_000_000, sizes["users"], replace=False)).astype(np.int64)
  split = rng.choice([pickapic.TRAIN, pickapic.VALIDATION, pickapic.TEST], sizes["users"],
                     p=[0.8, 0.1, 0.1]).astype(np.int8)
  store_lib.write_store(os.path.join(folder, USERS_FILE), user_ids,
                        rng.standard_normal((sizes["users"],) + user_shape(sizes), np.float32),
                        source={"benchmark": "benchmarks/data.py"})
  shards.commit_npz(os.path.join(folder, "index", "users.npz"),
                    {"user_id": user_ids, "split": split})

  # Text store: text/text_embedding-{k:05d}.npy, `chunk` captions each.
  text_files = []
  for k in range(-(-n_cap // chunk)):
    rows = min(chunk, n_cap - k * chunk)
    array = rng.standard_normal((rows,) + TEXT_SHAPE, np.float32).astype(np.float16)
    path = os.path.join(folder, "text", f"text_embedding-{k:05d}.npy")
    text_files.append({**shards.save_npy(path, array), "dir": "text", "key": "text_embedding",
                       "shape": list(array.shape)})

  # Pairs: one record per pair, the fields encode_file writes, over `n_shards` files.
  pair = np.arange(n, dtype=np.int64)
  pair_user = rng.choice(user_ids[split == pickapic.TRAIN], n)
  pair_caption = rng.integers(0, n_cap, n).astype(np.int32)
  shard_list = []
  bounds = np.linspace(0, n, n_shards + 1).astype(int)
  for u in range(n_shards):
    writer = shards.RecordWriter(os.path.join(folder, "pairs", f"train-{u:05d}.array_record"))
    for start in range(bounds[u], bounds[u + 1], 256):
      stop = min(start + 256, bounds[u + 1])
      latents = rng.standard_normal((stop - start, 2) + LATENT_SHAPE, np.float32)
      latents = latents.astype(np.float16)
      for j, i in enumerate(range(start, stop)):
        writer.write(records.encode({
            "preferred": latents[j, 0], "dispreferred": latents[j, 1],
            "time_ids": np.array([512, 512, 0, 0, 512, 512], np.float32),
            "pair": pair[i], "user_id": pair_user[i], "caption_id": pair_caption[i]}))
    shard_list.append({**writer.close(), "dir": "pairs", "split": "train",
                       "unit": f"file-{u:05d}"})
  shards.commit_npz(os.path.join(folder, "records-train.npz"),
                    {"pair": pair, "user_id": pair_user, "caption_id": pair_caption})

  config = ppd_configs.get_config("pickapic_sd15")
  m, d = config.model, config.data
  settings = {
      "format": shards.FORMAT, "version": shards.VERSION,
      "model": {"pretrained": m.pretrained, "variant": m.variant, "base": m.base,
                "backbone": ["random (benchmarks/data.py)"], "resolution": 512,
                "latent_shape": list(LATENT_SHAPE), "cross_attention_dim": TEXT_SHAPE[1],
                "addition_embed_type": m.addition_embed_type},
      "data": {"fewshot": d.fewshot, "validation_fraction": d.validation_fraction,
               "test_fraction": d.test_fraction, "split_seed": d.split_seed,
               "storage_dtype": "float16", "text_chunk": chunk, "text_length": TEXT_SHAPE[0]},
  }
  shards.write_json(os.path.join(folder, shards.SETTINGS), settings)
  manifest = {
      **settings,
      "config": json.loads(config.to_json()),
      "sources": [],
      "index": {"benchmark": sizes},
      "counts": {"pairs_train": n, "pairs_validation": 0, "pairs_test": 0, "pairs_skipped": 0},
      "skipped_reasons": {},
      "skipped": [],
      "text": {"chunk": chunk, "num_chunks": len(text_files), "keys": ["text_embedding"],
               "shapes": {"text_embedding": list(TEXT_SHAPE)}, "files": text_files},
      "shards": shard_list,
      "benchmark": sizes,           # what a later --folder run checks before reusing the folder
  }
  shards.write_json(os.path.join(folder, shards.MANIFEST), manifest)


def _prepare_folder(folder: str, sizes: dict) -> str:
  """Reuses a folder this benchmark made with the same sizes; otherwise builds it."""
  path = os.path.join(folder, shards.MANIFEST)
  if os.path.exists(path):
    if shards.read_json(path).get("benchmark") == sizes:
      return "reused"
    raise SystemExit(f"{folder} holds shards made with other sizes or not by this benchmark; "
                     "pass another --folder")
  if os.path.isdir(folder) and os.listdir(folder):
    raise SystemExit(f"{folder} is not empty; pass an empty or new --folder")
  build_folder(folder, sizes)
  return "built"


# Timing -------------------------------------------------------------------------------------------

def _index_batches(n: int, batch: int, count: int) -> list[np.ndarray]:
  """The record indices of the loader's first `count` batches (make_dataset's order, seed 0)."""
  ds = grain.MapDataset.range(n).shuffle(seed=0).repeat(None).batch(batch, drop_remainder=True)
  return [np.asarray(ds[i]) for i in range(count)]


def time_raw(paths: list[str], index_batches: list[np.ndarray], warmup: int) -> float:
  """Seconds per batch of a bare ArrayRecord read + decode of the same index batches."""
  from array_record.python import array_record_data_source
  source = array_record_data_source.ArrayRecordDataSource(paths)

  def read(idx):
    return [records.decode(r) for r in source.__getitems__(idx.tolist())]
  for idx in index_batches[:warmup]:
    read(idx)
  start = time.perf_counter()
  for idx in index_batches[warmup:]:
    read(idx)
  return (time.perf_counter() - start) / (len(index_batches) - warmup)


def time_loader(source, batch: int, workers: int, warmup: int, batches: int, user: tuple):
  """(seconds per batch, warm-up seconds) of make_dataset's iterator; the batch is checked."""
  start = time.perf_counter()
  it = iter(pipeline.make_dataset(source, global_batch=batch, seed=0, worker_count=workers))
  try:
    for _ in range(warmup):
      out = next(it)
    warm = time.perf_counter() - start
    assert out["preferred"].shape == (batch,) + LATENT_SHAPE, out["preferred"].shape
    assert out["text_embedding"].shape == (batch,) + TEXT_SHAPE, out["text_embedding"].shape
    assert out["user_embedding"].shape == (batch,) + user, out["user_embedding"].shape
    start = time.perf_counter()
    for _ in range(batches):
      out = next(it)
    per_batch = (time.perf_counter() - start) / batches
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return per_batch, warm


# Main ---------------------------------------------------------------------------------------------

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workers = [int(w) for w in FLAGS.workers]
  sizes = _sizes()
  folder = FLAGS.folder or tempfile.mkdtemp(prefix="ppd_bench_data_")
  try:
    start = time.perf_counter()
    how = _prepare_folder(os.path.abspath(folder), sizes)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    print(f"shard folder {folder} ({how} in {time.perf_counter() - start:.1f} s, "
          f"{size / 2**20:.0f} MiB): {FLAGS.pairs} pairs in {FLAGS.shards} shards, latents "
          f"float16 {list(LATENT_SHAPE)}, {FLAGS.captions} captions x float16 {list(TEXT_SHAPE)} "
          f"in chunks of {FLAGS.text_chunk}, {FLAGS.users} users x float32 "
          f"{list(user_shape(sizes))}",
          flush=True)

    config = ppd_configs.get_config("pickapic_sd15")
    config.data.shards = os.path.abspath(folder)
    config.data.user_embeddings = os.path.join(os.path.abspath(folder), USERS_FILE)
    config.model.addition_embed_type = ""
    source = pickapic_source.PickapicPairs(config)

    batch, n_timed, warmup = FLAGS.batch, FLAGS.batches, FLAGS.warmup
    latent_bytes = 2 * int(np.prod(LATENT_SHAPE)) * 2        # both images, float16 on disk
    t_raw = time_raw(source._paths,  # pylint: disable=protected-access
                     _index_batches(len(source), batch, warmup + n_timed), warmup)
    raw_rate = batch / t_raw

    rows = []
    for w in workers:
      t, warm = time_loader(source, batch, w, warmup, n_timed, user_shape(sizes))
      rows.append((w, batch / t, t, warm))
      print(f"workers {w}: {batch / t:8.1f} pairs/s ({t * 1e3:.1f} ms/batch; first {warmup} "
            f"batches {warm:.2f} s, worker start-up included)", flush=True)
  finally:
    if not FLAGS.folder:
      shutil.rmtree(folder, ignore_errors=True)

  target = FLAGS.target_pairs_per_s
  host = FLAGS.gpus * target            # what one host's GPUs consume at the target
  print(f"\nmachine: {platform.machine()} CPU, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; batch {batch} pairs, {n_timed} timed batches after {warmup}; "
        f"user embedding {list(user_shape(sizes))} float32")
  print(f"{'read':<22} {'pairs/s':>9} {'ms/batch':>9} {'latent MB/s':>12} "
        f"{'x 1 GPU':>8} {f'x {FLAGS.gpus}-GPU host':>13} {'/ raw':>7}")
  print(f"{'raw read+decode':<22} {raw_rate:9.1f} {t_raw * 1e3:9.1f} "
        f"{raw_rate * latent_bytes / 1e6:12.1f} {raw_rate / target:8.2f} {raw_rate / host:13.2f} "
        f"{1.0:7.2f}")
  for w, rate, t, _ in rows:
    print(f"{f'loader, workers {w}':<22} {rate:9.1f} {t * 1e3:9.1f} "
          f"{rate * latent_bytes / 1e6:12.1f} {rate / target:8.2f} {rate / host:13.2f} "
          f"{rate / raw_rate:7.2f}")
  print(f"(x 1 GPU: pairs/s / {target:g} pairs/s, what one GPU consumes at the performance target; "
        f"x {FLAGS.gpus}-GPU host: pairs/s / {host:g}; / raw: loader / bare ArrayRecord read + "
        "decode of the same batches)")
  for w, rate, _, _ in rows:
    print(f"data loader (SD 1.5 records, {sizes['user_tokens']} user tokens, batch {batch}, "
          f"workers {w}): {rate:.0f} pairs/s = {rate / host:.2f} x the {host:g} pairs/s an "
          f"{FLAGS.gpus}-GPU host consumes ({FLAGS.gpus} x {target:g})")
  short = [w for w, rate, _, _ in rows if rate < FLAGS.headroom * host]
  if short:
    print(f"WARNING: below {FLAGS.headroom:g} x {host:g} pairs/s with workers {short}: too little "
          f"headroom for an {FLAGS.gpus}-GPU host")


if __name__ == "__main__":
  app.run(main)

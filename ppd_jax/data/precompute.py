"""Pick-a-Pic parquet -> ArrayRecord shards of VAE latents, text store and manifest (data/shards.py).

  python -m ppd_jax.data.precompute --config=configs/ppd.py:pickapic_sd15 \
      --input=PARQUET_DIR --output=SHARD_DIR

--input may also be an own JSONL/CSV/parquet table (docs/own_data.md, --columns for other column
names): data/table_convert.py first copies its good rows into Pick-a-Pic's layout under
SHARD_DIR/table/, and everything below runs on that copy.

Work is cut into units, each done or not: one text chunk (`data.text_chunk` unique captions through
the text encoder(s)) or one input file (both images of its pairs through the VAE, one shard per
split). Process p of P does units p, p + P, ...; within a process the VAE batch is split over all
local devices. A rerun skips units whose done-file and checksums hold, so a killed run resumes
where it stopped. A JPEG that does not decode, or a row group that cannot be read, drops its pairs,
which are counted and listed in the manifest; nothing already written is touched.

Non-finite values (NaN or inf, e.g. an fp16 overflow in an encoder) never reach training. A pair
with non-finite latents is not written, skipped like a corrupt JPEG ("non-finite latents"). A
caption's text conditioning is written before the pairs that use it may be (text and file units
run independently, possibly in other processes), so its text unit records its non-finite rows in
its done-file; the manifest lists them (text.nonfinite), counts the pairs using them as skipped
("non-finite text"), and the loader (data/pickapic_source.py) leaves those pairs out.

With config.data.profile_in_caption on (the caption-augmentation baseline), the text units encode
each pair's caption joined with its user's profile text (data/profile_caption.py) instead of the
plain captions, and each record's caption_id points at that joined text.

--input may be a URL (gs://...): the parquet files are read in place (data/pickapic.py). --output
must be local: the shards are ArrayRecord files, whose writer and the training loader's reader
open local files only, and a unit's resume relies on local renames; write them to a local disk
and copy the finished folder where it is needed.
"""
import concurrent.futures
import os
import sys

import jax
import numpy as np

from ppd_jax import backbones
from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import storage
from ppd_jax.data import images as images_lib
from ppd_jax.data import manifest as manifest_lib
from ppd_jax.data import pair_progress
from ppd_jax.data import pickapic
from ppd_jax.data import profile_text
from ppd_jax.data import records
from ppd_jax.data import shards
from ppd_jax.data import table_convert
from ppd_jax.data import text_units

def settings_of(config, backbone, store=None) -> dict:
  """What the output folder is made with; a rerun into the same folder must match it.

  store: the profile store with data.profile_in_caption on (default: opened from the config).
  With the switch off nothing is added, so folders made before the switch existed still match."""
  d, m = config.data, config.model
  settings = {
      "format": shards.FORMAT, "version": shards.VERSION,
      "model": {"pretrained": m.pretrained, "variant": m.variant, "base": m.base,
                "backbone": [str(x) for x in backbone.identity],
                "resolution": int(backbone.pixel_size),
                "latent_shape": [m.sample_size, m.sample_size, m.in_channels],
                **({"family": "cascade", "decoder": m.decoder} if backbones.is_cascade(m) else
                   {"cross_attention_dim": m.cross_attention_dim,
                    "addition_embed_type": m.addition_embed_type})},
      "data": {"fewshot": d.fewshot, "validation_fraction": d.validation_fraction,
               "test_fraction": d.test_fraction, "split_seed": d.split_seed,
               "storage_dtype": d.storage_dtype, "text_chunk": d.text_chunk,
               "text_length": d.text_length},
  }
  if d.get("profile_in_caption", False):
    store = store if store is not None else profile_text.profile_store(config)
    settings["data"].update(profile_in_caption=True, profile_store=profile_text.store_fingerprint(store))
  return settings


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the settings that differ, one level into each section."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if a == b:
      continue
    if not prefix and isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{k}.")
    else:
      out.append(prefix + k)
  return out


def _check_settings(output: str, settings: dict) -> None:
  path = os.path.join(output, shards.SETTINGS)
  if os.path.exists(path):
    old = shards.read_json(path)
    if old != settings:
      diff = _differences(old, settings)
      raise shards.ShardsError(
          f"{output} was made with other settings ({', '.join(diff)} differ; see {path}). "
          "Use a new --output, or the settings it was made with.")
  else:
    os.makedirs(output, exist_ok=True)
    shards.write_json(path, settings)


def _load_or_build_index(output: str, input_path: str, d, log,
                         table_report=None) -> pickapic.PickapicIndex:
  """The index saved in `output` if it was made from these files with these parameters.
  table_report: an own table's conversion report (data/table_convert.py), kept in the index."""
  folder = os.path.join(output, "index")
  params = {"fewshot": d.fewshot, "validation_fraction": d.validation_fraction,
            "test_fraction": d.test_fraction, "seed": d.split_seed}
  if os.path.exists(os.path.join(folder, "index.json")):
    index = pickapic.PickapicIndex.load(folder)
    paths = pickapic.list_files(input_path)
    current = [pickapic.file_fingerprint(p) for p in paths]
    if index.report["parameters"] == params and index.report["inputs"] == current:
      usable = {f["name"] for f in index.files}
      index.paths = [p for p in paths if os.path.basename(p) in usable]
      log(pickapic.format_report(index.report))
      return index
    raise shards.ShardsError(
        f"{folder} was made from other input files or parameters than --input={input_path}; "
        "use a new --output")
  index = pickapic.build_index(input_path, fewshot=d.fewshot,
                               validation_fraction=d.validation_fraction,
                               test_fraction=d.test_fraction, seed=d.split_seed, log=log)
  if table_report is not None:
    index.report["table"] = table_report
  if jax.process_index() == 0 and not os.path.exists(os.path.join(folder, "index.json")):
    index.save(folder)
  return index


def make_image_encoder(backbone, batch: int):
  """(encode, padded batch): images [k <= batch, S, S, 3] -> latents, split over local devices."""
  devices = jax.local_devices()
  per = -(-batch // len(devices)) * len(devices)
  if backbone.latent_encoder is None:                   # pixel space: x0 is the image
    return (lambda x: np.asarray(x, np.float32)), per
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  rows, whole = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  images_to_latents, weights = backbone.latent_encoder   # the VAE, Stable Cascade's effnet
  params = jax.device_put(weights, whole)

  def traced(params, images):
    # The mesh as context while tracing, as in step.py: the VAE's attention reads it
    # (attention_kernels.attention_in_mesh) to choose its kernel for one device's rows and, for
    # "tpu_flash", to run it per device under shard_map. Without it a multi-chip TPU would get
    # a Pallas kernel that XLA cannot partition over the batch.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return images_to_latents(params, images)
  fn = jax.jit(traced, in_shardings=(whole, rows), out_shardings=rows)

  def encode(images: np.ndarray):
    k = len(images)
    padded = np.concatenate([images, np.repeat(images[-1:], per - k, 0)]) if k < per else images
    return fn(params, jax.device_put(padded, rows))     # asynchronous; sliced by the caller
  return encode, per


def _decode_pairs(executor, jpg0, jpg1, size):
  """Decodes both images of each pair in threads; per pair (imgs, sizes, crops) or an error."""
  def one(pair):
    out = []
    for column, data in zip(pickapic.IMAGE_COLUMNS, pair):
      try:
        out.append(images_lib.load_square(data, size))
      except images_lib.ImageError as e:
        return f"{column}: {e}"
    return out
  return list(executor.map(one, zip(jpg0, jpg1)))


def encode_file(output, unit, index, u, encode, per, backbone, storage_dtype, executor,
                progress, text_ids) -> dict:
  """All pairs of input file u -> pairs/{split}-{u}.array_record; the unit's done-file dict.

  text_ids: each pair's row in the text table (profile_text.text_table), stored as the record's caption_id."""
  path = index.paths[u]
  if pickapic.file_fingerprint(path) != index.files[u]:
    raise shards.ShardsError(f"{path} changed since it was indexed; use a new --output")
  positions = np.flatnonzero(index.pairs["file_id"] == u)
  split = index.split_of_pairs()[positions]
  os.makedirs(os.path.join(output, "pairs"), exist_ok=True)
  writers = {int(s): shards.RecordWriter(os.path.join(
      output, "pairs", f"{pickapic.SPLIT_NAMES[s]}-{u:05d}.array_record"))
      for s in np.unique(split)}
  pair_ids = {int(s): [] for s in writers}
  skipped = []
  size = int(backbone.pixel_size)
  pf = pickapic.open_parquet(path)
  group_start = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                 for g in range(pf.num_row_groups)])
  group_of = np.searchsorted(group_start, index.pairs["row"][positions], side="right") - 1

  def skip(pos, reason):
    skipped.append({"pair": int(pos), "file": index.files[u]["name"],
                    "row": int(index.pairs["row"][pos]), "reason": reason})

  def write(batch, latents):
    with np.errstate(over="ignore"):        # as stored: a cast can overflow, caught below
      latents = np.asarray(jax.device_get(latents))[:2 * len(batch)].astype(storage_dtype)
    bad = set(text_units.nonfinite_rows([latents]).tolist())
    for j, (pos, s, sizes, crops) in enumerate(batch):
      columns = [c for c, i in zip(pickapic.IMAGE_COLUMNS, (2 * j, 2 * j + 1)) if i in bad]
      if columns:
        skip(pos, f"non-finite latents ({', '.join(columns)})")
        continue
      (oh, ow), (top, left) = sizes[index.pairs["preferred"][pos]], crops[
          index.pairs["preferred"][pos]]
      win, lose = (2 * j, 2 * j + 1) if index.pairs["preferred"][pos] == 0 else (2 * j + 1, 2 * j)
      writers[s].write(records.encode({
          "preferred": latents[win], "dispreferred": latents[lose],
          "time_ids": np.array([oh, ow, top, left, size, size], np.float32),
          "pair": np.int64(pos), "user_id": index.pairs["user_id"][pos],
          "caption_id": np.int32(text_ids[pos])}))
      pair_ids[s].append(int(pos))
    progress.add(len(batch))

  pending, batch, imgs = None, [], []
  pairs_per_call = max(1, per // 2)
  for g in np.unique(group_of):
    sel = group_of == g
    pos_g, split_g = positions[sel], split[sel]
    local_rows = index.pairs["row"][pos_g] - group_start[g]
    try:
      table = pf.read_row_group(int(g), columns=list(pickapic.IMAGE_COLUMNS))
      jpg0 = table.column("jpg_0").take(local_rows).to_pylist()
      jpg1 = table.column("jpg_1").take(local_rows).to_pylist()
      decoded = _decode_pairs(executor, jpg0, jpg1, size)
    except Exception as e:  # an unreadable row group drops its pairs, not the run
      decoded = [f"row group {g} unreadable ({type(e).__name__}: {e})"] * len(pos_g)
    for pos, s, dec in zip(pos_g, split_g, decoded):
      if isinstance(dec, str):
        skip(pos, dec)
        progress.add(1)
        continue
      batch.append((int(pos), int(s), [d[1] for d in dec], [d[2] for d in dec]))
      imgs += [dec[0][0], dec[1][0]]
      if len(batch) == pairs_per_call:
        out = encode(np.stack(imgs))
        if pending:
          write(*pending)
        pending, batch, imgs = (batch, out), [], []
  if batch:
    out = encode(np.stack(imgs))
    if pending:
      write(*pending)
    pending = (batch, out)
  if pending:
    write(*pending)
  skipped.sort(key=lambda x: x["pair"])      # decode and latent skips, in one order
  files = []
  for s, w in writers.items():
    files.append({**w.close(), "dir": "pairs", "split": pickapic.SPLIT_NAMES[s], "unit": unit})
  return {"files": files, "source": index.files[u],
          "pair_ids": {pickapic.SPLIT_NAMES[s]: ids for s, ids in pair_ids.items()},
          "skipped": skipped}


def _units(index, num_texts: int, chunk: int) -> list[tuple[str, int]]:
  n_text = -(-num_texts // chunk)
  files = sorted(set(int(f) for f in np.unique(index.pairs["file_id"])))
  return [(f"text-{k:05d}", k) for k in range(n_text)] + [(f"file-{u:05d}", u) for u in files]


def local_output(output: str) -> str:
  """--output made absolute; a URL is refused (module docstring: the shards must be local)."""
  if storage.is_url(output):
    raise storage.StorageError(
        f"--output={output}: the shard folder must be on a local disk (ArrayRecord files are "
        "written and read locally only). Write it to a local path; to share it, copy the "
        "finished folder (e.g. gcloud storage cp -r) to each training machine's local disk.")
  return os.path.abspath(output)


def run(config, input_path: str, output: str, *, log=print, verify: bool = True,
        backbone=None, after_unit=None, process_index: int | None = None,
        process_count: int | None = None, columns: str | None = None) -> dict | None:
  """Makes (or finishes) the shard folder; returns the manifest once every unit is done.

  process_index / process_count: this process's share of the units (default: JAX's, so a
  jax.distributed launch splits the work; independent jobs, e.g. a SLURM array, pass them).
  after_unit(name): called after each finished unit (tests use it to stop a run midway).
  columns: --columns, the mapping of an own table's column names (data/table_rows.py).
  """
  from ppd_jax import config_validation
  output = local_output(output)
  table = table_convert.check(input_path, columns)      # None: Pick-a-Pic's parquet layout
  config_validation.prepare(config, stage="precompute")
  d = config.data
  if backbone is None:
    from ppd_jax import backbones
    backbone = backbones.build_backbone(config)
  factor = backbone.latent_factor
  if backbone.pixel_size != config.model.sample_size * factor:
    raise ValueError(f"the backbone encodes {backbone.pixel_size} px images, the model's "
                     f"sample_size {config.model.sample_size} needs "
                     f"{config.model.sample_size * factor}")
  store = profile_text.profile_store(config)
  settings = settings_of(config, backbone, store)
  _check_settings(output, settings)
  table_report = None
  if table is not None:          # own tables -> Pick-a-Pic's layout in output/table, once
    input_path, table_report = table_convert.convert(table, output, log)
  index = _load_or_build_index(output, input_path, d, log, table_report)
  texts, text_ids = profile_text.text_table(index, store)

  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  if not 0 <= p < n_proc:
    raise ValueError(f"process_index={p} must be in [0, process_count={n_proc})")
  units = _units(index, len(texts), d.text_chunk)
  mine = [unit for i, unit in enumerate(units) if i % n_proc == p]
  todo = [(name, k) for name, k in mine if shards.unit_done(output, name, verify) is None]
  file_units = [k for name, k in todo if name.startswith("file-")]
  total = int(np.isin(index.pairs["file_id"], file_units).sum())
  log(f"precompute: {len(units)} units ({len(mine)} on this process, {len(mine) - len(todo)} "
      f"already done); {total} pairs to encode at {backbone.pixel_size} px")
  encode, per = make_image_encoder(backbone, d.precompute_batch)
  progress = pair_progress.Progress(total, log)
  storage = np.dtype(d.storage_dtype)
  with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as executor:
    for name, k in todo:
      outputs = (f"text/*-{k:05d}.npy" if name.startswith("text-")
                 else f"pairs/*-{k:05d}.array_record")
      removed = shards.remove_temporaries(output, outputs, f"done/{name}.json")
      if removed:
        log(f"precompute: {name}: removed {removed} half-written file(s) of an interrupted run")
      if name.startswith("text-"):
        captions = texts[k * d.text_chunk:(k + 1) * d.text_chunk]
        done = text_units.encode_text_chunk(output, k, captions, backbone, storage,
                                 first_id=k * d.text_chunk)
        if done["nonfinite"]:
          log(f"precompute: {name}: non-finite text conditioning for text ids "
              f"{done['nonfinite'][:10]}{' ...' if len(done['nonfinite']) > 10 else ''}; "
              "their pairs are left out")
      else:
        done = encode_file(output, name, index, k, encode, per, backbone, storage, executor,
                           progress, text_ids)
      shards.mark_done(output, name, done)
      if after_unit is not None:
        after_unit(name)
  progress.add(0, force=True)

  if jax.process_count() > 1:          # a jax.distributed launch: process 0 writes the manifest
    from ppd_jax import distributed
    distributed.barrier("ppd_jax/precompute_done")
    if p != 0:
      return None
  # Otherwise whichever process finishes the last unit writes it.
  return manifest_lib.finalize(output, index, text_ids, units, settings, config, log)


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import app
  from absl import flags
  from ppd_jax import distributed
  from ppd_jax import config_validation
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  distributed.maybe_initialize()
  config = f.config
  prefix = f"[process {jax.process_index()}] " if jax.process_count() > 1 else ""
  try:
    run(config, f.input, f.output, verify=f.verify, log=lambda m: print(prefix + m, flush=True),
        process_index=f.task_index, process_count=f.task_count, columns=f.columns)
  except (config_validation.ConfigError, pickapic.PickapicError, shards.ShardsError,
          storage.StorageError, ValueError) as e:
    sys.exit(f"ppd_jax.data.precompute: {e}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/ppd.py:VARIANT", lock_config=True)
  flags.DEFINE_string("input", None, "Pick-a-Pic v2 parquet, or your own JSONL/CSV/parquet "
                      "table (docs/own_data.md): a folder, a glob or one file")
  flags.DEFINE_string("columns", None, "an own table's column names, as NAME=COLUMN,...; "
                      "NAME is one of user_id, caption, image_0, image_1, preferred, tie")
  flags.DEFINE_string("output", None, "shard folder to make (a rerun resumes it)")
  flags.DEFINE_bool("verify", True, "re-check the checksums of finished units on a rerun")
  flags.DEFINE_integer("task_index", None, "this job's share of the units, for independent jobs "
                       "(e.g. a SLURM array); default: the JAX process index")
  flags.DEFINE_integer("task_count", None, "how many independent jobs share the units")
  flags.mark_flags_as_required(["config", "input", "output"])
  from ppd_jax import cli_config
  app.run(main, flags_parser=cli_config.flags_parser("ppd_jax.data.precompute"))

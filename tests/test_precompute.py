"""Precompute: latents equal a direct VAE call, resume after a kill, corrupt rows, processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

import pickapic_fixtures
from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax.data import images
from ppd_jax.data import pickapic
from ppd_jax.data import precompute
from ppd_jax.data import records
from ppd_jax.data import shards
from ppd_jax.data import text_units

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  return pickapic_fixtures.make_inputs(str(tmp_path_factory.mktemp("pickapic")))


@pytest.fixture(scope="module")
def backbone(inputs):
  c = pickapic_fixtures.config(inputs["pretrained"])
  config_validation.prepare(c, stage="precompute")     # the tiny folder's sizes
  return backbones.build_backbone(c)


@pytest.fixture(scope="module")
def reference(inputs, backbone, tmp_path_factory):
  """One uninterrupted run."""
  out = str(tmp_path_factory.mktemp("reference"))
  c = pickapic_fixtures.config(inputs["pretrained"])
  logs = []
  manifest = precompute.run(c, inputs["parquet"], out, backbone=backbone, log=logs.append)
  return {"folder": out, "manifest": manifest, "logs": logs}


def _read_shard(path: str) -> list[dict]:
  reader = array_record_module.ArrayRecordReader(path)
  out = [records.decode(reader.read()) for _ in range(reader.num_records())]
  reader.close()
  return out


def _folder_files(folder: str) -> dict:
  """Relative path -> sha256 of every file the run wrote."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, folder)] = shards.sha256(path)
  return out


def test_latents_and_text_equal_direct_encoder_calls(inputs, backbone, reference):
  folder = reference["folder"]
  index = pickapic.PickapicIndex.load(os.path.join(folder, "index"))
  shard = next(s for s in reference["manifest"]["shards"] if s["split"] == "train")
  stored = _read_shard(os.path.join(folder, "pairs", shard["file"]))
  assert len(stored) == shard["count"] > 0
  raw = pickapic.read_pairs(index, [int(r["pair"]) for r in stored])
  size = backbone.pixel_size
  for rec, row in zip(stored, raw):
    pics = [images.load_square(row[c], size) for c in ("jpg_0", "jpg_1")]
    direct = backbone.to_latents(np.stack([p[0] for p in pics]))   # unsharded, one device
    win = row["preferred"]
    np.testing.assert_allclose(rec["preferred"], direct[win], atol=2e-5)
    np.testing.assert_allclose(rec["dispreferred"], direct[1 - win], atol=2e-5)
    (oh, ow), (top, left) = pics[win][1], pics[win][2]
    np.testing.assert_array_equal(rec["time_ids"], [oh, ow, top, left, size, size])
    assert int(rec["user_id"]) == row["user_id"]
    assert index.captions[int(rec["caption_id"])] == row["caption"]
  # Text: stored once per caption, equal to the encoder's output.
  text = shards.TextStore(folder, reference["manifest"])
  ids = np.arange(len(index.captions))
  direct = backbone.encode_captions(index.captions)["text_embedding"]
  np.testing.assert_allclose(text.get(ids)["text_embedding"], direct, atol=1e-5)


def test_every_indexed_pair_is_written_once_or_skipped_and_counted(inputs, reference):
  folder, manifest = reference["folder"], reference["manifest"]
  index = pickapic.PickapicIndex.load(os.path.join(folder, "index"))
  written = []
  for s in manifest["shards"]:
    written += [int(r["pair"]) for r in _read_shard(os.path.join(folder, "pairs", s["file"]))]
  skipped = [s["pair"] for s in manifest["skipped"]]
  assert len(written) == len(set(written))
  assert sorted(written + skipped) == list(range(len(index.pairs["user_id"])))
  # The corrupt JPEGs the generator wrote, among pairs of kept users, are exactly the skips.
  where = {(f["name"], int(r)): p for p, (f, r) in enumerate(
      zip([index.files[i] for i in index.pairs["file_id"]], index.pairs["row"]))}
  corrupt = {where[(name, row)] for name, row, _ in inputs["truth"]["corrupt"]
             if (name, row) in where}
  assert corrupt and set(skipped) == corrupt
  assert manifest["counts"]["pairs_skipped"] == len(corrupt)
  assert all("undecodable image" in s["reason"] and s["file"] and "row" in s
             for s in manifest["skipped"])
  assert sum(manifest["counts"][f"pairs_{n}"] for n in pickapic.SPLIT_NAMES) == len(written)
  # Bad files are reported by name and column, not fatal.
  problems = "\n".join(manifest["index"]["skipped_files"])
  assert "train-extra-badschema.parquet: column 'user_id' is missing" in problems
  assert "train-extra-empty.parquet: not a readable parquet file" in problems
  # Per-split record tables list the same pairs as the shards, in shard order.
  table = np.load(os.path.join(folder, "records-train.npz"))
  train_written = [int(r["pair"]) for s in manifest["shards"] if s["split"] == "train"
                   for r in _read_shard(os.path.join(folder, "pairs", s["file"]))]
  np.testing.assert_array_equal(table["pair"], train_written)
  assert any("pairs/s" in line and "ETA" in line for line in reference["logs"])


def test_killed_run_resumes_to_the_same_shards_and_manifest(inputs, backbone, reference,
                                                            tmp_path):
  out = str(tmp_path / "resumed")
  c = pickapic_fixtures.config(inputs["pretrained"])

  class Killed(Exception):
    pass

  def kill_after_three(name, seen=[]):
    seen.append(name)
    if len(seen) == 3:
      raise Killed(name)

  with pytest.raises(Killed):
    precompute.run(c, inputs["parquet"], out, backbone=backbone, log=lambda m: None,
                   after_unit=kill_after_three)
  assert not os.path.exists(os.path.join(out, shards.MANIFEST))
  done = os.listdir(os.path.join(out, "done"))
  assert len(done) == 3
  # What a kill in the middle of the next unit leaves: half-written temporaries, and a shard
  # under its final name whose unit never got its done-file.
  os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
  with open(os.path.join(out, "pairs", "train-00002.array_record.12345.tmp"), "wb") as f:
    f.write(b"half a shard")
  with open(os.path.join(out, "pairs", "train-00002.array_record"), "wb") as f:
    f.write(b"an untrusted shard")
  # A done unit whose file was damaged afterwards is redone, not trusted.
  first_done = shards.read_json(os.path.join(out, "done", sorted(done)[-1]))
  damaged = os.path.join(out, first_done["files"][0]["dir"], first_done["files"][0]["file"])
  with open(damaged, "r+b") as f:
    f.write(b"\0\0\0\0")

  manifest = precompute.run(c, inputs["parquet"], out, backbone=backbone, log=lambda m: None)
  assert manifest == reference["manifest"]
  assert _folder_files(out) == _folder_files(reference["folder"])


def test_units_split_over_processes_give_the_same_folder(inputs, backbone, reference, tmp_path):
  out = str(tmp_path / "two")
  c = pickapic_fixtures.config(inputs["pretrained"])
  logs = []
  first = precompute.run(c, inputs["parquet"], out, backbone=backbone, log=logs.append,
                         process_index=0, process_count=2)
  assert first is None and not os.path.exists(os.path.join(out, shards.MANIFEST))
  assert any("not done yet" in line for line in logs)
  second = precompute.run(c, inputs["parquet"], out, backbone=backbone, log=lambda m: None,
                          process_index=1, process_count=2)
  assert second == reference["manifest"]
  assert _folder_files(out) == _folder_files(reference["folder"])


def test_rerun_with_other_settings_is_refused(inputs, backbone, reference, tmp_path):
  c = pickapic_fixtures.config(inputs["pretrained"], storage_dtype="float16")
  with pytest.raises(shards.ShardsError, match="other settings.*data"):
    precompute.run(c, inputs["parquet"], reference["folder"], backbone=backbone,
                   log=lambda m: None)


def test_cli_writes_the_same_manifest(inputs, reference, tmp_path):
  """The command line a user runs, in its own process (8 devices split the VAE batches)."""
  out = str(tmp_path / "cli")
  c = pickapic_fixtures.config(inputs["pretrained"])
  overrides = [f"--config.model.pretrained={inputs['pretrained']}",
               f"--config.model.user_embed_dim={c.model.user_embed_dim}"]
  overrides += [f"--config.data.{k}={c.data[k]}" for k in (
      "precompute_batch", "text_chunk", "validation_fraction", "test_fraction", "storage_dtype")]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "ppd_jax.data.precompute", "--config=configs/ppd.py:pickapic_sd15",
       f"--input={inputs['parquet']}", f"--output={out}", *overrides],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pairs/s" in proc.stdout and "precompute: done" in proc.stdout
  with open(os.path.join(out, shards.MANIFEST)) as f:
    manifest = json.load(f)
  ref = reference["manifest"]
  for key in ("counts", "shards", "text", "skipped", "sources", "index", "model", "data"):
    assert manifest[key] == ref[key], key


def test_sdxl_shards_carry_pooled_text_and_each_pair_size_conditioning(inputs, tmp_path):
  """SDXL: the text store also holds the pooled embedding; time_ids come from each pair's own
  image size and crop, and the loader hands both to the step."""
  import tiny_sd
  from ppd_jax.data import pickapic_source
  folder = tiny_sd.save_pipeline(str(tmp_path / "tiny-sdxl"), "sdxl")
  c = pickapic_fixtures.config(folder)
  c.model.addition_embed_type = "text_time"
  out = str(tmp_path / "shards")
  manifest = precompute.run(c, inputs["parquet"], out, log=lambda m: None)
  assert manifest["text"]["keys"] == ["text_embedding", "pooled_text_embedding"]
  store = str(tmp_path / "users.safetensors")
  pickapic_fixtures.write_user_store(store, out)
  c.data.shards, c.data.user_embeddings = out, store
  config_validation.prepare(c)
  source = pickapic_source.PickapicPairs(c, log=lambda m: None)
  batch = source.gather(np.arange(len(source)))
  index = pickapic.PickapicIndex.load(os.path.join(out, "index"))
  backbone = backbones.build_backbone(c)
  rows = pickapic.read_pairs(index, batch["pair"])
  captions = [r["caption"] for r in rows]
  direct = backbone.encode_captions(captions)
  np.testing.assert_allclose(batch["pooled_text_embedding"], direct["pooled_text_embedding"],
                             atol=1e-5)
  np.testing.assert_allclose(batch["text_embedding"], direct["text_embedding"], atol=1e-5)
  size = backbone.pixel_size
  for i, r in enumerate(rows):
    _, (oh, ow), (top, left) = images.load_square(r[f"jpg_{r['preferred']}"], size)
    np.testing.assert_array_equal(batch["time_ids"][i], [oh, ow, top, left, size, size])
  assert len({tuple(t[:2]) for t in batch["time_ids"]}) > 1     # sizes differ between images


def _written(folder: str, manifest: dict) -> dict:
  """pair -> record, over every shard of a finished folder."""
  return {int(r["pair"]): r for s in manifest["shards"]
          for r in _read_shard(os.path.join(folder, "pairs", s["file"]))}


@pytest.fixture(scope="module")
def poisoned(inputs, backbone, reference, tmp_path_factory):
  """A run whose VAE overflows on one image of two pairs (NaN in jpg_0 of one, inf in jpg_1 of
  another) and whose text encoder on two captions (NaN in one, -inf in another)."""
  folder = reference["folder"]
  index = pickapic.PickapicIndex.load(os.path.join(folder, "index"))
  clean = _written(folder, reference["manifest"])
  texts = sorted({int(r["caption_id"]) for r in clean.values()})[:2]
  pairs = [p for p in sorted(clean) if int(clean[p]["caption_id"]) not in texts]
  pairs = [pairs[0], pairs[-1]]                 # two files apart
  rows = pickapic.read_pairs(index, pairs)
  size = backbone.pixel_size
  bad_images = [(images.load_square(rows[0]["jpg_0"], size)[0], np.nan),
                (images.load_square(rows[1]["jpg_1"], size)[0], np.inf)]
  bad_captions = {index.captions[texts[0]]: ("text_embedding", np.nan),
                  index.captions[texts[1]]: ("text_embedding", -np.inf)}
  wrapped = pickapic_fixtures.PoisonedBackbone(backbone, bad_images, bad_captions)
  out = str(tmp_path_factory.mktemp("poisoned"))
  c = pickapic_fixtures.config(inputs["pretrained"])
  logs = []
  manifest = precompute.run(c, inputs["parquet"], out, backbone=wrapped, log=logs.append)
  return {"folder": out, "manifest": manifest, "backbone": wrapped, "index": index,
          "clean": clean, "bad_pairs": pairs, "bad_texts": texts, "logs": logs}


def test_pairs_with_nonfinite_latents_are_skipped_like_corrupt_jpegs(reference, poisoned):
  manifest, ref = poisoned["manifest"], reference["manifest"]
  index, (nan_pair, inf_pair) = poisoned["index"], poisoned["bad_pairs"]
  written = _written(poisoned["folder"], manifest)
  assert sorted(written) == sorted(set(poisoned["clean"]) - {nan_pair, inf_pair})
  for r in written.values():
    assert np.isfinite(r["preferred"]).all() and np.isfinite(r["dispreferred"]).all()
    want = poisoned["clean"][int(r["pair"])]      # every other record is the clean run's
    assert r.keys() == want.keys()
    for k in r:
      np.testing.assert_array_equal(r[k], want[k])
  listed = {s["pair"]: s for s in manifest["skipped"]}
  for pair, column in ((nan_pair, "jpg_0"), (inf_pair, "jpg_1")):
    assert listed[pair] == {"pair": pair, "row": int(index.pairs["row"][pair]),
                            "file": index.files[index.pairs["file_id"][pair]]["name"],
                            "reason": f"non-finite latents ({column})"}
  assert manifest["skipped_reasons"]["non-finite latents"] == 2
  for kind, n in ref["skipped_reasons"].items():
    assert manifest["skipped_reasons"][kind] == n
  assert set(s["pair"] for s in ref["skipped"]) <= set(listed)


def test_nonfinite_text_is_listed_and_its_pairs_counted_as_skipped(reference, poisoned):
  manifest, ref = poisoned["manifest"], reference["manifest"]
  texts = poisoned["bad_texts"]
  assert manifest["text"]["nonfinite"] == texts and ref["text"]["nonfinite"] == []
  assert manifest["counts"]["texts_nonfinite"] == 2 and ref["counts"]["texts_nonfinite"] == 0
  users = sorted(p for p, r in poisoned["clean"].items() if int(r["caption_id"]) in texts)
  listed = [s for s in manifest["skipped"] if s["reason"].startswith("non-finite text")]
  assert [s["pair"] for s in listed] == users and users
  assert manifest["skipped_reasons"]["non-finite text"] == len(users)
  assert manifest["counts"]["pairs_skipped"] == ref["counts"]["pairs_skipped"] + 2 + len(users)
  usable = sum(manifest["counts"][f"pairs_{n}"] for n in pickapic.SPLIT_NAMES)
  assert usable == sum(ref["counts"][f"pairs_{n}"] for n in pickapic.SPLIT_NAMES) - 2 - len(users)
  assert any("non-finite text conditioning" in line for line in poisoned["logs"])
  # The text store is the clean one but for the two bad rows.
  ids = np.arange(len(poisoned["index"].captions))
  got = shards.TextStore(poisoned["folder"], manifest).get(ids)["text_embedding"]
  want = shards.TextStore(reference["folder"], ref).get(ids)["text_embedding"]
  good = ~np.isin(ids, texts)
  np.testing.assert_array_equal(got[good], want[good])
  assert not np.isfinite(got[texts]).all(axis=(1, 2)).any()


def test_a_killed_poisoned_run_split_over_processes_resumes_identically(inputs, poisoned,
                                                                        tmp_path):
  """Text and file units in other processes, one of them killed: the same folder."""
  out = str(tmp_path / "split")
  c = pickapic_fixtures.config(inputs["pretrained"])

  class Killed(Exception):
    pass

  def die(name):
    if name.startswith("text-"):
      raise Killed(name)

  run = dict(backbone=poisoned["backbone"], log=lambda m: None, process_count=2)
  with pytest.raises(Killed):
    precompute.run(c, inputs["parquet"], out, process_index=1, after_unit=die, **run)
  assert precompute.run(c, inputs["parquet"], out, process_index=0, **run) is None
  manifest = precompute.run(c, inputs["parquet"], out, process_index=1, **run)
  assert manifest == poisoned["manifest"]
  assert _folder_files(out) == _folder_files(poisoned["folder"])


def test_a_text_unit_records_nonfinite_rows_of_any_key(tmp_path):
  """SDXL's pooled embedding counts as much as the sequence, and so does a float16 overflow."""
  class Encoder:
    def encode_captions(self, captions):
      n = len(captions)
      seq = np.zeros((n, 3, 2), np.float32)
      pooled = np.zeros((n, 2), np.float32)
      for i, caption in enumerate(captions):
        if caption == "big":
          seq[i, 1, 0] = 1e6                             # finite, but not in float16
        if caption == "inf":
          pooled[i, 1] = np.inf
      return {"text_embedding": seq, "pooled_text_embedding": pooled,
              "time_ids": np.full((n, 6), np.nan)}      # per image, not stored with the text

  captions = ["a", "inf", "b", "big", "c"]
  done = text_units.encode_text_chunk(str(tmp_path), 2, captions, Encoder(), np.float32, batch=2,
                                      first_id=10)
  assert done["nonfinite"] == [11] and [f["key"] for f in done["files"]] == [
      "text_embedding", "pooled_text_embedding"]
  done = text_units.encode_text_chunk(str(tmp_path), 2, captions, Encoder(), np.float16,
                                      first_id=10)
  assert done["nonfinite"] == [11, 13]

"""The Pick-a-Pic loader: the user join, exact resume, per-process coverage, training from shards."""
import os

import jax
import numpy as np
import pytest
from array_record.python import array_record_module

import pickapic_fixtures
from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax import trainer
from ppd_jax.data import images
from ppd_jax.data import pickapic
from ppd_jax.data import pickapic_source
from ppd_jax.data import pipeline
from ppd_jax.data import precompute
from ppd_jax.data import records
from ppd_jax.data import shards


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("loader"))
  inputs = pickapic_fixtures.make_inputs(root, num_users=20, corrupt_jpegs=1)
  c = pickapic_fixtures.config(inputs["pretrained"])
  out = os.path.join(root, "shards")
  precompute.run(c, inputs["parquet"], out, log=lambda m: None)
  store = os.path.join(root, "users.safetensors")
  embeddings = pickapic_fixtures.write_user_store(store, out)
  return {**inputs, "shards": out, "store": store, "embeddings": embeddings, "root": root}


def _config(folders, **data):
  data = {"shards": folders["shards"], "user_embeddings": folders["store"], **data}
  c = pickapic_fixtures.config(folders["pretrained"], **data)
  config_validation.prepare(c)
  return c


def _all_records(folder: str, split: str) -> dict:
  """pair id -> record, read straight from the shard files (no loader code)."""
  manifest = shards.read_manifest(folder)
  out = {}
  for s in manifest["shards"]:
    if s["split"] != split:
      continue
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, "pairs", s["file"]))
    for _ in range(reader.num_records()):
      r = records.decode(reader.read())
      out[int(r["pair"])] = r
    reader.close()
  return out


def test_gather_joins_records_text_and_users(folders):
  source = pickapic_source.PickapicPairs(_config(folders), log=lambda m: None)
  stored = _all_records(folders["shards"], "train")
  assert len(source) == len(stored) > 0
  batch = source.gather(np.arange(len(source)))
  text = shards.TextStore(folders["shards"], shards.read_manifest(folders["shards"]))
  assert sorted(batch["pair"].tolist()) == sorted(stored)
  for i, pair in enumerate(batch["pair"]):
    r = stored[int(pair)]
    np.testing.assert_array_equal(batch["preferred"][i], r["preferred"])
    np.testing.assert_array_equal(batch["dispreferred"][i], r["dispreferred"])
    assert batch["user_id"][i] == r["user_id"]
    np.testing.assert_array_equal(batch["user_embedding"][i],
                                  folders["embeddings"][int(r["user_id"])])
    np.testing.assert_array_equal(batch["text_embedding"][i],
                                  text.get(np.array([r["caption_id"]]))["text_embedding"][0])
  # Only training users' pairs; unseen users have embeddings for sampling but no training pair.
  assert set(batch["user_id"].tolist()) <= set(source.train_user_ids.tolist())
  assert not set(batch["user_id"].tolist()) & set(source.unseen_user_ids.tolist())
  unseen = int(source.unseen_user_ids[0])
  np.testing.assert_array_equal(source.user_embedding(unseen), folders["embeddings"][unseen])


def test_missing_user_embeddings_are_an_error_or_dropped(folders, tmp_path):
  users = np.load(os.path.join(folders["shards"], "records-train.npz"))["user_id"]
  gone = sorted(set(users.tolist()))[:2]
  store = str(tmp_path / "partial.safetensors")
  pickapic_fixtures.write_user_store(store, folders["shards"], leave_out=gone)
  c = _config(folders)
  c.data.user_embeddings = store
  n_gone = int(np.isin(users, gone).sum())
  with pytest.raises(pickapic_source.MissingUserEmbeddings) as e:
    pickapic_source.PickapicPairs(c, log=lambda m: None)
  msg = str(e.value)
  assert f"{n_gone} train pairs of 2 users" in msg and all(str(u) in msg for u in gone)
  assert "missing_user_embeddings='drop'" in msg
  c.data.missing_user_embeddings = "drop"
  logs = []
  source = pickapic_source.PickapicPairs(c, log=logs.append)
  assert len(source) == len(users) - n_gone
  assert not set(source.gather(np.arange(len(source)))["user_id"].tolist()) & set(gone)
  assert any("dropping" in line for line in logs)


def test_loader_resumes_exactly_from_its_state(folders):
  source = pickapic_source.PickapicPairs(_config(folders), log=lambda m: None)
  it = iter(pipeline.make_dataset(source, global_batch=4, seed=3))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = iter(pipeline.make_dataset(source, global_batch=4, seed=3))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_two_processes_read_disjoint_pairs_covering_every_pair_once_per_epoch(folders):
  source = pickapic_source.PickapicPairs(_config(folders), log=lambda m: None)
  batch = 4
  epoch = len(source) // batch * batch            # whole batches of the first epoch
  seen = []
  for p in range(2):
    it = iter(pipeline.make_dataset(source, batch, seed=0, process_index=p, process_count=2))
    mine = np.concatenate([next(it)["pair"] for _ in range(epoch // batch)])
    seen.append(mine)
  assert not set(seen[0].tolist()) & set(seen[1].tolist())
  both = np.concatenate(seen)
  assert len(both) == len(set(both.tolist())) == epoch
  if epoch == len(source):
    assert set(both.tolist()) == set(source.record_pairs.tolist())


def test_config_errors_name_the_field(folders, tmp_path):
  c = pickapic_fixtures.config(folders["pretrained"], shards=str(tmp_path / "nowhere"),
                               user_embeddings=folders["store"])
  with pytest.raises(config_validation.ConfigError, match="data.shards"):
    config_validation.prepare(c)
  c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                               user_embeddings=folders["store"])
  c.model.user_embed_dim = 8
  with pytest.raises(config_validation.ConfigError, match="data.user_embeddings.*user_embed_dim"):
    config_validation.prepare(c)
  c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                               user_embeddings=folders["store"], missing_user_embeddings="skip")
  with pytest.raises(config_validation.ConfigError, match="data.missing_user_embeddings"):
    config_validation.prepare(c)


def test_training_from_shards_resumes_like_an_uninterrupted_run(folders, tmp_path):
  """The trainer on the Pick-a-Pic source, across a restart: same params as one straight run."""
  def train(workdir, steps):
    c = _config(folders)
    c.total_steps = steps
    c.checkpoint_every = 2
    c.batch_size = 8                 # one pair per fake device
    return trainer.train_and_evaluate(c, str(workdir))

  straight = train(tmp_path / "straight", 4)
  train(tmp_path / "stopped", 2)
  resumed = train(tmp_path / "stopped", 4)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.user_params)),
                  jax.tree.leaves(jax.device_get(resumed.user_params))):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def poisoned(folders):
  """The same inputs through a backbone whose text encoder gives NaN for one caption of training
  pairs and whose VAE gives inf for one image of another training pair."""
  c = pickapic_fixtures.config(folders["pretrained"])
  config_validation.prepare(c, stage="precompute")
  backbone = backbones.build_backbone(c)
  train = np.load(os.path.join(folders["shards"], "records-train.npz"))
  text = int(np.bincount(train["caption_id"]).argmax())       # the most used caption
  other = int(train["pair"][train["caption_id"] != text][0])
  index = pickapic.PickapicIndex.load(os.path.join(folders["shards"], "index"))
  image = images.load_square(pickapic.read_pairs(index, [other])[0]["jpg_1"],
                             backbone.pixel_size)[0]
  wrapped = pickapic_fixtures.PoisonedBackbone(
      backbone, [(image, np.inf)], {index.captions[text]: ("text_embedding", np.nan)})
  out = os.path.join(folders["root"], "poisoned")
  precompute.run(c, folders["parquet"], out, backbone=wrapped, log=lambda m: None)
  return {"shards": out, "text": text, "image_pair": other}


def _pairs_of_text(folder: str, split: str, text: int) -> set:
  table = np.load(os.path.join(folder, f"records-{split}.npz"))
  return set(table["pair"][table["caption_id"] == text].tolist())


@pytest.mark.parametrize("split", pickapic.SPLIT_NAMES)
def test_loader_never_yields_nonfinite_text_and_keeps_the_rest(folders, poisoned, split):
  c = _config(folders, shards=poisoned["shards"])
  logs = []
  source = pickapic_source.PickapicPairs(c, log=logs.append, split=split)
  clean = pickapic_source.PickapicPairs(_config(folders), log=lambda m: None, split=split)
  bad = _pairs_of_text(poisoned["shards"], split, poisoned["text"])
  assert bad or split != "train"
  got = source.gather(np.arange(len(source)))
  ref = clean.gather(np.arange(len(clean)))
  where = {int(p): i for i, p in enumerate(ref["pair"])}
  rows = [where[int(p)] for p in got["pair"]]
  for k, v in got.items():
    if v.dtype.kind == "f":
      assert np.isfinite(v).all(), k
    np.testing.assert_array_equal(v, ref[k][rows], err_msg=k)
  want = set(clean.record_pairs.tolist()) - bad - {poisoned["image_pair"]}
  assert set(source.record_pairs.tolist()) == want
  it = iter(pipeline.make_dataset(source, global_batch=4, seed=0))
  for _ in range(len(source) // 4):
    batch = next(it)
    assert all(np.isfinite(v).all() for v in batch.values() if v.dtype.kind == "f")
    assert not set(batch["pair"].tolist()) & bad
  assert bool(bad) == any(f"leaving out {len(bad)} {split} pairs" in m for m in logs)


def test_a_manifest_without_the_nonfinite_list_has_no_bad_text(folders, poisoned, monkeypatch):
  """Folders made before the check: nothing is left out (here, wrongly, which shows the list is
  what the loader goes by)."""
  read = shards.read_manifest

  def old(folder):
    manifest = read(folder)
    manifest["text"].pop("nonfinite")
    return manifest

  monkeypatch.setattr(pickapic_source.shards, "read_manifest", old)
  logs = []
  source = pickapic_source.PickapicPairs(_config(folders, shards=poisoned["shards"]),
                                         log=logs.append)
  assert _pairs_of_text(poisoned["shards"], "train", poisoned["text"]) <= set(
      source.record_pairs.tolist())
  assert not any("leaving out" in m for m in logs)

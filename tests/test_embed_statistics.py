"""The image-statistics user embedder: all users, the right pairs, tastes visible, a store."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from ppd_jax.data import images
from ppd_jax.data import make_pickapic
from ppd_jax.data import pickapic
from ppd_jax.users import embed_statistics
from ppd_jax.users import fewshot
from ppd_jax.data import user_store as store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, TOKENS, SIZE = 16, 4, 32          # dim 16: token features are fewshot.STATISTICS in order
_quiet = lambda *a: None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Synthetic parquet, its index saved where precompute would put it, and the embeddings."""
  tmp = tmp_path_factory.mktemp("embed")
  parquet = str(tmp / "parquet")
  truth = make_pickapic.write_synthetic_pickapic(parquet, num_users=12, corrupt_jpegs=0, seed=0)
  index = pickapic.build_index(parquet, log=_quiet)
  shard_dir = str(tmp / "shards")
  index.save(os.path.join(shard_dir, "index"))
  ids, emb = embed_statistics.embed_users(index, tokens=TOKENS, dim=DIM, size=SIZE, log=_quiet)
  return {"tmp": tmp, "parquet": parquet, "truth": truth, "index": index, "shards": shard_dir,
          "ids": ids, "emb": emb}


def _direct(index, positions, tokens=TOKENS, dim=DIM):
  """fewshot.embed_user on pairs read with pyarrow and labelled by the parquet's own label_0."""
  winners, losers, captions = [], [], []
  for pos in positions:
    path = index.paths[index.pairs["file_id"][pos]]
    row = pq.read_table(path).slice(int(index.pairs["row"][pos]), 1).to_pylist()[0]
    assert row["user_id"] == index.pairs["user_id"][pos]
    pics = [images.load_square(row[c], SIZE)[0] for c in ("jpg_0", "jpg_1")]
    first_won = row["label_0"] == 1.0
    winners.append(pics[0] if first_won else pics[1])
    losers.append(pics[1] if first_won else pics[0])
    captions.append(row["caption"])
  return fewshot.embed_user(np.stack(winners), np.stack(losers), captions, tokens, dim)


def _row(world, uid):
  return int(np.flatnonzero(world["ids"] == uid)[0])


def test_every_user_of_every_split(world):
  index, ids, emb = world["index"], world["ids"], world["emb"]
  np.testing.assert_array_equal(ids, index.users["user_id"])
  assert emb.shape == (len(ids), TOKENS, DIM) and emb.dtype == np.float32
  assert np.isfinite(emb).all()
  assert (index.users["split"] == pickapic.TEST).any()       # unseen users are embedded too
  assert len({e.tobytes() for e in emb}) == len(ids)


def test_equals_embed_user_on_the_fewshot_pairs(world):
  index = world["index"]
  for i, uid in enumerate(index.users["user_id"]):
    np.testing.assert_allclose(world["emb"][_row(world, uid)],
                               _direct(index, index.users["fewshot"][i]), rtol=0, atol=1e-6)


def test_opposite_tastes_point_opposite_ways(world):
  per_user = world["truth"]["per_user"]
  feature = {"brighter": ("luminance", 1), "darker": ("luminance", -1),
             "bigger": ("object_fraction", 1), "smaller": ("object_fraction", -1)}
  seen = set()
  for uid in world["ids"]:
    name, sign = feature[per_user[str(uid)]["taste"]]
    value = world["emb"][_row(world, uid), :, fewshot.STATISTICS.index(name)].mean()
    assert np.sign(value) == sign, (uid, per_user[str(uid)]["taste"], value)
    seen.add(per_user[str(uid)]["taste"])
  assert {"brighter", "darker"} <= seen


def test_excluded_pair_is_replaced(world):
  index = world["index"]
  i = int(np.flatnonzero(index.users["num_pairs"] > 4)[0])
  uid, first = index.users["user_id"][i], int(index.users["fewshot"][i][0])
  ids, emb = embed_statistics.embed_users(index, tokens=TOKENS, dim=DIM, size=SIZE,
                                          exclude=[first], log=_quiet)
  np.testing.assert_array_equal(ids, world["ids"])
  replaced = index.fewshot_pairs(uid, [first])
  assert first not in replaced and set(replaced) - set(index.users["fewshot"][i])
  k = _row(world, uid)
  np.testing.assert_allclose(emb[k], _direct(index, replaced), rtol=0, atol=1e-6)
  assert not np.allclose(emb[k], world["emb"][k])
  others = np.arange(len(ids)) != k
  np.testing.assert_array_equal(emb[others], world["emb"][others])


def test_undecodable_pair_retried_or_user_skipped(world, monkeypatch):
  index = world["index"]
  n = index.users["num_pairs"]
  roomy, tight = int(np.flatnonzero(n > 4)[0]), int(np.flatnonzero(n == 4)[0])
  broken = {int(index.users["fewshot"][roomy][1]), int(index.users["fewshot"][tight][2])}
  read, calls = pickapic.read_pairs, []

  def corrupting(idx, positions):
    calls.append(len(positions))
    rows = read(idx, positions)
    for r in rows:
      if r["pair"] in broken:
        r["jpg_1"] = b"not a jpeg"
    return rows

  monkeypatch.setattr(pickapic, "read_pairs", corrupting)
  logs = []
  ids, emb = embed_statistics.embed_users(index, tokens=TOKENS, dim=DIM, size=SIZE,
                                          log=logs.append)
  assert calls == [4 * len(n), 1]          # all users' pairs in one read, then the replacement
  tight_id, roomy_id = index.users["user_id"][tight], index.users["user_id"][roomy]
  assert tight_id not in ids and len(ids) == len(n) - 1
  assert any(f"user {tight_id} skipped" in line for line in logs)
  k = int(np.flatnonzero(ids == roomy_id)[0])
  replaced = index.fewshot_pairs(roomy_id, sorted(broken))
  np.testing.assert_allclose(emb[k], _direct(index, replaced), rtol=0, atol=1e-6)


def test_unreadable_file_drops_its_pairs(world, monkeypatch):
  index = world["index"]
  read = pickapic.read_pairs

  def failing(idx, positions):
    if (idx.pairs["file_id"][positions] == 0).any():
      raise OSError("bad row group")
    return read(idx, positions)

  monkeypatch.setattr(pickapic, "read_pairs", failing)
  logs = []
  ids, emb = embed_statistics.embed_users(index, tokens=TOKENS, dim=DIM, size=SIZE,
                                          log=logs.append)
  assert any("cannot read (OSError: bad row group)" in line for line in logs)
  in_file0 = np.flatnonzero(index.pairs["file_id"] == 0)
  usable = [uid for uid in index.users["user_id"]
            if (index.pairs["user_id"][index.pairs["file_id"] != 0] == uid).sum() >= 4]
  touched = set(index.pairs["user_id"][np.intersect1d(in_file0, index.users["fewshot"])])
  assert touched and list(ids) == usable
  for k, uid in enumerate(ids):
    mine = in_file0[index.pairs["user_id"][in_file0] == uid]
    np.testing.assert_allclose(emb[k], _direct(index, index.fewshot_pairs(uid, mine)),
                               rtol=0, atol=1e-6)


def test_cli_writes_a_store(world):
  """Moved parquet (re-pointed with --input) and a manifest's skipped pair, in one real run."""
  index, tmp = world["index"], world["tmp"]
  moved = str(tmp / "moved")
  shutil.copytree(world["parquet"], moved)
  shard_dir = str(tmp / "cli_shards")
  shutil.copytree(world["shards"], shard_dir)
  meta_path = os.path.join(shard_dir, "index", "index.json")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["paths"] = ["/nonexistent/" + os.path.basename(p) for p in meta["paths"]]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  i = int(np.flatnonzero(index.users["num_pairs"] > 4)[0])
  first = int(index.users["fewshot"][i][0])
  with open(os.path.join(shard_dir, "manifest.json"), "w") as f:
    json.dump({"skipped": [{"pair": first, "reason": "undecodable image (test)"}]}, f)

  out = str(tmp / "users.safetensors")
  cmd = [sys.executable, "-m", "ppd_jax.users.embed_statistics", f"--shards={shard_dir}",
         f"--out={out}", f"--tokens={TOKENS}", f"--dim={DIM}", f"--size={SIZE}",
         f"--input={moved}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert f"{len(world['ids'])} users embedded, 0 skipped" in done.stdout
  assert "python -m ppd_jax.users.embed " in done.stdout and "to come" not in done.stdout
  users = store.UserEmbeddingStore(out)
  np.testing.assert_array_equal(users.user_ids, world["ids"])
  assert (users.tokens, users.dim) == (TOKENS, DIM)
  assert users.source == {"embedder": "image_statistics", "tokens": TOKENS, "size": SIZE,
                          "fewshot": 4}
  uid = index.users["user_id"][i]
  moved_index = embed_statistics.load_index(shard_dir, moved)
  np.testing.assert_allclose(users[uid], _direct(moved_index, index.fewshot_pairs(uid, [first])),
                             rtol=0, atol=1e-6)
  others = np.arange(len(users)) != i
  np.testing.assert_array_equal(users.embeddings[others], world["emb"][others])


def test_cli_errors_name_the_path(world, tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(embed_statistics.EmbedError, match=f"{missing}: no such folder"):
    embed_statistics.run(missing, str(tmp_path / "u.safetensors"))
  with pytest.raises(embed_statistics.EmbedError, match="no saved Pick-a-Pic index"):
    embed_statistics.run(str(tmp_path), str(tmp_path / "u.safetensors"))
  other = tmp_path / "other"
  other.mkdir()
  shutil.copy(world["index"].paths[0], other / "renamed.parquet")
  with pytest.raises(embed_statistics.EmbedError, match="no file named train-00000"):
    embed_statistics.load_index(world["shards"], str(other))
  index = embed_statistics.load_index(world["shards"])
  index.paths = [p + ".gone" for p in index.paths]
  with pytest.raises(embed_statistics.EmbedError, match="parquet file not found"):
    embed_statistics.embed_users(index, tokens=1, dim=DIM, log=_quiet)
  done = subprocess.run([sys.executable, "-m", "ppd_jax.users.embed_statistics",
                         f"--shards={missing}", "--out=/tmp/never.safetensors"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      f"ppd_jax.users.embed_statistics: {missing}: no such folder"]

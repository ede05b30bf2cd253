"""The user-embedding store round-trips exactly, refuses bad input and foreign files by name, and
never leaves a half-written file behind."""
import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from ppd_jax.users import merge
from ppd_jax.data import user_store as store_lib
from ppd_jax.data import user_store_file as store_file
from ppd_jax.data.user_store import StoreError, UserEmbeddingStore, write_store


def random_users(n=7, tokens=3, dim=5, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  # Arbitrary, non-contiguous, unsorted int64s, some negative and some beyond 32 bits.
  ids = rng.choice(10**6, n, replace=False).astype(np.int64) * 7_919_000_011 - 10**15
  return ids, rng.normal(size=(n, tokens, dim)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip_sorts_by_id_and_returns_float32(tmp_path, dtype):
  ids, emb = random_users(dtype=dtype)
  path = tmp_path / "sub" / "users.safetensors"
  write_store(path, ids, emb, source={"vlm": "tiny", "layers": [0, 28]})
  s = UserEmbeddingStore(path)
  assert (len(s), s.num_users, s.tokens, s.dim, s.dtype) == (7, 7, 3, 5, np.dtype(dtype))
  assert s.source == {"vlm": "tiny", "layers": [0, 28]}
  np.testing.assert_array_equal(s.user_ids, np.sort(ids))
  assert s.user_ids.dtype == np.int64
  for uid, e in zip(ids, emb):
    assert uid in s and int(uid) in s
    got = s[uid]
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_array_equal(got, e.astype(np.float32))
  np.testing.assert_array_equal(s.embeddings, emb[np.argsort(ids)])
  assert s.profile(ids[0]) is None
  assert os.listdir(path.parent) == ["users.safetensors"]
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask     # not safetensors' private 0600


def test_get_many_matches_items_and_names_missing_ids(tmp_path):
  ids, emb = random_users(n=20)
  path = tmp_path / "u.safetensors"
  write_store(path, ids, emb)
  s = UserEmbeddingStore(path)
  batch = ids[[3, 3, 0, 19, 7]]
  many = s.get_many(batch)
  assert many.shape == (5, 3, 5) and many.dtype == np.float32
  for row, uid in zip(many, batch):
    np.testing.assert_array_equal(row, s[uid])
  assert s.get_many(np.zeros(0, np.int64)).shape == (0, 3, 5)

  absent = [int(ids.max()) + 1 + k for k in range(12)]
  np.testing.assert_array_equal(s.missing(list(ids[:4]) + absent[::-1] + absent), absent)
  assert s.missing(ids).size == 0
  with pytest.raises(KeyError) as e:
    s.get_many(list(ids[:2]) + absent)
  msg = str(e.value)
  assert "12 user id(s)" in msg and str(absent[0]) in msg and str(path) in msg
  assert str(absent[-1]) not in msg                      # only the first ten are listed
  with pytest.raises(KeyError, match=f"{absent[0]}.*{path}"):
    s[absent[0]]
  assert absent[0] not in s and "x" not in s and 1.5 not in s
  with pytest.raises(TypeError):
    s.get_many([1.5])


def test_bad_input_is_rejected_naming_the_culprit(tmp_path):
  path = tmp_path / "u.safetensors"
  ids, emb = random_users()
  dup = ids.copy()
  dup[4] = dup[1]
  with pytest.raises(StoreError, match=f"{path}.*duplicate.*{dup[1]}"):
    write_store(path, dup, emb)
  bad = emb.copy()
  bad[5, 1, 2] = np.nan
  bad[2, 0, 0] = np.inf
  with pytest.raises(StoreError, match=f"non-finite.*user id {ids[2]} \\(2 entries"):
    write_store(path, ids, bad)
  with pytest.raises(StoreError, match="shape"):
    write_store(path, ids, emb[:-1])
  with pytest.raises(StoreError, match="shape"):
    write_store(path, ids, emb[:, 0])
  with pytest.raises(StoreError, match="1-D integer"):
    write_store(path, ids.astype(np.float64), emb)
  with pytest.raises(StoreError, match="1-D integer"):
    write_store(path, ids[:, None], emb)
  with pytest.raises(StoreError, match="floating point"):
    write_store(path, ids, emb.astype(np.int32))
  with pytest.raises(StoreError, match="6 profiles for 7 entries"):
    write_store(path, ids, emb, profiles=["p"] * 6)
  assert not path.exists() and os.listdir(tmp_path) == []


def test_foreign_files_are_refused_naming_the_path(tmp_path):
  with pytest.raises(StoreError, match="not found"):
    UserEmbeddingStore(tmp_path / "nope.safetensors")
  for i, blob in enumerate([b"", b"abc", os.urandom(4096),
                            (20).to_bytes(8, "little") + b"{not json" + b" " * 40]):
    junk = tmp_path / f"junk{i}.bin"
    junk.write_bytes(blob)
    with pytest.raises(StoreError, match=str(junk)):
      UserEmbeddingStore(junk)
  ids, emb = random_users()
  plain = tmp_path / "plain.safetensors"
  save_file({"user_ids": np.sort(ids), "embeddings": emb}, plain)
  with pytest.raises(StoreError, match=f"{plain}.*format tag"):
    UserEmbeddingStore(plain)
  meta = {"format": store_lib.FORMAT, "version": "1", "tokens": "3", "dim": "6"}
  save_file({"user_ids": np.sort(ids), "embeddings": emb}, plain, metadata=meta)
  with pytest.raises(StoreError, match=f"{plain}.*embeddings"):
    UserEmbeddingStore(plain)
  save_file({"user_ids": ids, "embeddings": emb}, plain, metadata={**meta, "dim": "5"})
  with pytest.raises(StoreError, match="increasing"):
    UserEmbeddingStore(plain)


def test_profiles_round_trip_in_user_order(tmp_path):
  ids, emb = random_users()
  profiles = [f"user {u} likes \"quotes\", ünïcode and\nnewlines" for u in ids]
  path = tmp_path / "u.safetensors"
  write_store(path, ids, emb, profiles=profiles)
  s = UserEmbeddingStore(path)
  for uid, p in zip(ids, profiles):
    assert s.profile(uid) == p
  with pytest.raises(KeyError):
    s.profile(int(ids.max()) + 1)


def test_pickle_carries_only_the_path(tmp_path):
  ids, emb = random_users(n=50, tokens=4, dim=64)
  path = tmp_path / "u.safetensors"
  write_store(path, ids, emb)
  s = UserEmbeddingStore(path)
  s.get_many(ids)                                        # arrays are loaded before pickling
  blob = pickle.dumps(s)
  assert len(blob) < 1000 < emb.nbytes
  t = pickle.loads(blob)
  np.testing.assert_array_equal(t.get_many(ids), s.get_many(ids))
  assert t.path == s.path and t.tokens == 4


def test_failed_write_keeps_the_old_store_and_leaves_no_temp_file(tmp_path, monkeypatch):
  path = tmp_path / "u.safetensors"
  ids, emb = random_users()
  write_store(path, ids, emb)
  before = path.read_bytes()

  def crash(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"half a store")
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(store_file, "save_file", crash)
  with pytest.raises(RuntimeError, match="disk on fire"):
    write_store(path, ids, emb * 2)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["u.safetensors"]
  monkeypatch.undo()
  write_store(path, ids, emb * 2)                        # a later write replaces it in place
  assert os.listdir(tmp_path) == ["u.safetensors"]
  np.testing.assert_array_equal(UserEmbeddingStore(path)[ids[0]], emb[0] * 2)


def several_samples(tmp_path, name="multi.safetensors", users=(5, -3, 11), per_user=3, shard=None):
  """Entries (user, sample) in a scrambled order, each with its shots, profile and embedding."""
  rng = np.random.default_rng(len(name))
  ids = np.repeat(np.asarray(users, np.int64), per_user)
  samples = np.tile(np.arange(per_user), len(users))
  order = rng.permutation(ids.size)
  ids, samples = ids[order], samples[order]
  shots = ids[:, None] * 100 + samples[:, None] * 4 + np.arange(4)
  emb = rng.normal(size=(ids.size, 2, 3)).astype(np.float32)
  profiles = [f"user {u}, sample {s}: likes ✓" for u, s in zip(ids, samples)]
  source = {"model": "tiny"} if shard is None else {"model": "tiny", "shard": shard}
  path = tmp_path / name
  write_store(path, ids, emb, samples=samples, shot_ids=shots, profiles=profiles, source=source)
  return path, ids, samples, shots, emb, profiles


def test_several_samples_per_user_keep_shots_and_profiles(tmp_path):
  path, ids, samples, shots, emb, profiles = several_samples(tmp_path)
  s = UserEmbeddingStore(path)
  assert (s.num_users, s.num_entries, len(s)) == (3, 9, 9)
  np.testing.assert_array_equal(s.users, [-3, 5, 11])
  order = np.lexsort((samples, ids))
  np.testing.assert_array_equal(s.user_ids, ids[order])
  np.testing.assert_array_equal(s.samples, samples[order])
  np.testing.assert_array_equal(s.shot_ids, shots[order])
  np.testing.assert_array_equal(s.embeddings, emb[order])
  assert [s.profile_of_row(r) for r in range(9)] == [profiles[i] for i in order]
  for uid in (5, -3, 11):                         # lookups by user give the sample-0 entry
    first = np.flatnonzero((ids == uid) & (samples == 0))[0]
    np.testing.assert_array_equal(s[uid], emb[first])
    assert s.profile(uid) == profiles[first]
    np.testing.assert_array_equal(s.samples[s.rows_of(uid)], [0, 1, 2])
  np.testing.assert_array_equal(s.get_many([11, -3, 11]), s.embeddings[[6, 0, 6]])
  np.testing.assert_array_equal(s.missing([5, 6, -3]), [6])

  with pytest.raises(StoreError, match=r"duplicate \(user id, sample\) entries: \[\[1, 1\]\]"):
    write_store(path, [1, 1, 1], emb[:3], samples=[0, 1, 1])
  with pytest.raises(StoreError, match="without a sample-0 entry.*7"):
    write_store(path, [2, 7], emb[:2], samples=[0, 1])
  with pytest.raises(StoreError, match="shot_ids"):
    write_store(path, [2, 7], emb[:2], shot_ids=np.zeros((3, 4), np.int64))
  assert UserEmbeddingStore(path).num_entries == 9          # refused writes left it alone


def test_version_1_stores_are_still_read(tmp_path):
  ids, emb = random_users(n=4)
  path = tmp_path / "v1.safetensors"
  order = np.argsort(ids)
  meta = {"format": store_lib.FORMAT, "version": "1", "tokens": "3", "dim": "5",
          "source": "{\"vlm\": \"old\"}", "profiles": json.dumps([f"p{u}" for u in ids[order]])}
  save_file({"user_ids": ids[order], "embeddings": emb[order]}, path, metadata=meta)
  s = UserEmbeddingStore(path)
  assert (s.version, s.num_users, s.source, s.shot_ids.shape) == (1, 4, {"vlm": "old"}, (4, 0))
  np.testing.assert_array_equal(s[ids[2]], emb[2])
  assert s.profile(ids[2]) == f"p{ids[2]}"


def test_merge_joins_shards_and_refuses_mismatches(tmp_path):
  a = several_samples(tmp_path, "a.safetensors", users=(1, 4), shard={"index": 0, "count": 2})
  b = several_samples(tmp_path, "b.safetensors", users=(2, 9), shard={"index": 1, "count": 2})
  merged = merge.merge_stores(tmp_path / "all.safetensors", [a[0], b[0]])
  np.testing.assert_array_equal(merged.users, [1, 2, 4, 9])
  assert merged.num_entries == 12 and merged.source["model"] == "tiny"
  assert "shard" not in merged.source
  for part in (a, b):
    s = UserEmbeddingStore(part[0])
    for r in range(len(s)):
      (row,) = np.flatnonzero((merged.user_ids == s.user_ids[r]) & (merged.samples == s.samples[r]))
      np.testing.assert_array_equal(merged.embeddings[row], s.embeddings[r])
      np.testing.assert_array_equal(merged.shot_ids[row], s.shot_ids[r])
      assert merged.profile_of_row(row) == s.profile_of_row(r)

  with pytest.raises(StoreError, match=r"shard\(s\) \[1\] of 2 are missing"):
    merge.merge_stores(tmp_path / "x.safetensors", [a[0]])
  partial = merge.merge_stores(tmp_path / "x.safetensors", [a[0]], allow_partial=True)
  assert partial.num_users == 2
  with pytest.raises(StoreError, match=r"shard\(s\) \[0\] given twice"):
    merge.merge_stores(tmp_path / "x.safetensors", [a[0], a[0]])
  c = several_samples(tmp_path, "c.safetensors", users=(1,), shard={"index": 1, "count": 2})
  with pytest.raises(StoreError, match="duplicate"):
    merge.merge_stores(tmp_path / "x.safetensors", [a[0], c[0]])
  other = tmp_path / "other.safetensors"
  write_store(other, [77], np.ones((1, 2, 3)), shot_ids=np.zeros((1, 4), np.int64),
              profiles=["x"], source={"model": "big", "shard": {"index": 1, "count": 2}})
  with pytest.raises(StoreError, match=f"{other}: made with other settings.*'model'"):
    merge.merge_stores(tmp_path / "x.safetensors", [a[0], other])

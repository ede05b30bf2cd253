"""User-classification probe (users/probe.py): synthetic users with known structure."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppd_jax.users import probe
from ppd_jax.data import user_store as store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = 32


def _users(num_users=20, per_user=6, noise=1.0, seed=0, tokens=None):
  """Embeddings = user centroid + noise; ids large and non-contiguous like Pick-a-Pic's.
  With tokens, only token 1 carries the user, the others are pure noise."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(10**12, num_users, replace=False)) + 10**9
  y = np.repeat(np.arange(num_users), per_user)
  x = rng.normal(size=(num_users, F))[y] + noise * rng.normal(size=(y.size, F))
  if tokens is not None:
    full = rng.normal(size=(y.size, tokens, F))
    full[:, 1] = x
    x = full
  return x.astype(np.float32), ids[y]


def test_separates_users_far_above_chance():
  x, labels = _users()
  r = probe.train_probe(x, labels, steps=300)
  assert (r["num_users"], r["num_embeddings"], r["num_train"], r["num_test"]) == (20, 120, 80, 40)
  assert r["chance_top1"] == pytest.approx(1 / 20) and r["chance_top5"] == pytest.approx(5 / 20)
  assert r["test_top1"] > 0.9 and r["test_top5"] >= 0.99
  assert r["train_top1"] == 1.0
  assert len(r["loss"]) == 300 and r["loss"][-1] < 0.1 * r["loss"][0]
  assert r["loss"][0] == pytest.approx(np.log(20), rel=1e-5)      # zero init: uniform softmax
  assert r["user_ids"] == sorted(set(labels.tolist())) and r["train_only_users"] == []
  json.dumps(r)                                                    # plain Python types only


def test_shuffled_labels_are_near_chance():
  """Labels permuted across embeddings carry no user signal, so test hits are Binomial(n, 1/C).
  With n = 200 test embeddings and C = 20: mean 10, sd 3.1, and 3 x chance (30 hits) is 6.5 sd
  out (p < 1e-7); top-5 (chance 0.25: mean 50, sd 6.1) at 0.5 is 8 sd out. The classifier does
  fit the train split, so the gap is memorisation, not a failure to train."""
  x, labels = _users(per_user=20)
  shuffled = np.random.default_rng(1).permutation(labels)
  r = probe.train_probe(x, shuffled, test_fraction=0.5, steps=300)
  assert r["num_test"] == 200
  assert r["test_top1"] < 3 * r["chance_top1"]
  assert r["test_top5"] < 2 * r["chance_top5"]
  assert r["train_top1"] > 0.5
  real = probe.train_probe(x, labels, test_fraction=0.5, steps=300)
  assert real["test_top1"] > 0.9


def test_split_is_by_embedding_and_stratified():
  rng = np.random.default_rng(0)
  counts = np.array([1, 2, 3, 5, 8, 1, 13])
  y = rng.permutation(np.repeat(np.arange(counts.size), counts))
  for seed in range(4):
    test = probe._split(y, counts.size, 0.25, seed)
    for c, n in enumerate(counts):
      n_test = int(test[y == c].sum())
      if n == 1:
        assert n_test == 0                                # single embedding: train only
      else:
        assert 1 <= n_test <= n - 1                       # both splits
        assert n_test == np.clip(np.rint(n * 0.25), 1, n - 1)
  assert not (probe._split(y, counts.size, 0.25, 0) == probe._split(y, counts.size, 0.25, 1)).all()

  x, labels = _users(num_users=6, per_user=4, noise=0.3)
  labels = labels.copy()
  lone = int(labels[0])
  x, labels = x[3:], labels[3:]                           # the first user keeps one embedding
  r = probe.train_probe(x, labels, steps=50)
  assert r["train_only_users"] == [lone]
  assert r["num_train"] + r["num_test"] == r["num_embeddings"] == 21
  assert r["num_test"] == 5                               # one of each other user's 4


def test_deterministic_given_seed():
  x, labels = _users(noise=2.0)
  a = probe.train_probe(x, labels, steps=100, seed=3)
  b = probe.train_probe(x, labels, steps=100, seed=3)
  c = probe.train_probe(x, labels, steps=100, seed=4)
  assert a == b
  assert a["loss"] != c["loss"]


def test_input_errors():
  x, labels = _users(num_users=3, per_user=2)
  with pytest.raises(ValueError, match="at least 2 users"):
    probe.train_probe(x, np.zeros(len(x), np.int64))
  with pytest.raises(ValueError, match="single embedding"):
    probe.train_probe(x[::2], labels[::2])
  with pytest.raises(ValueError, match="integer user ids"):
    probe.train_probe(x, labels.astype(np.float64))
  with pytest.raises(ValueError, match="test_fraction"):
    probe.train_probe(x, labels, test_fraction=1.0)


def test_select_top_users_ties_by_id():
  ids = np.array([7, 3, 9, 3, 5, 7, 11, 2])                # rows per user: 7,3 x2
  pairs = {3: 10, 5: 10, 7: 12, 9: 4, 11: 10, 2: 1, 99: 50}   # 99 has no embedding
  rows, users = probe.select_top_users(ids, pairs, k=3)
  np.testing.assert_array_equal(users, [7, 3, 5])          # 12, then 10s by id: 3, 5 (not 11)
  np.testing.assert_array_equal(rows, [0, 1, 3, 4, 5])
  table = {"user_id": np.array(list(pairs)), "num_pairs": np.array(list(pairs.values()))}
  rows2, users2 = probe.select_top_users(ids, table, k=3)  # an index's users.npz
  np.testing.assert_array_equal(users2, users)
  np.testing.assert_array_equal(rows2, rows)
  _, everyone = probe.select_top_users(ids, (list(pairs), list(pairs.values())), k=300)
  np.testing.assert_array_equal(everyone, [7, 3, 5, 11, 9, 2])
  with pytest.raises(ValueError, match="more than once"):
    probe.select_top_users(ids, ([3, 3], [1, 2]))


def test_features_shapes():
  x = np.arange(4 * 29 * 8, dtype=np.float16).reshape(4, 29, 8)
  last = probe.features(x)
  assert last.shape == (4, 8) and last.dtype == np.float32
  np.testing.assert_array_equal(last, x[:, -1])
  np.testing.assert_array_equal(probe.features(x, 3), x[:, 3])
  np.testing.assert_allclose(probe.features(x, "mean"), x.astype(np.float32).mean(1))
  np.testing.assert_array_equal(probe.features(x, -1, rows=np.array([2, 0])), x[[2, 0], -1])
  np.testing.assert_allclose(probe.features(x, "mean", rows=[1]), x[[1]].astype(np.float32).mean(1))
  assert probe.features(x[:, 0]).shape == (4, 8)          # [E, F] passes through
  for bad in (29, -30, "last", True, 1.0):
    with pytest.raises(ValueError):
      probe.features(x, bad)


def test_plot_writes_a_png(tmp_path):
  x, labels = _users(num_users=5, per_user=4)
  r = probe.train_probe(x, labels, steps=20, top_k=(1, 3, 5))
  path = str(tmp_path / "p.png")
  probe.plot_probe(r, path)
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size[0] > 300
  line = probe.summary(r)
  assert line.startswith("probe: 5 users, 20 embeddings; test top-1 ")
  assert "top-5" in line and "(chance 1.0000)" in line    # top-5 of 5 users is certain


def _multi_store(tmp_path, num_users=8, per_user=8):
  x, labels = _users(num_users=num_users, per_user=per_user, noise=0.5, tokens=3)
  path = str(tmp_path / "multi.safetensors")
  samples = np.zeros_like(labels)
  for u in np.unique(labels):                    # 0, 1, ... within each user
    samples[labels == u] = np.arange((labels == u).sum())
  store.write_store(path, labels, x.astype(np.float16), samples=samples)
  uniq = np.unique(labels)
  index = tmp_path / "shards" / "index"
  index.mkdir(parents=True)
  num_pairs = np.arange(uniq.size)[::-1] * 10 + 5       # the smallest ids have the most pairs
  np.savez(index / "users.npz", user_id=uniq, num_pairs=num_pairs, split=np.zeros_like(uniq))
  return path, uniq


def test_run_selects_by_pairs_and_layer(tmp_path):
  path, uniq = _multi_store(tmp_path)
  lines = []
  r = probe.run(path, str(tmp_path / "out"), k=4, layer=1, steps=100,
                num_pairs=str(tmp_path / "shards"), log=lines.append)
  assert r["user_ids"] == uniq[:4].tolist() and r["num_embeddings"] == 32
  assert r["test_top1"] == 1.0                            # token 1 carries the user
  assert r["config"]["selected_by"] == "num_pairs" and r["config"]["layer"] == 1
  with open(tmp_path / "out" / "probe.json") as f:
    assert json.load(f) == r
  assert lines == [probe.summary(r)]
  noise = probe.run(path, str(tmp_path / "out2"), k=8, layer="-1", steps=100, log=lines.append)
  assert noise["config"]["selected_by"] == "embeddings" and noise["num_users"] == 8
  assert noise["num_test"] == 16                          # 2 of each user's 8
  assert noise["test_top1"] < 0.5        # last token pure noise: Binomial(16, 1/8) >= 8, p < 1e-4
  with pytest.raises(probe.ProbeError, match="--layer: expected an integer"):
    probe.run(path, str(tmp_path / "o"), layer="last")
  with pytest.raises(probe.ProbeError, match="--layer: layer 3 out of range"):
    probe.run(path, str(tmp_path / "o"), layer=3)
  with pytest.raises(probe.ProbeError, match="index/users.npz"):
    probe.run(path, str(tmp_path / "o"), num_pairs=str(tmp_path))
  with pytest.raises(probe.ProbeError, match="--k"):
    probe.run(path, str(tmp_path / "o"), k=1)


def test_run_on_a_store_of_single_embeddings_errors(tmp_path):
  """A store with one embedding per user gives nothing to test on, said in one line."""
  x, labels = _users(num_users=5, per_user=1, tokens=2)
  path = str(tmp_path / "users.safetensors")
  store.write_store(path, labels, x)
  with pytest.raises(probe.ProbeError, match=f"{path}: each of the 5 chosen users has a single"):
    probe.run(path, str(tmp_path / "out"))
  mapped = store.UserEmbeddingStore(path).embeddings          # memory-mapped, read by rows
  np.testing.assert_array_equal(probe.features(mapped, 1, rows=[4, 0]), x[[4, 0], 1])
  one = str(tmp_path / "one.safetensors")
  store.write_store(one, labels[:1], x[:1])
  with pytest.raises(probe.ProbeError, match=f"{one}: the probe needs at least 2 users, found 1"):
    probe.run(one, str(tmp_path / "out"))


def test_cli_end_to_end(tmp_path):
  """The absl script path on a store with several embeddings per user."""
  path, uniq = _multi_store(tmp_path)
  out = str(tmp_path / "out")
  args = [f"--store={path}", f"--out={out}", "--k=5", "--layer=1", "--steps=100",
          f"--num_pairs={tmp_path / 'shards'}"]
  done = subprocess.run([sys.executable, "-m", "ppd_jax.users.probe", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith("probe: 5 users, 40 embeddings; test top-1 1.00 (chance 0.2000), "
                                "top-5 1.00 (chance 1.0000)")
  with open(os.path.join(out, "probe.json")) as f:
    r = json.load(f)
  assert r["user_ids"] == uniq[:5].tolist()
  assert {"test_top1", "test_top5", "chance_top1", "chance_top5", "loss", "config"} <= set(r)
  with Image.open(os.path.join(out, "probe.png")) as img:
    assert img.format == "PNG"

  missing = str(tmp_path / "nope.safetensors")
  done = subprocess.run([sys.executable, "-m", "ppd_jax.users.probe", f"--store={missing}",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines() == [
      f"ppd_jax.users.probe: {missing}: user-embedding store not found"]

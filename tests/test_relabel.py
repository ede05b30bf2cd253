"""Reward users from Pick-a-Pic pairs: relabel scores, counts against an independent count from the
parquet JPEGs, kill + resume, and the loader training on the reward users' labels from the same
records (no latent recomputed)."""
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pickapic_fixtures
from ppd_jax import config_validation
from ppd_jax.data import pickapic
from ppd_jax.data import pickapic_source
from ppd_jax.data import precompute
from ppd_jax.data import relabel
from ppd_jax.data import reward_users
from ppd_jax.data import shards
from ppd_jax.rewards import preprocess
from ppd_jax.data import user_store as store_lib


class ChannelReward:
  """A stand-in reward: mean of one colour channel, quantised to `step` (so ties happen)."""

  def __init__(self, channel: int, step: float = 1.0, nan_every: int = 0):
    self.channel, self.step, self.nan_every, self.calls = channel, step, nan_every, 0

  def score(self, images, prompts):
    assert len(prompts) == len(images)
    self.calls += len(images)
    u8 = preprocess.to_uint8_images(images)
    s = np.array([np.floor(x[..., self.channel].mean() / self.step) for x in u8], np.float32)
    if self.nan_every:
      s[::self.nan_every] = np.nan
    return s


REWARDS = ("clip_h14", "aesthetic", "hps_v2")


def make_rewards():
  return {"clip_h14": ChannelReward(0, step=8.0), "aesthetic": ChannelReward(1, step=8.0),
          "hps_v2": ChannelReward(2, step=8.0, nan_every=7)}


SETTINGS = {n: {"model": f"fake-{n}"} for n in REWARDS}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("relabel"))
  inputs = pickapic_fixtures.make_inputs(root, num_users=12, corrupt_jpegs=1)
  c = pickapic_fixtures.config(inputs["pretrained"])
  out = os.path.join(root, "shards")
  precompute.run(c, inputs["parquet"], out, log=lambda m: None)
  scored = os.path.join(root, "relabel")
  relabel.run(out, scored, make_rewards(), SETTINGS, log=lambda m: None)
  return {**inputs, "shards": out, "relabel": scored, "root": root}


def jpeg_scores(folders, pair_ids):
  """Independent: each pair's two images' stand-in scores, straight from the parquet files."""
  index = pickapic.PickapicIndex.load(os.path.join(folders["shards"], "index"))
  out = {}
  for p in pair_ids:
    f, row = index.pairs["file_id"][p], index.pairs["row"][p]
    table = pq.read_table(index.paths[f], columns=["jpg_0", "jpg_1"]).slice(int(row), 1)
    ims = [np.asarray(Image.open(io.BytesIO(table.column(c)[0].as_py())).convert("RGB"))
           for c in ("jpg_0", "jpg_1")]
    out[p] = {n: [np.floor(im[..., ch].mean() / 8.0) for im in ims]
              for n, ch in zip(REWARDS, (0, 1, 2))}
  return index, out


def test_scores_match_the_jpegs(folders):
  pairs = relabel.record_pairs(folders["shards"])
  _, expected = jpeg_scores(folders, pairs[:12])
  for n in ("clip_h14", "aesthetic"):
    got_pairs, got = relabel.read_scores(folders["relabel"], n)
    table = dict(zip(got_pairs.tolist(), got))
    assert sorted(table) == sorted(pairs.tolist())
    for p in pairs[:12]:
      np.testing.assert_array_equal(table[int(p)], expected[int(p)][n])


@pytest.mark.parametrize("assign,min_margin", [("all", 0.0), ("all", 2.0), ("hash", 1.0)])
def test_label_counts_match_an_independent_count(folders, assign, min_margin):
  summary = reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), min_margin,
                               assign, seed=3, log=lambda m: None)
  index = pickapic.PickapicIndex.load(os.path.join(folders["shards"], "index"))
  for split in relabel.SPLITS:
    records = np.load(os.path.join(folders["shards"], f"records-{split}.npz"))["pair"]
    labels = dict(np.load(os.path.join(folders["relabel"], f"labels-{split}.npz")))
    scores = {n: dict(zip(*[a.tolist() for a in relabel.read_scores(folders["relabel"], n)]))
              for n in REWARDS}
    owners = {}
    expected_rows = []
    for k, n in enumerate(REWARDS):
      counts = {"assigned": 0, "kept": 0, "failed": 0, "ties": 0, "under_margin": 0,
                "flipped": 0}
      for row, p in enumerate(records.tolist()):
        if assign == "hash":
          owner = int(pickapic.seeded_hash(index.pairs["key"][[p]], 3, 0x5EED)[0] % 3)
          owners.setdefault(p, owner)
          if owner != k:
            continue
        counts["assigned"] += 1
        s0, s1 = scores[n][p]
        if not (np.isfinite(s0) and np.isfinite(s1)):
          counts["failed"] += 1
        elif s0 == s1:
          counts["ties"] += 1
        elif abs(s1 - s0) < min_margin:
          counts["under_margin"] += 1
        else:
          counts["kept"] += 1
          flip = int(s1 > s0) != int(index.pairs["preferred"][p])
          counts["flipped"] += flip
          expected_rows.append((row, -(k + 1), flip))
      assert summary["counts"][split][n] == counts, (split, n)
    got_rows = sorted(zip(labels["record"].tolist(), labels["user_id"].tolist(),
                          labels["flip"].tolist()))
    assert got_rows == sorted(expected_rows)
  # The stand-ins really produce every case the counts distinguish.
  every = {k: sum(summary["counts"]["train"][n][k] for n in REWARDS)
           for k in ("ties", "failed", "flipped")}
  assert all(v > 0 for v in every.values()), every


def test_hash_assignment_uses_each_pair_once(folders):
  reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "hash", seed=0,
                     log=lambda m: None)
  labels = np.load(os.path.join(folders["relabel"], "labels-train.npz"))
  assert len(np.unique(labels["record"])) == len(labels["record"])
  reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "all", seed=0,
                     log=lambda m: None)
  everything = np.load(os.path.join(folders["relabel"], "labels-train.npz"))
  assert len(everything["record"]) > len(labels["record"])


def test_a_killed_relabel_resumes_without_rescoring(folders, tmp_path):
  out = str(tmp_path / "relabel")
  first = make_rewards()

  def stop(unit):
    raise KeyboardInterrupt(unit)
  with pytest.raises(KeyboardInterrupt):
    relabel.run(folders["shards"], out, first, SETTINGS, log=lambda m: None, after_unit=stop)
  done_units = [n for n in os.listdir(os.path.join(out, "done"))]
  assert len(done_units) == 1
  second = make_rewards()
  relabel.run(folders["shards"], out, second, SETTINGS, log=lambda m: None)
  total_images = 2 * len(relabel.record_pairs(folders["shards"]))
  assert sum(r.calls for r in first.values()) + sum(r.calls for r in second.values()) < (
      total_images * len(REWARDS) + total_images)   # the finished unit was not scored again
  for n in REWARDS:
    a, b = relabel.read_scores(out, n), relabel.read_scores(folders["relabel"], n)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  third = make_rewards()
  relabel.run(folders["shards"], out, third, SETTINGS, log=lambda m: None)
  assert sum(r.calls for r in third.values()) == 0
  with pytest.raises(shards.ShardsError, match="scored reward 'aesthetic' with"):
    relabel.run(folders["shards"], out, third, {**SETTINGS, "aesthetic": {"model": "other"}},
                log=lambda m: None)


def test_the_loader_trains_on_reward_users_from_the_same_records(folders):
  summary = reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "all",
                               seed=0, log=lambda m: None)
  store = os.path.join(folders["root"], "reward_users.safetensors")
  ids = np.array(sorted(summary["user_ids"].values()))
  store_lib.write_store(store, ids, np.random.default_rng(0).standard_normal(
      (len(ids), 1, 16)).astype(np.float32), source={"embedder": "random (test)"})
  c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                               user_embeddings=store, relabel=folders["relabel"])
  config_validation.prepare(c)
  source = pickapic_source.PickapicPairs(c, log=lambda m: None)
  labels = np.load(os.path.join(folders["relabel"], "labels-train.npz"))
  assert len(source) == len(labels["record"])
  batch = source.gather(np.arange(len(source)))
  assert set(batch["user_id"].tolist()) == set(ids.tolist())
  index, truth = jpeg_scores(folders, batch["pair"][:10])
  raw = {int(r["pair"]): r for r in _records(folders["shards"])}
  swapped = 0
  for i in range(10):
    p, u = int(batch["pair"][i]), int(batch["user_id"][i])
    s0, s1 = truth[p][REWARDS[-u - 1]]
    stored = raw[p]                    # (preferred, dispreferred) by the person's label
    same = int(s1 > s0) == int(index.pairs["preferred"][p])
    swapped += not same
    np.testing.assert_array_equal(batch["preferred"][i],
                                  stored["preferred"] if same else stored["dispreferred"])
  assert 0 < swapped < 10
  with open(os.path.join(folders["relabel"], reward_users.LABELS)) as f:
    assert json.load(f)["user_ids"] == {"clip_h14": -1, "aesthetic": -2, "hps_v2": -3}


def _records(folder):
  from array_record.python import array_record_module
  from ppd_jax.data import records
  for s in shards.read_manifest(folder)["shards"]:
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, "pairs", s["file"]))
    for _ in range(reader.num_records()):
      yield records.decode(reader.read())
    reader.close()


def test_bad_settings_are_named(folders, tmp_path):
  with pytest.raises(ValueError, match="--assign='some'"):
    reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "some")
  with pytest.raises(shards.ShardsError, match="no scores for reward 'pickscore'"):
    reward_users.build(folders["shards"], folders["relabel"], ["pickscore"], 0.0, "all")
  with pytest.raises(shards.ShardsError, match="no records-train.npz"):
    relabel.run(str(tmp_path), str(tmp_path / "o"), make_rewards(), SETTINGS, log=lambda m: None)
  store = str(tmp_path / "users.safetensors")
  store_lib.write_store(store, np.array([-3, -2, -1]), np.zeros((3, 1, 16), np.float32),
                        source={"embedder": "zeros (test)"})
  c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                               user_embeddings=store, relabel=str(tmp_path / "nowhere"))
  with pytest.raises(config_validation.ConfigError, match="data.relabel"):
    config_validation.prepare(c)


def test_the_command_line_with_a_real_clip_reward(folders, tmp_path):
  """python -m ppd_jax.data.relabel end to end with a (tiny) CLIP reward: its scores equal the
  reward called on the decoded JPEGs and their captions; an unknown reward is named."""
  import subprocess
  import sys
  import tiny_clip
  from ppd_jax.rewards import registry
  model = str(tmp_path / "clip")
  tiny_clip.save_clip(model)
  out = str(tmp_path / "relabel")
  cmd = [sys.executable, "-m", "ppd_jax.data.relabel", f"--shards={folders['shards']}",
         f"--out={out}", "--rewards=clip_h14", f"--model=clip_h14={model}", "--assign=all"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "reward users: train clip_h14 (user -1)" in done.stdout
  pairs, scores = relabel.read_scores(out, "clip_h14")
  index = pickapic.PickapicIndex.load(os.path.join(folders["shards"], "index"))
  rows = pickapic.read_pairs(index, pairs[:4])
  images = [Image.open(io.BytesIO(r[c])) for r in rows for c in ("jpg_0", "jpg_1")]
  prompts = [r["caption"] for r in rows for _ in range(2)]
  expected = registry.load("clip_h14", model=model).score(images, prompts).reshape(-1, 2)
  np.testing.assert_allclose(scores[:4], expected, atol=1e-5)
  bad = subprocess.run(cmd[:5] + ["--rewards=clip_h14,imagereward"], capture_output=True,
                       text=True, env=env, timeout=300)
  assert bad.returncode != 0 and "imagereward" in bad.stderr and "Traceback" not in bad.stderr


def test_the_pickapic_prompt_set_is_the_splits_unique_captions(folders):
  """evals/prompt_sets' pickapic:SHARD_DIR[:split]: each caption of the split's records once,
  counted here straight from the index (the paper picks beta on validation captions)."""
  from ppd_jax.evals import prompt_sets
  index = pickapic.PickapicIndex.load(os.path.join(folders["shards"], "index"))
  for split in relabel.SPLITS:
    pairs = np.load(os.path.join(folders["shards"], f"records-{split}.npz"))["pair"]
    expected = {index.captions[c] for c in index.pairs["caption_id"][pairs]}
    spec = f"pickapic:{folders['shards']}" + ("" if split == "validation" else f":{split}")
    got = [p.text for p in prompt_sets.read(spec)]
    assert len(got) == len(set(got)) and set(got) == expected
  with pytest.raises(prompt_sets.PromptSetError, match="no .*records-dev.npz"):
    prompt_sets.read(f"pickapic:{folders['shards']}:dev")


def _relabel_config(folders, **data):
  c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                               relabel=folders["relabel"], **data)
  c.model.user_tokens = c.model.user_embed_dim = 0     # from the inputs, as the variants do
  config_validation.prepare(c)
  return c


def test_onehot_codes_single_rewards_and_no_user(folders):
  """The learned-code ablation feeds e_k to reward user -(k + 1); data.relabel_rewards keeps one
  reward's pairs; user_conditioning=False feeds one zero embedding: no store in either."""
  reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "all", seed=0,
                     log=lambda m: None)
  labels = np.load(os.path.join(folders["relabel"], "labels-train.npz"))
  c = _relabel_config(folders, user_embedding="onehot")
  assert (c.model.user_tokens, c.model.user_embed_dim) == (1, len(REWARDS))
  batch = pickapic_source.PickapicPairs(c, log=lambda m: None).gather(np.arange(6))
  for u, e in zip(batch["user_id"], batch["user_embedding"]):
    np.testing.assert_array_equal(e, np.eye(len(REWARDS))[[-u - 1]])
  one = pickapic_source.PickapicPairs(_relabel_config(
      folders, user_embedding="onehot", relabel_rewards="aesthetic"), log=lambda m: None)
  assert len(one) == int((labels["user_id"] == -2).sum()) and set(one.record_user_ids) == {-2}
  none = _relabel_config(folders, user_conditioning=False)
  assert (none.model.user_tokens, none.model.user_embed_dim) == (1, 1)
  source = pickapic_source.PickapicPairs(none, log=lambda m: None)
  assert not source.gather(np.arange(4))["user_embedding"].any()
  for data, message in ((dict(user_embedding="onehot", relabel=""), "needs data.relabel"),
                        (dict(relabel_rewards="imagereward"), "imagereward.*not reward users"),
                        (dict(user_embedding="learned"), "must be 'store'")):
    c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                                 **{"relabel": folders["relabel"], "user_conditioning": False,
                                    **data})
    with pytest.raises(config_validation.ConfigError, match=message):
      config_validation.prepare(c)


def test_a_reward_user_run_trains(folders, tmp_path):
  """One step of the onehot Table 1 row from the relabelled shards, end to end."""
  from ppd_jax import trainer
  reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "hash", seed=0,
                     log=lambda m: None)
  c = _relabel_config(folders, user_embedding="onehot")
  c.total_steps, c.eval_every, c.batch_size = 1, 0, 8     # 8 pairs: one per fake device
  state = trainer.train_and_evaluate(c, str(tmp_path / "run"))
  assert int(state.step) == 1 and int(state.skipped_updates) == 0


def test_reward_users_embedded_from_many_samples_and_drawn_per_pair(folders, tmp_path):
  """users.embed --pairs=RELABEL_DIR shows each reward user its pairs under its reward's labels
  (checked against the JPEG scores), with several 4-pair samples per user; data.user_sample =
  "random" shows each pair one of its user's entries, "first" always sample 0."""
  from tiny_llava import save_tiny_llava
  from ppd_jax.users import embed
  from ppd_jax.users import reward_shots
  from ppd_jax.users import shots as shots_lib
  from ppd_jax.users import vlm as vlm_lib
  reward_users.build(folders["shards"], folders["relabel"], list(REWARDS), 0.0, "all", seed=0,
                     log=lambda m: None)
  pairs = shots_lib.open_pairs(folders["relabel"], 4, split_params={}, log=lambda m: None)
  assert isinstance(pairs, reward_shots.RewardUserShots)
  assert pairs.users.tolist() == [-3, -2, -1]
  labels = np.load(os.path.join(folders["relabel"], "labels-train.npz"))
  records = np.load(os.path.join(folders["shards"], "records-train.npz"))["pair"]
  some = pairs.candidates(-2)[:3] + pairs.candidates(-1)[:3]
  index, truth = jpeg_scores(folders, records[labels["record"][some]])
  for row, got in pairs.load(some).items():
    assert int(labels["user_id"][row]) in (-2, -1)
    s0, s1 = truth[int(records[labels["record"][row]])][REWARDS[-int(labels["user_id"][row]) - 1]]
    assert got.preferred == 1 + int(s1 > s0)
  assert sorted(pairs.candidates(-1)) == np.flatnonzero(labels["user_id"] == -1).tolist()

  model = save_tiny_llava(str(tmp_path / "llava"))
  out = str(tmp_path / "reward_users.safetensors")
  opt = embed.Options(model=model, pairs=folders["relabel"], out=out, samples=5, batch_size=8,
                      decoding=vlm_lib.Decoding(mode="greedy", max_new_tokens=3))
  store = embed.run(opt, log=lambda m: None)
  assert store.num_users == 3 and store.num_entries == 15
  assert store.source["pairs"]["kind"] == "reward_users"
  first = store.shot_ids[store.samples == 0]
  assert [list(s) for s in first] == [pairs.candidates(u)[:4] for u in (-3, -2, -1)]
  assert len({tuple(sorted(s)) for s in store.shot_ids[store.user_ids == -1]}) == 5

  got = {}
  for how in ("first", "random"):
    c = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                                 user_embeddings=out, relabel=folders["relabel"], user_sample=how)
    c.model.user_tokens = c.model.user_embed_dim = 0
    config_validation.prepare(c)
    source = pickapic_source.PickapicPairs(c, log=lambda m: None)
    got[how] = source.gather(np.arange(len(source)))
  emb = np.asarray(store.embeddings, np.float32)
  for how, batch in got.items():
    used = {}
    for u, e in zip(batch["user_id"].tolist(), batch["user_embedding"]):
      mine = np.flatnonzero(store.user_ids == u)
      match = [int(store.samples[r]) for r in mine if np.array_equal(emb[r], e)]
      assert match, (how, u)                     # always one of the user's own entries
      used.setdefault(u, set()).add(match[0])
    if how == "first":
      assert all(s == {0} for s in used.values())
    else:
      assert all(len(s) >= 3 for s in used.values()), used
  again = pickapic_source.PickapicPairs(c, log=lambda m: None).gather(np.arange(8))
  np.testing.assert_array_equal(again["user_embedding"], got["random"]["user_embedding"][:8])
  bad = pickapic_fixtures.config(folders["pretrained"], shards=folders["shards"],
                                 user_embeddings=out, relabel=folders["relabel"],
                                 user_sample="any")
  with pytest.raises(config_validation.ConfigError, match="data.user_sample"):
    config_validation.prepare(bad)

"""The synthetic world, its users and pairs over base samples, the text encoder, the embedder."""
import colorsys
import inspect
import math

import numpy as np
import pytest

from configs import ppd
from ppd_jax.demo_world import base_pool
from ppd_jax.backbones import pixel as pixel_backbone
from ppd_jax.demo_world import shape_properties
from ppd_jax.demo_world import synthetic
from ppd_jax.demo_world import synthetic_users
from ppd_jax.demo_world.text_hash import HashTextEncoder
from ppd_jax.users import fewshot


@pytest.fixture(scope="module")
def tiny():
  return synthetic_users.SyntheticPreferences(ppd.get_config("tiny"))


def _everything(ds):
  batch = ds.gather(np.arange(len(ds)))
  batch["weights"] = ds.user_weights
  batch["unseen_embeddings"] = np.stack([ds.user_embedding(u) for u in ds.unseen_user_ids])
  return batch


def test_same_config_same_data_other_seed_other_data(tiny):
  c = ppd.get_config("tiny")
  a, b = _everything(tiny), _everything(synthetic_users.SyntheticPreferences(c))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  c.seed = 1
  other = _everything(synthetic_users.SyntheticPreferences(c))
  for k in ("preferred", "dispreferred", "text_embedding", "user_embedding", "weights"):
    assert not np.array_equal(a[k], other[k]), k


def test_gather_keys_shapes_dtypes(tiny):
  c = ppd.get_config("tiny")
  s, d = c.model.sample_size, c.data
  assert len(tiny) == tiny.num_records == d.num_users * d.pairs_per_user
  batch = tiny.gather(np.array([0, 5, len(tiny) - 1, 5]))
  expected = {
      "preferred": ((4, s, s, 3), np.float32),
      "dispreferred": ((4, s, s, 3), np.float32),
      "text_embedding": ((4, d.text_length, c.model.cross_attention_dim), np.float32),
      "user_embedding": ((4, c.model.user_tokens, c.model.user_embed_dim), np.float32),
      "user_id": ((4,), np.int32),
      "pair": ((4,), np.int64),        # the record: what a skipped batch is reported by
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["preferred"].min() >= -1 and batch["preferred"].max() <= 1
  np.testing.assert_array_equal(batch["user_id"], [0, 0, d.num_users - 1, 0])
  np.testing.assert_array_equal(batch["pair"], [0, 5, len(tiny) - 1, 5])
  one = tiny[5]
  for k in expected:
    np.testing.assert_array_equal(one[k], batch[k][1], err_msg=k)
  with pytest.raises(IndexError):
    tiny.gather(np.array([len(tiny)]))


def test_pairs_are_two_base_samples_of_one_caption(tiny):
  p = tiny.pairs_per_user
  for u in (0, 3, 7):
    batch = tiny.gather(np.arange(u * p, (u + 1) * p))
    pairs = tiny.user_pairs(u)
    win, lose = pairs["winner_index"], pairs["loser_index"]
    assert (win != lose).all()
    np.testing.assert_array_equal(tiny.pool_caption_ids[win], tiny.pool_caption_ids[lose])
    # Pixel space: the UNet's x0 is the image itself.
    np.testing.assert_array_equal(tiny.pool_latents, tiny.pool_images)
    np.testing.assert_array_equal(batch["preferred"], tiny.pool_images[win])
    np.testing.assert_array_equal(batch["dispreferred"], tiny.pool_images[lose])
    np.testing.assert_array_equal(batch["text_embedding"],
                                  tiny.encode_captions(pairs["captions"])["text_embedding"])
    assert (batch["user_id"] == u).all()


def test_winners_have_higher_hidden_reward(tiny):
  gap = ppd.get_config("tiny").data.min_reward_gap
  clear = []
  for u in np.concatenate([tiny.train_user_ids, tiny.unseen_user_ids]):
    pairs = tiny.user_pairs(int(u))
    diff = tiny.user_reward(int(u), pairs["winners"]) - tiny.user_reward(int(u), pairs["losers"])
    assert (diff > 0).all(), u
    clear.append(diff >= gap)
  # The tiny pool has only 6 pairs per caption, so a few users fall back to smaller gaps.
  assert np.mean(clear) > 0.9


def test_user_splits(tiny):
  d = ppd.get_config("tiny").data
  np.testing.assert_array_equal(tiny.train_user_ids, np.arange(d.num_users))
  np.testing.assert_array_equal(tiny.unseen_user_ids,
                                np.arange(d.num_users, d.num_users + d.num_unseen_users))
  assert tiny.gather(np.arange(len(tiny)))["user_id"].max() < d.num_users
  np.testing.assert_allclose(np.linalg.norm(tiny.user_weights, axis=1), 1.0, rtol=1e-5)
  for u in tiny.unseen_user_ids[:3]:
    few = tiny.fewshot_pairs(int(u))
    assert few["winners"].shape == (d.fewshot, 8, 8, 3) and len(few["captions"]) == d.fewshot
  with pytest.raises(KeyError, match="unknown user"):
    tiny.user_embedding(d.num_users + d.num_unseen_users)


def test_user_embedding_comes_from_its_fewshot_pairs_only(tiny):
  c = ppd.get_config("tiny").model
  for u in (0, int(tiny.unseen_user_ids[-1])):
    few = tiny.fewshot_pairs(u)
    np.testing.assert_array_equal(
        tiny.user_embedding(u),
        fewshot.embed_user(few["winners"], few["losers"], few["captions"], c.user_tokens,
                           c.user_embed_dim))
  # The embedder plays the VLM: no access to the world, the users or their reward's features.
  imports = [l for l in inspect.getsource(fewshot).splitlines() if l.startswith(("import", "from"))]
  assert not any(name in l for l in imports
                 for name in ("synthetic", "shape_properties", "base_pool")), imports


def test_baseline_source_has_the_same_pairs_and_one_embedding(tiny):
  c = ppd.get_config("tiny")
  c.data.user_conditioning = False
  baseline = synthetic_users.SyntheticPreferences(c)
  a, b = tiny.gather(np.arange(len(tiny))), baseline.gather(np.arange(len(baseline)))
  for k in ("preferred", "dispreferred", "text_embedding", "user_id"):
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert (b["user_embedding"] == b["user_embedding"][:1]).all()
  assert np.abs(b["user_embedding"]).max() > 0
  np.testing.assert_array_equal(baseline.user_embedding(1), baseline.user_embedding(9))


def test_pool_is_cached_and_a_corrupt_cache_is_remade(tmp_path, monkeypatch):
  monkeypatch.setenv("PPD_JAX_CACHE", str(tmp_path))
  c = ppd.get_config("tiny")
  pixels = pixel_backbone.PixelBackbone(c)
  first = base_pool.load_or_make(c, pixels, log=lambda _: None)
  path = tmp_path / "pools" / f"{base_pool.pool_key(c, pixels)}.npz"
  assert path.exists()
  assert first.images.shape == (18 * c.data.pool_per_caption, 8, 8, 3)
  np.testing.assert_array_equal(np.bincount(first.caption_ids), [c.data.pool_per_caption] * 18)
  path.write_bytes(b"not an npz")
  messages = []
  again = base_pool.load_or_make(c, pixels, log=messages.append)
  np.testing.assert_array_equal(first.images, again.images)
  assert any("unreadable" in m for m in messages)
  c.sample.num_steps = 3
  assert base_pool.pool_key(c, pixels) != path.stem


def test_shape_properties_read_rendered_attributes():
  attrs = synthetic.sample_attributes(np.random.default_rng(0), 500)
  props = shape_properties.measure(synthetic.render(attrs, 16))
  for i, name in enumerate(shape_properties.PROPERTIES):
    r = np.corrcoef(attrs[name], props[:, i])[0, 1]
    assert r > (0.95 if name in ("x", "y", "background") else 0.75), (name, r)


def _nearest_colour(rgb):
  hue = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
  dist = np.abs((hue - synthetic.HUES + 180.0) % 360.0 - 180.0)
  return synthetic.COLOURS[int(np.argmin(dist))]


def test_caption_colour_matches_rendered_pixels():
  s = 16
  attrs = synthetic.sample_attributes(np.random.default_rng(3), 60)
  images = synthetic.render(attrs, s)
  captions = [synthetic.captions_list()[i] for i in synthetic.caption_ids(attrs)]
  for img, caption, x, y in zip(images, captions, attrs["x"], attrs["y"]):
    pixel = (img[int(y * s), int(x * s)] + 1.0) / 2.0
    assert _nearest_colour(pixel) == caption.split()[1], caption


def _shape_of(img):
  """Names the shape from pixels alone: filled bounding-box corners, then top vs bottom width."""
  x = (img + 1.0) / 2.0
  bg = np.median(np.concatenate([x[0], x[-1]]), axis=0)
  d = np.linalg.norm(x - bg, axis=-1)
  mask = d > 0.5 * d.max()
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if mask[np.ix_(rows[[0, -1]], cols[[0, -1]])].all():
    return "square"
  return "triangle" if mask[rows[-1]].sum() >= mask[rows[0]].sum() + 3 else "circle"


def test_caption_shape_matches_rendered_pixels():
  captions = synthetic.captions_list()
  n = len(captions)
  for x, y, size in ((0.5, 0.5, 0.28), (0.4, 0.6, 0.3), (0.6, 0.45, 0.25)):
    attrs = {
        "shape": np.arange(n, dtype=np.int32) % len(synthetic.SHAPES),
        "colour": np.arange(n, dtype=np.int32) // len(synthetic.SHAPES),
        "x": np.full(n, x, np.float32), "y": np.full(n, y, np.float32),
        "size": np.full(n, size, np.float32),
        "brightness": np.full(n, 0.8, np.float32), "background": np.full(n, 0.3, np.float32),
    }
    attrs["hue"] = synthetic.HUES[attrs["colour"]]
    np.testing.assert_array_equal(synthetic.caption_ids(attrs), np.arange(n))
    for img, caption in zip(synthetic.render(attrs, 16), captions):
      assert _shape_of(img) == caption.split()[2], caption
  # Random images too: even this crude pixel rule names most shapes right at 16x16.
  attrs = synthetic.sample_attributes(np.random.default_rng(0), 300)
  named = [_shape_of(img) for img in synthetic.render(attrs, 16)]
  assert np.mean([synthetic.SHAPES[s] == n for s, n in zip(attrs["shape"], named)]) > 0.9


def _features(attrs):
  """The five free properties of rendered attributes, each mapped from its range to [-1, 1]."""
  return np.stack([(attrs[k] - (lo + hi) / 2) / ((hi - lo) / 2)
                   for k, (lo, hi) in synthetic.RANGES.items()], axis=-1)


def _pairs_chosen_by(w, rng, n):
  a = synthetic.sample_attributes(rng, n)
  b = synthetic.sample_attributes(rng, n, shape=a["shape"], colour=a["colour"])
  a_wins = _features(a) @ w > _features(b) @ w
  ia, ib = synthetic.render(a), synthetic.render(b)
  sel = a_wins[:, None, None, None]
  captions = [synthetic.captions_list()[i] for i in synthetic.caption_ids(a)]
  return np.where(sel, ia, ib), np.where(sel, ib, ia), captions, a_wins


def test_embedding_ignores_hidden_weights():
  rng = np.random.default_rng(0)
  w1, w2 = np.array([1.0, 0.3, 0, 0, 0]), np.array([0.8, 0, 0.2, 0.1, 0])
  winners, losers, captions, a_wins = _pairs_chosen_by(w1, rng, 64)
  _, _, _, a_wins2 = _pairs_chosen_by(w2, np.random.default_rng(0), 64)
  agree = np.flatnonzero(a_wins == a_wins2)[:4]
  assert len(agree) == 4
  # Two users with different hidden weights who labelled the same pairs alike: same embedding.
  few = [captions[i] for i in agree]
  e1 = fewshot.embed_user(winners[agree], losers[agree], few, 4, 16)
  e2 = fewshot.embed_user(winners[agree], losers[agree], few, 4, 16)
  np.testing.assert_array_equal(e1, e2)
  assert e1.shape == (4, 16) and e1.dtype == np.float32 and np.abs(e1).max() > 0
  # Swapping winner and loser negates the embedding; extra dims are zero, missing tokens zero.
  swapped = fewshot.embed_user(losers[agree], winners[agree], few, 4, 16)
  np.testing.assert_allclose(swapped, -e1, atol=1e-6)
  wide = fewshot.embed_user(winners[agree[:2]], losers[agree[:2]], captions[:2], 4, 40)
  assert (wide[2:] == 0).all() and (wide[:, len(fewshot.STATISTICS):] == 0).all()


@pytest.mark.parametrize("pairs, margin, ordered", [(16, 0.5, 0.98), (4, 0.15, 0.75)])
def test_embedding_separates_opposite_users(pairs, margin, ordered):
  # Users w and -w label independent random pairs. With 16 pairs the mean token points clearly
  # along the user's taste; with the demo's 4 the pairs themselves are a noisy sample of it.
  rng = np.random.default_rng(1)
  cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  opposite, same = [], []
  for _ in range(100):
    w = rng.standard_normal(len(synthetic.RANGES))
    w /= np.linalg.norm(w)
    e = [fewshot.embed_user(*_pairs_chosen_by(v, rng, pairs)[:3], pairs, 16).mean(0)
         for v in (w, w, -w)]
    same.append(cos(e[0], e[1]))
    opposite.append(cos(e[0], e[2]))
  assert np.mean(same) > margin and np.mean(opposite) < -margin, (np.mean(same), np.mean(opposite))
  assert np.mean(np.array(same) > np.array(opposite)) >= ordered


def test_hash_text_encoder():
  enc = HashTextEncoder(dim=32, max_length=8, seed=3)
  again = HashTextEncoder(dim=32, max_length=8, seed=3)
  captions = synthetic.captions_list() + [""]
  emb = enc.encode(captions)
  assert emb.shape == (len(captions), 8, 32) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb, again.encode(captions))
  assert not np.array_equal(emb, HashTextEncoder(dim=32, max_length=8, seed=4).encode(captions))
  flat = emb.reshape(len(captions), -1)
  dists = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert (dists + np.eye(len(captions)) > 0.1).all()        # every caption distinct
  assert (enc.tokenize([""]) == 0).all()
  np.testing.assert_array_equal(emb[-1], enc.token_table[0] + enc.position_table)
  np.testing.assert_array_equal(enc.encode(["A  Red\tCircle"]), enc.encode(["a red circle"]))
  long = enc.tokenize([" ".join(f"w{i}" for i in range(20))])
  assert long.shape == (1, 8) and (long > 0).all()
  ids = enc.tokenize(["a red circle"])[0]
  assert (ids[:3] > 0).all() and (ids[3:] == 0).all()


def test_dataset_text_encoder(tiny):
  assert len(set(tiny.captions)) == len(tiny.captions) == 18
  assert "an orange square" in tiny.captions
  empty = tiny.encode_captions([""])["text_embedding"]
  c = ppd.get_config("tiny")
  assert empty.shape == (1, c.data.text_length, c.model.cross_attention_dim)
  encoder = tiny.backbone.encoder
  np.testing.assert_array_equal(empty[0], encoder.token_table[0] + encoder.position_table)
  # The world's encoder does not follow the run's seed: the pretrained base learned this one.
  c.seed = 5
  np.testing.assert_array_equal(
      synthetic.make_text_encoder(c.model, c.data).encode(["a red circle"]),
      tiny.encode_captions(["a red circle"])["text_embedding"])


def test_users_come_in_opposed_couples():
  w = synthetic_users.opposed_user_weights(np.random.default_rng(0), 7, 3)
  assert w.shape == (7, 3)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(w[1::2], -w[0:6:2])
  np.testing.assert_allclose(w[:6].sum(0), 0.0, atol=1e-6)    # no majority taste


def test_a_majority_population_shares_a_direction_and_has_a_minority():
  """w_u = normalise(d + sigma z_u): the share with w_u . d < 0 is Phi(-1 / sigma), and the mean
  taste points along d (checked against the closed form, on many users)."""
  sigma = 1.5
  w, d = synthetic_users.population(0, 20000, 3, "majority", sigma)
  np.testing.assert_allclose(np.linalg.norm(d), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
  minority = float(np.mean(w @ d < 0))
  assert minority == pytest.approx(0.5 * math.erfc(1 / sigma / math.sqrt(2)), abs=0.01)
  mean = w.mean(0)
  assert mean @ d / np.linalg.norm(mean) > 0.99
  # Another seed draws another direction; "opposed" has none and sums to zero in couples.
  assert synthetic_users.population(1, 4, 3, "majority", sigma)[1] @ d < 0.999
  w, d = synthetic_users.population(0, 6, 3, "opposed", sigma)
  assert d is None
  np.testing.assert_allclose(w.sum(0), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="data.population"):
    synthetic_users.population(0, 6, 3, "mixed", sigma)


def test_user_groups_follow_the_population_direction():
  c = ppd.get_config("tiny")
  source = synthetic_users.SyntheticPreferences(c, log=lambda _: None)
  ids = range(len(source.user_weights))
  groups = [source.user_group(u) for u in ids]
  want = ["majority" if source.user_weights[u] @ source.population_direction > 0 else "minority"
          for u in ids]
  assert groups == want and set(groups) == {"majority", "minority"}
  c.data.population = "opposed"
  assert synthetic_users.SyntheticPreferences(c, log=lambda _: None).user_group(0) is None


def test_validation_users_are_held_out_apart_and_leave_the_other_users_as_they_were(tiny):
  """data.num_validation_users adds users after the unseen ones: neither trained on nor
  reported, the only users validation (val/*) scores; the training and unseen users keep
  their weights and pairs, so adding them changes no other number."""
  c = ppd.get_config("tiny")
  c.data.num_validation_users = 3
  ds = synthetic_users.SyntheticPreferences(c)
  d = c.data
  val = ds.validation_user_ids.tolist()
  assert val == list(range(d.num_users + d.num_unseen_users,
                           d.num_users + d.num_unseen_users + 3))
  assert not set(val) & (set(ds.train_user_ids.tolist()) | set(ds.unseen_user_ids.tolist()))
  held = ds.held_out()
  assert set(held.gather(np.arange(len(held)))["user_id"].tolist()) == set(val)
  assert len(held) == 3 * d.pairs_per_user
  assert ds.gather(np.arange(len(ds)))["user_id"].max() < d.num_users
  before = _everything(tiny)
  for k, v in _everything(ds).items():
    np.testing.assert_array_equal(v[:len(before[k])], before[k], err_msg=k)
  n = d.num_users + d.num_unseen_users
  np.testing.assert_array_equal(ds.winner_index[:n], tiny.winner_index)
  for u in val:                                     # their own clear pairs and embeddings
    diff = (ds.user_reward(u, ds.user_pairs(u)["winners"])
            - ds.user_reward(u, ds.user_pairs(u)["losers"]))
    assert (diff > 0).all() and ds.user_embedding(u).shape == ds.user_embedding(0).shape
  # Without validation users, validation falls back to the unseen users.
  held = tiny.held_out()
  assert set(held.gather(np.arange(len(held)))["user_id"].tolist()) == set(
      tiny.unseen_user_ids.tolist())
  assert ppd.get_config("demo").data.num_validation_users > 0

"""The synthetic world, its users and pairs, the hash text encoder and the few-shot embedder."""
import colorsys
import inspect

import numpy as np
import pytest

from configs import ppd
from ppd_jax.data import synthetic
from ppd_jax.data.text_hash import HashTextEncoder
from ppd_jax.users import fewshot


@pytest.fixture(scope="module")
def demo():
  return synthetic.SyntheticPreferences(ppd.get_config("demo"))


def _everything(ds):
  batch = ds.gather(np.arange(len(ds)))
  batch["weights"] = ds.user_weights
  batch["unseen_embeddings"] = np.stack([ds.user_embedding(u) for u in ds.unseen_user_ids])
  return batch


def test_same_config_same_data_other_seed_other_data():
  c = ppd.get_config("tiny")
  a = _everything(synthetic.SyntheticPreferences(c))
  b = _everything(synthetic.SyntheticPreferences(c))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  c.seed = 1
  other = _everything(synthetic.SyntheticPreferences(c))
  for k in ("preferred", "dispreferred", "text_embedding", "user_embedding", "weights"):
    assert not np.array_equal(a[k], other[k]), k


def test_gather_keys_shapes_dtypes(demo):
  c = ppd.get_config("demo")
  s, d = c.model.sample_size, c.data
  assert len(demo) == demo.num_records == d.num_users * d.pairs_per_user
  batch = demo.gather(np.array([0, 5, len(demo) - 1, 5]))
  expected = {
      "preferred": ((4, s, s, 3), np.float32),
      "dispreferred": ((4, s, s, 3), np.float32),
      "text_embedding": ((4, d.text_length, c.model.cross_attention_dim), np.float32),
      "user_embedding": ((4, c.model.user_tokens, c.model.user_embed_dim), np.float32),
      "user_id": ((4,), np.int32),
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["preferred"].min() >= -1 and batch["preferred"].max() <= 1
  np.testing.assert_array_equal(batch["user_id"], [0, 0, d.num_users - 1, 0])
  one = demo[5]
  for k in expected:
    np.testing.assert_array_equal(one[k], batch[k][1], err_msg=k)
  with pytest.raises(IndexError):
    demo.gather(np.array([len(demo)]))


def test_records_match_their_users_pairs(demo):
  p = demo.pairs_per_user
  u = 7
  batch = demo.gather(np.arange(u * p, (u + 1) * p))
  pairs = demo.user_pairs(u)
  np.testing.assert_array_equal(batch["preferred"], pairs["winners"])
  np.testing.assert_array_equal(batch["dispreferred"], pairs["losers"])
  np.testing.assert_array_equal(batch["text_embedding"], demo.encode_captions(pairs["captions"]))
  np.testing.assert_array_equal(batch["preferred"], synthetic.render(pairs["winner_attrs"], 16))
  assert (batch["user_id"] == u).all()


def _nearest_colour(rgb):
  hue = colorsys.rgb_to_hsv(*rgb)[0] * 360.0
  dist = np.abs((hue - synthetic.HUES + 180.0) % 360.0 - 180.0)
  return synthetic.COLOURS[int(np.argmin(dist))]


def test_caption_colour_matches_rendered_pixels(demo):
  s = demo.sample_size
  for u in (0, 3, 11, int(demo.unseen_user_ids[0])):
    pairs = demo.user_pairs(u)
    for images, attrs in ((pairs["winners"], pairs["winner_attrs"]),
                          (pairs["losers"], pairs["loser_attrs"])):
      for img, caption, x, y in zip(images, pairs["captions"], attrs["x"], attrs["y"]):
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


def test_winners_have_higher_hidden_reward(demo):
  for u in np.concatenate([demo.train_user_ids, demo.unseen_user_ids]):
    pairs = demo.user_pairs(u)
    gap = demo.user_reward(u, pairs["winner_attrs"]) - demo.user_reward(u, pairs["loser_attrs"])
    assert (gap >= synthetic.MIN_REWARD_GAP).all(), u


def test_user_splits(demo):
  d = ppd.get_config("demo").data
  np.testing.assert_array_equal(demo.train_user_ids, np.arange(d.num_users))
  np.testing.assert_array_equal(demo.unseen_user_ids,
                                np.arange(d.num_users, d.num_users + d.num_unseen_users))
  assert not set(demo.train_user_ids) & set(demo.unseen_user_ids)
  assert demo.gather(np.arange(len(demo)))["user_id"].max() < d.num_users
  np.testing.assert_allclose(np.linalg.norm(demo.user_weights, axis=1), 1.0, rtol=1e-5)
  for u in demo.unseen_user_ids[:3]:
    few = demo.fewshot_pairs(u)
    assert few["winners"].shape == (d.fewshot, 16, 16, 3) and len(few["captions"]) == d.fewshot


def test_user_embedding_comes_from_its_fewshot_pairs_only(demo):
  c = ppd.get_config("demo").model
  for u in (0, int(demo.unseen_user_ids[-1])):
    few = demo.fewshot_pairs(u)
    np.testing.assert_array_equal(
        demo.user_embedding(u),
        fewshot.embed_user(few["winners"], few["losers"], few["captions"], c.user_tokens,
                           c.user_embed_dim))
  imports = [l for l in inspect.getsource(fewshot).splitlines() if l.startswith(("import", "from"))]
  assert not any("synthetic" in l for l in imports), imports


def _pairs_chosen_by(w, rng, n):
  a = synthetic.sample_attributes(rng, n)
  b = synthetic.sample_attributes(rng, n, shape=a["shape"], colour=a["colour"])
  a_wins = synthetic.reward_features(a) @ w > synthetic.reward_features(b) @ w
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
    w = rng.standard_normal(len(synthetic.REWARD_FEATURES))
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


def test_dataset_text_encoder(demo):
  assert len(set(demo.captions)) == len(demo.captions) == 18
  assert "an orange square" in demo.captions
  empty = demo.encode_captions([""])
  c = ppd.get_config("demo")
  assert empty.shape == (1, c.data.text_length, c.model.cross_attention_dim)
  np.testing.assert_array_equal(empty[0], demo.text_encoder.token_table[0]
                                + demo.text_encoder.position_table)

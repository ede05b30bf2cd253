"""The caption-augmentation baseline (data.profile_in_caption): shards whose text conditioning is
each pair's caption joined with its user's profile, and the checks that keep the two kinds apart."""
import os

import numpy as np
import pytest

import pickapic_fixtures
from configs import ppd
from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax.data import pickapic
from ppd_jax.data import pickapic_source
from ppd_jax.data import precompute
from ppd_jax.data import profile_text
from ppd_jax.data import shards
from ppd_jax.data import profile_caption
from ppd_jax.data import user_store as store_lib

_F16 = dict(rtol=2e-3, atol=2e-3)      # float16 storage of values of order one


def _quiet(_):
  pass


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """A plain folder (its index names the users the store needs), a store with profiles, and the
  same input precomputed with the switch on; both stored in float16 as a real run would."""
  root = str(tmp_path_factory.mktemp("profile_in_caption"))
  inputs = pickapic_fixtures.make_inputs(root, num_users=10, num_files=2, corrupt_jpegs=0,
                                         empty_file=False, bad_schema_file=False)
  plain_config = pickapic_fixtures.config(inputs["pretrained"], storage_dtype="float16")
  config_validation.prepare(plain_config, stage="precompute")
  backbone = backbones.build_backbone(plain_config)
  plain = os.path.join(root, "plain")
  precompute.run(plain_config, inputs["parquet"], plain, backbone=backbone, log=_quiet)
  store = os.path.join(root, "users.safetensors")
  profiles = pickapic_fixtures.write_profile_store(store, plain)
  on = os.path.join(root, "on")
  manifest = precompute.run(_config(inputs, store, True), inputs["parquet"], on,
                            backbone=backbone, log=_quiet)
  return {**inputs, "backbone": backbone, "plain": plain, "on": on, "store": store,
          "profiles": profiles, "manifest": manifest}


def _config(inputs, store, on: bool, **data):
  return pickapic_fixtures.config(inputs["pretrained"], storage_dtype="float16",
                                  user_embeddings=store, profile_in_caption=on, **data)


def _loader_batch(made, folder: str, on: bool) -> dict:
  c = _config(made, made["store"], on, shards=folder)
  config_validation.prepare(c)
  source = pickapic_source.PickapicPairs(c, backbone=made["backbone"], log=_quiet)
  return source.gather(np.arange(len(source)))


def _captions_of(folder: str, pairs) -> list[str]:
  index = pickapic.PickapicIndex.load(os.path.join(folder, "index"))
  return [index.captions[index.pairs["caption_id"][p]] for p in pairs]


def _encode(made, texts: list[str]) -> np.ndarray:
  return made["backbone"].encode_captions(texts)["text_embedding"]


def test_loader_text_is_the_caption_joined_with_the_pairs_user_profile(made):
  batch = _loader_batch(made, made["on"], on=True)
  captions = _captions_of(made["on"], batch["pair"])
  joined = [profile_caption.with_profile(cap, made["profiles"][int(u)])
            for cap, u in zip(captions, batch["user_id"])]
  np.testing.assert_allclose(batch["text_embedding"], _encode(made, joined), **_F16)
  # The tiny tokenizer keeps 16 tokens, so only short captions leave room for the profile.
  gap = np.abs(batch["text_embedding"] - _encode(made, captions)).max(axis=(1, 2))
  assert gap.max() > 0.05, gap


def test_text_units_hold_each_joined_string_once_and_records_point_into_them(made):
  index = pickapic.PickapicIndex.load(os.path.join(made["on"], "index"))
  texts, text_ids = profile_text.text_table(index, store_lib.UserEmbeddingStore(made["store"]))
  assert texts == sorted(set(texts)) and len(texts) > len(index.captions)
  chunk = made["manifest"]["text"]["chunk"]
  assert made["manifest"]["text"]["num_chunks"] == -(-len(texts) // chunk)
  for name in pickapic.SPLIT_NAMES:
    table = np.load(os.path.join(made["on"], f"records-{name}.npz"))
    np.testing.assert_array_equal(table["caption_id"], text_ids[table["pair"]])
  stored = shards.TextStore(made["on"], made["manifest"]).get(np.arange(len(texts)))
  np.testing.assert_allclose(stored["text_embedding"], _encode(made, texts), **_F16)
  data = made["manifest"]["data"]
  assert data["profile_in_caption"] is True
  assert data["profile_store"]["file"] == "users.safetensors"


def test_users_the_store_lacks_keep_the_plain_caption(made, tmp_path):
  index = pickapic.PickapicIndex.load(os.path.join(made["on"], "index"))
  gone = int(index.pairs["user_id"][0])
  partial = str(tmp_path / "partial.safetensors")
  pickapic_fixtures.write_profile_store(partial, made["plain"], leave_out=[gone])
  texts, text_ids = profile_text.text_table(index, store_lib.UserEmbeddingStore(partial))
  theirs = np.flatnonzero(index.pairs["user_id"] == gone)
  assert [texts[text_ids[p]] for p in theirs] == _captions_of(made["on"], theirs)
  others = np.flatnonzero(index.pairs["user_id"] != gone)
  assert all(profile_caption.SEPARATOR in texts[text_ids[p]] for p in others)
  again, again_ids = profile_text.text_table(index, store_lib.UserEmbeddingStore(partial))
  assert again == texts
  np.testing.assert_array_equal(again_ids, text_ids)


def test_switch_off_gives_the_plain_caption(made):
  batch = _loader_batch(made, made["plain"], on=False)
  plain = _encode(made, _captions_of(made["plain"], batch["pair"]))
  np.testing.assert_allclose(batch["text_embedding"], plain, **_F16)
  assert "profile_in_caption" not in shards.read_manifest(made["plain"])["data"]


def test_rerun_with_the_switch_flipped_or_another_store_is_refused(made, tmp_path):
  def rerun(config, folder):
    precompute.run(config, made["parquet"], folder, backbone=made["backbone"], log=_quiet)

  with pytest.raises(shards.ShardsError, match="other settings.*data.profile_in_caption"):
    rerun(_config(made, made["store"], True), made["plain"])
  with pytest.raises(shards.ShardsError, match="other settings.*data.profile_in_caption"):
    rerun(_config(made, made["store"], False), made["on"])
  other = str(tmp_path / "other.safetensors")
  pickapic_fixtures.write_profile_store(other, made["plain"], style="hates")
  with pytest.raises(shards.ShardsError, match="other settings.*data.profile_store"):
    rerun(_config(made, other, True), made["on"])


def test_loader_refuses_shards_made_with_the_other_setting(made):
  for folder, on in ((made["plain"], True), (made["on"], False)):
    c = _config(made, made["store"], on, shards=folder)
    config_validation.prepare(c)
    with pytest.raises(shards.ShardsError, match="data.profile_in_caption") as e:
      pickapic_source.PickapicPairs(c, log=_quiet)
    assert folder in str(e.value)


def test_validation_needs_pickapic_and_a_store_with_profiles(made, tmp_path):
  c = ppd.get_config("tiny")
  c.data.profile_in_caption = True
  with pytest.raises(config_validation.ConfigError, match="data.profile_in_caption.*pickapic"):
    config_validation.prepare(c)
  bare = str(tmp_path / "no_profiles.safetensors")
  pickapic_fixtures.write_user_store(bare, made["plain"])
  for stage in ("precompute", "train"):
    c = _config(made, bare, True, shards=made["on"])
    with pytest.raises(config_validation.ConfigError, match="data.profile_in_caption") as e:
      config_validation.prepare(c, stage=stage)
    assert bare in str(e.value)
  c = _config(made, str(tmp_path / "nowhere.safetensors"), True)
  with pytest.raises(config_validation.ConfigError, match="data.user_embeddings"):
    config_validation.prepare(c, stage="precompute")
  config_validation.prepare(_config(made, bare, False), stage="precompute")   # off: not needed

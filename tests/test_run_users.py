"""A run keeps its users in its workdir (run_users.py), and a table with named users keeps the
names: `sample --user=NAME` and `users.embedding --user=NAME` find the user's embedding by the
name the table gave it."""
import json
import types

import ml_collections
import numpy as np
import pytest

from ppd_jax import run_users
from ppd_jax.data import user_store
from ppd_jax.users import embedding


def _config(shards: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": {"source": "pickapic", "user_conditioning": True,
                                             "user_embedding": "store", "shards": shards,
                                             "relabel": ""}})


def _run_with_named_users(tmp_path):
  """A workdir written by run_users.save from a store of users 0, 1, 2 whose table named them
  alice, bob and "7" (numbered in sorted order by data/table_convert.py)."""
  shards = tmp_path / "shards"
  (shards / "table").mkdir(parents=True)
  names = {"7": 0, "alice": 1, "bob": 2}
  (shards / "table" / "user_ids.json").write_text(json.dumps(names))
  embeddings = np.random.default_rng(0).normal(size=(3, 2, 5)).astype(np.float32)
  user_store.write_store(str(tmp_path / "store.safetensors"), np.arange(3), embeddings)
  store = user_store.UserEmbeddingStore(str(tmp_path / "store.safetensors"))
  source = types.SimpleNamespace(
      inputs=types.SimpleNamespace(mode="store"), store=store,
      train_user_ids=np.array([0, 1]), validation_user_ids=np.array([2]),
      unseen_user_ids=np.zeros(0, np.int64))
  workdir = tmp_path / "run"
  config = _config(str(shards))
  run_users.save(str(workdir), source, config)
  users = run_users.RunUsers(str(workdir), config, backbone_fn=None)
  run = types.SimpleNamespace(users=users, workdir=str(workdir))
  return run, embeddings, names


def test_named_users_are_found_by_name(tmp_path):
  run, embeddings, names = _run_with_named_users(tmp_path)
  assert run.users.names == names
  for name, number in names.items():
    np.testing.assert_array_equal(embedding.stored_embedding(run, name), embeddings[number])
  # "7" is a name here (user 0), not the number 7; a number still works as the id.
  np.testing.assert_array_equal(embedding.stored_embedding(run, "2"), embeddings[2])


def test_an_unknown_name_lists_the_names(tmp_path):
  run, _, _ = _run_with_named_users(tmp_path)
  with pytest.raises(KeyError, match="named 7, alice, bob.*--list_users"):
    embedding.stored_embedding(run, "carol")


def test_a_resume_keeps_the_users_it_already_wrote(tmp_path, monkeypatch):
  """Training saves the users at every start; a resume with the same users does not copy the
  store again (hundreds of KB per user for a whole-VLM embedding), another split does."""
  run, _, _ = _run_with_named_users(tmp_path)
  store = user_store.UserEmbeddingStore(str(tmp_path / "store.safetensors"))
  source = types.SimpleNamespace(
      inputs=types.SimpleNamespace(mode="store"), store=store,
      train_user_ids=np.array([0, 1]), validation_user_ids=np.array([2]),
      unseen_user_ids=np.zeros(0, np.int64))
  writes = []
  monkeypatch.setattr(user_store, "write_store", lambda *a, **k: writes.append(a))
  config = _config(str(tmp_path / "shards"))
  run_users.save(run.workdir, source, config)
  assert writes == []
  source.train_user_ids = np.array([0])
  run_users.save(run.workdir, source, config)
  assert len(writes) == 1

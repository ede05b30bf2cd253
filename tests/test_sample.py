"""Sampling from a trained run: the CLI's files, user mixing, the user scale."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ppd_jax import inference
from ppd_jax import sample
from ppd_jax.users import new_user
from ppd_jax.users import shots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tiny_trained_run):
  return tiny_trained_run, inference.load_trained(tiny_trained_run)


def test_mix_of_one_user_with_weight_one_equals_that_user(run):
  _, trained = run
  e0, e1 = (trained.source.user_embedding(u) for u in (0, 1))
  np.testing.assert_array_equal(inference.mix_users([e0, e1], [1.0, 0.0]), e0)
  prompts = ["a red circle", "a blue square"]
  alone = inference.generate(trained, prompts, e0, seed=3)
  mixed = inference.generate(trained, prompts, inference.mix_users([e0, e1], [1, 0]), seed=3)
  np.testing.assert_array_equal(alone, mixed)
  other = inference.generate(trained, prompts, e1, seed=3)
  assert np.abs(other - alone).max() > 1e-4, "two users' samples should differ"


def test_user_scale_zero_is_the_base_model_for_every_user(run):
  _, trained = run
  a = inference.generate(trained, ["a green triangle"], trained.source.user_embedding(0),
                         user_scale=0.0, seed=1)
  b = inference.generate(trained, ["a green triangle"], trained.source.user_embedding(5),
                         user_scale=0.0, seed=1)
  np.testing.assert_array_equal(a, b)


def test_bad_user_weights_are_rejected():
  with pytest.raises(ValueError, match="weights"):
    inference.mix_users([np.zeros((2, 2))] * 2, [0.0, 0.0])
  with pytest.raises(ValueError, match="weights"):
    inference.mix_users([np.zeros((2, 2))] * 2, [1.0])


def test_sample_cli_writes_images_of_the_configured_size(run, tmp_path):
  workdir, trained = run
  out = tmp_path / "images"
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", f"--out={out}",
         "--prompt=a red circle", "--prompt=a yellow square", "--users=0:0.7,1:0.3",
         "--num_images=2", "--num_steps=3", "--guidance_scale=2"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  files = sorted(f for f in os.listdir(out) if f != "prompts.jsonl")
  assert len(files) == 4 and all(f.endswith(".png") for f in files)
  size = trained.config.model.sample_size
  for f in files:
    with Image.open(out / f) as im:
      assert im.size == (size, size) and im.mode == "RGB"
  # The listing the scoring CLI reads: each PNG with its prompt.
  from ppd_jax.evals import score_files
  items = score_files.read_items(str(out))
  assert sorted(it.key for it in items) == files
  assert {it.prompt for it in items if "yellow" in it.key} == {"a yellow square"}


def test_the_listing_merges_reruns(tmp_path):
  sample.update_listing(str(tmp_path), [{"image": "a.png", "prompt": "x"},
                                        {"image": "b.png", "prompt": "y"}])
  sample.update_listing(str(tmp_path), [{"image": "b.png", "prompt": "z"}])
  with open(tmp_path / "prompts.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{"image": "a.png", "prompt": "x"}, {"image": "b.png", "prompt": "z"}]


def test_sample_cli_names_an_unknown_user(run, tmp_path):
  workdir, _ = run
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", f"--out={tmp_path}",
         "--prompt=a red circle", "--user=999"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "unknown user 999" in result.stderr


def _write_pairs(folder, source, user_id, n=4) -> str:
  """A new user's pairs as files, winner first or second by turns, as a user would give them."""
  p = source.fewshot_pairs(user_id)
  rows = []
  for k in range(n):
    names = []
    for side, img in (("w", p["winners"][k]), ("l", p["losers"][k])):
      name = f"{k}{side}.png"
      Image.fromarray(np.round((np.asarray(img) + 1) * 127.5).clip(0, 255).astype(np.uint8)
                      ).save(os.path.join(folder, name))
      names.append(name)
    first, second = names if k % 2 == 0 else names[::-1]
    rows.append({"caption": p["captions"][k], "image_1": first, "image_2": second,
                 "preferred": 1 if k % 2 == 0 else 2})
  path = os.path.join(folder, "new_user.json")
  with open(path, "w") as f:
    json.dump(rows, f)
  return path


def test_new_user_from_pairs_is_embedded_like_the_runs_users(run, tmp_path):
  """The demo's unseen user, given as 4 image files, gets (up to 8-bit PNG rounding) the
  embedding the run itself computes for it; fewer pairs than the run's N are refused."""
  _, trained = run
  uid = int(trained.source.unseen_user_ids[0])
  path = _write_pairs(str(tmp_path), trained.source, uid)
  emb, profile = new_user.embed_new_user(trained, path, log=lambda _: None)
  assert profile is None
  np.testing.assert_allclose(emb, trained.source.user_embedding(uid), atol=0.05)
  other = trained.source.user_embedding(int(trained.source.unseen_user_ids[1]))
  assert np.abs(emb - other).max() > 0.2
  with open(path) as f:
    rows = json.load(f)
  with open(path, "w") as f:
    json.dump(rows[:3], f)
  with pytest.raises(shots.PairsError, match=f"--pairs={path}: 3 readable pair"):
    new_user.embed_new_user(trained, path)


def test_sample_cli_generates_for_a_new_users_pairs(run, tmp_path):
  workdir, trained = run
  path = _write_pairs(str(tmp_path), trained.source, int(trained.source.unseen_user_ids[0]))
  out = tmp_path / "images"
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", f"--out={out}",
         "--prompt=a red circle", f"--pairs={path}", "--num_steps=2"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["a-red-circle_new_userx1_s0_0.png", "prompts.jsonl"]


def test_users_pairs_and_mixes_are_exclusive():
  assert sample.parse_users(None, None, "a/b/mine.json") == [("mine", 1.0)]
  with pytest.raises(ValueError, match="exactly one of"):
    sample.parse_users("3", None, "mine.json")

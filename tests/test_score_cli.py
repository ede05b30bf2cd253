"""`python -m ppd_jax.evals.score`: JSONL and folder inputs, one line per image equal to the reward
called directly, a summary with its CI, resuming after a kill, and errors that name the culprit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")

import tiny_clip  # noqa: E402
from ppd_jax import images as image_io  # noqa: E402
from ppd_jax.evals import score  # noqa: E402
from ppd_jax.evals import score_files  # noqa: E402
from ppd_jax.evals import stats  # noqa: E402
from ppd_jax.rewards import registry  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a dark cat", "a red circle", "a small dog",
           "a big green triangle", "an orange square"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  model_dir = tiny_clip.folder(tmp_path_factory, "score_clip")
  tiny_clip.save_clip(model_dir)
  data = tmp_path_factory.mktemp("score_images")
  floats = tiny_clip.images(len(PROMPTS)).astype(np.float32) / 127.5 - 1
  with open(data / "prompts.jsonl", "w") as f:
    for i, (x, p) in enumerate(zip(floats, PROMPTS)):
      image_io.save_png(x, os.fspath(data / f"img_{i}.png"))
      f.write(json.dumps({"image": f"img_{i}.png", "prompt": p}) + "\n")
  expected = registry.load("pickscore", model=model_dir).score(floats, PROMPTS)
  return model_dir, os.fspath(data), expected


def read_lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_folder_and_jsonl_give_the_reward_scores(setup, tmp_path):
  model_dir, data, expected = setup
  out = os.fspath(tmp_path / "scores.jsonl")
  summary = score.run("pickscore", data, out, model=model_dir, batch_size=2, log=lambda *_: None)
  rows = read_lines(out)
  assert [r["image"] for r in rows] == [f"img_{i}.png" for i in range(len(PROMPTS))]
  assert [r["prompt"] for r in rows] == PROMPTS and {r["reward"] for r in rows} == {"pickscore"}
  np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-6)
  reference = stats.mean_ci(expected)
  for key in ("n", "mean", "ci_low", "ci_high"):
    assert summary[key] == pytest.approx(reference[key], rel=1e-5)
  with open(score_files.summary_path(out)) as f:
    assert json.load(f)["mean"] == pytest.approx(summary["mean"])
  # The same images listed by a JSONL elsewhere, with paths relative to it.
  listing = tmp_path / "list.jsonl"
  listing.write_text("".join(json.dumps({"image": os.path.relpath(f"{data}/img_{i}.png",
                                                                   tmp_path), "prompt": p}) + "\n"
                             for i, p in enumerate(PROMPTS)))
  out2 = os.fspath(tmp_path / "scores2.jsonl")
  score.run("pickscore", os.fspath(listing), out2, model=model_dir, log=lambda *_: None)
  np.testing.assert_allclose([r["score"] for r in read_lines(out2)], expected, rtol=1e-6)


def test_a_killed_run_resumes_without_rescoring(setup, tmp_path, monkeypatch):
  model_dir, data, expected = setup
  out = tmp_path / "scores.jsonl"
  score.run("pickscore", data, os.fspath(out), model=model_dir, batch_size=2, log=lambda *_: None)
  lines = out.read_text().splitlines(keepends=True)
  out.write_text("".join(lines[:3]) + lines[3][:10])       # killed while writing line 4
  scored = []
  real_load = registry.load

  def counting_load(*args, **kwargs):
    reward = real_load(*args, **kwargs)
    inner = reward.score
    reward.score = lambda images, prompts: scored.extend(images) or inner(images, prompts)
    return reward
  monkeypatch.setattr(registry, "load", counting_load)
  logs = []
  score.run("pickscore", data, os.fspath(out), model=model_dir, batch_size=2, log=logs.append)
  assert len(scored) == len(PROMPTS) - 3 and any("resuming: 3 of 7" in m for m in logs)
  assert any("images/s" in m and "ETA" in m for m in logs)
  rows = read_lines(out)
  assert sorted(r["image"] for r in rows) == sorted(f"img_{i}.png" for i in range(len(PROMPTS)))
  by_image = {r["image"]: r["score"] for r in rows}
  np.testing.assert_allclose([by_image[f"img_{i}.png"] for i in range(len(PROMPTS))], expected,
                             rtol=1e-6)
  with pytest.raises(score_files.ScoreInputError, match="holds scores of reward 'pickscore'"):
    score.run("clip_h14", data, os.fspath(out), model=model_dir, log=lambda *_: None)
  # The same reward with other weights: refused before anything is scored, naming the field.
  other = os.fspath(tmp_path / "other_clip")
  tiny_clip.save_clip(other, seed=1)
  scored.clear()
  with pytest.raises(ValueError, match="reward.model.*reward.weights_sha256.model.safetensors"):
    score.run("pickscore", data, os.fspath(out), model=other, log=lambda *_: None)
  assert scored == []


def test_bad_inputs_are_named(setup, tmp_path):
  model_dir, data, _ = setup
  out = os.fspath(tmp_path / "s.jsonl")
  run = lambda images, **kw: score.run(kw.pop("reward", "pickscore"), images, out,
                                       model=kw.pop("model", model_dir), log=lambda *_: None, **kw)
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"image": "nowhere.png", "prompt": "x"}) + "\n")
  with pytest.raises(score_files.ScoreInputError, match="missing, e.g. .*nowhere.png"):
    run(os.fspath(bad))
  bad.write_text(json.dumps({"image": f"{data}/img_0.png"}) + "\n")
  with pytest.raises(score_files.ScoreInputError, match=r"bad.jsonl:1: field 'prompt' is missing"):
    run(os.fspath(bad))
  bad.write_text("{not json\n")
  with pytest.raises(score_files.ScoreInputError, match=r"bad.jsonl:1: not a JSON line"):
    run(os.fspath(bad))
  empty_dir = tmp_path / "no_prompts"
  empty_dir.mkdir()
  with pytest.raises(score_files.ScoreInputError, match="no prompts file .*prompts.jsonl"):
    run(os.fspath(empty_dir))
  with pytest.raises(score_files.ScoreInputError, match="no such folder or file"):
    run(os.fspath(tmp_path / "absent"))
  from ppd_jax.weights import hf_folder
  with pytest.raises(hf_folder.FolderError, match="has no config.json"):
    run(data, model=data)
  with pytest.raises(registry.RewardConfigError, match="--aesthetic_head"):
    run(data, reward="aesthetic")


def test_the_command_line(setup, tmp_path):
  """The module runs as printed in docs/rewards.md; an error exits non-zero with one clear line."""
  model_dir, data, expected = setup
  out = tmp_path / "cli.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "ppd_jax.evals.score", "--reward=pickscore", f"--images={data}",
         f"--out={out}", f"--model={model_dir}"]
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"pickscore: mean {np.mean(expected.astype(np.float64)):.4f} over {len(PROMPTS)} images" in done.stdout
  missing = subprocess.run(cmd[:-1] + [f"--model={tmp_path / 'nope'}"], capture_output=True,
                           text=True, env=env, timeout=300)
  assert missing.returncode != 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr

"""Sampling from a trained run: the CLI's files, user mixing, the user scale."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import ppd
from ppd_jax import inference
from ppd_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sample_run"))
  c = ppd.get_config("tiny")
  c.total_steps = 3
  c.optim.lr = 3e-2    # a few big steps, so that users' samples differ visibly
  trainer.train_and_evaluate(c, workdir)
  return workdir, inference.load_trained(workdir)


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
  files = sorted(os.listdir(out))
  assert len(files) == 4 and all(f.endswith(".png") for f in files)
  size = trained.config.model.sample_size
  for f in files:
    with Image.open(out / f) as im:
      assert im.size == (size, size) and im.mode == "RGB"


def test_sample_cli_names_an_unknown_user(run, tmp_path):
  workdir, _ = run
  cmd = [sys.executable, "-m", "ppd_jax.sample", f"--workdir={workdir}", f"--out={tmp_path}",
         "--prompt=a red circle", "--user=999"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "unknown user 999" in result.stderr

"""evals/interpolate.py on the tiny trained run, with three demo users as the vertices: the grid's
weights, its images against plain generation of the mixed embedding from the same x_T, the edge
curves against the scores of their own PNGs, resuming, and the monotonicity rule."""
import json
import os

import numpy as np
import pytest

from ppd_jax import images as image_io
from ppd_jax import inference
from ppd_jax.evals import interpolate
from ppd_jax.evals import prompt_sets
from ppd_jax.rewards import hidden

def as_png(x):
  """What saving to PNG and reading back does to [-1, 1] images."""
  return image_io.to_uint8(x).astype(np.float32) / 127.5 - 1.0


PROMPTS = [prompt_sets.Prompt(t) for t in ("a red circle", "a blue square", "a green triangle")]


def test_barycentric_grid_weights():
  n = 4
  points = interpolate.barycentric(n)
  assert len(points) == n * (n + 1) // 2
  w = np.array([p[2] for p in points])
  np.testing.assert_allclose(w.sum(1), 1.0)
  assert (w >= 0).all() and len({tuple(x) for x in w.round(6)}) == len(points)
  by_place = {(r, j): x for (r, j, _), x in zip(points, w)}
  np.testing.assert_allclose(by_place[(0, 0)], [1, 0, 0])          # top: vertex 0
  np.testing.assert_allclose(by_place[(n - 1, 0)], [0, 1, 0])      # bottom left: vertex 1
  np.testing.assert_allclose(by_place[(n - 1, n - 1)], [0, 0, 1])  # bottom right: vertex 2
  np.testing.assert_allclose(by_place[(2, 1)], [1 / 3, 1 / 3, 1 / 3])
  with pytest.raises(ValueError, match="--grid=1"):
    interpolate.barycentric(1)


def test_monotone():
  assert interpolate.monotone([0.1, 0.2, 0.2, 0.5]) == "increasing"
  assert interpolate.monotone([0.1, 0.4, 0.2]) is None
  assert interpolate.monotone([0.2, 0.2]) is None
  # A step back is weighed against the curve's range: 0.01 back on a range of 0.4 is 2.5% of it.
  wobble = [0.5, 0.3, 0.31, 0.1]
  assert interpolate.monotone(wobble) is None
  assert interpolate.monotone(wobble, tolerance=0.05) == "decreasing"
  assert interpolate.monotone(wobble, tolerance=0.02) is None
  # ...so the verdict is the same in any units and offset (CLIP logits in the tens, [0, 1]).
  for k, b in ((1e-3, 0.0), (100.0, 20.0)):
    assert interpolate.monotone([k * v + b for v in wobble], tolerance=0.05) == "decreasing"
    assert interpolate.monotone([k * v + b for v in wobble], tolerance=0.02) is None
  # A fixed unit instead (the multireward demo's standardised rewards): tolerance * scale.
  assert interpolate.monotone(wobble, tolerance=0.02, scale=1.0) == "decreasing"
  assert interpolate.monotone([100 * v for v in wobble], tolerance=0.02, scale=1.0) is None


def test_the_edge_plot_shares_one_axis(tmp_path, monkeypatch):
  """Each reward is scaled over the points of every edge, not per panel: the same value sits at
  the same height in every panel, and the axis says how it is scaled."""
  from PIL import ImageDraw
  from ppd_jax.evals import plots
  curves = [{"from": "a", "to": "b", "t": [0.0, 0.5, 1.0],
             "means": {"a": [1.0, 0.5, 0.0], "b": [20.0, 25.0, 30.0]}},
            {"from": "b", "to": "a", "t": [0.0, 0.5, 1.0],
             "means": {"a": [0.0, 0.2, 0.5], "b": [30.0, 28.0, 25.0]}}]
  assert plots.edge_scales(curves, ["a", "b"]) == {"a": (0.0, 1.0), "b": (20.0, 10.0)}
  dots, texts = [], []
  real_ellipse, real_text = ImageDraw.ImageDraw.ellipse, ImageDraw.ImageDraw.text
  monkeypatch.setattr(ImageDraw.ImageDraw, "ellipse",
                      lambda self, xy, **k: (dots.append(xy), real_ellipse(self, xy, **k)))
  monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                      lambda self, xy, t, **k: (texts.append(t), real_text(self, xy, t, **k)))
  plots.edge_curves(curves, ["a", "b"], str(tmp_path / "edges.png"))
  height = lambda i: (dots[i][1] + dots[i][3]) / 2
  # dots: panel 0 a (0-2), b (3-5); panel 1 a (6-8), b (9-11).
  assert height(2) == height(6) and height(1) == height(8)     # a = 0 twice, a = 0.5 twice
  assert height(4) == height(11) and height(5) == height(9)    # b = 25 twice, b = 30 twice
  assert height(0) == height(5)            # each reward's own max at the top: a 1.0, b 30
  assert texts.count(plots.EDGE_Y_LABEL) == 2


def test_grid_and_edges_on_a_trained_run(tiny_trained_run, tmp_path, monkeypatch):
  run = inference.load_trained(tiny_trained_run)
  users = [int(u) for u in run.source.train_user_ids[:3]]
  names = [f"u{u}" for u in users]
  rewards = {n: hidden.HiddenPropertyReward(run.source, u) for n, u in zip(names, users)}
  embeddings = [run.source.user_embedding(u) for u in users]
  out = str(tmp_path / "interp")
  result = interpolate.run_all(run, embeddings, names, rewards, "a red circle", PROMPTS, out,
                               seed=3, n=3, steps=3, chunk=2, log=lambda m: None)
  for f in ("grid.png", "edges.png", "edges.json"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  with open(os.path.join(out, "edges.json")) as f:
    assert json.load(f) == json.loads(json.dumps(result))

  # Grid: each point is the plainly mixed embedding, generated from the same x_T (seed 3, image 0).
  for r, j, w in interpolate.barycentric(3):
    if (r, j) not in ((0, 0), (2, 1), (1, 1)):
      continue
    mixed = sum(wk * e for wk, e in zip(w, embeddings))
    expected = inference.generate(run, ["a red circle"], mixed, seed=3)[0]
    got = image_io.load_png(os.path.join(out, "grid", f"r{r}_j{j}.png"))
    assert np.abs(got - as_png(expected)).max() <= 1 / 127.5 + 1e-6
  # Grid points differ: the embedding, not the noise, changes along the grid.
  top, left = (image_io.load_png(os.path.join(out, "grid", p)) for p in ("r0_j0.png", "r2_j0.png"))
  assert np.abs(top - left).max() > 0.05

  # Edges: t = 0.5 on edge 1 -> 2 is (e_1 + e_2) / 2 on every prompt; its means are its PNGs'.
  edge = result["edges"][1]
  assert (edge["from"], edge["to"], edge["t"]) == (names[1], names[2], [0.0, 0.5, 1.0])
  half = 0.5 * embeddings[1] + 0.5 * embeddings[2]
  images = np.concatenate([inference.generate(run, [p.text for p in PROMPTS[c:c + 2]], half,
                                              seed=3 + c // 2) for c in (0, 2)])
  for n, reward in rewards.items():
    np.testing.assert_allclose(edge["means"][n][1],
                               reward.score(as_png(images)).mean(), atol=1e-5)
  # Vertices are shared by the edges that meet there: the end of 0 -> 1 is the start of 1 -> 2.
  for n in names:
    assert result["edges"][0]["means"][n][-1] == edge["means"][n][0]

  # Resuming: nothing is generated or scored again.
  def refuse(*a, **k):
    raise AssertionError("regenerated")
  monkeypatch.setattr(inference, "generate", refuse)
  monkeypatch.setattr(inference, "generate_mixes", refuse)
  again = interpolate.run_all(run, embeddings, names, rewards, "a red circle", PROMPTS, out,
                              seed=3, n=3, steps=3, chunk=2, log=lambda m: None)
  assert again == result
  # Another seed or vertex order into the same folder: refused before anything is made.
  with pytest.raises(ValueError, match="seed: 3 -> 4"):
    interpolate.run_all(run, embeddings, names, rewards, "a red circle", PROMPTS, out,
                        seed=4, n=3, steps=3, chunk=2, log=lambda m: None)
  with pytest.raises(ValueError, match="vertices"):
    interpolate.run_all(run, embeddings[::-1], names[::-1], rewards, "a red circle", PROMPTS,
                        out, seed=3, n=3, steps=3, chunk=2, log=lambda m: None)


def test_command_line_errors_name_the_flag(tiny_trained_run, tmp_path):
  import subprocess
  import sys
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  base = [sys.executable, "-m", "ppd_jax.evals.interpolate", f"--out={tmp_path / 'o'}",
          "--prompt=a red circle", f"--edge_prompts={tmp_path / 'prompts.txt'}"]
  (tmp_path / "prompts.txt").write_text("a red circle\n")
  for extra, message in (([f"--run={tiny_trained_run}", "--rewards=clip_h14,aesthetic"],
                          "three reward names"),
                         ([f"--run={tiny_trained_run}", "--rewards=clip_h14,aesthetic,nope"],
                          "unknown reward"),
                         ([f"--run={tmp_path / 'nowhere'}"], "nowhere")):
    done = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_the_command_line_end_to_end(tiny_trained_run, tmp_path):
  """python -m ppd_jax.evals.interpolate with three (tiny) CLIP rewards and three demo users as
  the vertices: the grid and the edge curves are written, and the vertex means are the rewards'
  scores of the vertex images."""
  import subprocess
  import sys
  import tiny_clip
  from ppd_jax.rewards import registry
  model = str(tmp_path / "clip")
  tiny_clip.save_clip(model)
  (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
  out = tmp_path / "o"
  names = ("clip_h14", "clip_l14", "pickscore")
  cmd = [sys.executable, "-m", "ppd_jax.evals.interpolate", f"--run={tiny_trained_run}",
         f"--out={out}", "--prompt=a green triangle", f"--edge_prompts={tmp_path / 'prompts.txt'}",
         f"--rewards={','.join(names)}", "--users=0,1,2", "--grid=2", "--edge_steps=2",
         *[f"--model={n}={model}" for n in names]]
  done = subprocess.run(cmd, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.load(open(out / "edges.json"))
  assert [e["from"] for e in result["edges"]] == list(names)
  assert len(os.listdir(out / "grid")) == 3 and (out / "grid.png").exists()
  first = result["edges"][0]
  vertex = out / "points" / "w1.000_0.000_0.000"
  listing = [json.loads(line) for line in open(vertex / "prompts.jsonl")]
  reward = registry.load("clip_l14", model=model)
  expected = reward.score([str(vertex / r["image"]) for r in listing],
                          [r["prompt"] for r in listing]).mean()
  assert first["means"]["clip_l14"][0] == pytest.approx(float(expected), abs=1e-4)

"""Interpolation among three reward users (Fig. 4, Figs 7-9): mixed embeddings at inference.

  python -m ppd_jax.evals.interpolate --run=W[@STEP] --out=DIR --prompt="a red lighthouse" \
      --edge_prompts=PROMPTS [--rewards=clip_h14,aesthetic,hps_v2] [--users=-1,-2,-3] \
      [--grid=5] [--edge_steps=5] [--seed=0] [--model=REWARD=FOLDER] [--aesthetic_head=PATH]

Vertex k is the embedding e_k of reward k's user, looked up by name in what the run's data
recorded (evals/reward_user_ids.py: the relabel folder's reward_users.json; --users gives the
ids explicitly). A point
of the triangle with barycentric weights (w_0, w_1, w_2), sum 1, is the embedding
sum_k w_k e_k (inference.mix_users). Two outputs:
  * grid.png: every point of the n-row barycentric grid, row r (0 at the top) holding
    w = ((n-1-r), (r-j), j) / (n-1) for j = 0..r, one prompt, the same x_T for every point;
  * edges.json / edges.png: along each edge k -> l, at t = 0, 1/(m-1), ..., 1, the embedding
    (1 - t) e_k + t e_l generates the edge prompts (the same seeds at every t), and every reward's
    mean score is plotted against t. PPD should trade reward k for reward l monotonically: no
    step going back by more than --tolerance (0.1) of the curve's range.
Images and scores are kept per point (DIR/points/w<w0>_<w1>_<w2>/, shared by the edges that meet
at a vertex), so a killed run redoes nothing it finished; DIR/manifest.json (evals/manifest.py)
records the run's step and config hash, the vertices' users, the rewards' weight hashes, the
prompts, seed, grid and steps, and a rerun under other ones is refused. DIR, the run and the
prompt file may be URLs (gs://...): every file goes through ppd_jax.storage.
"""
import json
import sys

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import images as image_io
from ppd_jax import storage
from ppd_jax.evals import image_sets
from ppd_jax.evals import manifest as manifest_lib
from ppd_jax.evals import plots
from ppd_jax.evals import score_files
from ppd_jax.evals import table1

EDGES = ((0, 1), (1, 2), (2, 0))


def barycentric(n: int) -> list[tuple[int, int, tuple[float, float, float]]]:
  """(row, position, weights) of the n-row grid (module docstring)."""
  if n < 2:
    raise ValueError(f"--grid={n}: needs at least 2 rows (the vertices)")
  return [(r, j, ((n - 1 - r) / (n - 1), (r - j) / (n - 1), j / (n - 1)))
          for r in range(n) for j in range(r + 1)]


def mix(embeddings, weights) -> np.ndarray:
  """sum_k w_k e_k, weights summing to 1 (inference.mix_users on the given weights)."""
  from ppd_jax import inference
  keep = [(e, w) for e, w in zip(embeddings, weights) if w > 0]
  return inference.mix_users([e for e, _ in keep], [w for _, w in keep])


def _key(weights) -> str:
  return "w" + "_".join(f"{w:.3f}" for w in weights)


def grid(run, embeddings, prompt: str, seed: int, n: int, folder: str, log=print) -> list:
  """[(row, position, weights, image [H, W, C] in [-1, 1])]; PNGs kept in folder/grid/."""
  from ppd_jax import inference
  points = barycentric(n)
  where = storage.makedirs(storage.path(folder) / "grid")
  paths = [where / f"r{r}_j{j}.png" for r, j, _ in points]
  if not all(p.exists() for p in paths):
    mixes = np.stack([mix(embeddings, w) for _, _, w in points])
    made = inference.generate_mixes(run, prompt, mixes, seed=seed)
    for p, image in zip(paths, made):
      image_io.save_png(image, p)
    log(f"interpolate: {len(points)} grid images of {prompt!r}")
  loaded = [np.asarray(image_io.load_png(p), np.float32) for p in paths]
  return [(r, j, w, im) for (r, j, w), im in zip(points, loaded)]


def edges(run, embeddings, names, rewards: dict, prompts, seed: int, steps: int, folder: str,
          chunk: int = 16, log=print) -> list[dict]:
  """Per edge: {"from", "to", "t", "means": {reward: [steps]}, "ci95": {reward: [[lo, hi]]}}."""
  if steps < 2:
    raise ValueError(f"--edge_steps={steps}: needs at least 2 (the vertices)")
  ts = np.linspace(0.0, 1.0, steps)
  out = []
  for a, b in EDGES:
    curve = {"from": names[a], "to": names[b], "t": ts.tolist(),
             "means": {r: [] for r in rewards}, "ci95": {r: [] for r in rewards}}
    for t in ts:
      w = [0.0, 0.0, 0.0]
      w[a], w[b] = 1.0 - float(t), float(t)
      where = storage.path(folder) / "points" / _key(w)
      paths = image_sets.generate_set(run, mix(embeddings, w), 1.0, prompts, where, seed, chunk,
                                  log=lambda m: None)
      for name, reward in rewards.items():
        c = image_sets.cell(image_sets.score_set(paths, prompts, name, reward, where))
        curve["means"][name].append(c["mean"])
        curve["ci95"][name].append(c["ci95"])
    log(f"interpolate: edge {names[a]} -> {names[b]}: " + "; ".join(
        f"{r} {' '.join(f'{v:.3f}' for v in curve['means'][r])}" for r in rewards))
    out.append(curve)
  return out


def monotone(values, tolerance: float = 0.0, scale: float | None = None) -> str | None:
  """"increasing" / "decreasing" when every step moves one way, else None. A step back of at
  most tolerance * scale is allowed, scale being the curve's own range (max - min) unless given:

      allowed = tolerance * (max_t v(t) - min_t v(t))

  so the rule reads the same for a reward in [0, 1] and one in the tens (CLIP logits), and a
  step back is weighed against how far the curve moves at all. A caller whose rewards share a
  known unit (the multireward demo's, standardised over its pool) passes scale=1."""
  v = np.asarray(values, np.float64)
  allowed = tolerance * (float(v.max() - v.min()) if scale is None else scale)
  d = np.diff(v)
  if (d >= -allowed).all() and v[-1] > v[0]:
    return "increasing"
  if (d <= allowed).all() and v[-1] < v[0]:
    return "decreasing"
  return None


def run_all(run, embeddings, names, rewards: dict, prompt: str, edge_prompts, out: str, *,
            seed: int = 0, n: int = 5, steps: int = 5, chunk: int = 16, tolerance: float = 0.1,
            tolerance_scale: float | None = None, log=print, users: dict | None = None,
            prompt_source: dict | None = None) -> dict:
  """grid.png, edges.json and edges.png in out; returns edges.json's content. A curve counts as
  monotone when no step goes back by more than `tolerance` times its own range (`monotone`;
  `tolerance_scale`: a fixed unit instead). users: the vertices' {reward name: user id},
  recorded."""
  manifest_lib.bind(out, {"run": manifest_lib.run_identity(run), "vertices": list(names),
                          "users": users, "prompt": prompt,
                          "edge_prompts": image_sets.prompts_identity(edge_prompts),
                          "rewards": {k: manifest_lib.reward_identity(r, k)
                                      for k, r in rewards.items()},
                          "seed": seed, "grid": n, "edge_steps": steps, "chunk": chunk},
                    keyed={"prompt_source": prompt_source or {}},
                    command="ppd_jax.evals.interpolate")
  out = storage.makedirs(out)
  points = grid(run, embeddings, prompt, seed, n, out, log)
  plots.triangle_grid(points, n, names, prompt, out / "grid.png")
  curves = edges(run, embeddings, names, rewards, edge_prompts, seed, steps, out, chunk, log)
  for c in curves:
    c["monotone"] = {r: monotone(c["means"][r], tolerance, tolerance_scale) for r in rewards}
  result = {"vertices": list(names), "users": users, "run": manifest_lib.run_identity(run),
            "prompt": prompt, "grid": n, "seed": seed,
            "monotone_tolerance": {"fraction": tolerance,
                                   "of": "curve range" if tolerance_scale is None
                                   else tolerance_scale},
            "edge_prompts": len(edge_prompts), "edges": curves}
  score_files.write_json_atomic(out / "edges.json", result)
  plots.edge_curves(curves, list(rewards), out / "edges.png")
  return result


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import flags
  from ppd_jax import checkpoint
  from ppd_jax import inference
  from ppd_jax.evals import prompt_sets
  from ppd_jax.evals import reward_user_ids
  from ppd_jax.rewards import registry
  from ppd_jax.weights import hf_folder
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    names = table1.reward_names(f.rewards)
    if len(names) != 3:
      raise table1.Table1Error(f"--rewards: three reward names, one per vertex, got {names}")
    given = [int(u) for u in f.users.split(",")] if f.users else None
    if given is not None and len(given) != 3:
      raise table1.Table1Error(f"--users={f.users!r}: three user ids, one per reward")
    storage.check_writable(f.out)     # a wrong bucket fails now, not after the first images
    workdir, _, step = f.run.partition("@")
    run = inference.load_trained(workdir, int(step) if step else None)
    users = reward_user_ids.resolve(run, names, dict(zip(names, given)) if given else None,
                                    f"--run={f.run}")
    embeddings = []
    for u in users.values():
      try:
        embeddings.append(run.source.user_embedding(u))
      except KeyError as e:
        raise table1.Table1Error(f"--users: {e}") from None
    edge_prompts = prompt_sets.read(f.edge_prompts, f.num_prompts, seed=f.prompt_seed)
    rewards = table1.load_rewards(names, f.model, f.aesthetic_head)
    result = run_all(run, embeddings, names, rewards, f.prompt, edge_prompts, f.out,
                     seed=f.seed, n=f.grid, steps=f.edge_steps, chunk=f.chunk,
                     tolerance=f.tolerance, users=users,
                     prompt_source=prompt_sets.describe(edge_prompts, f.edge_prompts))
  except (ValueError, checkpoint.CheckpointError, prompt_sets.PromptSetError,
          registry.RewardConfigError, hf_folder.FolderError, storage.StorageError) as e:
    sys.exit(f"ppd_jax.evals.interpolate: {e}")
  print(json.dumps({c["from"] + "->" + c["to"]: c["monotone"] for c in result["edges"]}))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("run", None, "WORKDIR[@STEP] of a PPD run conditioned on reward users")
  flags.DEFINE_string("out", None, "output folder (grid.png, edges.json, edges.png, points/)")
  flags.DEFINE_string("prompt", None, "the grid's prompt")
  flags.DEFINE_string("edge_prompts", None, "prompt set for the edge curves (TSV, .txt, .jsonl, "
                      "Pick-a-Pic v2 .parquet, pickapic:SHARD_DIR[:split])")
  flags.DEFINE_integer("num_prompts", None, "use N edge prompts: a seeded sample, stratified by "
                       "category where the set has one")
  flags.DEFINE_integer("prompt_seed", 0, "seed of the --num_prompts sample")
  flags.DEFINE_string("rewards", "clip_h14,aesthetic,hps_v2", "the three rewards (vertices)")
  flags.DEFINE_string("users", None, "the three reward users' ids, one per --rewards name "
                      "(default: the run's own map, its relabel folder's reward_users.json)")
  flags.DEFINE_multi_string("model", None, "REWARD=FOLDER: a reward's weights")
  flags.DEFINE_string("aesthetic_head", None, "the aesthetic reward's head file")
  flags.DEFINE_integer("grid", 5, "rows of the barycentric grid (n(n+1)/2 images)")
  flags.DEFINE_integer("edge_steps", 5, "points along each edge, vertices included")
  flags.DEFINE_integer("seed", 0, "x_T seed of the grid and of the first edge-prompt chunk")
  flags.DEFINE_integer("chunk", 16, "prompts generated together (one seed per chunk)")
  flags.DEFINE_float("tolerance", 0.1, "a curve is monotone if no step goes back by more than "
                     "this fraction of the curve's range (max - min of its means)")
  flags.mark_flags_as_required(["run", "out", "prompt", "edge_prompts"])
  app.run(main)

"""Section 5.1 on a laptop: reward models as users, Table 1 and the interpolation among rewards.

  python -m ppd_jax.demo.multireward --workdir=runs/multireward \
      [--config=configs/ppd.py:demo_multireward] [--config.seed=1]

The demo world's three partly conflicting property rewards
(demo_world/synthetic_reward_users.py) are the users. Every Table 1 row is trained from the
same config (configs.common.table1_row):

    W/ppd/ W/diffusion_dpo/ W/sft/ W/dpo_<reward>/   training runs (resumed, never redone)
    W/table1/          evals/table1.py on the captions x held-out seeds: table1.json, table1.md
    W/interpolation/   evals/interpolate.py on the PPD run: grid.png, edges.json, edges.png
    W/results.json     the table, PPD minus each baseline per reward, PPD's share of each
                       single-reward upper bound's gain over the base, the edges' monotonicity
"""
import os
import sys
import time

import ml_collections

from configs import common
from ppd_jax import cli_logging
from ppd_jax import metrics as metrics_lib

ROWS = ("ppd", "diffusion_dpo", "sft")            # then dpo_<reward> per reward user
# The claims (docs/table1.md, tests/test_multireward_demo.py): PPD's gain over the base on each reward is
# at least this share of that reward's single-reward DPO gain, and along every edge the two end
# rewards move monotonically, no step going back by more than EDGE_TOLERANCE (the rewards are
# standardised over the pool, so the unit is fixed, tolerance_scale=1: a tenth of their spread).
UPPER_BOUND_SHARE = 1 / 3
EDGE_TOLERANCE = 0.1


def row_config(config: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  return common.table1_row(c, "dpo" if row == "diffusion_dpo" else row)


def rows_of(config) -> list[str]:
  return list(ROWS) + [f"dpo_{n}" for n in config.data.reward_users]


def summarise(table: dict, curves: dict, rewards: list) -> dict:
  """What docs/table1.md reports and the test asserts (module docstring)."""
  rows = table["rows"]
  mean = lambda row, r: rows[row][r]["mean"]
  out = {"table": {row: {r: mean(row, r) for r in rewards} for row in rows},
         "ppd_minus": {b: {r: mean("ppd", r) - mean(b, r) for r in rewards}
                       for b in ("base", "diffusion_dpo", "sft")},
         "upper_bound_share": {}, "edges_monotone": {}}
  for r in rewards:
    gain = mean(f"dpo_{r}", r) - mean("base", r)
    out["upper_bound_share"][r] = (mean("ppd", r) - mean("base", r)) / gain if gain else None
  for c in curves["edges"]:
    out["edges_monotone"][f"{c['from']}->{c['to']}"] = (
        c["monotone"][c["from"]] == "decreasing" and c["monotone"][c["to"]] == "increasing")
  return out


def run(config: ml_collections.ConfigDict, workdir: str, log=metrics_lib.log) -> dict:
  """Every stage into workdir (module docstring); returns results.json's content."""
  from ppd_jax import config_validation
  from ppd_jax import inference
  from ppd_jax import trainer
  from ppd_jax import sources
  from ppd_jax.demo_world import synthetic
  from ppd_jax.evals import interpolate
  from ppd_jax.evals import prompt_sets
  from ppd_jax.evals import reward_user_ids
  from ppd_jax.evals import score_files
  from ppd_jax.evals import table1
  from ppd_jax.rewards import hidden
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  if config.data.source != "synthetic_rewards":
    raise config_validation.ConfigError(
        f"config.data.source={config.data.source!r}: the multi-reward demo needs "
        "'synthetic_rewards' (configs/ppd.py:demo_multireward)")
  rows = rows_of(config)
  configs = {row: row_config(config, row) for row in rows}
  for c in configs.values():                        # every row's config, before any work
    config_validation.prepare(c)
  for i, row in enumerate(rows):
    log(f"[{i + 1}/{len(rows) + 2}] training {row}")
    trainer.train_and_evaluate(configs[row], os.path.join(workdir, row))

  names = list(config.data.reward_users)
  source = sources.build_source(config)
  rewards = {n: hidden.HiddenPropertyReward(source, -(k + 1)) for k, n in enumerate(names)}
  captions = synthetic.captions_list()
  e = config.eval
  prompts = [prompt_sets.Prompt(t) for t in captions] * e.multireward_repeats
  log(f"[{len(rows) + 1}/{len(rows) + 2}] Table 1 on {len(prompts)} prompts (captions x "
      f"{e.multireward_repeats} held-out seeds)")
  specs = [table1.RunSpec("base", os.path.join(workdir, "ppd"))] + [
      table1.RunSpec(row, os.path.join(workdir, row)) for row in rows]
  table = table1.build_table(specs, prompts, None, rewards, None, os.path.join(workdir, "table1"),
                             seed=e.multireward_seed, chunk=len(captions), log=log)

  log(f"[{len(rows) + 2}/{len(rows) + 2}] interpolation among {', '.join(names)}")
  ppd = inference.load_trained(os.path.join(workdir, "ppd"))
  users = reward_user_ids.resolve(ppd, names)
  embeddings = [ppd.source.user_embedding(users[n]) for n in names]
  edge_prompts = [prompt_sets.Prompt(t) for t in captions] * e.edge_repeats
  curves = interpolate.run_all(ppd, embeddings, names, rewards, captions[0], edge_prompts,
                               os.path.join(workdir, "interpolation"),
                               seed=e.multireward_seed + 7919, n=e.grid, steps=e.edge_steps,
                               chunk=len(captions), tolerance=EDGE_TOLERANCE,
                               tolerance_scale=1.0, log=log, users=users)
  results = {**summarise(table, curves, names), "seed": config.seed,
             "minutes": (time.perf_counter() - start) / 60}
  score_files.write_json_atomic(os.path.join(workdir, "results.json"), results)
  log(table1.markdown(table))
  log(format_results(results))
  return results


def format_results(results: dict) -> str:
  lines = ["PPD minus each baseline, per reward (its own user's images for PPD):"]
  for b, diffs in results["ppd_minus"].items():
    lines.append(f"  vs {b:<14}" + "  ".join(f"{r} {v:+.3f}" for r, v in diffs.items()))
  lines.append("PPD's share of each single-reward DPO's gain over the base: " + ", ".join(
      f"{r} {v:.2f}" for r, v in results["upper_bound_share"].items() if v is not None))
  lines.append("edges monotone (first reward down, second up): " + ", ".join(
      f"{k} {'yes' if v else 'no'}" for k, v in results["edges_monotone"].items()))
  return "\n".join(lines)


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import flags
  from ppd_jax import checkpoint
  from ppd_jax import config_validation
  if len(argv) > 1:
    from absl import app
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run(flags.FLAGS.config, flags.FLAGS.workdir)
  except (config_validation.ConfigError, checkpoint.CheckpointError, ValueError) as e:
    sys.exit(f"ppd_jax.demo.multireward: {e}")
  w = os.path.abspath(flags.FLAGS.workdir)
  print(f"\nresults: {os.path.join(w, 'results.json')}\ntable:   "
        f"{os.path.join(w, 'table1', 'table1.md')}\ngrid:    "
        f"{os.path.join(w, 'interpolation', 'grid.png')}\nedges:   "
        f"{os.path.join(w, 'interpolation', 'edges.png')}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ppd_jax import cli_config
  cli_config.define_config_file("ppd_jax.demo.multireward", "configs/ppd.py:demo_multireward",
                                "configs/ppd.py:VARIANT")
  flags.DEFINE_string("workdir", "runs/multireward", "run folder (module docstring)")
  app.run(main, flags_parser=cli_config.flags_parser("ppd_jax.demo.multireward"))

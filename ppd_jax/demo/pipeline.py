"""The whole demo, start to finish: pool -> PPD -> Diffusion-DPO baseline -> evaluation.

    W/ppd/            PPD run: user branch trained with each pair's labeller embedding
    W/dpo_baseline/   the same recipe with one constant embedding (no user information)
    W/eval/           results.json, win_rates.png, samples.png

Every stage resumes: a finished training run is restored, not re-trained, and the base-model pool
is cached (demo_world/base_pool.py), so a rerun after a crash picks up where it stopped. The
evaluation is kept with what made it (W/eval/made_by.json: each run's latest step and config
hash, and the eval settings): a rerun with the same ones reads results.json back; any change
evaluates again.
"""
import json
import os
import time

import ml_collections

from ppd_jax import backbones
from ppd_jax import checkpoint
from ppd_jax import config_validation
from ppd_jax import inference
from ppd_jax import metrics as metrics_lib
from ppd_jax import trainer
from ppd_jax.demo_world import base_pool
from ppd_jax.evals import manifest
from ppd_jax.evals import personalization


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The Diffusion-DPO baseline: identical except that no user information reaches the model."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.user_conditioning = False
  return c


def run_demo(config: ml_collections.ConfigDict, workdir: str, log=metrics_lib.log) -> dict:
  """Runs every stage into workdir; returns the evaluation results."""
  config_validation.prepare(config)
  start = time.perf_counter()
  workdir = os.path.abspath(workdir)

  log("[1/4] frozen base samples for the users to label (cached)")
  base_pool.load_or_make(config, backbones.build_backbone(config), log)

  log("[2/4] PPD: training the user branch on per-user preferences")
  trainer.train_and_evaluate(config, os.path.join(workdir, "ppd"))

  log("[3/4] Diffusion-DPO baseline: the same pairs, no user conditioning")
  trainer.train_and_evaluate(baseline_config(config), os.path.join(workdir, "dpo_baseline"))

  log("[4/4] evaluation on unseen and training users")
  out = os.path.join(workdir, "eval")
  made_by = evaluation_inputs(config, workdir)
  results = kept_results(out, made_by)
  if results is not None:
    log(f"evaluation: {out}/results.json was made from these runs and settings; reusing it")
  else:
    results = personalization.evaluate(
        inference.load_trained(os.path.join(workdir, "ppd")),
        inference.load_trained(os.path.join(workdir, "dpo_baseline")), out, config.eval, log)
    with open(os.path.join(out, MADE_BY), "w") as f:      # after results.json: a kill redoes
      json.dump(made_by, f, indent=2, sort_keys=True)
  log(personalization.format_table(results))
  log(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
  return results


MADE_BY = "made_by.json"


def evaluation_inputs(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """What decides the evaluation: each run's latest checkpoint step and config hash (the hash
  covers the synthetic users, hence the judge's hidden rewards), and the eval settings."""
  runs = {}
  for name, c in (("ppd", config), ("dpo_baseline", baseline_config(config))):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, name, "checkpoints"))
    runs[name] = {"step": ckpt.latest_step(), "config_sha256": manifest.config_sha256(c)[:16]}
    ckpt.close()
  return {"runs": runs, "eval": config.eval.to_dict()}


def kept_results(out: str, made_by: dict) -> dict | None:
  """out/results.json when out/made_by.json says it was made from `made_by`, else None."""
  try:
    with open(os.path.join(out, MADE_BY)) as f:
      if json.load(f) != json.loads(json.dumps(made_by)):
        return None
    with open(os.path.join(out, "results.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None

"""The whole demo, start to finish: pool -> PPD -> Diffusion-DPO baseline -> evaluation.

    W/ppd/            PPD run: user branch trained with each pair's labeller embedding
    W/dpo_baseline/   the same recipe with one constant embedding (no user information)
    W/eval/           results.json, win_rates.png, samples.png

Every stage resumes: a finished training run is restored, not re-trained, and the base-model pool
is cached (demo_world/base_pool.py), so a rerun after a crash picks up where it stopped.
"""
import os
import time

import ml_collections

from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax import inference
from ppd_jax import metrics as metrics_lib
from ppd_jax import trainer
from ppd_jax.demo_world import base_pool
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
  results = personalization.evaluate(
      inference.load_trained(os.path.join(workdir, "ppd")),
      inference.load_trained(os.path.join(workdir, "dpo_baseline")),
      os.path.join(workdir, "eval"), config.eval, log)
  log(personalization.format_table(results))
  log(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min")
  return results

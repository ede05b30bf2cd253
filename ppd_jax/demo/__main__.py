"""The CPU demo: python -m ppd_jax.demo --workdir=runs/demo [--config=configs/ppd.py:demo]

Trains PPD and a Diffusion-DPO baseline on synthetic users and evaluates personalisation on users
never seen in training (ppd_jax/demo/pipeline.py). Any config field can be overridden, e.g.
--config.seed=1 (use a fresh --workdir for another seed).
"""
import os
import sys

from absl import app
from absl import flags

from ppd_jax import checkpoint
from ppd_jax import cli_config
from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import config_validation
from ppd_jax.demo import pipeline

cli_config.define_config_file("ppd_jax.demo", "configs/ppd.py:demo", "configs/ppd.py:VARIANT")
flags.DEFINE_string("workdir", "runs/demo", "run folder: ppd/, dpo_baseline/, eval/")


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  workdir = os.path.abspath(flags.FLAGS.workdir)
  try:
    pipeline.run_demo(flags.FLAGS.config, workdir)
  except (config_validation.ConfigError, checkpoint.CheckpointError) as e:
    sys.exit(f"ppd_jax.demo: {e}")
  ev = os.path.join(workdir, "eval")
  print(f"\nresults:  {os.path.join(ev, 'results.json')}\n"
        f"chart:    {os.path.join(ev, 'win_rates.png')}\n"
        f"samples:  {os.path.join(ev, 'samples.png')}\n"
        f"training: {os.path.join(workdir, 'ppd', 'metrics.jsonl')} (and tensorboard/)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli_config.flags_parser("ppd_jax.demo"))

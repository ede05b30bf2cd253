"""Train a PPD user branch: python -m ppd_jax.train --config=configs/ppd.py:demo --workdir=W

Any config field can be overridden, e.g. --config.total_steps=20 --config.dpo.beta=2000.
Running the same command again resumes from W/checkpoints (a changed batch_size, seed, loss,
dpo.* or optim.* is refused unless --allow_changed names it); SIGTERM or Ctrl-C saves the current
step and exits cleanly (a second Ctrl-C quits at once). --compilation_cache moves or turns off the
persistent compilation cache (compile_cache.py).
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ppd_jax import checkpoint
from ppd_jax import cli_config
from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import config_validation
from ppd_jax import distributed
from ppd_jax import preemption
from ppd_jax import storage
from ppd_jax import trainer
from ppd_jax import weights

config_flags.DEFINE_config_file("config", None, "configs/ppd.py:VARIANT", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard/; "
                    "a local path or a URL (gs://bucket/run)")
flags.DEFINE_list("allow_changed", [], "config fields or sections a resumed run may change on "
                  "purpose (refused otherwise), e.g. --allow_changed=optim.lr")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  compile_cache.setup()
  try:
    config_validation.prepare(config)  # before anything heavy starts
    distributed.maybe_initialize()
    trainer.train_and_evaluate(config, storage.path(flags.FLAGS.workdir),
                               allow_changed=flags.FLAGS.allow_changed)
  except (config_validation.ConfigError, checkpoint.CheckpointError,
          trainer.NonFiniteError, storage.StorageError, weights.WeightFileError) as e:
    sys.exit(f"ppd_jax.train: {e}")
  except KeyboardInterrupt:   # before or after the steps; during them Ctrl-C saves (preemption.py)
    print("ppd_jax.train: interrupted outside the training steps; the checkpoints on disk are "
          "intact", file=sys.stderr)
    sys.exit(preemption.QUIT_STATUS)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_config.flags_parser("ppd_jax.train"))

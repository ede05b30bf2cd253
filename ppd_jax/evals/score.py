"""Score images with a reward model.

  python -m ppd_jax.evals.score --reward=pickscore --images=DIR|FILE.jsonl --out=scores.jsonl \
      [--model=FOLDER|HUB_ID] [--aesthetic_head=PATH] [--batch_size=32]

Rewards: rewards/registry.py (pickscore, hps_v2, hps_v21, clip_l14, clip_h14, aesthetic).
Writes one JSON line per image {"image", "prompt", "reward", "score"} to --out, and the summary
(n, mean, std, 95% CI of the mean) to <out>.summary.json and stdout. A killed run resumes where it
stopped; inputs and weights are checked before any scoring. <out>.manifest.json
(evals/manifest.py) records the reward and the SHA-256 of its weight files: resuming with other
weights is refused. --images, --prompts and --out may be URLs (gs://...): every file goes through
ppd_jax.storage.
"""
import sys
import time

from absl import app
from absl import flags

from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import storage
from ppd_jax.evals import score_files
from ppd_jax.evals import stats
from ppd_jax.rewards import preprocess
from ppd_jax.rewards import registry
from ppd_jax.weights import convert
from ppd_jax.weights import hf_folder


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  flags.DEFINE_enum("reward", None, list(registry.NAMES), "the reward model")
  flags.DEFINE_string("images", None, "a folder of images with a prompts.jsonl, or a JSONL file "
                      "of {image, prompt} lines")
  flags.DEFINE_string("prompts", None, "with a folder: its {image, prompt} JSONL, if not "
                      "DIR/prompts.jsonl")
  flags.DEFINE_string("out", None, "the scores, one JSON line per image")
  flags.DEFINE_string("model", None, "CLIP weights: a transformers folder, a converted open_clip "
                      "folder or a hub id (default: the reward's)")
  flags.DEFINE_string("aesthetic_head", None, "--reward=aesthetic: the head (.pth or .safetensors)")
  flags.DEFINE_string("tokenizer", None, "a CLIP tokenizer folder or hub id, if not the model's")
  flags.DEFINE_integer("batch_size", 32, "images per device batch (rounded up to the devices)")
  flags.DEFINE_integer("log_every", 10, "progress line every N batches")
  flags.mark_flags_as_required(["reward", "images", "out"])


def _eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def run(reward_name: str, images: str, out: str, model=None, aesthetic_head=None, tokenizer=None,
        prompts=None, batch_size: int = 32, log_every: int = 10, log=print) -> dict:
  """The CLI's work; returns the summary."""
  from ppd_jax.evals import manifest
  items = score_files.read_items(images, prompts, need_prompts=reward_name != "aesthetic")
  log_file = score_files.ScoreLog(out, reward_name)
  todo = [it for it in items if it.key not in log_file.scores]
  if len(todo) < len(items):
    log(f"resuming: {len(items) - len(todo)} of {len(items)} image(s) already scored in {out}")
  reward = registry.load(reward_name, model, aesthetic_head, tokenizer, batch_size)
  where = storage.path(out)           # before any scoring: other weights, another file
  manifest.bind(where.parent, {"reward": registry.identity(reward_name, model, aesthetic_head),
                               "tokenizer": tokenizer},
                keyed={"images": images, "prompts": prompts}, command="ppd_jax.evals.score",
                name=f"{where.name}.manifest.json")
  step = reward.runner.batch_size
  start = time.perf_counter()
  for b, first in enumerate(range(0, len(todo), step)):
    chunk = todo[first:first + step]
    log_file.append(chunk, reward.score([it.path for it in chunk], [it.prompt for it in chunk]))
    done = first + len(chunk)
    if (b + 1) % log_every == 0 or done == len(todo):
      rate = done / max(time.perf_counter() - start, 1e-9)
      log(f"scored {done}/{len(todo)} images, {rate:.1f} images/s, "
          f"ETA {_eta((len(todo) - done) / rate)}")
  scores = [log_file.scores[it.key] for it in items]
  summary = {"reward": reward_name, "model": model or registry.SPECS[reward_name].model,
             "images": images, **stats.mean_ci(scores)}
  score_files.write_json_atomic(score_files.summary_path(out), summary)
  return summary


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    storage.check_writable(storage.path(f.out).parent)   # a wrong bucket fails before scoring
    summary = run(f.reward, f.images, f.out, f.model, f.aesthetic_head, f.tokenizer, f.prompts,
                  f.batch_size, f.log_every)
  except (score_files.ScoreInputError, registry.RewardConfigError, hf_folder.FolderError,
          convert.WeightsError, preprocess.ImageInputError, storage.StorageError,
          ValueError) as e:
    sys.exit(f"ppd_jax.evals.score: {e}")
  ci = (f"[{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]" if summary["ci_low"] is not None
        else "n/a")
  print(f"{summary['reward']}: mean {summary['mean']:.4f} over {summary['n']} images, "
        f"95% CI {ci} -> {score_files.summary_path(f.out)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

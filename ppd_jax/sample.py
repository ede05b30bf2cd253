"""Generate images for a user, or a mix of users, from a trained run.

  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --user=3 --out=DIR
  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --users=3:0.5,70:0.5 --out=DIR
  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --pairs=FOUR_PAIRS.json --out=DIR

--pairs embeds a new user from their labelled pairs the way the run's users were embedded
(users/new_user.py). --profile_in_caption (default: the run's data.profile_in_caption) appends the
user's profile text to each prompt: the caption-augmentation baseline.

Writes DIR/<prompt>_<users>_s<seed>_<i>.png, one per prompt and image index, and lists them in
DIR/prompts.jsonl ({"image", "prompt", "users", "seed"} per PNG, merged with earlier runs into the
same folder), which `python -m ppd_jax.evals.score --images=DIR` reads.
"""
import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

from ppd_jax import checkpoint
from ppd_jax import compile_cache
from ppd_jax import images
from ppd_jax import inference
from ppd_jax import storage
from ppd_jax.users import new_user
from ppd_jax.users import profile_caption


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  flags.DEFINE_string("workdir", None, "the training run's folder (holds checkpoints/)")
  flags.DEFINE_multi_string("prompt", None, "caption(s) to generate; repeat the flag for several")
  flags.DEFINE_string("user", None, "user id to generate for")
  flags.DEFINE_string("users", None, "a mix of users as ID:WEIGHT,ID:WEIGHT (weights normalised)")
  flags.DEFINE_string("pairs", None, "a new user: JSON list / JSONL of their labelled pairs "
                      "{caption, image_1, image_2, preferred}")
  flags.DEFINE_string("vlm", None, "with --pairs: the VLM checkpoint, if not where the run's user "
                      "store says")
  flags.DEFINE_bool("profile_in_caption", None, "append the user's profile text to each prompt "
                    "(default: the run's data.profile_in_caption)")
  flags.DEFINE_float("user_scale", 1.0, "strength of the user branch (0: the base model)")
  flags.DEFINE_string("out", None, "folder for the PNG files")
  flags.DEFINE_integer("seed", 0, "noise seed")
  flags.DEFINE_integer("num_images", 1, "images per prompt (seeds seed, seed+1, ...)")
  flags.DEFINE_float("guidance_scale", None, "classifier-free guidance (default: the run's config)")
  flags.DEFINE_integer("num_steps", None, "DDIM steps (default: the run's config)")
  flags.DEFINE_float("eta", None, "DDIM eta, 0 = deterministic (default: the run's config)")
  flags.DEFINE_enum("sampler", None, ["ddim", "euler", "dpmpp_2m", "ddpm_wuerstchen"],
                    "sampler (default: the run's config.sample.sampler)")
  flags.DEFINE_integer("step", None, "checkpoint step to use (default: the latest)")
  flags.mark_flags_as_required(["workdir", "prompt", "out"])


def parse_users(user: str | None, users: str | None,
                pairs: str | None = None) -> list[tuple[str, float]]:
  """--user=ID or --users=ID:W,ID:W -> [(id, weight), ...]; --pairs=FILE -> [(FILE's name, 1)]."""
  if sum(x is not None for x in (user, users, pairs)) != 1:
    raise ValueError("give exactly one of --user=ID, --users=ID:WEIGHT,ID:WEIGHT or "
                     "--pairs=FILE")
  if pairs is not None:
    return [(os.path.splitext(os.path.basename(pairs))[0], 1.0)]
  if user is not None:
    return [(user, 1.0)]
  out = []
  for part in users.split(","):
    uid, sep, weight = part.partition(":")
    try:
      out.append((uid.strip(), float(weight) if sep else 1.0))
    except ValueError:
      raise ValueError(f"--users: weight {weight!r} of user {uid!r} is not a number") from None
  return out


def _user_key(uid: str):
  """Synthetic users are numbered; other stores key users by string."""
  return int(uid) if uid.isdigit() else uid


def _stored_profile(run, user_id) -> str | None:
  store = getattr(run.source, "store", None)
  return None if store is None else store.profile(user_id)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "empty"


def update_listing(out_dir, entries: list[dict]) -> None:
  """Merges `entries` into out_dir/prompts.jsonl by image name (a rerun overwrites its PNGs, so
  its lines replace theirs), written atomically."""
  path = storage.path(out_dir) / "prompts.jsonl"
  rows = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        row = json.loads(line)
        rows[row["image"]] = row
  rows.update({e["image"]: e for e in entries})
  storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows.values()))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  try:
    mix = parse_users(f.user, f.users, f.pairs)
    run = inference.load_trained(f.workdir, f.step)
    with_profile = (run.config.data.get("profile_in_caption", False)
                    if f.profile_in_caption is None else f.profile_in_caption)
    if with_profile and len(mix) > 1:
      raise ValueError("--profile_in_caption takes one user's profile; not a mix of users")
    if f.pairs is not None:
      embedding, profile = new_user.embed_new_user(run, f.pairs, vlm_model=f.vlm)
    else:
      embeddings = [run.source.user_embedding(_user_key(uid)) for uid, _ in mix]
      embedding = inference.mix_users(embeddings, [w for _, w in mix])
      profile = _stored_profile(run, _user_key(mix[0][0])) if with_profile else None
    if with_profile and not profile:
      raise ValueError("--profile_in_caption: this user has no profile text (the demo's users "
                       "and stores written without profiles have none)")
    prompts = [profile_caption.with_profile(p, profile) if with_profile else p for p in f.prompt]
  except (ValueError, KeyError, OSError, checkpoint.CheckpointError) as e:
    sys.exit(f"ppd_jax.sample: {e}")

  out = storage.makedirs(f.out)   # a local folder or a URL (gs://bucket/samples)
  tag = "+".join(f"{uid}x{w:g}" for uid, w in mix)
  written, listing = [], []
  for i in range(f.num_images):
    seed = f.seed + i
    batch = inference.generate(run, prompts, embedding, user_scale=f.user_scale, seed=seed,
                               num_steps=f.num_steps, guidance_scale=f.guidance_scale, eta=f.eta,
                               sampler=f.sampler)
    for prompt, image in zip(f.prompt, batch):
      path = out / f"{_slug(prompt)}_{tag}_s{seed}_{i}.png"
      images.save_png(image, path)
      written.append(path)
      listing.append({"image": path.name, "prompt": prompt, "users": tag, "seed": seed})
  update_listing(out, listing)
  side = batch.shape[1] if len(written) else run.config.model.sample_size
  print(f"wrote {len(written)} image(s) of {side}px from step {run.step} "
        f"to {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

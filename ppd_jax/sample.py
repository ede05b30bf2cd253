"""Generate images for a user, or a mix of users, from a trained run.

  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --user=3 --out=DIR
  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --users=3:0.5,70:0.5 --out=DIR
  python -m ppd_jax.sample --workdir=W --prompt="a red circle" --pairs=FOUR_PAIRS.json --out=DIR

--pairs embeds a new user from their labelled pairs the way the run's users were embedded
(users/new_user.py). --profile_in_caption (default: the run's data.profile_in_caption) appends the
user's profile text to each prompt: the caption-augmentation baseline.

  python -m ppd_jax.sample --workdir=W --list_users

Writes DIR/<prompt>_<users>_scale<S>_cfg<G>_<sampler><steps>_ckpt<step>_s<seed>_<i>.png (eta<E>
before s<seed> when eta is not 0), one per prompt and image index, so that images made with other
settings (a base image at --user_scale=0 beside the personalised one) never overwrite each other.
DIR/prompts.jsonl lists them, one JSON object per PNG, merged with earlier runs into the same
folder: {"image", "prompt", "users", "seed", "user_scale", "guidance_scale", "num_steps",
"sampler", "eta", "step", "workdir"}; `python -m ppd_jax.evals.score --images=DIR` reads it.

A Pick-a-Pic run reads its users from W/users.safetensors (run_users.py), not from its shards.
"""
import json
import re
import sys

from absl import app
from absl import flags

from ppd_jax import checkpoint
from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import images
from ppd_jax import inference
from ppd_jax import run_users
from ppd_jax import storage
from ppd_jax.data import profile_caption
from ppd_jax.users import embedding as embedding_lib


def _define_flags():
  """Defined only when run as a script, so tests can import this module beside other CLIs."""
  flags.DEFINE_string("workdir", None, "the training run's folder (holds checkpoints/)")
  flags.DEFINE_multi_string("prompt", None, "caption(s) to generate; repeat the flag for several")
  flags.DEFINE_string("user", None, "user id to generate for (--list_users lists them)")
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
  flags.DEFINE_bool("list_users", False, "print the run's user ids, one per line with its group "
                    "(train, validation, unseen; store: in the store only), and stop")
  flags.mark_flags_as_required(["workdir"])


parse_users = embedding_lib.parse_users


def _stored_profile(run, user_id) -> str | None:
  store = getattr(run.users, "store", None)
  return None if store is None else store.profile(user_id)


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "empty"


def _number(x: float) -> str:
  """7.5 -> "7.5", 1.0 -> "1": short and exact enough for a file name."""
  return f"{x:g}"


def image_name(prompt: str, users: str, settings: dict, seed: int, index: int) -> str:
  """The PNG's name: every setting that changes the image (module docstring)."""
  eta = f"_eta{_number(settings['eta'])}" if settings["eta"] else ""
  return (f"{_slug(prompt)}_{users}_scale{_number(settings['user_scale'])}"
          f"_cfg{_number(settings['guidance_scale'])}_{settings['sampler']}{settings['num_steps']}"
          f"_ckpt{settings['step']}{eta}_s{seed}_{index}.png")


def resolved_settings(run, user_scale: float, guidance_scale: float | None,
                      num_steps: int | None, eta: float | None, sampler: str | None) -> dict:
  """The flags with the run's config filling what was not given: what the images are made with."""
  c = run.config.sample
  return {"user_scale": float(user_scale),
          "guidance_scale": float(c.guidance_scale if guidance_scale is None else guidance_scale),
          "num_steps": int(num_steps or c.num_steps),
          "sampler": sampler or c.get("sampler", "ddim"),
          "eta": float(c.eta if eta is None else eta),
          "step": int(run.step)}


def list_users(workdir: str, step: int | None = None) -> str:
  """One line per user: its id and group (run_users.groups), and its name where the run's table
  named its users. Reads the run's config and users only: no weights are loaded."""
  users = inference.run_users_only(workdir, step)
  name_of = {v: k for k, v in getattr(users, "names", {}).items()}
  return "".join(f"{uid}\t{group}" + (f"\t{name_of[uid]}" if uid in name_of else "") + "\n"
                 for uid, group in run_users.groups(users))


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
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    if f.list_users:
      print(list_users(f.workdir, f.step), end="")
      return
    missing = [name for name in ("prompt", "out") if not getattr(f, name)]
    if missing:
      raise ValueError(" and ".join(f"--{m}" for m in missing) + " must be given (or "
                       "--list_users)")
    mix = parse_users(f.user, f.users, f.pairs)
    run = inference.load_trained(f.workdir, f.step)
    with_profile = (run.config.data.get("profile_in_caption", False)
                    if f.profile_in_caption is None else f.profile_in_caption)
    if with_profile and len(mix) > 1:
      raise ValueError("--profile_in_caption takes one user's profile; not a mix of users")
    embedding, profile = embedding_lib.embedding_for(run, mix, f.pairs, f.vlm)
    if f.pairs is None and with_profile:
      profile = _stored_profile(run, embedding_lib.run_user_key(run, mix[0][0]))
    if with_profile and not profile:
      raise ValueError("--profile_in_caption: this user has no profile text (the demo's users "
                       "and stores written without profiles have none)")
    prompts = [profile_caption.with_profile(p, profile) if with_profile else p for p in f.prompt]
  except KeyError as e:
    sys.exit(f"ppd_jax.sample: {e.args[0] if e.args else e}")
  except (ValueError, OSError, checkpoint.CheckpointError) as e:
    sys.exit(f"ppd_jax.sample: {e}")

  out = storage.makedirs(f.out)   # a local folder or a URL (gs://bucket/samples)
  tag = "+".join(f"{uid}x{w:g}" for uid, w in mix)
  settings = resolved_settings(run, f.user_scale, f.guidance_scale, f.num_steps, f.eta, f.sampler)
  written, listing = [], []
  for i in range(f.num_images):
    seed = f.seed + i
    batch = inference.generate(
        run, prompts, embedding, user_scale=settings["user_scale"], seed=seed,
        num_steps=settings["num_steps"], guidance_scale=settings["guidance_scale"],
        eta=settings["eta"], sampler=settings["sampler"])
    for prompt, image in zip(f.prompt, batch):
      path = out / image_name(prompt, tag, settings, seed, i)
      images.save_png(image, path)
      written.append(path)
      listing.append({"image": path.name, "prompt": prompt, "users": tag, "seed": seed,
                      **settings, "workdir": run.workdir})
  update_listing(out, listing)
  side = batch.shape[1] if len(written) else run.config.model.sample_size
  print(f"wrote {len(written)} image(s) of {side}px from step {run.step} "
        f"to {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

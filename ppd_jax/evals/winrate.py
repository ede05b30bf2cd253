"""Win rates of PPD against an opponent, judged with each user's own 4 pairs (Section 5.2).

  python -m ppd_jax.evals.winrate --run=W_PPD \
      --against=base|control|profile_caption|run:W_OTHER[@STEP] \
      --users=unseen|seen --out=DIR [--max_users=50] [--items=8] [--prompts=FILE] \
      [--judge=api|local|synthetic ...] [--seed=0]

For each user: the judge's context is the user's 4 few-shot pairs (the pairs its embedding was made
from); the prompts are the captions of its next `--items` pairs (or the first items of
--prompts). PPD draws one image per prompt with the user's embedding, the opponent one from the
same x_T (user k's chunk seed: seed + k):
  * base     the PPD run's frozen base (user branch off);
  * control  the PPD run with another user's embedding (the next user of the list);
  * profile_caption  the frozen base with the user's VLM profile text appended to every prompt
             (users/profile_caption.py; untrained caption augmentation);
  * run:W    another run: a Diffusion-DPO run with its one shared embedding; a run trained with
             data.profile_in_caption gets the user's profile text appended to every prompt (the
             caption-augmentation baseline).
The judge (evals/judge.py) compares each (PPD = A, opponent = B) in both orders. Per user

    win_u = #A / (#A + #B)       (inconsistent verdicts dropped, the paper's rule)

and the reported win rate is the mean of win_u over users, with a percentile bootstrap 95%
interval over users (evals/stats.bootstrap_mean_ci); also the soft (debiased) mean, the
consistency and the position bias. DIR/winrate.json, DIR/winrate.md and DIR/examples.png (the
first pairs with their verdicts). Images and verdicts are kept (DIR/images/..., DIR/verdicts.jsonl
in per-user blocks, evals/judge_log.py), so a killed run redoes only the user in flight. DIR, the
runs and the prompt file may be URLs (gs://...): every file goes through ppd_jax.storage.
"""
import dataclasses
import json
import sys

import numpy as np

from ppd_jax import compile_cache
from ppd_jax import images as image_io
from ppd_jax import storage
from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_log
from ppd_jax.evals import plots
from ppd_jax.evals import prompt_sets
from ppd_jax.evals import score_files
from ppd_jax.evals import stats
from ppd_jax.evals import table1
from ppd_jax.users import prompts as prompts_lib


class WinrateError(ValueError):
  """A run, opponent or user setting that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class UserCase:
  user_id: int
  context: tuple                  # users/prompts.Pair x 4
  prompts: tuple                  # captions to generate


def _synthetic_cases(source, ids, items: int, fixed) -> list[UserCase]:
  out = []
  for u in ids:
    p = source.user_pairs(int(u))
    shots = source.fewshot
    context = judge_lib.context_from_pairs(p["winners"][:shots], p["losers"][:shots],
                                           p["captions"][:shots])
    later = fixed or p["captions"][shots:shots + items]
    out.append(UserCase(int(u), context, tuple(later)))
  return out


def _pickapic_cases(run, ids, items: int, fixed) -> list[UserCase]:
  from ppd_jax.users import shots as shots_lib
  pairs = shots_lib.open_pairs(run.config.data.shards, 4, split_params={})
  idx = pairs.index
  out = []
  for u in ids:
    cands = pairs.candidates(int(u))
    loaded = pairs.load(cands[:4])
    context = tuple(loaded[c] for c in cands[:4])
    if len(context) < 4 or any(not isinstance(c, prompts_lib.Pair) for c in context):
      continue
    later = fixed or [idx.captions[idx.pairs["caption_id"][c]] for c in cands[4:4 + items]]
    out.append(UserCase(int(u), context, tuple(later)))
  return out


def user_cases(run, users: str, max_users: int, items: int, prompt_file=None) -> list[UserCase]:
  """The users to evaluate, each with its judge context and prompts (module docstring)."""
  if users not in ("seen", "unseen"):
    raise WinrateError(f"--users={users!r}: seen or unseen")
  src = run.source
  ids = src.unseen_user_ids if users == "unseen" else src.train_user_ids
  ids = list(ids[:max_users] if max_users else ids)
  if not ids:
    raise WinrateError(f"--users={users}: the run's data has no {users} users")
  fixed = [p.text for p in prompt_sets.read(prompt_file, items)] if prompt_file else None
  if run.config.data.source == "pickapic":
    cases = _pickapic_cases(run, ids, items, fixed)
  else:
    cases = _synthetic_cases(src, ids, items, fixed)
  cases = [c for c in cases if c.prompts]
  if not cases:
    raise WinrateError(f"no {users} user has pairs beyond its 4 few-shot ones to take prompts "
                       "from; give --prompts")
  return cases


class Opponent:
  """--against: what the PPD images are compared with."""

  def __init__(self, spec: str, ppd_run, cases):
    self.spec, self.ppd = spec, ppd_run
    if spec == "base":
      self.run, self.tag = ppd_run, "base"
    elif spec == "control":
      if len(cases) < 2:
        raise WinrateError("--against=control needs at least two users")
      self.run, self.tag = ppd_run, "control"
      ids = [c.user_id for c in cases]
      self.other = dict(zip(ids, ids[1:] + ids[:1]))
    elif spec == "profile_caption":
      if getattr(ppd_run.source, "store", None) is None:
        raise WinrateError("--against=profile_caption needs users with profile texts (a "
                           "Pick-a-Pic run whose user store the VLM wrote); this run's users "
                           "have none")
      self.run, self.tag = ppd_run, "profile_caption"
    elif spec.startswith("run:"):
      from ppd_jax import inference
      workdir, _, step = spec[len("run:"):].partition("@")
      self.run = inference.load_trained(workdir, int(step) if step else None)
      self.tag = "run-" + storage.path(workdir).name + (f"-{step}" if step else "")
    else:
      raise WinrateError(f"--against={spec!r}: base, control, profile_caption or "
                         "run:WORKDIR[@STEP]")

  def images(self, case: UserCase, folder: str, seed: int) -> list[str]:
    prompts = [prompt_sets.Prompt(p) for p in case.prompts]
    chunk = len(prompts)                     # one chunk: the user's seed for every prompt
    if self.spec == "base":
      c = self.run.config.model
      zero = np.zeros((c.user_tokens, c.user_embed_dim), np.float32)
      return table1.generate_set(self.run, zero, 0.0, prompts, folder, seed, chunk, _quiet)
    if self.spec == "control":
      emb = self.run.source.user_embedding(self.other[case.user_id])
      return table1.generate_set(self.run, emb, 1.0, prompts, folder, seed, chunk, _quiet)
    d = self.run.config.data
    if self.spec == "profile_caption" or d.get("profile_in_caption", False):
      from ppd_jax.users import profile_caption
      profile = self.run.source.store.profile(case.user_id)
      prompts = [prompt_sets.Prompt(profile_caption.with_profile(p.text, profile))
                 for p in prompts]
      emb = np.zeros((self.run.config.model.user_tokens, self.run.config.model.user_embed_dim),
                     np.float32)
      return table1.generate_set(self.run, emb, 0.0, prompts, folder, seed, chunk, _quiet)
    if d.get("user_conditioning", True):
      emb = self.run.source.user_embedding(case.user_id)
    else:
      emb = self.run.source.user_embedding(self.run.source.train_user_ids[0])
    return table1.generate_set(self.run, emb, 1.0, prompts, folder, seed, chunk, _quiet)


def _quiet(message: str) -> None:
  del message


def run(ppd_run, opponent: Opponent, cases, backend, out: str, *, seed: int = 0, log=print,
        after_user=None) -> dict:
  """Every user's images and verdicts into out; returns winrate.json's content."""
  out = storage.makedirs(out)
  path = out / "verdicts.jsonl"
  done = judge_log.read(path, key="item")
  todo = [c for c in cases if c.user_id not in done]
  log(f"winrate: PPD vs {opponent.spec}: {len(cases)} users, {len(cases) - len(todo)} done "
      "before")
  position = {c.user_id: k for k, c in enumerate(cases)}
  for i, case in enumerate(todo):
    s = seed + position[case.user_id]
    where = lambda side: out / "images" / side / f"user{case.user_id}"
    mine = table1.generate_set(ppd_run, ppd_run.source.user_embedding(case.user_id), 1.0,
                               [prompt_sets.Prompt(p) for p in case.prompts], where("ppd"), s,
                               len(case.prompts), _quiet)
    theirs = opponent.images(case, where(opponent.tag), s)
    questions = [judge_lib.Question(case.context, p, image_io.load_png(a), image_io.load_png(b),
                                    user_id=case.user_id)
                 for p, a, b in zip(case.prompts, mine, theirs)]
    verdicts = judge_lib.judge(backend, questions)
    rows = [{"user_id": case.user_id, "item": k, "prompt": p, "ppd": a, "opponent": b,
             "verdict": j.verdict, "p_ab": j.p_ab, "p_ba": j.p_ba, "soft": j.soft,
             "bias": j.bias, "problems": list(j.problems)}
            for k, (p, a, b, j) in enumerate(zip(case.prompts, mine, theirs, verdicts))]
    judge_log.append_user(path, case.user_id, rows)
    done[case.user_id] = {r["item"]: r for r in rows}
    log(f"winrate: {i + 1}/{len(todo)} users")
    if after_user is not None:
      after_user(case.user_id)
  result = summarise({c.user_id: list(done[c.user_id].values()) for c in cases}, seed)
  result.update({"against": opponent.spec, "ppd_step": ppd_run.step, "seed": seed,
                 "judge": backend.describe() if hasattr(backend, "describe") else backend.name,
                 "template": prompts_lib.TEMPLATE_VERSION})
  score_files.write_json_atomic(out / "winrate.json", result)
  storage.write_text(out / "winrate.md", markdown(result))
  examples(done, cases, out / "examples.png")
  return result


def summarise(by_user: dict, seed: int = 0) -> dict:
  """Per-user win rates, their mean with a bootstrap CI over users, and pooled counts."""
  per_user = {}
  for u, rows in by_user.items():
    a = sum(r["verdict"] == "A" for r in rows)
    b = sum(r["verdict"] == "B" for r in rows)
    valid = [r for r in rows if r["verdict"] != "invalid"]
    per_user[u] = {"wins": a, "losses": b, "items": len(rows),
                   "win_rate": a / (a + b) if a + b else None,
                   "soft": float(np.mean([r["soft"] for r in valid])) if valid else None}
  rates = [v["win_rate"] for v in per_user.values() if v["win_rate"] is not None]
  softs = [v["soft"] for v in per_user.values() if v["soft"] is not None]
  rows = [r for rs in by_user.values() for r in rs]
  pooled = judge_lib.summarise([judge_lib.Judgement(r["verdict"], r["p_ab"], r["p_ba"],
                                                    r["soft"], r["bias"]) for r in rows])
  return {"users": len(per_user), "users_with_a_verdict": len(rates),
          "win_rate": float(np.mean(rates)) if rates else None,
          "ci95": list(stats.bootstrap_mean_ci(rates, seed=seed)),
          "soft_win_rate": float(np.mean(softs)) if softs else None,
          "soft_ci95": list(stats.bootstrap_mean_ci(softs, seed=seed)),
          "pooled": pooled, "per_user": {str(u): v for u, v in per_user.items()}}


def markdown(r: dict) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lo, hi = r["ci95"]
  return (f"| PPD vs {r['against']} | win rate | 95% CI (users) | soft | consistency | "
          f"position bias | users |\n| --- | --- | --- | --- | --- | --- | --- |\n"
          f"| | {fmt(r['win_rate'])} | [{fmt(lo)}, {fmt(hi)}] | {fmt(r['soft_win_rate'])} | "
          f"{fmt(r['pooled']['consistency'])} | {fmt(r['pooled']['position_bias'])} | "
          f"{r['users_with_a_verdict']} of {r['users']} |\n")


def examples(done: dict, cases, path: str, count: int = 6) -> None:
  """The first users' first item: PPD's image over the opponent's, labelled with the verdict."""
  picked = [done[c.user_id][0] for c in cases if done.get(c.user_id) and 0 in done[c.user_id]]
  picked = picked[:count]
  if not picked:
    return
  ppd = np.stack([image_io.load_png(r["ppd"]) for r in picked])
  opp = np.stack([image_io.load_png(r["opponent"]) for r in picked])
  labels = [f"user {r['user_id']}: {r['verdict']}" for r in picked]
  plots.sample_grid([("PPD (A)", ppd), ("opponent (B)", opp)], labels, path,
                    scale=max(1, 128 // ppd.shape[1]))


def main(argv):
  from absl import flags
  from ppd_jax import checkpoint
  from ppd_jax import inference
  from ppd_jax.evals import judge_backends
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax and fsspec log every file they read at INFO
  f = flags.FLAGS
  try:
    storage.check_writable(f.out)     # a wrong bucket fails now, not after the first images
    workdir, _, step = f.run.partition("@")
    ppd = inference.load_trained(workdir, int(step) if step else None)
    cases = user_cases(ppd, f.users, f.max_users, f.items, f.prompts)
    opponent = Opponent(f.against, ppd, cases)
    backend = judge_backends.from_flags(f, f.out, run=ppd)
    result = run(ppd, opponent, cases, backend, f.out, seed=f.seed,
                 log=lambda m: print(m, flush=True))
  except (ValueError, OSError, KeyError, checkpoint.CheckpointError, storage.StorageError) as e:
    sys.exit(f"ppd_jax.evals.winrate: {e}")
  print(markdown(result))
  print(json.dumps({"win_rate": result["win_rate"], "ci95": result["ci95"]}))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ppd_jax.evals import judge_backends
  flags.DEFINE_string("run", None, "WORKDIR[@STEP] of the PPD run")
  flags.DEFINE_string("against", "base", "base, control, profile_caption or run:WORKDIR[@STEP]")
  flags.DEFINE_string("users", "unseen", "seen (training) or unseen (test) users")
  flags.DEFINE_integer("max_users", 0, "at most this many users (0: all)")
  flags.DEFINE_integer("items", 8, "prompts per user")
  flags.DEFINE_string("prompts", None, "a prompt file instead of the users' own captions")
  flags.DEFINE_integer("seed", 0, "x_T seed of the first user (user k: seed + k)")
  flags.DEFINE_string("out", None, "output folder")
  judge_backends.define_flags(synthetic=True)
  flags.mark_flags_as_required(["run", "out"])
  app.run(main)

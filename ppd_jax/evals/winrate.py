"""Win rates of PPD against an opponent, judged with each user's own 4 pairs (Section 5.2).

  python -m ppd_jax.evals.winrate --run=W_PPD \
      --against=base|control|profile_caption|run:W_OTHER[@STEP] \
      --users=unseen|seen --out=DIR [--max_users=50] [--items=8] [--prompts=FILE] \
      [--judge=api|local|synthetic ...] [--seed=0]

For each user: the judge's context is the user's 4 few-shot pairs (the pairs its embedding was made
from); the prompts are the captions of its next `--items` pairs (or `--items` prompts of
--prompts, a seeded sample stratified by category, the same for every user: evals/prompt_sets).
PPD draws one image per prompt with the user's embedding, the opponent one from the same x_T
(user k's chunk seed: seed + k):
  * base     the PPD run's frozen base (user branch off);
  * control  the PPD run with another user's embedding (the next user of the list);
  * profile_caption  the frozen base with the user's VLM profile text appended to every prompt
             (data/profile_caption.py; untrained caption augmentation);
  * run:W    another run: a Diffusion-DPO run with its one shared embedding; a run trained with
             data.profile_in_caption gets the user's profile text appended to every prompt (the
             caption-augmentation baseline).
The judge (evals/judge.py) compares each (PPD = A, opponent = B) in both orders. Per user

    win_u = #A / (#A + #B)       (inconsistent verdicts dropped, the paper's rule)

and the reported win rate is the mean of win_u over users, with a 95% bootstrap interval: over
users when each user has its own prompts (evals/stats.bootstrap_mean_ci, at the small-sample
level), over users and prompts at once when they share a --prompts set
(stats.two_way_bootstrap_ci); also the soft (debiased) mean, the consistency, the position bias and
the number of invalid answers (never counted as a verdict). A judge that knows the users' rewards
(--judge=synthetic) also gives the rate with gaps below the users' own threshold for a clear pair
(data.min_reward_gap) counted as ties. DIR/winrate.json, DIR/winrate.md and DIR/examples.png
(the first pairs with their verdicts). Images and verdicts are kept (DIR/images/...,
DIR/verdicts.jsonl in per-user blocks, evals/judge_log.py), so a killed run redoes only the user in
flight, and a rerun asks the judge again where its answer was invalid. DIR/manifest.json
(evals/manifest.py) records what decides the numbers (the runs' steps and config hashes, the
opponent, the judge, the users, prompts, items and seed): a rerun into DIR under any other is
refused, naming the changed fields. DIR, the runs and the prompt file may be URLs (gs://...):
every file goes through ppd_jax.storage.
"""
import dataclasses
import json
import sys

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import images as image_io
from ppd_jax import storage
from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_log
from ppd_jax.evals import manifest as manifest_lib
from ppd_jax.evals import plots
from ppd_jax.evals import prompt_sets
from ppd_jax.evals import score_files
from ppd_jax.evals import image_sets
from ppd_jax.evals import win_rates
from ppd_jax.users import prompts as prompts_lib


class WinrateError(ValueError):
  """A run, opponent or user setting that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class UserCase:
  user_id: int
  context: tuple                  # users/prompts.Pair x 4
  prompts: tuple                  # captions to generate
  shared: bool = False            # the prompts are a --prompts set every user shares


def _synthetic_cases(source, ids, items: int, fixed) -> list[UserCase]:
  out = []
  for u in ids:
    p = source.user_pairs(int(u))
    shots = source.fewshot
    context = judge_lib.context_from_pairs(p["winners"][:shots], p["losers"][:shots],
                                           p["captions"][:shots])
    later = fixed or p["captions"][shots:shots + items]
    out.append(UserCase(int(u), context, tuple(later), bool(fixed)))
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
    out.append(UserCase(int(u), context, tuple(later), bool(fixed)))
  return out


def user_cases(run, users: str, max_users: int, items: int, prompt_file=None,
               prompt_seed: int = 0) -> list[UserCase]:
  """The users to evaluate, each with its judge context and prompts (module docstring)."""
  if users not in ("seen", "unseen"):
    raise WinrateError(f"--users={users!r}: seen or unseen")
  src = run.source
  ids = src.unseen_user_ids if users == "unseen" else src.train_user_ids
  ids = list(ids[:max_users] if max_users else ids)
  if not ids:
    raise WinrateError(f"--users={users}: the run's data has no {users} users")
  fixed = ([p.text for p in prompt_sets.read(prompt_file, items, seed=prompt_seed)]
           if prompt_file else None)
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
      self.tag = f"run-{storage.path(workdir).name}-{self.run.step}"
    else:
      raise WinrateError(f"--against={spec!r}: base, control, profile_caption or "
                         "run:WORKDIR[@STEP]")

  def identity(self) -> dict:
    """What the opponent is, for the manifest: its spec, and another run's step and config."""
    out = {"spec": self.spec}
    if self.run is not self.ppd:
      out["run"] = manifest_lib.run_identity(self.run)
    if self.spec == "control":
      out["pairs"] = {str(a): b for a, b in self.other.items()}
    return out

  def images(self, case: UserCase, folder: str, seed: int) -> list[str]:
    prompts = [prompt_sets.Prompt(p) for p in case.prompts]
    chunk = len(prompts)                     # one chunk: the user's seed for every prompt
    if self.spec == "base":
      c = self.run.config.model
      zero = np.zeros((c.user_tokens, c.user_embed_dim), np.float32)
      return image_sets.generate_set(self.run, zero, 0.0, prompts, folder, seed, chunk, _quiet)
    if self.spec == "control":
      emb = self.run.source.user_embedding(self.other[case.user_id])
      return image_sets.generate_set(self.run, emb, 1.0, prompts, folder, seed, chunk, _quiet)
    d = self.run.config.data
    if self.spec == "profile_caption" or d.get("profile_in_caption", False):
      from ppd_jax.data import profile_caption
      profile = self.run.source.store.profile(case.user_id)
      prompts = [prompt_sets.Prompt(profile_caption.with_profile(p.text, profile))
                 for p in prompts]
      emb = np.zeros((self.run.config.model.user_tokens, self.run.config.model.user_embed_dim),
                     np.float32)
      return image_sets.generate_set(self.run, emb, 0.0, prompts, folder, seed, chunk, _quiet)
    if d.get("user_conditioning", True):
      emb = self.run.source.user_embedding(case.user_id)
    else:
      emb = self.run.source.user_embedding(self.run.source.train_user_ids[0])
    return image_sets.generate_set(self.run, emb, 1.0, prompts, folder, seed, chunk, _quiet)


def _quiet(message: str) -> None:
  del message


def describe_backend(backend) -> dict:
  return backend.describe() if hasattr(backend, "describe") else {"backend": backend.name}


def bind(out, ppd_run, opponent: Opponent, cases, backend, seed: int,
         prompt_source: dict | None = None) -> dict:
  """Checks and writes out/manifest.json (evals/manifest.py) before any work."""
  return manifest_lib.bind(out, {
      "ppd": manifest_lib.run_identity(ppd_run), "against": opponent.identity(),
      "users": [c.user_id for c in cases],
      "prompts": {str(c.user_id): list(c.prompts) for c in cases},
      "shared_prompts": bool(cases and cases[0].shared), "seed": seed,
      "judge": describe_backend(backend), "template": prompts_lib.TEMPLATE_VERSION,
  }, keyed={"prompt_source": prompt_source or {}}, command="ppd_jax.evals.winrate")


def _rows(case: UserCase, items, mine, theirs, verdicts) -> list[dict]:
  return [{"user_id": case.user_id, "item": k, "prompt": case.prompts[k], "ppd": a,
           "opponent": b, "verdict": j.verdict, "p_ab": j.p_ab, "p_ba": j.p_ba, "soft": j.soft,
           "bias": j.bias, "problems": list(j.problems), "reward_gap": j.reward_gap,
           "mass": list(j.mass)}
          for k, a, b, j in zip(items, mine, theirs, verdicts)]


def _ask(backend, case: UserCase, items, mine, theirs) -> list[dict]:
  questions = [judge_lib.Question(case.context, case.prompts[k], image_io.load_png(a),
                                  image_io.load_png(b), user_id=case.user_id)
               for k, a, b in zip(items, mine, theirs)]
  return _rows(case, items, mine, theirs, judge_lib.judge(backend, questions))


def reask_invalid(backend, cases, done: dict, path, log=print) -> int:
  """Asks again every question of a finished user whose answer was invalid (an HTTP error, an
  unreadable or cut-short reply): a failure is never final. Returns how many were asked."""
  asked = 0
  for case in cases:
    rows = done.get(case.user_id) or {}
    bad = sorted(k for k, r in rows.items() if r["verdict"] == "invalid")
    if not bad:
      continue
    fresh = _ask(backend, case, bad, [rows[k]["ppd"] for k in bad],
                 [rows[k]["opponent"] for k in bad])
    merged = {**rows, **{r["item"]: r for r in fresh}}
    judge_log.append_user(path, case.user_id, [merged[k] for k in sorted(merged)])
    done[case.user_id] = merged
    asked += len(bad)
  if asked:
    left = sum(r["verdict"] == "invalid" for c in cases for r in done.get(c.user_id, {}).values())
    log(f"winrate: asked the judge again for {asked} invalid answers; {left} still invalid")
  return asked


def run(ppd_run, opponent: Opponent, cases, backend, out: str, *, seed: int = 0, log=print,
        after_user=None, prompt_source: dict | None = None) -> dict:
  """Every user's images and verdicts into out; returns winrate.json's content."""
  bind(out, ppd_run, opponent, cases, backend, seed, prompt_source)
  out = storage.makedirs(out)
  path = out / "verdicts.jsonl"
  done = judge_log.read(path, key="item")
  log(f"winrate: PPD vs {opponent.spec}: {len(cases)} users, "
      f"{sum(c.user_id in done for c in cases)} done before")
  reask_invalid(backend, cases, done, path, log)
  todo = [c for c in cases if c.user_id not in done]
  position = {c.user_id: k for k, c in enumerate(cases)}
  for i, case in enumerate(todo):
    s = seed + position[case.user_id]
    where = lambda side: out / "images" / side / f"user{case.user_id}"
    mine = image_sets.generate_set(ppd_run, ppd_run.source.user_embedding(case.user_id), 1.0,
                               [prompt_sets.Prompt(p) for p in case.prompts], where("ppd"), s,
                               len(case.prompts), _quiet)
    theirs = opponent.images(case, where(opponent.tag), s)
    rows = _ask(backend, case, range(len(mine)), mine, theirs)
    judge_log.append_user(path, case.user_id, rows)
    done[case.user_id] = {r["item"]: r for r in rows}
    log(f"winrate: {i + 1}/{len(todo)} users")
    if after_user is not None:
      after_user(case.user_id)
  by_user = {c.user_id: [done[c.user_id][k] for k in sorted(done[c.user_id])] for c in cases}
  result = win_rates.summarise(by_user, seed, shared_items=bool(cases and cases[0].shared),
                     tie_gap=ppd_run.config.data.get("min_reward_gap"))
  result.update({"against": opponent.spec, "ppd_step": ppd_run.step,
                 "opponent": opponent.identity(), "seed": seed,
                 "judge": describe_backend(backend), "template": prompts_lib.TEMPLATE_VERSION})
  score_files.write_json_atomic(out / "winrate.json", result)
  storage.write_text(out / "winrate.md", win_rates.markdown(result))
  examples(done, cases, out / "examples.png")
  return result


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
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import flags
  from ppd_jax import checkpoint
  from ppd_jax import inference
  from ppd_jax.evals import judge_backends
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    storage.check_writable(f.out)     # a wrong bucket fails now, not after the first images
    workdir, _, step = f.run.partition("@")
    ppd = inference.load_trained(workdir, int(step) if step else None)
    cases = user_cases(ppd, f.users, f.max_users, f.items, f.prompts, f.prompt_seed)
    opponent = Opponent(f.against, ppd, cases)
    backend = judge_backends.from_flags(f, f.out, run=ppd)
    source = None
    if f.prompts:
      from ppd_jax.evals import prompt_sets as sets
      source = sets.describe(sets.read(f.prompts, f.items, seed=f.prompt_seed), f.prompts)
    result = run(ppd, opponent, cases, backend, f.out, seed=f.seed,
                 log=lambda m: print(m, flush=True), prompt_source=source)
  except (ValueError, OSError, KeyError, checkpoint.CheckpointError, storage.StorageError,
          judge_lib.JudgeAuthError) as e:
    sys.exit(f"ppd_jax.evals.winrate: {e}")
  print(win_rates.markdown(result))
  print(json.dumps({"win_rate": result["win_rate"], "ci95": result["ci95"],
                    "invalid": result["invalid"]}))
  if result["users_with_a_verdict"] == 0:
    sys.exit(f"ppd_jax.evals.winrate: no valid verdict ({result['invalid']} invalid answers of "
             f"{result['pooled']['n']}: see 'problems' in {f.out}/verdicts.jsonl); a rerun asks "
             "again")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ppd_jax.evals import judge_backends
  flags.DEFINE_string("run", None, "WORKDIR[@STEP] of the PPD run")
  flags.DEFINE_string("against", "base", "base, control, profile_caption or run:WORKDIR[@STEP]")
  flags.DEFINE_string("users", "unseen", "seen (training) or unseen (test) users")
  flags.DEFINE_integer("max_users", 0, "at most this many users (0: all)")
  flags.DEFINE_integer("items", 8, "prompts per user")
  flags.DEFINE_string("prompts", None, "a prompt file instead of the users' own captions "
                      "(--items of them: a seeded sample, stratified by category)")
  flags.DEFINE_integer("prompt_seed", 0, "seed of the --prompts sample")
  flags.DEFINE_integer("seed", 0, "x_T seed of the first user (user k: seed + k)")
  flags.DEFINE_string("out", None, "output folder")
  judge_backends.define_flags(synthetic=True)
  flags.adopt_module_key_flags(judge_backends)   # --help lists the judge's flags
  flags.mark_flags_as_required(["run", "out"])
  app.run(main)

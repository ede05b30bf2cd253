"""How often the judge agrees with real users (supplement B.3, the paper's 83%).

  python -m ppd_jax.evals.judge_agreement --pairs=SHARD_DIR|PARQUET_DIR|PAIRS.jsonl --out=DIR \
      [--split=test|validation|all] [--max_users=100] [--questions=4] [--judge=api|local ...]

For each user (of the chosen split of a Pick-a-Pic index; every user of a JSONL file): the context
is its first 4 pairs in the reader's order (the pairs its embedding is made from, users/shots.py),
and each of its next `--questions` pairs is a question, image 1 as A and image 2 as B. The judge
answers in both orders (evals/judge.py); a consistent verdict is right when it names the image the
user preferred:

    accuracy = #right / #consistent

with a 95% interval from a bootstrap over users (a user's questions share its context and taste,
so they are not independent; evals/stats.cluster_ratio_ci) and, beside it, Wilson's over
questions;

also the share dropped as inconsistent, the invalid count, the soft accuracy (mean debiased
probability of the user's image, over all valid questions) and the position bias.
DIR/judgements.jsonl keeps one row per question, appended as each user is judged, between a
user_start and a user_done row: a killed run resumes with the first user not closed. An invalid
answer (the judge could not answer) is never final: the next run into DIR asks those questions
again and appends the user's block anew (evals/judge_log.py). DIR/agreement.json holds the
summary and DIR/agreement.md its table. DIR may be a URL (gs://...): its files go through
ppd_jax.storage. DIR/manifest.json (evals/manifest.py) records the pairs, split, users,
questions and the judge's full description; a rerun under others is refused, naming the fields.
The command exits non-zero when no question got a valid verdict, and with one
line when the API refuses the key (evals/judge_api.py).
"""
import json
import sys
import time

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import metrics
from ppd_jax import storage
from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_log
from ppd_jax.evals import manifest as manifest_lib
from ppd_jax.evals import score_files
from ppd_jax.evals import stats
from ppd_jax.users import shots as shots_lib

SPLITS = {"train": 0, "validation": 1, "test": 2}


def users_of(pairs, split: str) -> list[int]:
  """The users to ask about: a Pick-a-Pic index's split, or everyone."""
  ids = [int(u) for u in pairs.users]
  if split == "all" or not hasattr(pairs, "index"):
    return ids
  if split not in SPLITS:
    raise ValueError(f"--split={split!r}: one of {', '.join(SPLITS)} or all")
  users = pairs.index.users
  wanted = set(users["user_id"][users["split"] == SPLITS[split]].tolist())
  return [u for u in ids if u in wanted]


def questions_for(pairs, user_id: int, shots: int, count: int) -> tuple[list, list]:
  """(questions, their pair ids) of one user; the user's label decides the truth (A = image 1)."""
  cands = pairs.candidates(user_id)
  context_ids, asked = cands[:shots], cands[shots:shots + count]
  if not asked:
    return [], []
  loaded = pairs.load(list(context_ids) + list(asked))
  context = tuple(loaded[p] for p in context_ids)
  if any(isinstance(p, shots_lib.UnreadablePair) for p in context):
    return [], []
  out, ids = [], []
  for p in asked:
    pair = loaded[p]
    if isinstance(pair, shots_lib.UnreadablePair):
      continue
    out.append((judge_lib.Question(context, pair.caption, pair.image_1, pair.image_2,
                                   user_id=user_id), "A" if pair.preferred == 1 else "B"))
    ids.append(int(p))
  return out, ids


def run(pairs, backend, out: str, *, split: str = "test", max_users: int = 0, questions: int = 4,
        shots: int = 4, log=print, after_user=None, pairs_source: dict | None = None) -> dict:
  """Judges every user's questions into out (module docstring); returns agreement.json.
  pairs_source: what the pairs were read from (manifest.data_identity), for the manifest."""
  users = [u for u in users_of(pairs, split) if len(pairs.candidates(u)) > shots]
  if max_users:
    users = users[:max_users]
  if not users:
    raise ValueError(f"no user ({split} split) has more than {shots} pairs: nothing to ask")
  judge = backend.describe() if hasattr(backend, "describe") else {"backend": backend.name}
  manifest_lib.bind(out, {"pairs": pairs_source or {}, "split": split, "users": users,
                          "questions_per_user": questions, "shots": shots, "judge": judge},
                    command="ppd_jax.evals.judge_agreement")
  out = storage.makedirs(out)
  path = out / "judgements.jsonl"
  done = judge_log.read(path)
  retry = judge_log.invalid({u: done[u] for u in users if u in done})
  todo = [u for u in users if u not in done or u in retry]
  log(f"judge agreement: {len(users)} users, {len(users) - len(todo) + len(retry)} judged "
      f"before" + (f"; {sum(map(len, retry.values()))} invalid answers of {len(retry)} users "
                   "asked again" if retry else ""))
  start = time.time()
  for i, u in enumerate(todo):
    qs, ids = questions_for(pairs, u, shots, questions)
    # A user judged before keeps its valid rows; only its invalid ones are asked again.
    kept = {k: r for k, r in done.get(u, {}).items() if r["verdict"] != "invalid"}
    asked = [(q, pid) for q, pid in zip(qs, ids) if pid not in kept]
    verdicts = judge_lib.judge(backend, [q for (q, _), _ in asked]) if asked else []
    new = {pid: {"user_id": u, "pair_id": pid, "truth": truth, "verdict": j.verdict,
                 "p_ab": j.p_ab, "p_ba": j.p_ba, "soft": j.soft, "bias": j.bias,
                 "problems": list(j.problems), "mass": list(j.mass)}
           for ((q, truth), pid), j in zip(asked, verdicts)}
    rows = [kept.get(pid) or new[pid] for pid in ids]
    judge_log.append_user(path, u, rows)
    done[u] = {r["pair_id"]: r for r in rows}
    rate = (i + 1) / max(time.time() - start, 1e-9)
    log(f"judge agreement: {i + 1}/{len(todo)} users, {rate:.2f} users/s, ETA "
        f"{metrics.format_duration((len(todo) - i - 1) / rate)}")
    if after_user is not None:
      after_user(u)
  rows = [r for u in users for r in done.get(u, {}).values()]
  summary = summarise(rows)
  summary.update({"split": split, "users": len(users), "questions_per_user": questions,
                  "judge": judge})
  score_files.write_json_atomic(out / "agreement.json", summary)
  storage.write_text(out / "agreement.md", table(summary))
  return summary


def table(summary: dict) -> str:
  """agreement.md: the headline numbers, the invalid count beside them."""
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lo, hi = summary["wilson95"]
  clo, chi = summary["ci95_users"]
  return ("| accuracy | 95% CI (users) | Wilson 95% (questions) | consistency | invalid | "
          "questions |\n|---|---|---|---|---|---|\n"
          f"| {fmt(summary['accuracy'])} | [{fmt(clo)}, {fmt(chi)}] | [{fmt(lo)}, {fmt(hi)}] | "
          f"{fmt(summary['consistency'])} | {summary['invalid']} | {summary['questions']} |\n")


def no_valid_verdict(summary: dict) -> str | None:
  """Why the run has nothing to report (every answer invalid), or None."""
  if summary["questions"] and summary["invalid"] < summary["questions"]:
    return None
  first = summary["problems"][0] if summary["problems"] else "no question asked"
  return (f"no valid verdict: {summary['invalid']} of {summary['questions']} answers invalid "
          f"(first: {first}); a rerun into the same --out asks them again")


def summarise(rows: list[dict], seed: int = 0) -> dict:
  """Counts, accuracy with its intervals, consistency, soft accuracy, bias. A user's questions
  share its context and its taste, so they are not independent: the interval reported is a
  bootstrap over users of right / decided (stats.cluster_ratio_ci); Wilson's, which treats every
  question as independent, is kept beside it."""
  counts = {v: sum(r["verdict"] == v for r in rows) for v in judge_lib.VERDICTS}
  decided = [r for r in rows if r["verdict"] in ("A", "B")]
  valid = [r for r in rows if r["verdict"] != "invalid"]
  right = sum(r["verdict"] == r["truth"] for r in decided)
  lo, hi = stats.wilson(right, len(decided))
  per_user: dict = {}
  for r in decided:
    hits = per_user.setdefault(r["user_id"], [0, 0])
    hits[0] += r["verdict"] == r["truth"]
    hits[1] += 1
  clustered = stats.cluster_ratio_ci([h[0] for h in per_user.values()],
                                     [h[1] for h in per_user.values()], seed=seed)
  soft = [r["soft"] if r["truth"] == "A" else 1 - r["soft"] for r in valid]
  return {"questions": len(rows), "counts": counts, "invalid": counts["invalid"], "right": right,
          "accuracy": right / len(decided) if decided else None, "wilson95": [lo, hi],
          "ci95_users": list(clustered),
          "consistency": len(decided) / len(valid) if valid else None,
          "dropped_inconsistent": counts["inconsistent"] / len(valid) if valid else None,
          "soft_accuracy": float(np.mean(soft)) if soft else None,
          "position_bias": float(np.mean([r["bias"] for r in valid])) if valid else None,
          "problems": [p for r in rows for p in r["problems"]][:10]}


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import flags
  from ppd_jax.evals import judge_backends
  from ppd_jax.users import embed
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    storage.check_writable(f.out)     # a wrong bucket fails now, not after the first users
    pairs = shots_lib.open_pairs(f.pairs, 4, split_params=embed._split_params())
    backend = judge_backends.from_flags(f, f.out)
    summary = run(pairs, backend, f.out, split=f.split, max_users=f.max_users,
                  questions=f.questions, log=lambda m: print(m, flush=True),
                  pairs_source=manifest_lib.data_identity(f.pairs))
  except (ValueError, OSError, storage.StorageError, judge_lib.JudgeAuthError) as e:
    sys.exit(f"ppd_jax.evals.judge_agreement: {e}")
  print(table(summary), end="")
  print(json.dumps({k: summary[k] for k in ("questions", "accuracy", "ci95_users", "wilson95",
                                             "consistency",
                                             "invalid", "position_bias")}))
  failed = no_valid_verdict(summary)
  if failed:
    sys.exit(f"ppd_jax.evals.judge_agreement: {failed}")


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ppd_jax.evals import judge_backends
  flags.DEFINE_string("pairs", None, "precompute folder, Pick-a-Pic parquet folder, or JSONL")
  flags.DEFINE_string("out", None, "output folder (judgements.jsonl, agreement.json)")
  flags.DEFINE_string("split", "test", "users of this split of a Pick-a-Pic index (or all)")
  flags.DEFINE_integer("max_users", 0, "at most this many users (0: all)")
  flags.DEFINE_integer("questions", 4, "pairs after the context asked per user")
  judge_backends.define_flags()
  flags.adopt_module_key_flags(judge_backends)   # --help lists the judge's flags
  flags.mark_flags_as_required(["pairs", "out"])
  app.run(main)

"""Win rates from verdict rows (evals/judge.py): per user, over users, with the interval that fits
how the items were drawn, invalid answers counted, and the rate with sub-threshold gaps as ties.

    win_u = #A / (#A + #B)       (inconsistent verdicts dropped, the paper's rule)

The reported rate is the mean of win_u over users. Its 95% interval is a bootstrap over users at
the small-sample level when each user has its own items (stats.bootstrap_mean_ci), and over users
and items at once when every user judged the same items (stats.two_way_bootstrap_ci). Shared by
the winrate command and the demo's evaluation (evals/personalization.py).
"""
import numpy as np

from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import stats

_OUTCOME = {"A": 1.0, "B": 0.0}


def tie_counted_win_rate(rows_by_user: dict, min_reward_gap: float) -> dict:
  """The win rate with sub-threshold reward gaps counted as ties. Per question

      score = 1/2                                 if |r_u(a) - r_u(b)| < min_reward_gap
            = 1, 0, 1/2 for verdict A, B, inconsistent   otherwise

  (invalid verdicts left out), averaged per user, then over users: win_rate. The users label
  only pairs of gap >= min_reward_gap, so a smaller one is a difference they would not call.
  rows_by_user: user -> [{"verdict", "reward_gap"}] (reward_gap = r_u(a) - r_u(b)).
  Returns win_rate, per_user and below_threshold (the share of valid questions under it)."""
  score = {"A": 1.0, "B": 0.0, "inconsistent": 0.5}
  per_user, below, valid = {}, 0, 0
  for u, rows in rows_by_user.items():
    s = []
    for r in rows:
      if r["verdict"] not in score:
        continue
      if r.get("reward_gap") is None:
        raise ValueError(f"tie_counted_win_rate: user {u}'s verdict has no reward_gap "
                         "(only a judge that knows the user's reward gives one)")
      tie = abs(r["reward_gap"]) < min_reward_gap
      below += tie
      s.append(0.5 if tie else score[r["verdict"]])
    valid += len(s)
    per_user[str(u)] = float(np.mean(s)) if s else None
  rates = [r for r in per_user.values() if r is not None]
  return {"win_rate": float(np.mean(rates)) if rates else None, "per_user": per_user,
          "below_threshold": below / valid if valid else None}


def summarise(by_user: dict, seed: int = 0, shared_items: bool = False,
              tie_gap: float | None = None) -> dict:
  """Per-user win rates, their mean with a bootstrap CI (over users and, when every user judges
  the same items, over items too), invalid counts, and pooled counts."""
  per_user = {}
  for u, rows in by_user.items():
    a = sum(r["verdict"] == "A" for r in rows)
    b = sum(r["verdict"] == "B" for r in rows)
    valid = [r for r in rows if r["verdict"] != "invalid"]
    per_user[u] = {"wins": a, "losses": b, "items": len(rows),
                   "invalid": len(rows) - len(valid),
                   "win_rate": a / (a + b) if a + b else None,
                   "soft": float(np.mean([r["soft"] for r in valid])) if valid else None}
  rates = [v["win_rate"] for v in per_user.values() if v["win_rate"] is not None]
  softs = [v["soft"] for v in per_user.values() if v["soft"] is not None]
  rows = [r for rs in by_user.values() for r in rs]
  pooled = judge_lib.summarise([judge_lib.Judgement(r["verdict"], r["p_ab"], r["p_ba"],
                                                    r["soft"], r["bias"]) for r in rows])
  if shared_items and by_user:
    items = max(len(rs) for rs in by_user.values())
    outcomes = np.full((len(by_user), items), np.nan)
    for i, rs in enumerate(by_user.values()):
      for k, r in enumerate(rs):
        outcomes[i, k] = _OUTCOME.get(r["verdict"], np.nan)
    # Plain percentiles: resampling items counts the verdicts' own noise a second time, which
    # already keeps this interval at or above its level (tests/test_stats.py's simulations).
    ci = stats.two_way_bootstrap_ci(outcomes, seed=seed, expanded=False)
    method = "two-way bootstrap over users and the shared items"
  else:
    ci = stats.bootstrap_mean_ci(rates, seed=seed)
    method = "bootstrap over users, small-sample (expanded percentile) level"
  out = {"users": len(per_user), "users_with_a_verdict": len(rates),
         "win_rate": float(np.mean(rates)) if rates else None, "ci95": list(ci),
         "ci_method": method,
         "soft_win_rate": float(np.mean(softs)) if softs else None,
         "soft_ci95": list(stats.bootstrap_mean_ci(softs, seed=seed)),
         "invalid": sum(v["invalid"] for v in per_user.values()),
         "pooled": pooled, "per_user": {str(u): v for u, v in per_user.items()}}
  answered = [r for r in rows if r["verdict"] != "invalid"]
  if tie_gap is not None and answered and all(r.get("reward_gap") is not None for r in answered):
    t = tie_counted_win_rate(by_user, tie_gap)
    rates = [v for v in t["per_user"].values() if v is not None]
    out["tie_counted"] = {"gap": tie_gap, "win_rate": t["win_rate"],
                          "ci95": list(stats.bootstrap_mean_ci(rates, seed=seed)),
                          "below_threshold": t["below_threshold"]}
  return out


def markdown(r: dict) -> str:
  fmt = lambda x: "-" if x is None else f"{x:.3f}"
  lo, hi = r["ci95"]
  tie = r.get("tie_counted")
  head = "| PPD vs {} | win rate | 95% CI | soft | consistency | position bias | invalid | users |"
  cells = (f"| | {fmt(r['win_rate'])} | [{fmt(lo)}, {fmt(hi)}] | {fmt(r['soft_win_rate'])} | "
           f"{fmt(r['pooled']['consistency'])} | {fmt(r['pooled']['position_bias'])} | "
           f"{r['invalid']} of {r['pooled']['n']} | {r['users_with_a_verdict']} of {r['users']} |")
  if tie:
    head += " sub-threshold gaps as ties |"
    cells += (f" {fmt(tie['win_rate'])} ({tie['below_threshold']:.0%} of the pairs below "
              f"{tie['gap']}) |")
  return (head.format(r["against"]) + "\n" + "| --- " * (head.count("|") - 1) + "|\n"
          + cells + f"\n\n95% CI: {r['ci_method']}\n")

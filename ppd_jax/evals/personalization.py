"""The paper's personalisation protocol (Section 5.2) on the demo's synthetic users.

Every model draws the same items (a prompt and a starting noise x_T). For user u, a comparison
of model a with model b asks the judge, for each item, which of a's and b's images u prefers,
showing u's 4 few-shot pairs as the context, in both orders (evals/judge.py). The judge is the
synthetic one (evals/judge_synthetic.py): u's hidden reward answering as a VLM would. Per user

    win_u(a vs b) = #A / (#A + #B)             (inconsistent verdicts dropped, the paper's rule)

averaged over users, with a 95% bootstrap interval over users and the shared items
(evals/win_rates.summarise, the protocol `python -m ppd_jax.evals.winrate` runs; users only for the
control, whose image sets differ per user). Beside each rate, `tie_counted`: the same with
every question whose reward gap is below the users' own threshold for a clear pair
(|r_u(a) - r_u(b)| < data.min_reward_gap) counted as a tie
(evals/win_rates.tie_counted_win_rate). The judge's
answers are sampled, so a rate on near-equal images is a coin toss that only looks like a
preference; the tie-counted rate shows how much of a rate rests on differences the users
themselves would not label. Reported, for unseen users unless said:
  unseen_user_win_rate   PPD with u's few-shot embedding vs the frozen base
  train_user_win_rate    the same for training users
  dpo_baseline_win_rate  Diffusion-DPO (one embedding for all: no user) vs the base
  ppd_vs_dpo_win_rate    PPD head to head with Diffusion-DPO
  control_win_rate       PPD with ANOTHER unseen user's embedding vs the base, judged for u
                         (u's verdicts pooled over every other unseen user's images)
  groups                 the first three over the majority and the minority users (w_u . d > 0
                         or < 0, demo_world/synthetic_users.py), where the population has one
and interpolation: for pairs (a, b) of unseen users, the embedding (1 - alpha) e_a + alpha e_b with
alpha in 0, 0.25, ..., 1, and the mean rewards r_a and r_b of its samples at each alpha. Pairs are
users of different tastes (each user a, in id order, with the remaining user whose hidden weights
are least like a's, short of exactly opposite, which would only show a symmetric picture), so that
"from one user's rewards to the other's" is a visible move.
"""
import json
import time

import numpy as np

from ppd_jax import storage
from ppd_jax.demo_world import synthetic
from ppd_jax.diffusion import generation
from ppd_jax.evals import judge as judge_lib
from ppd_jax.evals import judge_synthetic
from ppd_jax.evals import plots
from ppd_jax.evals import win_rates
from ppd_jax.rewards import hidden

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
HEAD_TO_HEAD = ("unseen_user_win_rate", "dpo_baseline_win_rate", "ppd_vs_dpo_win_rate")
RESULT_KEYS = ("unseen_user_win_rate", "train_user_win_rate", "dpo_baseline_win_rate",
               "ppd_vs_dpo_win_rate", "control_win_rate", "ci95", "tie_counted", "groups",
               "judge", "interpolation", "per_user", "counts", "seconds")


def _items(seed: int, num_items: int, model_cfg):
  """The shared evaluation items: caption ids (cycling through a shuffled caption list) and x_T."""
  captions = np.random.default_rng(seed).permutation(len(synthetic.captions_list()))
  caption_ids = captions[np.arange(num_items) % len(captions)]
  return caption_ids, generation.initial_noise(seed, num_items, model_cfg)


class _Sampler:
  """Samples a run for (user embeddings x items), with the run's own sampler settings."""

  def __init__(self, run, caption_ids, noise, log):
    self.run, self.noise, self.log = run, noise, log
    self.text = run.source.encode_captions([synthetic.captions_list()[c] for c in caption_ids])
    self.null = run.source.encode_captions([""])

  def __call__(self, embeddings: np.ndarray | None) -> np.ndarray:
    """embeddings [U, T, D] (or None: the base) -> images [U, items, S, S, C]."""
    c, k = self.run.config, len(self.noise)
    u = 1 if embeddings is None else len(embeddings)
    user = None if embeddings is None else np.repeat(embeddings, k, axis=0)
    tile = lambda a: np.tile(a, (u,) + (1,) * (a.ndim - 1))
    images = generation.sample_images(
        self.run.model, self.run.schedule, self.run.params,
        {k: tile(v) for k, v in self.text.items()}, self.null, tile(self.noise), user,
        guidance_scale=c.sample.guidance_scale, num_steps=c.sample.num_steps, eta=c.sample.eta,
        clip_sample=c.sample.clip_sample, sampler=c.sample.get("sampler", "ddim"),
        decode=self.run.source.backbone.to_images, progress=self.log)
    return images.reshape((u, k) + images.shape[1:])


def evaluate(ppd_run, baseline_run, out_dir: str, eval_config=None, log=print,
             user_reward=None) -> dict:
  """Runs the protocol; writes out_dir/results.json, win_rates.png, samples.png; returns results.

  eval_config: a `config.eval` section; default: the one the PPD run was trained with.
  user_reward: user id -> the Reward (rewards/base.py) that plays that user; default: the
    demo's hidden rewards (rewards/hidden.py). Each item's image is scored under its prompt.
  """
  start = time.perf_counter()
  source = ppd_run.source
  e = eval_config or ppd_run.config.eval
  unseen = source.unseen_user_ids[:e.unseen_users or None].tolist()
  train = source.train_user_ids[:e.train_users].tolist()
  if len(unseen) < 2:
    raise ValueError(f"config.eval.unseen_users / data.num_unseen_users: the control needs at "
                     f"least 2 unseen users, got {len(unseen)}")
  pairs = min(e.interpolation_pairs, len(unseen) // 2)
  caption_ids, noise = _items(e.seed, e.num_items, ppd_run.config.model)
  prompts = [synthetic.captions_list()[c] for c in caption_ids]
  sample = _Sampler(ppd_run, caption_ids, noise, log)

  log(f"evaluating: {len(unseen)} unseen + {len(train)} training users x {e.num_items} items")
  base = sample(None)[0]                                          # [items, S, S, C]
  ppd = dict(zip(unseen + train, sample(np.stack([source.user_embedding(u)
                                                  for u in unseen + train]))))
  baseline = _Sampler(baseline_run, caption_ids, noise, log)(
      baseline_run.source.user_embedding(0)[None])[0]

  rewards = _per_user(user_reward or (lambda u: hidden.HiddenPropertyReward(source, u)))
  judge = judge_synthetic.SyntheticJudge(rewards, e.judge_temperature, e.judge_position_bias,
                                         seed=e.seed)
  compare = _Comparer(judge, source, prompts)
  min_gap = ppd_run.config.data.min_reward_gap
  others = {u: [o for o in unseen if o != u] for u in unseen}
  summaries = {
      "unseen_user_win_rate": compare(unseen, lambda u: [ppd[u]], lambda u: [base]),
      "train_user_win_rate": compare(train, lambda u: [ppd[u]], lambda u: [base]),
      "dpo_baseline_win_rate": compare(unseen, lambda u: [baseline], lambda u: [base]),
      "ppd_vs_dpo_win_rate": compare(unseen, lambda u: [ppd[u]], lambda u: [baseline]),
      "control_win_rate": compare(unseen, lambda u: [ppd[o] for o in others[u]],
                                  lambda u: [base] * len(others[u])),
  }
  log("judged: " + ", ".join(f"{k} {v['win_rate']:.3f}" for k, v in summaries.items()))
  groups = {}
  for u in unseen:
    if source.user_group(u) is not None:
      groups.setdefault(source.user_group(u), []).append(u)

  interpolation = _interpolate(sample, source, unseen, pairs, ppd, rewards, prompts)
  ties = {k: win_rates.tie_counted_win_rate(v["rows"], min_gap) for k, v in summaries.items()}
  results = {
      **{k: _round(v["win_rate"]) for k, v in summaries.items()},
      "ci95": {k: [_round(x) for x in v["ci95"]] for k, v in summaries.items()},
      "tie_counted": {k: {"win_rate": _round(t["win_rate"]), "min_reward_gap": min_gap,
                          "below_threshold": _round(t["below_threshold"]),
                          "per_user": {u: _round(r) for u, r in t["per_user"].items()}}
                      for k, t in ties.items()},
      "groups": {g: {"users": len(ids),
                     **{k: _round(_mean_of(summaries[k], ids)) for k in HEAD_TO_HEAD},
                     "tie_counted": {k: _round(np.mean([ties[k]["per_user"][str(u)] for u in ids]))
                                     for k in HEAD_TO_HEAD}}
                 for g, ids in sorted(groups.items())},
      "judge": {**judge.describe(), **{k: _consistency(v) for k, v in summaries.items()}},
      "interpolation": interpolation,
      "per_user": {k: {u: _round(r["win_rate"]) for u, r in v["per_user"].items()}
                   for k, v in summaries.items()},
      "counts": {"unseen_users": len(unseen), "train_users": len(train), "items": e.num_items,
                 "interpolation_pairs": pairs, "ppd_step": ppd_run.step,
                 "baseline_step": baseline_run.step},
      "seconds": round(time.perf_counter() - start, 1),
  }
  results["per_user"]["group"] = {str(u): source.user_group(u) for u in unseen}
  out = storage.makedirs(out_dir)
  _write_json(results, out / "results.json")
  plots.win_rate_chart(results, out / "win_rates.png")
  rows = [("base", base), ("DPO baseline", baseline)]
  rows += [(f"unseen user {u}", ppd[u]) for u in unseen[:4]]
  rows += [(f"train user {u}", ppd[u]) for u in train[:2]]
  plots.sample_grid(rows, prompts, out / "samples.png")
  return results


class _Comparer:
  """compare(users, a_of, b_of): user u judges a_of(u)[k][i] against b_of(u)[k][i] for every
  image set k and item i; returns evals/win_rates.summarise of the verdicts."""

  def __init__(self, judge, source, prompts):
    self.judge, self.prompts = judge, prompts
    self.context = lambda u: judge_lib.context_from_pairs(**source.fewshot_pairs(u))

  def __call__(self, users, a_of, b_of) -> dict:
    questions, owner = [], []
    for u in users:
      context = self.context(u)
      for a_set, b_set in zip(a_of(u), b_of(u)):
        questions += [judge_lib.Question(context, p, a, b, user_id=u)
                      for p, a, b in zip(self.prompts, a_set, b_set)]
        owner += [u] * len(self.prompts)
    rows = {u: [] for u in users}
    for u, j in zip(owner, judge_lib.judge(self.judge, questions)):
      rows[u].append({"verdict": j.verdict, "p_ab": j.p_ab, "p_ba": j.p_ba, "soft": j.soft,
                      "bias": j.bias, "reward_gap": j.reward_gap})
    # One image set per user: every user judged the same items, so the interval resamples items
    # too (the control's sets pair each user with every other user's images: users only).
    shared = all(len(r) == len(self.prompts) for r in rows.values())
    return {**win_rates.summarise(rows, shared_items=shared), "rows": rows}


def _per_user(user_reward):
  """user id -> its Reward object, made once."""
  made = {}

  def reward_for(u):
    if u not in made:
      made[u] = user_reward(u)
    return made[u]
  return reward_for


def _mean_of(summary: dict, users) -> float | None:
  rates = [summary["per_user"][str(u)]["win_rate"] for u in users]
  rates = [r for r in rates if r is not None]
  return float(np.mean(rates)) if rates else None


def _consistency(summary: dict) -> dict:
  pooled = summary["pooled"]
  return {"consistency": _round(pooled["consistency"]), "counts": pooled["counts"]}


def opposed_pairs(user_ids, weights: np.ndarray, pairs: int) -> list[tuple[int, int]]:
  """Greedy: each still-unpaired user in id order with the unpaired user of least cos(w_a, w_b)
  above -0.99 (exact opposites only if nothing else is left)."""
  left = [int(u) for u in user_ids]
  out = []
  while len(out) < pairs and len(left) >= 2:
    a = left.pop(0)
    cos = np.array([float(weights[a] @ weights[b]) for b in left])
    out.append((a, left.pop(int(np.argmin(np.where(cos > -0.99, cos, np.inf))
                                if (cos > -0.99).any() else np.argmin(cos)))))
  return out


def _interpolate(sample, source, unseen, pairs, ppd, rewards, prompts) -> dict:
  """Mean r_a and r_b at each alpha over `pairs` pairs (a, b) of unseen users."""
  reward = lambda u, images: rewards(u).score(images, prompts)
  chosen = opposed_pairs(unseen, source.user_weights, pairs)
  a_ids, b_ids = [a for a, _ in chosen], [b for _, b in chosen]
  mixes = [(1 - al) * source.user_embedding(a) + al * source.user_embedding(b)
           for a, b in zip(a_ids, b_ids) for al in ALPHAS[1:-1]]
  middle = sample(np.stack(mixes)).reshape((pairs, len(ALPHAS) - 2) + ppd[a_ids[0]].shape)
  r_a, r_b = np.zeros(len(ALPHAS)), np.zeros(len(ALPHAS))
  for p, (a, b) in enumerate(zip(a_ids, b_ids)):
    images = [ppd[a]] + list(middle[p]) + [ppd[b]]
    r_a += [reward(a, x).mean() for x in images]
    r_b += [reward(b, x).mean() for x in images]
  r_a, r_b = r_a / pairs, r_b / pairs
  return {"alphas": list(ALPHAS), "reward_user_a": r_a.round(4).tolist(),
          "reward_user_b": r_b.round(4).tolist(),
          "monotone": bool((np.diff(r_a) <= 0).all() and (np.diff(r_b) >= 0).all()),
          "pairs": [[a, b] for a, b in zip(a_ids, b_ids)]}


def _round(x):
  return None if x is None else round(float(x), 4)


def _write_json(obj, path) -> None:
  storage.write_text(path, json.dumps(obj, indent=2))     # atomic locally


def format_table(results: dict) -> str:
  """The results as a small text table for the console."""
  fmt = lambda v: "   -" if v is None else f"{v:.3f}"
  ci = results.get("ci95", {})
  rows = [("PPD vs base, unseen users (4-pair embedding)", "unseen_user_win_rate"),
          ("PPD vs base, training users", "train_user_win_rate"),
          ("Diffusion-DPO (no user) vs base", "dpo_baseline_win_rate"),
          ("PPD vs Diffusion-DPO", "ppd_vs_dpo_win_rate"),
          ("control: another user's embedding vs base", "control_win_rate")]
  ties = results.get("tie_counted", {})
  lines = ["win rates judged by each user's hidden reward (synthetic judge, both orders; "
           "tie_counted: gaps below data.min_reward_gap as ties)"]
  for name, key in rows:
    lo, hi = ci.get(key, (None, None))
    interval = f"  [{fmt(lo)}, {fmt(hi)}]" if lo is not None else ""
    below = ties.get(key, {}).get("below_threshold")
    tie = (f"  tie_counted {fmt(ties[key]['win_rate'])}"
           + ("" if below is None else f" ({below:.0%} of gaps below it)") if key in ties else "")
    lines.append(f"  {name:<44s} {fmt(results[key])}{interval}{tie}")
  for group, g in results.get("groups", {}).items():
    lines.append(f"  {group} ({g['users']} unseen users): PPD vs base {fmt(g[HEAD_TO_HEAD[0]])}, "
                 f"DPO vs base {fmt(g[HEAD_TO_HEAD[1]])}, PPD vs DPO {fmt(g[HEAD_TO_HEAD[2]])}")
  it = results["interpolation"]
  lines.append("interpolation a -> b (alpha: mean r_a, mean r_b)"
               + ("" if it["monotone"] else "  [NOT monotone]"))
  lines += [f"  {al:.2f}: {ra:+.3f} {rb:+.3f}"
            for al, ra, rb in zip(it["alphas"], it["reward_user_a"], it["reward_user_b"])]
  return "\n".join(lines)

"""The paper's personalisation protocol on synthetic users: win rates judged by hidden rewards.

For user u, item i (a prompt and a starting noise x_T shared by every model) and two images a, b:

    win_u(a vs b) = mean_i ( 1[r_u(a_i) > r_u(b_i)] + 0.5 * 1[r_u(a_i) = r_u(b_i)] )

reported as means over users of:
  unseen_user_win_rate   PPD with u's few-shot embedding vs the frozen base, u unseen in training
  train_user_win_rate    the same for training users
  dpo_baseline_win_rate  Diffusion-DPO without user conditioning vs the base, under unseen rewards
  control_win_rate       PPD with ANOTHER unseen user's embedding vs the base, under u's reward
                         (averaged over every other evaluated unseen user, so it is precise)
and interpolation: for pairs (a, b) of unseen users, the embedding (1 - alpha) e_a + alpha e_b with
alpha in 0, 0.25, ..., 1, and the mean rewards r_a and r_b of its samples at each alpha. Pairs are
users of different tastes (each user a, in id order, with the remaining user whose hidden weights
are least like a's, short of exactly opposite: demo_world/synthetic_users.py makes users in
opposed couples, and mixing a couple would only show a symmetric picture), so that "from one user's
rewards to the other's" is a visible move.
"""
import json
import os
import time

import numpy as np

from ppd_jax.demo_world import synthetic
from ppd_jax.diffusion import generation
from ppd_jax.evals import plots
from ppd_jax.evals.rewards import hidden

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RESULT_KEYS = ("unseen_user_win_rate", "train_user_win_rate", "dpo_baseline_win_rate",
               "control_win_rate", "interpolation", "per_user", "counts", "seconds")


def win_rate(reward_a: np.ndarray, reward_b: np.ndarray) -> float:
  """Fraction of items where a beats b (ties count half)."""
  return float(np.mean((reward_a > reward_b) + 0.5 * (reward_a == reward_b)))


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
  user_reward: user id -> the Reward (evals/rewards/base.py) that plays that user; default: the
    demo's hidden rewards (evals/rewards/hidden.py). Each item's image is scored under its prompt.
  """
  start = time.perf_counter()
  source = ppd_run.source
  e = eval_config or ppd_run.config.eval
  unseen = source.unseen_user_ids[:e.unseen_users or None]
  train = source.train_user_ids[:e.train_users]
  if len(unseen) < 2:
    raise ValueError(f"config.eval.unseen_users / data.num_unseen_users: the control needs at "
                     f"least 2 unseen users, got {len(unseen)}")
  pairs = min(e.interpolation_pairs, len(unseen) // 2)
  caption_ids, noise = _items(e.seed, e.num_items, ppd_run.config.model)
  sample = _Sampler(ppd_run, caption_ids, noise, log)

  log(f"evaluating: {len(unseen)} unseen + {len(train)} training users x {e.num_items} items")
  base = sample(None)[0]                                          # [items, S, S, C]
  users = np.concatenate([unseen, train])
  ppd = dict(zip(users.tolist(), sample(np.stack([source.user_embedding(int(u))
                                                  for u in users]))))
  baseline = _Sampler(baseline_run, caption_ids, noise, log)(
      baseline_run.source.user_embedding(0)[None])[0]

  reward = _scorer(user_reward or (lambda u: hidden.HiddenPropertyReward(source, u)),
                   [synthetic.captions_list()[c] for c in caption_ids])
  per_unseen = {u: win_rate(reward(u, ppd[u]), reward(u, base)) for u in unseen.tolist()}
  per_train = {u: win_rate(reward(u, ppd[u]), reward(u, base)) for u in train.tolist()}
  per_baseline = {u: win_rate(reward(u, baseline), reward(u, base)) for u in unseen.tolist()}
  per_control = {u: float(np.mean([win_rate(reward(u, ppd[o]), reward(u, base))
                                   for o in unseen.tolist() if o != u]))
                 for u in unseen.tolist()}

  interpolation = _interpolate(sample, source, unseen, pairs, ppd, reward)
  results = {
      "unseen_user_win_rate": _mean(per_unseen),
      "train_user_win_rate": _mean(per_train),
      "dpo_baseline_win_rate": _mean(per_baseline),
      "control_win_rate": _mean(per_control),
      "interpolation": interpolation,
      "per_user": {"unseen": _keyed(per_unseen), "train": _keyed(per_train),
                   "dpo_baseline": _keyed(per_baseline), "control": _keyed(per_control)},
      "counts": {"unseen_users": len(unseen), "train_users": len(train), "items": e.num_items,
                 "interpolation_pairs": pairs, "ppd_step": ppd_run.step,
                 "baseline_step": baseline_run.step},
      "seconds": round(time.perf_counter() - start, 1),
  }
  os.makedirs(out_dir, exist_ok=True)
  _write_json(results, os.path.join(out_dir, "results.json"))
  plots.win_rate_chart(results, os.path.join(out_dir, "win_rates.png"))
  rows = [("base", base), ("DPO baseline", baseline)]
  rows += [(f"unseen user {u}", ppd[u]) for u in unseen.tolist()[:4]]
  rows += [(f"train user {u}", ppd[u]) for u in train.tolist()[:2]]
  plots.sample_grid(rows, [synthetic.captions_list()[c] for c in caption_ids],
                    os.path.join(out_dir, "samples.png"))
  return results


def _scorer(user_reward, prompts):
  """(user, images [items, ...]) -> [items] rewards, one Reward object per user."""
  rewards = {}

  def score(u, images):
    if u not in rewards:
      rewards[u] = user_reward(u)
    return rewards[u].score(images, prompts)
  return score


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


def _interpolate(sample, source, unseen, pairs, ppd, reward) -> dict:
  """Mean r_a and r_b at each alpha over `pairs` pairs (a, b) of unseen users."""
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


def _mean(per_user: dict) -> float:
  return round(float(np.mean(list(per_user.values()))), 4)


def _keyed(per_user: dict) -> dict:
  return {str(u): round(v, 4) for u, v in per_user.items()}


def _write_json(obj, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def format_table(results: dict) -> str:
  """The results as a small text table for the console."""
  rows = [("PPD, unseen users (4-pair embedding)", results["unseen_user_win_rate"]),
          ("PPD, training users", results["train_user_win_rate"]),
          ("Diffusion-DPO baseline (no user)", results["dpo_baseline_win_rate"]),
          ("control: another user's embedding", results["control_win_rate"])]
  lines = ["win rate vs the frozen base, judged by each user's hidden reward",
           *(f"  {name:<40s} {value:.3f}" for name, value in rows)]
  it = results["interpolation"]
  lines.append("interpolation a -> b (alpha: mean r_a, mean r_b)"
               + ("" if it["monotone"] else "  [NOT monotone]"))
  lines += [f"  {al:.2f}: {ra:+.3f} {rb:+.3f}"
            for al, ra, rb in zip(it["alphas"], it["reward_user_a"], it["reward_user_b"])]
  return "\n".join(lines)

"""A synthetic judge: a demo user's hidden reward answering the judge's question like a VLM would.

Each order's answer is drawn, as a VLM's sampled reply is, from

    P(first preferred) = sigmoid((r_u(first) - r_u(second)) / T + position_bias_logit)

and read as 1 or 0 (the paper reads the sampled text, not the probabilities). So a small reward
gap gets inconsistent verdicts across the two orders, which evals/judge.combine drops, as for a
VLM; a gap well above T gets the same answer in both. r_u is user u's hidden reward
(rewards/hidden.py, or any reward of the registry's interface given per user), so the demo
runs the same judge protocol (evals/judge.py: both orders, the consistency rule, the debiased
score) end to end. `position_bias_logit` > 0 favours the first-shown image, as real VLM judges
do, so the debiasing is exercised too. It never reads the context pairs: it knows the user's
taste, which a VLM has to infer from them.

Temperature. The demo users label without noise but only clear pairs, those of reward gap at
least data.min_reward_gap (demo_world/synthetic_users.py). The judge is given the same notion of
"clear": a gap equal to the users' threshold is answered right with probability
ACCURACY_AT_THRESHOLD = 0.9 per order,

    T = min_reward_gap / logit(0.9) = min_reward_gap / ln 9,

so at the threshold both orders agree on the right image 81% of the time and are inconsistent
18%, while a gap of half the threshold is inconsistent about 40% of the time. (Giving the users
Bradley-Terry label noise instead would change the training pairs the demo's recipe was chosen
on; the threshold keeps them and still ties the judge's noise to what the users call clear.)

Draws are seeded per (seed, user, caption, the two images' bytes), so a rerun, or the same
question asked again in another comparison, gets the same verdict.
"""
import hashlib
import math

import numpy as np

from ppd_jax.evals import judge as judge_lib

ACCURACY_AT_THRESHOLD = 0.9
SOURCES = ("synthetic", "synthetic_rewards")     # the demo's users, with a known reward


def default_temperature(min_reward_gap: float) -> float:
  """T such that a gap of min_reward_gap is answered right with P = ACCURACY_AT_THRESHOLD:
  sigmoid(gap / T) = p  <=>  T = gap / logit(p)."""
  p = ACCURACY_AT_THRESHOLD
  return float(min_reward_gap) / math.log(p / (1.0 - p))


def uniform_draw(seed: int, user, caption: str, first, second) -> float:
  """A uniform number in [0, 1) fixed by the question and the order its images are shown in."""
  h = hashlib.blake2b(digest_size=8)
  for part in (str(seed), str(user), caption):
    h.update(part.encode() + b"\0")
  for image in (first, second):
    a = np.ascontiguousarray(np.asarray(image, np.float32))
    h.update(str(a.shape).encode() + a.tobytes())
  return int.from_bytes(h.digest(), "little") / 2.0 ** 64


class SyntheticJudge:
  """judge.Backend; reward_for(user_id) -> an object with score(images, prompts) -> [N].

  sample=False answers with the probability itself (no draw): the expected verdict of a judge
  whose answers were probabilities, for tests and for a noise-free reading.
  """

  def __init__(self, reward_for, temperature: float = 0.1, position_bias_logit: float = 0.0,
               seed: int = 0, sample: bool = True):
    if not temperature > 0:
      raise ValueError(f"synthetic judge: temperature must be > 0, got {temperature}")
    self.reward_for, self.temperature = reward_for, float(temperature)
    self.position_bias_logit, self.seed, self.sample = position_bias_logit, seed, sample
    self.name = "synthetic"

  def describe(self) -> dict:
    return {"backend": "synthetic", "temperature": self.temperature,
            "position_bias_logit": self.position_bias_logit, "seed": self.seed,
            "verdict_from": "a sampled answer per order" if self.sample else "the probability"}

  def answer(self, requests) -> list[judge_lib.Answer]:
    """Each user's requests scored in one reward call (the demo asks tens of thousands)."""
    out: list = [None] * len(requests)
    by_user: dict = {}
    for i, r in enumerate(requests):
      if r.question.user_id is None:
        out[i] = judge_lib.Answer(None, problem="the synthetic judge needs the question's user_id")
      else:
        by_user.setdefault(r.question.user_id, []).append(i)
    for user, rows in by_user.items():
      images = np.stack([np.asarray(x, np.float32) for i in rows
                         for x in (requests[i].first, requests[i].second)])
      captions = [requests[i].question.caption for i in rows for _ in range(2)]
      s = np.asarray(self.reward_for(user).score(images, captions), np.float64).reshape(-1, 2)
      gap = s[:, 0] - s[:, 1]
      z = gap / self.temperature + self.position_bias_logit
      p = 0.5 * (1.0 + np.tanh(z / 2.0))                # sigmoid(z), without overflow
      for i, p_i, g in zip(rows, p, gap):
        r = requests[i]
        if self.sample:      # the answer "1" with probability p_i
          u = uniform_draw(self.seed, user, r.question.caption, r.first, r.second)
          p_i = 1.0 if u < p_i else 0.0
        text = ("1" if p_i > 0.5 else "2") if self.sample else ""
        out[i] = judge_lib.Answer(float(p_i), text=text, mass=1.0, reward_gap=float(g))
    return out


def for_run(run, temperature: float | None = None, seed: int = 0) -> SyntheticJudge:
  """The synthetic judge for a trained run on the demo's users (inference.TrainedRun): its
  users' hidden rewards, T from the run's data.min_reward_gap unless `temperature` is given."""
  from ppd_jax.rewards import hidden
  source = getattr(run, "source", None)
  kind = run.config.data.get("source") if getattr(run, "config", None) is not None else None
  if kind not in SOURCES or not hasattr(source, "user_reward"):
    raise ValueError(f"--judge=synthetic needs a run on the demo's synthetic users "
                     f"(data.source one of {SOURCES}), this run's data.source is {kind!r}")
  if temperature is None:
    temperature = default_temperature(run.config.data.min_reward_gap)
  made: dict = {}

  def reward_for(u):
    if u not in made:
      made[u] = hidden.HiddenPropertyReward(source, u)
    return made[u]
  return SyntheticJudge(reward_for, temperature, seed=seed)

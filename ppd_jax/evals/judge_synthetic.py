"""A synthetic judge: a demo user's hidden reward answering the judge's question like a VLM would.

    P(first preferred) = sigmoid((r_u(first) - r_u(second)) / temperature + position_bias_logit)

r_u is user u's hidden reward (evals/rewards/hidden.py, or any reward of the registry's interface
given per user), so the demo runs the same judge protocol (evals/judge.py: both orders, the
consistency rule, the debiased score) end to end. `position_bias_logit` > 0 makes it favour the
first-shown image, as real VLM judges do, so the debiasing is exercised too. It never reads the
context pairs: it knows the user's taste, which a VLM has to infer from them.
"""
import numpy as np

from ppd_jax.evals import judge as judge_lib


class SyntheticJudge:
  """judge.Backend; reward_for(user_id) -> an object with score(images, prompts) -> [N]."""

  def __init__(self, reward_for, temperature: float = 0.1, position_bias_logit: float = 0.0):
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    self.reward_for, self.temperature = reward_for, temperature
    self.position_bias_logit = position_bias_logit
    self.name = "synthetic"

  def describe(self) -> dict:
    return {"backend": "synthetic", "temperature": self.temperature,
            "position_bias_logit": self.position_bias_logit}

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
      z = (s[:, 0] - s[:, 1]) / self.temperature + self.position_bias_logit
      for i, p in zip(rows, 1.0 / (1.0 + np.exp(-z))):
        out[i] = judge_lib.Answer(float(p), mass=1.0)
    return out

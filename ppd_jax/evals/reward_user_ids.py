"""Reward name -> user id, as the run's own data recorded it (Section 5.1's reward users).

A run trained on reward users knows which id is which reward: the relabel folder's
reward_users.json ("user_ids", written by data/reward_users.py), or, in the demo's world, the
config's data.reward_users order (demo_world/synthetic_reward_users.py). Table 1 and the
interpolation look users up here by name, never by the position of a name in --rewards: with
another order than the relabel's, the aesthetic column would score the CLIP user's images.
"""
from ppd_jax.data import reward_users


class RewardUserError(ValueError):
  """A reward the run has no user for; the message names the reward and the run's map."""


def of_run(run) -> dict[str, int]:
  """{reward name: user id} recorded by the run's data; {} when it was not trained on reward
  users."""
  d = run.config.data
  if d.get("relabel"):
    summary = reward_users.read_summary(d.relabel)
    return {str(n): int(u) for n, u in (summary.get("user_ids") or {
        n: reward_users.user_id(k) for k, n in enumerate(summary["rewards"])}).items()}
  if d.get("source") == "synthetic_rewards":
    return {str(n): reward_users.user_id(k) for k, n in enumerate(d.reward_users)}
  return {}


def resolve(run, names, overrides: dict | None = None, where: str = "--run") -> dict[str, int]:
  """{name: id} for every name: the run's map, with explicit overrides (--reward_user=NAME=ID)
  on top. A name with neither is refused, naming what the run has."""
  recorded = of_run(run)
  found = {**recorded, **(overrides or {})}
  missing = [n for n in names if n not in found]
  if missing:
    have = (f"its reward users are {', '.join(f'{n} ({u})' for n, u in recorded.items())}"
            if recorded else "it was not trained on reward users (no data.relabel)")
    raise RewardUserError(f"{where}: no user for reward(s) {missing}: {have}; name rewards the "
                          "run has, or map one with --reward_user=NAME=ID")
  return {n: int(found[n]) for n in names}

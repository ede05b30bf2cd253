"""Picks the preference-pair source a config names, and its held-out pairs for validation.

It sits above data/ and demo_world/: the real pipeline (data/pickapic_source.py) and the demo's
synthetic users (demo_world/) are both sources, and data/ never imports the demo.
"""
from ppd_jax import metrics


def build_source(config, split: str = "train"):
  """A PairSource (see data/pipeline.py) plus the users' embeddings and caption encoder."""
  if config.data.source == "synthetic":
    from ppd_jax.demo_world import synthetic_users
    return synthetic_users.SyntheticPreferences(config, log=metrics.log)  # builds its backbone
  if config.data.source == "synthetic_rewards":
    from ppd_jax.demo_world import synthetic_reward_users
    return synthetic_reward_users.RewardUserPreferences(config, log=metrics.log)
  if config.data.source == "pickapic":
    from ppd_jax.data import pickapic_source
    return pickapic_source.PickapicPairs(config, log=metrics.log, split=split)
  raise ValueError(f"config.data.source={config.data.source!r}: must be 'synthetic', "
                   "'synthetic_rewards' or 'pickapic'")


def build_held_out(config, train_source):
  """Pairs of users never trained on, for validation while training: the synthetic source's
  unseen users, or Pick-a-Pic's validation split (its shards and the same user store)."""
  if config.data.source in ("synthetic", "synthetic_rewards"):
    return train_source.held_out()
  return build_source(config, split="validation")

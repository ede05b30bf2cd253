"""Picks the preference-pair source a config names."""
from ppd_jax import metrics
from ppd_jax.data import synthetic_users


def build_source(config):
  """A PairSource (see data/pipeline.py) plus the users' embeddings and caption encoder."""
  if config.data.source == "synthetic":
    return synthetic_users.SyntheticPreferences(config, log=metrics.log)  # builds its backbone
  raise ValueError(f"config.data.source={config.data.source!r}: only 'synthetic' is supported")

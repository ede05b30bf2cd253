"""Weights in and out: diffusers/transformers checkpoints -> Flax, user branch -> IP-Adapter."""


class WeightFileError(ValueError):
  """A weights file or model folder that is missing, cut short or unreadable, or made for another
  architecture; the message names the file. The command lines print it as their one last line."""

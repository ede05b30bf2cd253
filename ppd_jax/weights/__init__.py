"""Weights in and out: diffusers / transformers checkpoints -> Flax params, user branch -> IP-Adapter."""

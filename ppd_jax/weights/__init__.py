"""Weights in and out: diffusers/transformers checkpoints -> Flax, user branch -> IP-Adapter."""

"""Reward models behind one interface: score(images, prompts) -> [N] (see base.py)."""

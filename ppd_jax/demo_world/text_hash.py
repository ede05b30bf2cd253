"""A frozen hashing text encoder: the demo's stand-in for CLIP.

The demo needs caption embeddings that are deterministic, distinguish captions, and cost nothing to
build, without downloading a tokenizer or weights. Each whitespace word is hashed (crc32) into a
fixed vocabulary and looked up in a seeded random table; a seeded position table is added. Id 0 is
padding, so the empty caption "" is all padding: the unconditional embedding for classifier-free
guidance. The output has CLIP's layout, [N, max_length, dim], so a real encoder plugs in unchanged.
"""
import zlib

import numpy as np

PAD_ID = 0


class HashTextEncoder:
  """Deterministic caption -> [max_length, dim] float32 embedding; no parameters are trained."""

  def __init__(self, dim: int, max_length: int, vocab_size: int = 1024, seed: int = 0):
    if vocab_size < 2:
      raise ValueError(f"vocab_size={vocab_size}: needs the padding id and at least one word id")
    self.dim = dim
    self.max_length = max_length
    self.vocab_size = vocab_size
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(dim)
    self.token_table = (rng.standard_normal((vocab_size, dim)) * scale).astype(np.float32)
    self.position_table = (rng.standard_normal((max_length, dim)) * scale).astype(np.float32)

  def word_id(self, word: str) -> int:
    """Ids 1..vocab_size-1; collisions are possible and harmless for the demo's small vocabulary."""
    return zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 1) + 1

  def tokenize(self, captions: list[str]) -> np.ndarray:
    """[N, max_length] int32 ids: lowercased whitespace words, truncated, padded with PAD_ID."""
    ids = np.full((len(captions), self.max_length), PAD_ID, np.int32)
    for n, caption in enumerate(captions):
      words = caption.lower().split()[:self.max_length]
      ids[n, :len(words)] = [self.word_id(w) for w in words]
    return ids

  def encode(self, captions: list[str]) -> np.ndarray:
    """[N, max_length, dim] float32: token embedding + position embedding (padding included)."""
    ids = self.tokenize(captions)
    return self.token_table[ids] + self.position_table[None]

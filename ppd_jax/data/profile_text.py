"""What the text units of data/precompute.py encode: the index's captions, or with
config.data.profile_in_caption (the caption-augmentation baseline) each pair's caption joined with
its user's profile text (data/profile_caption.py), and a fingerprint of the profiles used.
"""
import hashlib
import json
import os

import numpy as np

from ppd_jax.data import profile_caption
from ppd_jax.data import user_store as store_lib


def profile_store(config) -> store_lib.UserEmbeddingStore | None:
  """The store whose profiles the captions are joined with; None with the switch off."""
  d = config.data
  return store_lib.UserEmbeddingStore(d.user_embeddings) if d.get("profile_in_caption") else None


def store_fingerprint(store: store_lib.UserEmbeddingStore) -> dict:
  """Identifies the profile texts a folder was encoded with, so a rerun with another store is
  refused rather than mixing two stores' texts in one folder."""
  profiles = [store.profile(int(u)) for u in store.users]      # the sample-0 entries
  h = hashlib.sha256(store.users.astype("<i8").tobytes())
  h.update(json.dumps(profiles).encode())
  return {"file": os.path.basename(store.path), "bytes": os.path.getsize(store.path),
          "users": store.num_users, "profiles_sha256": h.hexdigest()}


def text_table(index, store=None) -> tuple[list[str], np.ndarray]:
  """(texts, per-pair row in texts): what the text units encode and where each pair's text is.

  No store: the index's own captions and caption ids, untouched. A store: the unique strings
  with_profile(caption, profile of the pair's user), sorted; a user the store lacks keeps the plain
  caption (the loader refuses or drops that user's pairs anyway)."""
  if store is None:
    return index.captions, index.pairs["caption_id"]
  keys = np.stack([index.pairs["caption_id"].astype(np.int64),
                   index.pairs["user_id"].astype(np.int64)], axis=1)
  combos, inverse = np.unique(keys, axis=0, return_inverse=True)
  users = np.unique(combos[:, 1]).tolist()
  profiles = {u: store.profile(u) if u in store else None for u in users}
  joined = [profile_caption.with_profile(index.captions[c], profiles[u])
            for c, u in combos.tolist()]
  texts = sorted(set(joined))
  row = {t: i for i, t in enumerate(texts)}
  rows = np.array([row[t] for t in joined], np.int32)
  return texts, rows[inverse.reshape(-1)]

"""The text units of data/precompute.py: a chunk of captions -> text/{key}-{k}.npy files.

Text conditioning is stored once per caption, never per pair. A unit runs independently of the
file units that write the pairs using its captions (possibly in another process), so it records
the text ids whose conditioning is not finite in its done-file; data/manifest.py turns them into
skipped pairs and the loader leaves those out.
"""
import os

import numpy as np

from ppd_jax.data import shards


def nonfinite_rows(arrays) -> np.ndarray:
  """Rows (along axis 0, common to the arrays) holding a NaN or inf in any of the arrays."""
  bad = None
  for a in arrays:
    rows = ~np.isfinite(a.reshape(len(a), -1)).all(1)
    bad = rows if bad is None else bad | rows
  return np.flatnonzero(bad)


def encode_text_chunk(output, k, captions, backbone, storage_dtype, batch: int = 64,
                      first_id: int = 0) -> dict:
  """Text conditioning of one caption chunk (text ids first_id, first_id + 1, ...) ->
  text/{key}-{k}.npy files; their infos, and under "nonfinite" the text ids whose conditioning,
  as stored, is not finite in some key: other units write the pairs using them, so finalize
  leaves those out."""
  os.makedirs(os.path.join(output, "text"), exist_ok=True)
  parts = []
  for i in range(0, len(captions), batch):
    chunk = list(captions[i:i + batch])
    n = len(chunk)
    text = backbone.encode_captions(chunk + [""] * (batch - n))   # one compiled shape
    text.pop("time_ids", None)           # SDXL's size conditioning is per image, in the record
    parts.append({key: np.asarray(v[:n]) for key, v in text.items()})
  files, stored = [], []
  for key in parts[0]:
    with np.errstate(over="ignore"):          # an overflow to inf is caught just below
      array = np.concatenate([p[key] for p in parts]).astype(storage_dtype)
    path = os.path.join(output, "text", f"{key}-{k:05d}.npy")
    files.append({**shards.save_npy(path, array), "dir": "text", "key": key,
                  "shape": list(array.shape)})
    stored.append(array)
  return {"files": files, "count": len(captions),
          "nonfinite": (first_id + nonfinite_rows(stored)).tolist()}

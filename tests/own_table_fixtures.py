"""Tiny own preference tables (docs/own_data.md): PNG files beside a JSONL/CSV/parquet table."""
import base64
import csv
import io
import json
import os

import numpy as np
from PIL import Image


def png(seed: int, size=(20, 14)) -> bytes:
  """A small, distinct, non-square PNG (so the centre crop matters)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def pair_rows(folder: str, users, pairs_per_user: int, seed: int = 0) -> list[dict]:
  """Rows with canonical names whose images are files under folder/images/, written here."""
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  rows, k = [], 0
  for u, user in enumerate(users):
    for i in range(pairs_per_user):
      names = []
      for side in range(2):
        name = f"images/{k:04d}-{side}.png"
        with open(os.path.join(folder, name), "wb") as f:
          f.write(png(seed * 100003 + 2 * k + side))
        names.append(name)
      rows.append({"user_id": user, "caption": f"a picture number {i % 3} for {u}",
                   "image_0": names[0], "image_1": names[1], "preferred": (k + u) % 2})
      k += 1
  return rows


def data_uri(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def write_table(path: str, rows: list[dict], rename: dict | None = None) -> str:
  """rows -> a table whose format is path's suffix; rename maps canonical -> file column.
  Bytes values go into parquet binary columns (and become data URIs in JSONL/CSV)."""
  rename = rename or {}
  rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
  if path.endswith(".parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path
  rows = [{k: data_uri(v) if isinstance(v, bytes) else v for k, v in r.items()} for r in rows]
  with open(path, "w", newline="") as f:
    if path.endswith(".jsonl"):
      for r in rows:
        f.write(json.dumps(r) + "\n")
    else:
      columns = list(dict.fromkeys(k for r in rows for k in r))
      writer = csv.DictWriter(f, columns)
      writer.writeheader()
      writer.writerows(rows)
  return path

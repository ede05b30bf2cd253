"""Small synthetic parquet files in the Pick-a-Pic v2 layout, with known answers.

The real dataset is ~650 files of ~0.5 GB; the reader and precompute step need something tiny,
deterministic and with known per-user counts and planted faults to be tested against, and a user
needs something to smoke-test the pipeline on before downloading.

Layout (yuvalkirstain/pickapic_v2): one row per pair shown to a user: `caption`, two JPEGs
`jpg_0`/`jpg_1` with uids, urls and the model that made each, and the user's verdict.
  label_0/label_1: 1/0 image 0 preferred, 0/1 image 1 preferred, 0.5/0.5 a tie.
  has_label False: no verdict (labels 0/0 here).
  best_image_uid: uid of the preferred image, "" for ties and unlabeled rows.
  are_different False: both images are the same (same uid and bytes); such rows carry a 1/0 label
  here, so a reader must check the flag to drop them.
  user_id: large, non-contiguous int64; ranking_id: distinct per row.

Each user has a hidden taste (brighter / darker images, bigger / smaller object; in opposed
couples, so no taste is the majority's) and labels its clear pairs by it, so the data is learnable.

  python -m ppd_jax.data.make_pickapic --out=DIR [--users=24 --files=3 --seed=0 ...]
"""
import colorsys
import io
import os
import sys
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app
from absl import flags
from PIL import Image
from PIL import ImageDraw

from ppd_jax import cli_logging

SCHEMA = pa.schema([
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()), ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
    ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("model_0", pa.string()), ("model_1", pa.string()),
    ("ranking_id", pa.int64()), ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()), ("__index_level_0__", pa.int64()),
])
# Opposed couples: user 2k+1 has the opposite of user 2k's taste.
TASTES = ("brighter", "darker", "bigger", "smaller")
EMPTY_FILE = "train-extra-empty.parquet"
BAD_SCHEMA_FILE = "train-extra-badschema.parquet"

_COLOURS = {"red": 0.0, "orange": 0.08, "yellow": 0.15, "green": 0.33, "teal": 0.47,
            "blue": 0.62, "purple": 0.77, "pink": 0.9}
_SUBJECTS = ("fox", "lighthouse", "teapot", "balloon", "robot", "cat", "sailboat", "tree")
_PLACES = ("in the snow", "on a beach", "at night", "in a forest", "on the moon", "in the rain")
_MODELS = ("sdxl", "dreamlike", "sd-2.1", "sdxl-turbo")
_NUM_CAPTIONS, _CAPTIONS_PER_USER, _BAD_SCHEMA_ROWS = 12, 3, 4
# Smallest gap in the taste's measure for a labelled pair, so labels survive JPEG round trips.
_MIN_GAP = {"bright": 0.08, "size": 0.10}
_BASE_TIME = np.datetime64("2023-04-01T00:00:00", "ns")
_JPEG_QUALITY = 90


def _stream(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([stream, seed])


def _uid(rng: np.random.Generator) -> str:
  return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _captions(rng: np.random.Generator) -> list[str]:
  """Distinct "a <colour> <subject> <place>" prompts; the colour word sets the object's hue."""
  combos = [(c, s, p) for c in _COLOURS for s in _SUBJECTS for p in _PLACES]
  picks = rng.choice(len(combos), _NUM_CAPTIONS, replace=False)
  return ["a {} {} {}".format(*combos[i]) for i in picks]


def _draw(rng, caption: str, size) -> tuple[Image.Image, dict]:
  """A background and one ellipse or rectangle -> (image, {"bright", "size"} measures).

  The object stays inside a 10% margin, so the border is pure background, and its HSV value is
  >= 0.4 away from the background's, so it stands out in every colour.
  """
  w, h = size
  bg_v = rng.uniform(0.1, 0.95)
  obj_v = rng.uniform(0.05, bg_v - 0.4) if bg_v > 0.55 else rng.uniform(bg_v + 0.4, 1.0)
  bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.8), bg_v)
  obj = colorsys.hsv_to_rgb(_COLOURS[caption.split()[1]], 0.8, obj_v)
  bw, bh = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
  x0, y0 = rng.uniform(0.1 * w, 0.9 * w - bw), rng.uniform(0.1 * h, 0.9 * h - bh)
  box = [round(x0), round(y0), round(x0 + bw), round(y0 + bh)]
  shape = "ellipse" if rng.uniform() < 0.5 else "rectangle"
  image = Image.new("RGB", (w, h), tuple(round(255 * c) for c in bg))
  mask = Image.new("L", (w, h), 0)
  getattr(ImageDraw.Draw(image), shape)(box, fill=tuple(round(255 * c) for c in obj))
  getattr(ImageDraw.Draw(mask), shape)(box, fill=255)
  measures = {"bright": float(np.asarray(image.convert("L")).mean()) / 255.0,
              "size": float((np.asarray(mask) > 0).mean())}
  return image, measures


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
  return buf.getvalue()


def _prefers_first(taste: str, a: dict, b: dict) -> bool:
  key = "bright" if taste in ("brighter", "darker") else "size"
  return (a[key] > b[key]) == (taste in ("brighter", "bigger"))


def _clear_pair(rng, taste, caption, sizes):
  """Two images whose gap in the taste's measure is at least _MIN_GAP (redrawn until it is)."""
  key = "bright" if taste in ("brighter", "darker") else "size"
  while True:
    (ia, ma), (ib, mb) = (_draw(rng, caption, sizes[rng.integers(len(sizes))]) for _ in range(2))
    if abs(ma[key] - mb[key]) >= _MIN_GAP[key]:
      return (ia, ma), (ib, mb)


def _row(rng, kind: str, user_id: int, taste: str, caption: str, sizes) -> dict:
  """One row's columns (all but created_at, ranking_id, __index_level_0__) for a row kind."""
  if kind == "valid":
    (ia, ma), (ib, mb) = _clear_pair(rng, taste, caption, sizes)
    if not _prefers_first(taste, ma, mb):
      ia, ib = ib, ia
    if rng.uniform() < 0.5:  # the preferred image sits on either side
      images, labels = (ia, ib), (1.0, 0.0)
    else:
      images, labels = (ib, ia), (0.0, 1.0)
  else:
    images = tuple(_draw(rng, caption, sizes[rng.integers(len(sizes))])[0] for _ in range(2))
    labels = {"tie": (0.5, 0.5), "unlabeled": (0.0, 0.0), "same": (1.0, 0.0)}[kind]
  uids = [_uid(rng), _uid(rng)]
  jpgs = [_jpeg(im) for im in images]
  models = [str(m) for m in rng.choice(_MODELS, 2)]
  if kind == "same":
    uids[1], jpgs[1], models[1] = uids[0], jpgs[0], models[0]
  best = "" if labels[0] == labels[1] else uids[0 if labels[0] > labels[1] else 1]
  return {
      "are_different": kind != "same", "best_image_uid": best, "caption": caption,
      "has_label": kind != "unlabeled",
      "image_0_uid": uids[0], "image_0_url": f"https://example.invalid/{uids[0]}.jpg",
      "image_1_uid": uids[1], "image_1_url": f"https://example.invalid/{uids[1]}.jpg",
      "jpg_0": jpgs[0], "jpg_1": jpgs[1], "label_0": labels[0], "label_1": labels[1],
      "model_0": models[0], "model_1": models[1], "user_id": user_id,
      "num_example_per_prompt": 1,
  }


def _corrupt(rng, jpg: bytes, truncate: bool) -> bytes:
  """A JPEG cut short (header intact, scan data missing) or bytes no decoder recognises."""
  if truncate:
    return jpg[:len(jpg) // 2]
  return b"\x00not an image\x00" + rng.bytes(256)


def _fault_count(fraction: float, rows: int) -> int:
  """round(fraction * rows), but at least one when the fraction is positive, so tests see one."""
  return max(int(round(fraction * rows)), 1 if fraction > 0 else 0)


def _check(num_users, pairs_per_user, num_files, fractions, corrupt_jpegs, row_group_size):
  lo, hi = pairs_per_user
  if num_users < 1 or num_files < 1 or row_group_size < 1 or corrupt_jpegs < 0:
    raise ValueError("num_users, num_files and row_group_size must be >= 1, corrupt_jpegs >= 0")
  if not 1 <= lo <= hi:
    raise ValueError(f"pairs_per_user={pairs_per_user} must be an inclusive (lo, hi), lo >= 1")
  if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
    raise ValueError(f"fractions {fractions} must be in [0, 1) and sum below 1")


def _table(rows: list[dict], created_at, ranking_ids) -> pa.Table:
  columns = {name: [r[name] for r in rows] for name in SCHEMA.names if name in rows[0]}
  columns["created_at"] = created_at
  columns["ranking_id"] = ranking_ids
  columns["__index_level_0__"] = np.arange(len(rows), dtype=np.int64)
  return pa.table({n: pa.array(columns[n], type=SCHEMA.field(n).type) for n in SCHEMA.names},
                  schema=SCHEMA)


def _stale_parquet(out_dir: str, names: list[str]) -> list[str]:
  return sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet") and f not in names)


def write_synthetic_pickapic(out_dir, *, num_users=12, pairs_per_user=(2, 10), num_files=3,
                             image_sizes=((64, 64), (48, 64), (64, 48)), tie_fraction=0.1,
                             unlabeled_fraction=0.05, same_image_fraction=0.02, corrupt_jpegs=0,
                             empty_file=False, bad_schema_file=False, row_group_size=16,
                             seed=0) -> dict:
  """Writes train-{i:05d}-of-{n:05d}.parquet files (+ optional faulty extras) -> ground truth.

  image_sizes are (width, height). The first user labels pairs_per_user[0] rows and the second
  pairs_per_user[1], the rest a uniform draw, so both ends of the range occur for any seed. The
  returned dict is JSON-serialisable; see the module docstring for the column semantics.
  """
  fractions = (tie_fraction, unlabeled_fraction, same_image_fraction)
  _check(num_users, pairs_per_user, num_files, fractions, corrupt_jpegs, row_group_size)
  sizes = [tuple(int(v) for v in s) for s in image_sizes]
  if not sizes or min(min(s) for s in sizes) < 16:
    raise ValueError(f"image_sizes={image_sizes}: give (width, height) pairs of at least 16 px")
  rng = _stream(seed, 1)
  user_ids = (rng.choice(10**6, num_users, replace=False) + 1).astype(np.int64)
  tastes = [TASTES[i % len(TASTES)] for i in range(num_users)]
  counts = rng.integers(pairs_per_user[0], pairs_per_user[1] + 1, num_users)
  counts[:2] = pairs_per_user[:min(2, num_users)]
  captions = _captions(rng)
  user_captions = [rng.choice(captions, _CAPTIONS_PER_USER, replace=False) for _ in user_ids]
  owner = np.repeat(np.arange(num_users), counts)  # rows in user order, shuffled below
  total = len(owner)
  if total < num_files:
    raise ValueError(f"{total} rows cannot fill {num_files} files")

  # Exact fault counts on random rows; then corrupt JPEGs on some of the valid ones.
  n_tie, n_unl, n_same = (_fault_count(f, total) for f in fractions)
  if n_tie + n_unl + n_same + corrupt_jpegs > total:
    raise ValueError(f"{total} rows are too few for the requested faults (a positive fraction "
                     "gives at least one row; set it to 0 for none)")
  kinds = np.array(["tie"] * n_tie + ["unlabeled"] * n_unl + ["same"] * n_same
                   + ["valid"] * (total - n_tie - n_unl - n_same))[rng.permutation(total)]
  order = rng.permutation(total)  # row order over all files
  owner, kinds = owner[order], kinds[order]
  corrupt_rows = set(rng.choice(np.flatnonzero(kinds == "valid"), corrupt_jpegs, replace=False)
                     .tolist())
  spans = np.array_split(np.arange(total), num_files)
  names = [f"train-{i:05d}-of-{num_files:05d}.parquet" for i in range(num_files)]
  extras = {"empty": EMPTY_FILE if empty_file else None,
            "bad_schema": BAD_SCHEMA_FILE if bad_schema_file else None}
  os.makedirs(out_dir, exist_ok=True)
  stale = _stale_parquet(out_dir, names + [e for e in extras.values() if e])
  if stale:  # a reader scans the whole folder, so leftovers would silently join the data
    raise ValueError(f"{out_dir} already holds other parquet files: {stale[:3]}")

  created_at = _BASE_TIME + np.cumsum(rng.integers(1, 600, total)) * np.timedelta64(1, "s")
  ranking_ids = np.sort(rng.choice(10**9, total, replace=False)).astype(np.int64) + 1
  rows, corrupt = [], []
  for i, (u, kind) in enumerate(zip(owner, kinds)):
    caption = str(user_captions[u][rng.integers(_CAPTIONS_PER_USER)])
    rows.append(_row(rng, str(kind), int(user_ids[u]), tastes[u], caption, sizes))
    if i in corrupt_rows:
      column = "jpg_0" if rng.uniform() < 0.5 else "jpg_1"
      rows[-1][column] = _corrupt(rng, rows[-1][column], truncate=len(corrupt) % 2 == 0)
      file = int(np.searchsorted([s[-1] for s in spans], i))
      corrupt.append([names[file], int(i - spans[file][0]), column])
  for name, span in zip(names, spans):
    table = _table([rows[i] for i in span], created_at[span], ranking_ids[span])
    pq.write_table(table, os.path.join(out_dir, name), row_group_size=row_group_size)

  if empty_file:
    open(os.path.join(out_dir, EMPTY_FILE), "wb").close()
  if bad_schema_file:
    _write_bad_schema(os.path.join(out_dir, BAD_SCHEMA_FILE), captions, sizes, seed)

  per_user = {}
  for u, uid in enumerate(user_ids):
    mine = owner == u
    per_user[str(int(uid))] = {"rows": int(mine.sum()),
                               "valid_pairs": int((mine & (kinds == "valid")).sum()),
                               "taste": tastes[u]}
  return {"files": names, "extra_files": extras, "rows": total, "per_user": per_user,
          "valid_pairs": int((kinds == "valid").sum()), "corrupt": corrupt,
          "ties": n_tie, "unlabeled": n_unl, "same_image": n_same}


def _write_bad_schema(path: str, captions, sizes, seed: int) -> None:
  """A few well-formed rows without the user_id column: a reader must reject the file, not guess."""
  rng = _stream(seed, 2)
  rows = [_row(rng, "valid", 1, TASTES[i % len(TASTES)], str(captions[i % len(captions)]), sizes)
          for i in range(_BAD_SCHEMA_ROWS)]
  created_at = _BASE_TIME + np.arange(_BAD_SCHEMA_ROWS) * np.timedelta64(1, "s")
  table = _table(rows, created_at, np.arange(1, _BAD_SCHEMA_ROWS + 1, dtype=np.int64))
  pq.write_table(table.drop_columns(["user_id"]), path)


def _define_flags() -> None:
  """Defined only when run as a script: readers import this module next to other CLIs' flags."""
  flags.DEFINE_string("out", None, "folder to write the parquet files into")
  flags.DEFINE_integer("users", 24, "number of users (24: the training config's 5% validation "
                       "and 10% test splits each get a user with held-out pairs, so validation "
                       "and Table 1's pickapic:SHARDS prompts run on the default data)")
  flags.DEFINE_integer("files", 3, "number of train-*.parquet files")
  flags.DEFINE_integer("min_pairs", 2, "fewest rows a user labels")
  flags.DEFINE_integer("max_pairs", 10, "most rows a user labels")
  flags.DEFINE_integer("image_size", 64, "image side; also (3/4 side x side) and (side x 3/4 side)")
  flags.DEFINE_integer("seed", 0, "seed: the same flags give byte-identical files")
  flags.DEFINE_integer("corrupt_jpegs", 0, "labelled rows given an undecodable JPEG")
  flags.DEFINE_bool("empty_file", False, f"also write a 0-byte {EMPTY_FILE}")
  flags.DEFINE_bool("bad_schema_file", False, f"also write {BAD_SCHEMA_FILE} (no user_id)")
  flags.mark_flags_as_required(["out"])


def _main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  s = f.image_size
  try:
    truth = write_synthetic_pickapic(
        f.out, num_users=f.users, pairs_per_user=(f.min_pairs, f.max_pairs), num_files=f.files,
        image_sizes=((s, s), (s * 3 // 4, s), (s, s * 3 // 4)), corrupt_jpegs=f.corrupt_jpegs,
        empty_file=f.empty_file, bad_schema_file=f.bad_schema_file, seed=f.seed)
  except ValueError as e:
    sys.exit(f"ppd_jax.data.make_pickapic: {e}")
  users = truth["per_user"].values()
  few = sum(u["valid_pairs"] < 4 for u in users)
  print(f"wrote {len(truth['files'])} files to {f.out}: {', '.join(truth['files'])}")
  extras = [e for e in truth["extra_files"].values() if e]
  if extras:
    print(f"faulty extras: {', '.join(extras)}")
  print(f"{truth['rows']} rows, {len(users)} users, {truth['valid_pairs']} valid pairs "
        f"({few} users with < 4), {truth['ties']} ties, {truth['unlabeled']} unlabeled, "
        f"{truth['same_image']} same-image, {len(truth['corrupt'])} corrupt JPEGs")
  print("next: python -m ppd_jax.data.precompute --config=configs/ppd.py:pickapic_sd15 "
        f"--input={f.out} --output=SHARDS")


if __name__ == "__main__":
  _define_flags()
  app.run(_main)

"""Own preference tables -> Pick-a-Pic's parquet layout in SHARDS/table/, once.

After this step an own table is indistinguishable from Pick-a-Pic: data/pickapic.py indexes it
(filters, users, train/validation/test split, few-shot pairs), precompute encodes it, and
users.embed and data.relabel read its images, all on one code path. Each row becomes:

    caption, user_id          as given (user names are numbered 0.. in sorted order when any id
                              is not an integer; table/user_ids.json maps name -> number)
    label_0, label_1          1/0 or 0/1 from preferred; 0.5/0.5 for a tie (which the index drops)
    has_label = true, are_different = the two images' bytes differ
    ranking_id, image_*_uid   hashes of (user, caption) and of each image's bytes: the pair's
                              identity, which orders a user's pairs (the same in any file
                              name, format or row order)
    jpg_0, jpg_1              the image bytes as given (any format PIL decodes)
    source_row                the row in the original table

A bad row (data/table_rows.py: a missing field, preferred not 0/1, an image that does not decode
or whose path leaves the table's folder, ...) is skipped, counted by kind and named by file and
row, in the log and in the report that precompute keeps in SHARDS/index/index.json and the
manifest ("index" -> "table"). One input file is one output file plus a JSON of what it was made
from, written in that order under temporary names: a killed run redoes only the file it was
writing, and a rerun whose input or --columns differ is refused before anything is touched.
Every process of a multi-process precompute converts what is not yet there under its own
temporary names (the result is the same bytes whoever writes it); a killed run's *.tmp files
there are never read.
"""
import hashlib
import os

from ppd_jax import storage
from ppd_jax.data import images as images_lib
from ppd_jax.data import shards
from ppd_jax.data import table_rows
from ppd_jax.data.table_rows import MISSING, TableError

TABLE_DIR = "table"
VERSION = 1
ROW_GROUP = 256              # rows per parquet row group: what a reader holds in memory at once
_LISTED = 1000               # bad rows listed one by one in the report (all are counted)
_LOGGED = 20                 # ... and in the log
_PICKAPIC = ("jpg_0", "label_0", "has_label")


def _schema():
  import pyarrow as pa
  return pa.schema([("caption", pa.string()), ("user_id", pa.int64()),
                    ("label_0", pa.float64()), ("label_1", pa.float64()),
                    ("has_label", pa.bool_()), ("are_different", pa.bool_()),
                    ("ranking_id", pa.int64()), ("image_0_uid", pa.string()),
                    ("image_1_uid", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                    ("source_row", pa.int64())])


def is_own_input(input_path: str, columns: str | None) -> bool:
  """True for JSONL/CSV tables, --columns, or parquet files without Pick-a-Pic's columns; False
  for Pick-a-Pic's layout (read as before). A mix of both is refused."""
  if storage.is_url(input_path):
    if columns or input_path.endswith((".jsonl", ".csv")):
      raise TableError(f"--input={input_path}: own tables are read from a local disk; copy "
                       "the table and its images there")
    return False
  paths = table_rows.list_tables(input_path)
  if columns or any(table_rows.kind_of(p) != "parquet" for p in paths):
    mixed = [p for p in paths if _is_pickapic(p)]
    if mixed:
      raise TableError(f"--input={input_path}: mixes Pick-a-Pic parquet files ({mixed[0]}) "
                       "with own tables; give them separate --input folders")
    return bool(paths)
  layouts = {p: _is_pickapic(p) for p in paths}
  known = {v for v in layouts.values() if v is not None}
  if len(known) > 1:
    one = next(p for p, v in layouts.items() if v)
    other = next(p for p, v in layouts.items() if v is False)
    raise TableError(f"--input={input_path}: mixes Pick-a-Pic parquet files ({one}) with own "
                     f"tables ({other}); give them separate --input folders")
  return known == {False}


def _is_pickapic(path: str):
  """Whether a parquet file has Pick-a-Pic's columns; None when its schema cannot be read (the
  Pick-a-Pic reader then skips it, naming why)."""
  if table_rows.kind_of(path) != "parquet":
    return False
  try:
    names = table_rows.column_names(path)
  except Exception:  # an empty or corrupt file: pyarrow raises several types
    return None
  return all(c in names for c in _PICKAPIC)


def _fingerprint(path: str) -> dict:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return {"name": os.path.basename(path), "size": os.path.getsize(path), "blake2b": h.hexdigest()}


def _user_numbers(paths: list[str], mapping: dict) -> dict | None:
  """None when every user id is an integer (kept as is); else {name: number} in sorted order."""
  keys = set()
  for path in paths:
    for _, raw in table_rows.read_rows(path, mapping, columns=("user_id",)):
      if raw is not None and raw["user_id"] is not MISSING:
        key = table_rows.user_key(raw["user_id"])
        if key is not None:
          keys.add(key)
  if all(isinstance(k, int) for k in keys):
    return None
  return {name: i for i, name in enumerate(sorted({str(k) for k in keys}))}


def _hash63(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _convert_row(raw, folder: str, numbers: dict | None, row: int):
  """One row -> the Pick-a-Pic record, or the reason it is bad."""
  problem = table_rows.row_problem(raw)
  if problem:
    return problem
  images = []
  for name in ("image_0", "image_1"):
    data = table_rows.image_bytes(raw[name], folder, name)
    if isinstance(data, str):
      return data
    try:
      images_lib.load_square(data, 8)      # the same decode precompute does, at a tiny size
    except images_lib.ImageError as e:
      return f"undecodable image: {name} ({e})"
    images.append(data)
  key = table_rows.user_key(raw["user_id"])
  tie = table_rows.is_tie(raw)
  preferred = None if tie else table_rows.preferred_of(raw)
  uids = [hashlib.blake2b(b, digest_size=16).hexdigest() for b in images]
  return {"caption": raw["caption"], "user_id": key if numbers is None else numbers[str(key)],
          "label_0": 0.5 if tie else float(preferred == 0),
          "label_1": 0.5 if tie else float(preferred == 1),
          "has_label": True, "are_different": uids[0] != uids[1],
          "ranking_id": _hash63(f"{key}\n{raw['caption']}"), "image_0_uid": uids[0],
          "image_1_uid": uids[1], "jpg_0": images[0], "jpg_1": images[1], "source_row": row}


def _convert_file(path: str, out: str, mapping: dict, numbers: dict | None) -> dict:
  """One table -> `out` (committed); its counts and bad rows."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  schema, tmp = _schema(), shards.temporary(out)
  name, folder = os.path.basename(path), os.path.dirname(path)
  report = {"rows_read": 0, "rows_kept": 0, "bad_rows": []}
  batch = []
  with pq.ParquetWriter(tmp, schema) as writer:
    def flush():
      if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema), row_group_size=len(batch))
        batch.clear()
    for row, raw in table_rows.read_rows(path, mapping):
      report["rows_read"] += 1
      record = _convert_row(raw, folder, numbers, row)
      if isinstance(record, str):
        report["bad_rows"].append({"file": name, "row": row, "reason": record})
        continue
      report["rows_kept"] += 1
      batch.append(record)
      if len(batch) == ROW_GROUP:
        flush()
    flush()
  shards.commit(tmp, out)
  return report


def check(input_path: str, columns: str | None):
  """(tables, column mapping) of own tables, None for Pick-a-Pic's layout; a bad --columns or a
  missing column raises here, before any work starts."""
  if not is_own_input(input_path, columns):
    return None
  mapping = table_rows.parse_columns(columns)
  paths = table_rows.list_tables(input_path)
  for path in paths:
    table_rows.check_columns(path, mapping, columns)
  return paths, mapping


def convert(plan, output: str, log=print):
  """check()'s tables -> (the SHARDS/table folder, for pickapic.build_index; the report)."""
  paths, mapping = plan
  numbers = _user_numbers(paths, mapping)
  folder = os.path.join(output, TABLE_DIR)
  os.makedirs(folder, exist_ok=True)
  users = "as given" if numbers is None else "numbered by name (table/user_ids.json)"
  digest = "integers" if numbers is None else hashlib.blake2b(
      repr(sorted(numbers.items())).encode(), digest_size=16).hexdigest()
  plans = []
  for k, path in enumerate(paths):
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(folder, f"{k:05d}-{stem}.parquet")
    made_from = {"version": VERSION, "source": _fingerprint(path), "columns": mapping,
                 "users": digest}
    plans.append((path, out, made_from))
    meta = out[:-len(".parquet")] + ".json"
    if os.path.exists(meta):
      old = shards.read_json(meta)
      if {key: old.get(key) for key in made_from} != made_from:
        raise shards.ShardsError(
            f"{meta}: {output} was made from another {os.path.basename(path)} or other "
            "--columns; use a new --output")
  if numbers is not None:
    shards.write_json(os.path.join(folder, "user_ids.json"), numbers)
  reports = []
  for path, out, made_from in plans:
    meta = out[:-len(".parquet")] + ".json"
    if os.path.exists(meta) and os.path.exists(out):
      reports.append(shards.read_json(meta)["report"])
      continue
    log(f"table: converting {path}")
    report = _convert_file(path, out, mapping, numbers)
    shards.write_json(meta, {**made_from, "report": report})
    reports.append(report)
  report = _summary(paths, mapping, users, reports)
  log(format_report(report))
  return folder, report


def _summary(paths, mapping, users, reports) -> dict:
  bad = [b for r in reports for b in r["bad_rows"]]
  kinds = {}
  for b in bad:
    kind = b["reason"].split(":")[0]
    kinds[kind] = kinds.get(kind, 0) + 1
  return {"files": [os.path.basename(p) for p in paths], "columns": mapping, "user_ids": users,
          "rows_read": sum(r["rows_read"] for r in reports),
          "rows_bad": len(bad), "bad_reasons": kinds, "bad_rows": bad[:_LISTED]}


def format_report(report: dict) -> str:
  lines = [f"table: {len(report['files'])} files, {report['rows_read']} rows, "
           f"{report['rows_bad']} bad rows skipped; user ids {report['user_ids']}"]
  lines += [f"  - {n} {kind}" for kind, n in sorted(report["bad_reasons"].items())]
  lines += [f"  skipping {b['file']} row {b['row']}: {b['reason']}"
            for b in report["bad_rows"][:_LOGGED]]
  if report["rows_bad"] > _LOGGED:
    lines.append(f"  ... {report['rows_bad'] - _LOGGED} more (all counted; the first "
                 f"{_LISTED} listed in the manifest's index.table.bad_rows)")
  return "\n".join(lines)

"""Your own preference table (JSONL, CSV or parquet) -> checked rows of one pair each.

A row is one labelled pair: (user_id, caption, image_0, image_1, preferred, optional tie).
The format comes from the file's suffix; `--columns=user_id=uid,caption=prompt` maps other column
names onto these. An image is inline bytes (a parquet binary column), a data URI
("data:image/png;base64,<bytes>") or a path relative to the table's own folder; a path that
leaves that folder (absolute, "..", or a symlink pointing out) is refused. A row that cannot be
used is not an error: row_problem() and image_bytes() say why, as "KIND: detail" (the kind is
what the report counts), and the caller skips, counts and names it.
docs/own_data.md is the user-facing description.
"""
import base64
import binascii
import csv
import glob
import json
import os

CANONICAL = ("user_id", "caption", "image_0", "image_1", "preferred", "tie")
REQUIRED = CANONICAL[:5]
SUFFIXES = (".jsonl", ".csv", ".parquet")
DATA_URI = "data:image/"
MISSING = object()          # a cell that is absent or null
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class TableError(ValueError):
  """A table that cannot be read at all (bad --columns, a missing column); names flag and file."""


def parse_columns(spec: str | None) -> dict:
  """--columns=canonical=column,... -> {canonical: column name in the file}, defaults filled in."""
  mapping = {name: name for name in CANONICAL}
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    name, sep, column = item.partition("=")
    name, column = name.strip(), column.strip()
    if not sep or not column:
      raise TableError(f"--columns={spec!r}: {item!r} is not NAME=COLUMN")
    if name not in CANONICAL:
      raise TableError(f"--columns={spec!r}: unknown name {name!r}; the names are "
                       f"{', '.join(CANONICAL)}")
    mapping[name] = column
  return mapping


def list_tables(input_path: str) -> list[str]:
  """A folder (every .jsonl/.csv/.parquet below it, sorted), a glob, or one file."""
  if os.path.isdir(input_path):
    found = [f for s in SUFFIXES
             for f in glob.glob(os.path.join(input_path, "**", "*" + s), recursive=True)]
  else:
    found = glob.glob(input_path)
  return sorted(os.path.abspath(f) for f in found if f.endswith(SUFFIXES))


def kind_of(path: str) -> str:
  return os.path.splitext(path)[1].lstrip(".")


def column_names(path: str) -> list[str]:
  """The columns a table has: parquet's schema, CSV's header, every key of a JSONL file."""
  kind = kind_of(path)
  if kind == "parquet":
    import pyarrow.parquet as pq
    return list(pq.ParquetFile(path).schema_arrow.names)
  if kind == "csv":
    with open(path, newline="") as f:
      return next(csv.reader(f), [])
  names = {}
  for _, obj in _jsonl(path):
    if isinstance(obj, dict):
      names.update(dict.fromkeys(obj))
  return list(names)


def check_columns(path: str, mapping: dict, spec: str | None) -> None:
  """Every required column (and a mapped tie) is in the file, or one error naming them."""
  try:
    have = set(column_names(path))
  except Exception as e:
    raise TableError(f"--input: {path} is not a readable {kind_of(path)} table "
                     f"({type(e).__name__}: {e})") from None
  wanted = [n for n in REQUIRED] + (["tie"] if mapping["tie"] != "tie" else [])
  missing = [f"{mapping[n]!r}" + (f" (for {n})" if mapping[n] != n else "")
             for n in wanted if mapping[n] not in have]
  if missing:
    hint = (f"; map yours with --columns=NAME=COLUMN (now {spec!r})" if spec
            else "; map yours with --columns=NAME=COLUMN, e.g. --columns=caption=prompt")
    raise TableError(f"--input: {path} has no column {', '.join(missing)} "
                     f"(it has {', '.join(sorted(have)) or 'none'}){hint}")


def _jsonl(path: str):
  """(row, parsed object or MISSING) per non-empty line; row counts those lines from 0."""
  with open(path, encoding="utf-8") as f:
    row = 0
    for line in f:
      if not line.strip():
        continue
      try:
        yield row, json.loads(line)
      except ValueError:
        yield row, MISSING
      row += 1


def read_rows(path: str, mapping: dict, columns=CANONICAL):
  """(row number, {canonical name: raw value or MISSING}) for every row of the table, in order.
  `columns` limits what is read (the images are the big part of a parquet file)."""
  kind = kind_of(path)
  if kind == "parquet":
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    present = [n for n in columns if mapping[n] in pf.schema_arrow.names]
    row = 0
    for g in range(pf.num_row_groups):
      table = pf.read_row_group(g, columns=sorted({mapping[n] for n in present}))
      values = {n: table.column(mapping[n]).to_pylist() for n in present}
      for i in range(table.num_rows):
        yield row, {n: (values[n][i] if n in values and values[n][i] is not None else MISSING)
                    for n in columns}
        row += 1
  elif kind == "csv":
    with open(path, newline="", encoding="utf-8") as f:
      for row, rec in enumerate(csv.DictReader(f)):
        yield row, {n: (rec.get(mapping[n]) if rec.get(mapping[n]) not in (None, "") else MISSING)
                    for n in columns}
  else:
    for row, obj in _jsonl(path):
      if not isinstance(obj, dict):
        yield row, None
        continue
      yield row, {n: (obj[mapping[n]] if obj.get(mapping[n]) is not None else MISSING)
                  for n in columns}


def user_key(value):
  """A user id as read: an int (ints and decimal strings) or a name; None if neither."""
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str) and value.strip():
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text
  return None


def _flag(value):
  """0/1 (or False/True, "0"/"1", "true"/"false") -> int, else a reason."""
  if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
    return int(value)
  if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
    return int(value.strip().lower() in _TRUE)
  return f"true/false or 0/1, got {value!r}"


def image_bytes(value, folder: str, name: str):
  """An image cell -> its bytes, or a reason it has none."""
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if not isinstance(value, str):
    return (f"bad image: {name} must be bytes, a data URI or a relative path, got "
            f"{type(value).__name__}")
  if value.startswith(DATA_URI):
    try:
      return base64.b64decode(value.split(",", 1)[1], validate=True)
    except (IndexError, binascii.Error, ValueError) as e:
      return f"bad data URI: {name} is not base64 ({e})"
  if os.path.isabs(value):
    return f"image path leaves the table's folder: {name} {value!r} is absolute"
  root = os.path.realpath(folder)
  target = os.path.realpath(os.path.join(root, value))
  if os.path.commonpath([root, target]) != root:
    return f"image path leaves the table's folder: {name} {value!r}"
  try:
    with open(target, "rb") as f:
      return f.read()
  except OSError as e:
    return f"image file unreadable: {name} {value!r} ({type(e).__name__})"


def row_problem(raw) -> str | None:
  """Why a row's small fields cannot be used (None: they can); images are checked apart."""
  if raw is None:
    return "not a JSON object: the line does not parse to one"
  absent = [n for n in REQUIRED if raw[n] is MISSING and not (n == "preferred" and is_tie(raw))]
  if absent:
    return f"missing field: {', '.join(absent)}"
  if user_key(raw["user_id"]) is None:
    return f"bad user_id: an integer or a non-empty string, got {raw['user_id']!r}"
  if not isinstance(raw["caption"], str):
    return f"bad caption: a string, got {type(raw['caption']).__name__}"
  tie = raw.get("tie", MISSING)
  if tie is not MISSING and isinstance(_flag(tie), str):
    return f"bad tie: {_flag(tie)}"
  if not is_tie(raw) and preferred_of(raw) is None:
    return f"bad preferred: 0 or 1, got {raw['preferred']!r}"
  return None


def preferred_of(raw):
  """0 or 1 (which image won), from an int, an integral float or a "0"/"1" string; else None."""
  value = raw["preferred"]
  if isinstance(value, str):
    value = value.strip()
    return int(value) if value in ("0", "1") else None
  if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
    return int(value)
  return None


def is_tie(raw) -> bool:
  tie = raw.get("tie", MISSING)
  return tie is not MISSING and _flag(tie) == 1

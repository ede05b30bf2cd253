"""Per-user verdict logs (judge_agreement, winrate): JSONL rows of one user between a
{"user_start"} and a {"user_done"} row, appended and fsynced as each user finishes.

Reading keeps, for each closed user, the rows after its last start: a user cut off by a kill (no
closing row, maybe a torn last line) counts as not done, and what it left is ignored. A block is
appended on a fresh line even after a torn one. A log on a URL (gs://...) is rewritten whole for
each user (an object cannot be appended to; storage.append_text), which a kill cannot tear.

An invalid verdict (the judge could not answer: an HTTP error, an unreadable or cut-short reply,
too little mass on the answer) is never final. invalid() lists a closed user's invalid rows; the
next run asks those rows again and appends a new closed block for the user with all its rows
(the valid ones kept as they were, the re-asked ones replaced), which read() then takes, as it
takes the last block of a user.
"""
import json
import os

from ppd_jax import storage


def read(path, key: str = "pair_id") -> dict:
  """{user: {row[key]: row}} of the closed users (module docstring)."""
  final, pending = {}, {}
  if storage.exists(path):
    for line in storage.read_text(path).splitlines():
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if not isinstance(row, dict):
        continue
      u = row.get("user_id")
      if row.get("user_start"):
        pending[u] = {}
      elif row.get("user_done"):
        final[u] = pending.pop(u, {})
      elif key in row and u in pending:
        pending[u][row[key]] = row
  return final


def invalid(final: dict) -> dict:
  """{user: [row keys whose verdict is "invalid"]} of read()'s users that have any, in row order."""
  out = {}
  for u, rows in final.items():
    bad = [k for k, r in rows.items() if r.get("verdict") == "invalid"]
    if bad:
      out[u] = bad
  return out


def append_lines(path, text: str) -> None:
  """Appends whole lines to a local file (fsynced) or a URL's object, on a fresh line even when
  the file ends in a torn one (a kill mid-write)."""
  p = storage.path(path)
  if storage.is_url(p):
    old = p.read_text() if p.exists() else ""
    storage.write_text(p, old + ("\n" if old and not old.endswith("\n") else "") + text)
    return
  torn = False
  if p.exists() and p.stat().length:
    with open(p, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  with open(p, "a", encoding="utf-8") as f:
    f.write(("\n" if torn else "") + text)
    f.flush()
    os.fsync(f.fileno())


def append_user(path, user_id, rows: list[dict]) -> None:
  """One user's rows as a closed block, on a fresh line even after a torn one, fsynced."""
  block = [{"user_id": user_id, "user_start": True}, *rows,
           {"user_id": user_id, "user_done": True}]
  append_lines(path, "".join(json.dumps(r) + "\n" for r in block))

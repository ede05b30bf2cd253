"""Per-user verdict logs (judge_agreement, winrate): JSONL rows of one user between a
{"user_start"} and a {"user_done"} row, appended and fsynced as each user finishes.

Reading keeps, for each closed user, the rows after its last start: a user cut off by a kill (no
closing row, maybe a torn last line) counts as not done, and what it left is ignored. A block is
appended on a fresh line even after a torn one.
"""
import json
import os

def read(path: str, key: str = "pair_id") -> dict:
  """{user: {row[key]: row}} of the closed users (module docstring)."""
  final, pending = {}, {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
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


def append_user(path: str, user_id, rows: list[dict]) -> None:
  """One user's rows as a closed block, on a fresh line even after a torn one, fsynced."""
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  with open(path, "a", encoding="utf-8") as f:
    block = [{"user_id": user_id, "user_start": True}, *rows,
             {"user_id": user_id, "user_done": True}]
    f.write(("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in block))
    f.flush()
    os.fsync(f.fileno())

"""Which labelled pairs each user embedding is made from, and reading them.

Three inputs (users/embed.py --pairs):
  * Pick-a-Pic: a precompute output folder (its saved index/, so the shots are exactly the ones
    the training data recorded) or a parquet folder (indexed here with the config's split
    parameters). A pair's id is its position in the index, as in the training records.
  * A JSONL file (or a JSON list) of {"user_id", "caption", "image_1", "image_2", "preferred"
    (1 or 2)[, "pair_id"]} with image paths relative to the file, or the images themselves as
    data URIs ("data:image/png;base64,...": a file that travels alone, as the web demo's
    download). A pair's id is its "pair_id", else its 0-based line (list position).
  * A relabel folder (data/relabel.py): the reward users, each shown its pairs under its
    reward's labels (users/reward_shots.py). A pair's id is its row of labels-train.npz.

Entry (user, sample 0) is the user's recorded few-shot pairs: the first N of its pairs in the
reader's order (Pick-a-Pic: the seeded order of data/pickapic.py; JSONL: file order). Samples
1, 2, ... are other N-subsets, drawn with a seed from the user's pairs, distinct as sets; a user
with fewer distinct subsets gets fewer samples. A pair whose image cannot be read is replaced by
the user's next unused pair, as the training reader does, and counted.

Any of these may be at a URL (gs://...), and so may a JSONL file's images (paths relative to the
file are relative to its URL): every read goes through ppd_jax.storage.
"""
import base64
import dataclasses
import json
import math
import os

import numpy as np

from ppd_jax import storage
from ppd_jax.users import prompts
from ppd_jax.users.pair_image import PairsError, UnreadablePair, decode_image  # noqa: F401


DATA_URI = "data:image/"   # an image given inline: data:image/png;base64,<bytes>


@dataclasses.dataclass(frozen=True)
class Entry:
  """One embedding to make: a user, its sample number and the ids of the pairs it shows."""
  user_id: int
  sample: int
  shot_ids: tuple

  @property
  def key(self) -> str:
    return f"{self.user_id}:{self.sample}"


def read_rows(path: str) -> tuple[list[dict], list[str]]:
  """A JSONL file or a JSON list -> (rows with their pair ids, problems found), bad rows left
  out. Every row needs caption, image_1, image_2 and preferred; JsonlPairs also needs user_id,
  a new user's file (users/new_user.py) may leave it out."""
  try:
    text = storage.read_bytes(path).decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    raise PairsError(f"--pairs={path}: {e}") from None
  return parse_rows(text, path, path.endswith(".json"))


def parse_rows(text: str, path: str, as_json_list: bool) -> tuple[list[dict], list[str]]:
  """read_rows on the file's text: `path` names it in messages and anchors relative images."""
  if as_json_list:
    try:
      raw = json.loads(text)
    except ValueError as e:
      raise PairsError(f"--pairs={path}: not valid JSON: {e}") from None
    if not isinstance(raw, list):
      raise PairsError(f"--pairs={path}: expected a JSON list of pairs")
    numbered = [(i, r, f"{path}[{i}]") for i, r in enumerate(raw)]
  else:
    numbered = []
    for i, line in enumerate(text.splitlines()):
      if line.strip():
        numbered.append((i, line, f"{path}:{i + 1}"))
  rows, problems = [], []
  folder = os.fspath(storage.path(path).parent)
  for i, raw, where in numbered:
    try:
      rows.append(_row(raw, i, folder, where))
    except PairsError as e:
      problems.append(str(e))
  return rows, problems


def _row(raw, i: int, folder: str, where: str) -> dict:
  if isinstance(raw, str):
    try:
      raw = json.loads(raw)
    except ValueError as e:
      raise PairsError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise PairsError(f"{where}: expected an object")
  lacking = [k for k in ("caption", "image_1", "image_2", "preferred") if k not in raw]
  if lacking:
    raise PairsError(f"{where}: missing field(s) {lacking}")
  if raw["preferred"] not in (1, 2) or isinstance(raw["preferred"], bool):
    raise PairsError(f"{where}: preferred must be 1 or 2, got {raw['preferred']!r}")
  for key in ("user_id", "pair_id"):
    if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
      raise PairsError(f"{where}: {key} must be an integer, got {raw[key]!r}")
  if not isinstance(raw["caption"], str):
    raise PairsError(f"{where}: caption must be a string")
  def image(key):
    value = raw[key]
    if isinstance(value, str) and value.startswith(DATA_URI):
      try:
        return base64.b64decode(value[len(DATA_URI):].split(",", 1)[1], validate=True)
      except (ValueError, IndexError) as e:
        raise PairsError(f"{where}: {key} is not a base64 data URI ({e})") from None
    if not isinstance(value, str):
      raise PairsError(f"{where}: {key} must be a path or a data URI")
    return os.path.join(folder, value)
  return {"pair_id": int(raw.get("pair_id", i)), "user_id": raw.get("user_id"),
          "caption": raw["caption"], "image_1": image("image_1"), "image_2": image("image_2"),
          "preferred": int(raw["preferred"]), "where": where}


class JsonlPairs:
  """Pairs from a JSONL file / JSON list, grouped by user in file order."""

  def __init__(self, path: str, shots: int, log=print):
    self.path = path
    rows, problems = read_rows(path)
    for p in problems[:10]:
      log(f"embed: skipping {p}")
    lacking = [r["where"] for r in rows if r["user_id"] is None]
    if lacking:
      raise PairsError(f"--pairs={path}: rows without a user_id: {lacking[:5]}")
    ids = [r["pair_id"] for r in rows]
    if len(set(ids)) != len(ids):
      raise PairsError(f"--pairs={path}: repeated pair_id values")
    self._rows = {r["pair_id"]: r for r in rows}
    by_user: dict[int, list[int]] = {}
    for r in rows:
      by_user.setdefault(r["user_id"], []).append(r["pair_id"])
    self._order = {u: p for u, p in by_user.items() if len(p) >= shots}
    self.report = {"rows_skipped": len(problems),
                   "users_too_few_pairs": len(by_user) - len(self._order)}
    self.users = np.asarray(sorted(self._order), np.int64)

  def describe(self) -> dict:
    p = storage.path(self.path)
    return {"kind": "jsonl", "path": os.fspath(p), "size": p.stat().length}

  def candidates(self, user_id: int) -> list[int]:
    return self._order[int(user_id)]

  def load(self, pair_ids: list[int]) -> dict:
    """{pair id: prompts.Pair or UnreadablePair}."""
    out = {}
    for pid in pair_ids:
      r = self._rows[pid]
      try:
        out[pid] = prompts.Pair(r["caption"], decode_image(r["image_1"], r["where"]),
                                decode_image(r["image_2"], r["where"]), r["preferred"])
      except UnreadablePair as e:
        out[pid] = e
    return out


class PickapicShots:
  """Pairs of a Pick-a-Pic index; sample 0 is the index's recorded few-shot set."""

  def __init__(self, index, source: dict):
    self.index, self._source = index, source
    p = index.pairs
    order = np.lexsort((p["key"], p["user_id"]))             # by user, then the seeded key
    self._sorted = order
    self._starts = np.searchsorted(p["user_id"][order], index.users["user_id"])
    self._ends = np.searchsorted(p["user_id"][order], index.users["user_id"], side="right")
    self.users = np.asarray(index.users["user_id"], np.int64)
    self.num_pairs = np.asarray(index.users["num_pairs"], np.int64)
    self.report = {}

  def describe(self) -> dict:
    return self._source

  def candidates(self, user_id: int) -> list[int]:
    u = int(np.searchsorted(self.users, user_id))
    return self._sorted[self._starts[u]:self._ends[u]].tolist()

  def load(self, pair_ids: list[int]) -> dict:
    from ppd_jax.data import pickapic
    out = {}
    for r in pickapic.read_pairs(self.index, pair_ids):
      where = f"pair {r['pair']} of user {r['user_id']}"
      try:
        out[r["pair"]] = prompts.Pair(r["caption"], decode_image(r["jpg_0"], where),
                                      decode_image(r["jpg_1"], where), 1 + r["preferred"])
      except UnreadablePair as e:
        out[r["pair"]] = e
    return out


def open_pairs(path: str, shots: int, *, split_params: dict, log=print):
  """--pairs -> JsonlPairs, PickapicShots or, for a relabel folder, the reward users'
  RewardUserShots (users/reward_shots.py)."""
  from ppd_jax.data import pickapic
  from ppd_jax.users import reward_shots
  where = storage.path(path)
  if where.exists() and not where.is_dir():
    return JsonlPairs(path, shots, log)
  if reward_shots.is_relabel_folder(path):
    return reward_shots.RewardUserShots(path, shots)
  saved = os.path.join(path, "index")
  if storage.exists(os.path.join(saved, "index.json")):
    index = pickapic.PickapicIndex.load(saved)
    if index.users["fewshot"].shape[1] != shots:
      raise PairsError(f"--pairs={path}: its index recorded {index.users['fewshot'].shape[1]} "
                       f"few-shot pairs per user, --shots={shots}")
    source = {"kind": "pickapic_index", "path": os.fspath(where),
              "parameters": index.report["parameters"]}
    return PickapicShots(index, source)
  if not where.is_dir():
    raise PairsError(f"--pairs={path}: neither a JSONL/JSON file nor a folder")
  try:
    index = pickapic.build_index(path, fewshot=shots, log=log, **split_params)
  except pickapic.PickapicError as e:
    raise PairsError(f"--pairs={path}: {e}") from None
  source = {"kind": "pickapic_parquet", "path": os.fspath(where),
            "parameters": index.report["parameters"], "inputs": index.report["inputs"]}
  return PickapicShots(index, source)


def plan(pairs, *, shots: int, samples: int, sample_users: int, seed: int) -> list[Entry]:
  """Every entry to make, sorted by (user, sample). Extra samples go to every user, or with
  sample_users = K only to the K users with the most pairs."""
  users = pairs.users
  counts = np.asarray([len(pairs.candidates(u)) for u in users])
  extra = set(users.tolist())
  if sample_users and samples > 1:
    top = np.lexsort((users, -counts))[:sample_users]          # most pairs, then smallest id
    extra = set(users[top].tolist())
  entries = []
  for u, n in zip(users.tolist(), counts):
    order = pairs.candidates(u)
    entries.append(Entry(u, 0, tuple(order[:shots])))
    if u not in extra or samples == 1:
      continue
    wanted = min(samples, math.comb(int(n), shots))
    seen = {frozenset(order[:shots])}
    rng = np.random.default_rng([seed, u & (2**63 - 1), 1])
    tries = 0
    while len(seen) < wanted and tries < 50 * samples:
      tries += 1
      pick = sorted(rng.choice(int(n), shots, replace=False))
      chosen = tuple(order[i] for i in pick)
      if frozenset(chosen) not in seen:
        seen.add(frozenset(chosen))
        entries.append(Entry(u, len(seen) - 1, chosen))
  return entries


def resolve(pairs, entries: list[Entry]) -> tuple[list[Entry], list[list], list[str]]:
  """Reads the images of some entries. A pair that cannot be read is replaced by the user's next
  pair not already in the entry, and the shots are kept in the user's order (so sample 0 is the
  training reader's fewshot_pairs(exclude=unreadable)) -> (entries with the shots used, their
  Pair lists, problems).
  An entry that runs out of pairs is left out (named in problems)."""
  wanted = sorted({p for e in entries for p in e.shot_ids})
  loaded = pairs.load(wanted)
  done, pair_lists, problems = [], [], []
  for e in entries:
    shots, used = [], set(e.shot_ids)
    for pid in e.shot_ids:
      pid, pair = _usable(pairs, loaded, e.user_id, pid, used, problems)
      if pair is None:
        break
      shots.append((pid, pair))
    if len(shots) < len(e.shot_ids):
      problems.append(f"user {e.user_id} sample {e.sample}: too few readable pairs, left out")
      continue
    rank = {pid: i for i, pid in enumerate(pairs.candidates(e.user_id))}
    shots.sort(key=lambda s: rank[s[0]])          # the user's order, as without replacements
    done.append(Entry(e.user_id, e.sample, tuple(pid for pid, _ in shots)))
    pair_lists.append([pair for _, pair in shots])
  return done, pair_lists, problems


def _usable(pairs, loaded: dict, user_id: int, pid: int, used: set, problems: list):
  """pid's Pair, or the user's next readable unused pair's; (None, None) when none is left."""
  queue = iter([q for q in pairs.candidates(user_id) if q not in used])
  while True:
    got = loaded.get(pid)
    if got is None:
      got = loaded[pid] = pairs.load([pid])[pid]
    if not isinstance(got, UnreadablePair):
      return pid, got
    problems.append(f"unreadable image, pair skipped: {got}")
    pid = next(queue, None)
    if pid is None:
      return None, None
    used.add(pid)

"""The files of `python -m ppd_jax.evals.score`: what to score, and the scores written so far.

Input: a JSONL file of {"image": PATH, "prompt": TEXT} lines (paths relative to the file), or a
folder of images with such a `prompts.jsonl` beside them (`ppd_jax.sample` writes one); a folder
without one is fine for an image-only reward. Every image and prompt is checked before any work.

Output: one JSON line per image, appended and fsynced batch by batch, so a killed run keeps what it
scored and a rerun scores only the rest (a torn last line is dropped). A summary goes beside it.

Every path may be a URL (gs://...): files go through ppd_jax.storage. An object cannot be appended
to, so a URL's score log is rewritten whole after each batch (an upload appears only once complete,
so a kill leaves the previous batch's log).
"""
import dataclasses
import json
import os

from ppd_jax import storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPTS_FILE = "prompts.jsonl"


class ScoreInputError(ValueError):
  """A missing or malformed input; the message names the file, line or field."""


@dataclasses.dataclass(frozen=True)
class Item:
  key: str       # the image as the input names it (the output's "image")
  path: str      # where it is
  prompt: str


def json_objects(path: str, error=ScoreInputError, fields=()):
  """(line number, object) of each non-blank line of a JSONL file; a line that is not a JSON
  object, or lacks one of the string `fields`, raises `error` naming path:line."""
  for number, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise error(f"{path}:{number}: not a JSON line ({e})") from None
    if not isinstance(row, dict):
      raise error(f"{path}:{number}: expected an object with {', '.join(fields)}")
    for field in fields:
      if not isinstance(row.get(field), str):
        raise error(f"{path}:{number}: field {field!r} is missing or not a string")
    yield number, row


def _read_jsonl(path: str, base_dir) -> list[Item]:
  items, seen = [], set()
  for number, row in json_objects(path, ScoreInputError, ("image", "prompt")):
    if row["image"] in seen:
      raise ScoreInputError(f"{path}:{number}: image {row['image']!r} is listed twice")
    seen.add(row["image"])
    items.append(Item(row["image"], os.fspath(storage.path(base_dir) / row["image"]),
                      row["prompt"]))
  return items


def read_items(images: str, prompts: str | None = None, need_prompts: bool = True) -> list[Item]:
  """--images=DIR|FILE.jsonl (and --prompts=FILE.jsonl for a folder) -> the items to score."""
  where = storage.path(images)
  if where.is_dir():
    listing = prompts or os.fspath(where / PROMPTS_FILE)
    if storage.exists(listing):
      items = _read_jsonl(listing, where)
    elif prompts or need_prompts:
      raise ScoreInputError(f"--images={images}: no prompts file {listing} (JSON lines of "
                            "{\"image\": NAME, \"prompt\": TEXT}); pass --prompts=FILE")
    else:
      names = sorted(p.name for p in where.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES))
      items = [Item(n, os.fspath(where / n), "") for n in names]
  elif where.is_file():
    if prompts:
      raise ScoreInputError(f"--prompts is for a folder of images; {images} is a file")
    items = _read_jsonl(images, where.parent)
  else:
    raise ScoreInputError(f"--images={images}: no such folder or file")
  missing = [it.path for it in items if not storage.path(it.path).is_file()]
  if missing:
    raise ScoreInputError(f"{len(missing)} image file(s) missing, e.g. {', '.join(missing[:3])}")
  if not items:
    raise ScoreInputError(f"--images={images}: nothing to score")
  return items


class ScoreLog:
  """The --out JSONL: what previous runs scored (for resuming), and appending new scores."""

  def __init__(self, path: str, reward: str):
    self.path, self.reward = path, reward
    self.scores: dict[str, float] = {}
    if storage.exists(path):
      self._read()

  def _read(self) -> None:
    good = 0
    data = storage.read_bytes(self.path)
    for line in data.splitlines(keepends=True):
      if not line.endswith(b"\n"):
        break                                    # a torn last line: dropped below
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        break
      if row.get("reward") != self.reward:
        raise ScoreInputError(f"--out={self.path} holds scores of reward {row.get('reward')!r}, "
                              f"not {self.reward!r}; pass another --out")
      self.scores[row["image"]] = float(row["score"])
      good += len(line)
    if good < len(data):
      if storage.is_url(self.path):
        storage.write_bytes(self.path, data[:good])
      else:
        with open(self.path, "r+b") as f:
          f.truncate(good)

  def append(self, items: list[Item], scores) -> None:
    scores = [float(s) for s in scores]
    lines = [json.dumps({"image": item.key, "prompt": item.prompt, "reward": self.reward,
                         "score": score}) + "\n" for item, score in zip(items, scores)]
    if storage.is_url(self.path):
      storage.append_text(self.path, "".join(lines))
    else:
      with open(self.path, "a") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    self.scores.update({item.key: score for item, score in zip(items, scores)})


def summary_path(out: str) -> str:
  stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
  return stem + ".summary.json"


def write_json_atomic(path, payload: dict) -> None:
  """A local path or a URL; a reader never sees it half-written (storage.write_text)."""
  storage.write_text(path, json.dumps(payload, indent=2))

"""The files of `python -m ppd_jax.evals.score`: what to score, and the scores written so far.

Input: a JSONL file of {"image": PATH, "prompt": TEXT} lines (paths relative to the file), or a
folder of images with such a `prompts.jsonl` beside them (`ppd_jax.sample` writes one); a folder
without one is fine for an image-only reward. Every image and prompt is checked before any work.

Output: one JSON line per image, appended and fsynced batch by batch, so a killed run keeps what it
scored and a rerun scores only the rest (a torn last line is dropped). A summary goes beside it.
"""
import dataclasses
import json
import os

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
  with open(path) as f:
    for number, line in enumerate(f, 1):
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


def _read_jsonl(path: str, base_dir: str) -> list[Item]:
  items, seen = [], set()
  for number, row in json_objects(path, ScoreInputError, ("image", "prompt")):
    if row["image"] in seen:
      raise ScoreInputError(f"{path}:{number}: image {row['image']!r} is listed twice")
    seen.add(row["image"])
    items.append(Item(row["image"], os.path.join(base_dir, row["image"]), row["prompt"]))
  return items


def read_items(images: str, prompts: str | None = None, need_prompts: bool = True) -> list[Item]:
  """--images=DIR|FILE.jsonl (and --prompts=FILE.jsonl for a folder) -> the items to score."""
  if os.path.isdir(images):
    listing = prompts or os.path.join(images, PROMPTS_FILE)
    if os.path.exists(listing):
      items = _read_jsonl(listing, images)
    elif prompts or need_prompts:
      raise ScoreInputError(f"--images={images}: no prompts file {listing} (JSON lines of "
                            "{\"image\": NAME, \"prompt\": TEXT}); pass --prompts=FILE")
    else:
      names = sorted(n for n in os.listdir(images) if n.lower().endswith(IMAGE_SUFFIXES))
      items = [Item(n, os.path.join(images, n), "") for n in names]
  elif os.path.isfile(images):
    if prompts:
      raise ScoreInputError(f"--prompts is for a folder of images; {images} is a file")
    items = _read_jsonl(images, os.path.dirname(os.path.abspath(images)))
  else:
    raise ScoreInputError(f"--images={images}: no such folder or file")
  missing = [it.path for it in items if not os.path.isfile(it.path)]
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
    if os.path.exists(path):
      self._read()

  def _read(self) -> None:
    good = 0
    with open(self.path, "rb") as f:
      data = f.read()
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
      with open(self.path, "r+b") as f:
        f.truncate(good)

  def append(self, items: list[Item], scores) -> None:
    with open(self.path, "a") as f:
      for item, score in zip(items, scores):
        f.write(json.dumps({"image": item.key, "prompt": item.prompt, "reward": self.reward,
                            "score": float(score)}) + "\n")
        self.scores[item.key] = float(score)
      f.flush()
      os.fsync(f.fileno())


def summary_path(out: str) -> str:
  stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
  return stem + ".summary.json"


def write_json_atomic(path: str, payload: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)

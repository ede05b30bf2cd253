"""Prompt sets for evaluation, read from the user's files (none ships with the package).

    PartiPrompts.tsv        header Prompt<TAB>Category<TAB>Challenge<TAB>Note (1632 prompts;
                            google-research/parti, Apache-2.0)
    prompts.txt             one prompt per line (blank lines skipped)
    prompts.jsonl           {"prompt": TEXT, "category": ...} per line
    pickapic:SHARD_DIR[:split]   the unique captions of a precomputed Pick-a-Pic split
                            (default validation: the paper's beta selection set)

Duplicates are kept in file order (a prompt set is what it is); an empty set, a TSV without a
Prompt column, a row of the wrong width or a JSONL line without "prompt" is an error naming the
file and line. Files and SHARD_DIR may be URLs (gs://...): they are read through ppd_jax.storage.
"""
import csv
import dataclasses
import io
import os

from ppd_jax import storage


class PromptSetError(ValueError):
  """A prompt file that cannot be read as a prompt set; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  category: str = ""


def _tsv(path: str) -> list[Prompt]:
  rows = list(csv.reader(io.StringIO(storage.read_text(path), newline=""), delimiter="\t"))
  if not rows or "Prompt" not in rows[0]:
    raise PromptSetError(f"{path}:1: a TSV prompt set needs a header with a 'Prompt' column "
                         f"(PartiPrompts: Prompt, Category, Challenge, Note), got {rows[:1]}")
  header = rows[0]
  col, cat = header.index("Prompt"), header.index("Category") if "Category" in header else None
  out = []
  for number, row in enumerate(rows[1:], 2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != len(header):
      raise PromptSetError(f"{path}:{number}: {len(row)} fields, the header has {len(header)}")
    out.append(Prompt(row[col].strip(), row[cat].strip() if cat is not None else ""))
  return out


def _jsonl(path: str) -> list[Prompt]:
  from ppd_jax.evals import score_files
  return [Prompt(row["prompt"], str(row.get("category", "")))
          for _, row in score_files.json_objects(path, PromptSetError, ("prompt",))]


def _pickapic(spec: str) -> list[Prompt]:
  import numpy as np
  from ppd_jax.data import pickapic
  folder, _, split = spec[len("pickapic:"):].partition(":")
  split = split or "validation"
  path = storage.path(folder) / f"records-{split}.npz"
  if not path.exists():
    raise PromptSetError(f"{spec}: no {path} (a precompute output folder and one of its "
                         "splits: train, validation, test)")
  index = pickapic.PickapicIndex.load(os.fspath(storage.path(folder) / "index"))
  pairs = np.load(io.BytesIO(path.read_bytes()))["pair"]
  ids = list(dict.fromkeys(int(c) for c in index.pairs["caption_id"][np.sort(pairs)]))
  return [Prompt(index.captions[c], f"pickapic-{split}") for c in ids]


def read(spec: str, limit: int | None = None) -> list[Prompt]:
  """The prompt set at `spec` (a file, or pickapic:SHARD_DIR[:split]), its first `limit`."""
  if spec.startswith("pickapic:"):
    prompts = _pickapic(spec)
  elif not storage.path(spec).is_file():
    raise PromptSetError(f"{spec}: no such prompt file")
  elif spec.endswith(".tsv"):
    prompts = _tsv(spec)
  elif spec.endswith(".jsonl"):
    prompts = _jsonl(spec)
  else:
    prompts = [Prompt(line.strip()) for line in storage.read_text(spec).splitlines()
               if line.strip()]
  if not prompts:
    raise PromptSetError(f"{spec}: no prompts")
  return prompts[:limit] if limit else prompts

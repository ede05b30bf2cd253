"""Prompt sets for evaluation, read from the user's files (none ships with the package).

    PartiPrompts.tsv        header Prompt<TAB>Category<TAB>Challenge<TAB>Note (1632 prompts;
                            google-research/parti, Apache-2.0); cells read verbatim, quotes kept
    prompts.txt             one prompt per line (blank lines skipped)
    prompts.jsonl           {"prompt": TEXT, "category": ...} per line
    CAPTIONS.parquet, or a folder of .parquet files (sorted by name)
                            the unique non-blank values of the `caption` column, in file order:
                            Pick-a-Pic v2's validation_unique split (500 captions), the paper's
                            beta-selection set
    pickapic:SHARD_DIR[:split]
                            the unique captions of one of this project's own user splits, made by
                            the precompute (data/make_pickapic holds users out; default
                            validation). Not Pick-a-Pic v2's validation_unique split; the
                            category says so: "ppd-split-validation".

Duplicates are kept in file order (a prompt set is what it is); an empty set, a TSV without a
Prompt column, a row of the wrong width, a JSONL line without "prompt" or a parquet file without
a caption column is an error naming the file and line or column. Files and SHARD_DIR may be URLs
(gs://...): they are read through ppd_jax.storage.

Subsets. `read(spec, limit=N, seed=S)` with N below the set's size is a seeded sample, not the
first N rows (PartiPrompts' first 37 are one-word "Abstract" prompts). Where the set has
categories it is stratified: category c of n_c prompts gets floor(N n_c / n) places, and the
places left go to the largest remainders N n_c mod n, ties in a seeded order; each category's
places are then drawn without replacement. Without categories it is a simple random sample. One
numpy default_rng(S) draws everything, so the same file, N and S give the same subset. Prompts
come back in file order, each with its `index` in the full set; `describe` gives what a manifest
records about them (file hash, set size, indices, seed).
"""
import csv
import dataclasses
import hashlib
import io
import os
from typing import Sequence

import numpy as np

from ppd_jax import storage


class PromptSetError(ValueError):
  """A prompt file that cannot be read as a prompt set; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt. `index` is its 0-based place in the full set, in file order (-1: not read from a
  set); equality looks at the text and category only."""
  text: str
  category: str = ""
  index: int = dataclasses.field(default=-1, compare=False)


def _tsv(path: str) -> list[Prompt]:
  # QUOTE_NONE: a cell such as `"G I G G L E" painted in ...` keeps its quotes.
  rows = list(csv.reader(io.StringIO(storage.read_text(path), newline=""), delimiter="\t",
                         quoting=csv.QUOTE_NONE))
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


def _parquet_files(spec: str) -> list[str]:
  from ppd_jax.data import pickapic
  if not storage.path(spec).is_dir():
    return [spec]
  try:
    return pickapic.list_files(spec)
  except pickapic.PickapicError:
    raise PromptSetError(f"{spec}: a folder without .parquet files") from None


def _parquet(files: list[str]) -> list[Prompt]:
  """Unique non-blank captions of the `caption` column, in file order."""
  import pyarrow as pa
  from ppd_jax.data import pickapic
  captions = {}
  for path in files:
    try:
      pf = pickapic.open_parquet(path)
    except (OSError, pa.ArrowException) as e:
      raise PromptSetError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if "caption" not in names:
      raise PromptSetError(f"{path}: no 'caption' column (columns: {', '.join(names)})")
    kind = pf.schema_arrow.field("caption").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise PromptSetError(f"{path}: column 'caption' has type {kind}, expected string")
    for text in pf.read(columns=["caption"]).column("caption").to_pylist():
      if text is not None and text.strip():
        captions.setdefault(text, None)
  return [Prompt(text) for text in captions]


def _pickapic(spec: str) -> tuple[list[Prompt], list[str]]:
  """The unique captions of a precompute's own user split, and the files that determine them."""
  from ppd_jax.data import pickapic
  folder, _, split = spec[len("pickapic:"):].partition(":")
  split = split or "validation"
  path = storage.path(folder) / f"records-{split}.npz"
  if not path.exists():
    raise PromptSetError(f"{spec}: no {path} (a precompute output folder and one of its own "
                         "user splits: train, validation, test)")
  index = pickapic.PickapicIndex.load(os.fspath(storage.path(folder) / "index"))
  pairs = np.load(io.BytesIO(path.read_bytes()))["pair"]
  ids = list(dict.fromkeys(int(c) for c in index.pairs["caption_id"][np.sort(pairs)]))
  files = [os.fspath(path)] + [os.fspath(storage.path(folder) / "index" / name)
                               for name in ("captions.json", "pairs.npz")]
  return [Prompt(index.captions[c], f"ppd-split-{split}") for c in ids], files


def _load(spec: str) -> tuple[list[Prompt], list[str]]:
  """(the whole set with indices, the files it was read from)."""
  if spec.startswith("pickapic:"):
    prompts, files = _pickapic(spec)
  elif not storage.exists(spec):
    raise PromptSetError(f"{spec}: no such prompt file")
  elif spec.endswith(".parquet") or storage.path(spec).is_dir():
    files = _parquet_files(spec)
    prompts = _parquet(files)
  else:
    files = [spec]
    if spec.endswith(".tsv"):
      prompts = _tsv(spec)
    elif spec.endswith(".jsonl"):
      prompts = _jsonl(spec)
    else:
      prompts = [Prompt(line.strip()) for line in storage.read_text(spec).splitlines()
                 if line.strip()]
  if not prompts:
    raise PromptSetError(f"{spec}: no prompts")
  return [dataclasses.replace(p, index=i) for i, p in enumerate(prompts)], files


def choose(categories: Sequence[str], n: int, seed: int) -> list[int]:
  """The sorted indices of a seeded n-subset, stratified by `categories` (one per prompt; a
  single category is a simple random sample). Largest-remainder allocation:
      quota_c = n n_c / total = base_c + r_c / total,  base_c = floor,  r_c = n n_c mod total,
  and the n - sum(base_c) places left go to the largest r_c (ties in a seeded order). Each
  quota_c <= n_c, so every category has the places it is given."""
  if n <= 0:
    return []
  rng = np.random.default_rng(seed)
  groups: dict[str, list[int]] = {}
  for i, c in enumerate(categories):
    groups.setdefault(c, []).append(i)
  sizes = np.array([len(g) for g in groups.values()], np.int64)
  total = int(sizes.sum())
  base, remainder = np.divmod(n * sizes, total)
  order = np.lexsort((rng.permutation(len(sizes)), -remainder))   # remainder desc, then tie
  base[order[:n - int(base.sum())]] += 1
  chosen = [rng.choice(np.asarray(g), size=int(k), replace=False)
            for g, k in zip(groups.values(), base) if k]
  return sorted(int(i) for i in np.concatenate(chosen))


def read(spec: str, limit: int | None = None, seed: int = 0) -> list[Prompt]:
  """The prompt set at `spec` (a file, a parquet folder, or pickapic:SHARD_DIR[:split]), or, for a
  `limit` below its size, the seeded stratified `limit`-subset of it, in file order (module
  docstring). No limit (None or 0) is the whole set."""
  prompts, _ = _load(spec)
  if limit is not None and limit < 0:
    raise PromptSetError(f"{spec}: cannot take {limit} prompts (a count >= 1, or 0 for all)")
  if not limit or limit >= len(prompts):
    return prompts
  return [prompts[i] for i in choose([p.category for p in prompts], limit, seed)]


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def describe(prompts: Sequence[Prompt], spec: str, seed: int = 0) -> dict:
  """What a manifest records about `prompts`, the list `read(spec, limit, seed)` returned:
  {"spec", "sha256" (of the file's bytes; for several files, of their sorted hex digests, one a
  line, so a copy elsewhere hashes alike), "files" {path: sha256}, "size" (the full set),
  "indices", "seed", "sampling"}. The set is read again, and prompts that are not its `read`
  subset for this seed are an error, so the record cannot describe other prompts than those
  used."""
  full, files = _load(spec)
  if not prompts:
    raise PromptSetError(f"{spec}: no prompts to describe")
  indices = [p.index for p in prompts]
  for p in prompts:
    if not 0 <= p.index < len(full) or full[p.index].text != p.text:
      raise PromptSetError(f"{spec}: prompt {p.text!r} (index {p.index}) is not in this set; "
                           "describe the list that prompt_sets.read returned")
  if len(prompts) < len(full):
    categories = [p.category for p in full]
    if indices != choose(categories, len(prompts), seed):
      raise PromptSetError(f"{spec}: these {len(prompts)} prompts are not the subset that "
                           f"read(limit={len(prompts)}, seed={seed}) draws")
    sampling = "stratified by category" if len(set(categories)) > 1 else "simple random"
  elif indices != list(range(len(full))):
    raise PromptSetError(f"{spec}: {len(prompts)} prompts but not the whole set in file order")
  else:
    sampling = "all"
  hashes = {os.fspath(f): _sha256(f) for f in files}
  if len(hashes) == 1:
    sha = next(iter(hashes.values()))
  else:
    sha = hashlib.sha256("".join(f"{h}\n" for h in sorted(hashes.values())).encode()).hexdigest()
  return {"spec": spec, "sha256": sha, "files": hashes, "size": len(full), "indices": indices,
          "seed": seed, "sampling": sampling}

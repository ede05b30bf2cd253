"""evals/prompt_sets.py: files read verbatim, seeded subsets that represent the set (stratified by
category, in file order, with their indices), Pick-a-Pic v2 caption parquet, and `describe`."""
import collections
import hashlib
import json
import os

import numpy as np
import pytest

from ppd_jax.evals import prompt_sets

# Category sizes of a PartiPrompts-like file whose first rows are one category, as the real one's
# 37 "Abstract" rows are.
SIZES = {"Abstract": 37, "Animals": 20, "Vehicles": 13, "People": 30}


def _tsv(tmp_path, sizes=SIZES) -> str:
  lines = ["Prompt\tCategory\tChallenge\tNote"]
  for category, n in sizes.items():
    lines += [f"{category.lower()} prompt {i}\t{category}\tBasic\t" for i in range(n)]
  path = tmp_path / "PartiPrompts.tsv"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_tsv_cells_are_read_verbatim_with_indices(tmp_path):
  path = tmp_path / "quotes.tsv"
  path.write_text('Prompt\tCategory\tChallenge\tNote\n'
                  '"G I G G L E" painted in thick colorful lines\tWorld Knowledge\tWriting\t\n'
                  'a sign that says "hi"\tArtifacts\tWriting\t"a note"\n')
  got = prompt_sets.read(str(path))
  assert [p.text for p in got] == ['"G I G G L E" painted in thick colorful lines',
                                   'a sign that says "hi"']
  assert [p.category for p in got] == ["World Knowledge", "Artifacts"]
  assert [p.index for p in got] == [0, 1]
  assert prompt_sets.Prompt("x").index == -1                                  # built by hand
  assert got[1] == prompt_sets.Prompt('a sign that says "hi"', "Artifacts")   # index not compared


def test_a_subset_is_stratified_seeded_and_in_file_order(tmp_path):
  """10 of 100: quotas 3.7, 2.0, 1.3, 3.0 -> floors 3, 2, 1, 3 and the one place left to the
  largest remainder (Abstract's .7): 4, 2, 1, 3. Never the first 10 rows (all Abstract)."""
  spec = _tsv(tmp_path)
  full = prompt_sets.read(spec)
  for seed in range(5):
    got = prompt_sets.read(spec, limit=10, seed=seed)
    assert collections.Counter(p.category for p in got) == {"Abstract": 4, "Animals": 2,
                                                            "Vehicles": 1, "People": 3}
    indices = [p.index for p in got]
    assert indices == sorted(indices) and len(set(indices)) == 10
    assert all(full[p.index] == p for p in got)
    assert got == prompt_sets.read(spec, limit=10, seed=seed)          # same seed, same subset
  subsets = {tuple(p.index for p in prompt_sets.read(spec, 10, seed=s)) for s in range(5)}
  assert len(subsets) == 5
  assert prompt_sets.read(spec, limit=100) == full == prompt_sets.read(spec, limit=0)
  with pytest.raises(prompt_sets.PromptSetError, match="PartiPrompts.tsv: cannot take -1"):
    prompt_sets.read(spec, limit=-1)


def test_remainder_ties_are_broken_by_the_seed(tmp_path):
  """Two categories of 5, 3 places: 1.5 each, so one gets 2 and which one depends on the seed."""
  spec = _tsv(tmp_path, {"A": 5, "B": 5})
  winners = collections.Counter()
  for seed in range(40):
    counts = collections.Counter(p.category for p in prompt_sets.read(spec, 3, seed=seed))
    assert sorted(counts.values()) == [1, 2]
    winners[counts.most_common(1)[0][0]] += 1
  assert winners["A"] >= 8 and winners["B"] >= 8


def test_without_categories_every_prompt_is_equally_likely(tmp_path):
  """A text file has no categories: a simple random sample, each of 20 lines drawn with
  probability 5/20 (400 seeds: about 100 draws each; 60..140 is over 4 standard deviations)."""
  path = tmp_path / "p.txt"
  path.write_text("".join(f"line {i}\n" for i in range(20)))
  draws = collections.Counter()
  for seed in range(400):
    got = prompt_sets.read(str(path), limit=5, seed=seed)
    assert len(got) == 5 and [p.index for p in got] == sorted(p.index for p in got)
    assert all(p.text == f"line {p.index}" for p in got)
    draws.update(p.index for p in got)
  assert sorted(draws) == list(range(20))
  assert 60 <= min(draws.values()) and max(draws.values()) <= 140


def test_jsonl_categories_stratify(tmp_path):
  path = tmp_path / "p.jsonl"
  rows = [{"prompt": f"x{i}", "category": "big"} for i in range(8)]
  rows += [{"prompt": f"y{i}", "category": "small"} for i in range(2)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  for seed in range(10):
    got = prompt_sets.read(str(path), limit=5, seed=seed)
    assert collections.Counter(p.category for p in got) == {"big": 4, "small": 1}


def test_describe_records_the_file_the_indices_and_the_seed(tmp_path):
  spec = _tsv(tmp_path)
  got = prompt_sets.read(spec, limit=10, seed=7)
  record = prompt_sets.describe(got, spec, seed=7)
  sha = hashlib.sha256(open(spec, "rb").read()).hexdigest()
  assert record == {"spec": spec, "sha256": sha, "files": {spec: sha}, "size": 100,
                    "indices": [p.index for p in got], "seed": 7,
                    "sampling": "stratified by category"}
  assert json.loads(json.dumps(record)) == record
  assert prompt_sets.describe(prompt_sets.read(spec), spec)["sampling"] == "all"
  with pytest.raises(prompt_sets.PromptSetError, match="not the subset that read.*seed=8"):
    prompt_sets.describe(got, spec, seed=8)
  with pytest.raises(prompt_sets.PromptSetError, match="is not in this set"):
    prompt_sets.describe([prompt_sets.Prompt("made up", index=3)], spec)
  with open(spec, "a") as f:                      # another file: another hash
    f.write("one more\tPeople\tBasic\t\n")
  assert prompt_sets.describe(prompt_sets.read(spec), spec)["sha256"] != sha


def _parquet(path, captions, **columns):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = {"caption": pa.array(captions, pa.string()),
           "jpg_0": pa.array([b"\xff\xd8" * 3] * len(captions), pa.binary()), **columns}
  pq.write_table(pa.table(table), str(path))


def test_pickapic_v2_caption_parquet(tmp_path):
  """validation_unique-style files: a caption column among others, captions repeated across rows
  and files; the set is each non-blank caption once, in file order (files sorted by name)."""
  folder = tmp_path / "validation_unique"
  folder.mkdir()
  _parquet(folder / "validation_unique-00001.parquet", ["a fox", "a 'quoted' owl", "a cat"])
  _parquet(folder / "validation_unique-00000.parquet", ["a cat", "a dog", "a cat", None, "  "])
  got = prompt_sets.read(str(folder))
  assert [p.text for p in got] == ["a cat", "a dog", "a fox", "a 'quoted' owl"]
  assert [p.index for p in got] == [0, 1, 2, 3]
  one = prompt_sets.read(str(folder / "validation_unique-00001.parquet"))
  assert [p.text for p in one] == ["a fox", "a 'quoted' owl", "a cat"]
  record = prompt_sets.describe(got, str(folder))
  digests = sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir())
  assert sorted(record["files"].values()) == digests and record["size"] == 4
  assert record["sha256"] == hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"prompt": ["x"]}), str(tmp_path / "bad.parquet"))
  with pytest.raises(prompt_sets.PromptSetError, match=r"bad.parquet: no 'caption' column "
                                                       r"\(columns: prompt\)"):
    prompt_sets.read(str(tmp_path / "bad.parquet"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(prompt_sets.PromptSetError, match="empty: a folder without .parquet"):
    prompt_sets.read(str(tmp_path / "empty"))


def test_pickapic_shards_are_this_projects_own_split(tmp_path):
  """pickapic:SHARD_DIR is a precompute's user split (category ppd-split-<split>), each caption
  once in pair order; describe hashes the records and the index files that determine it."""
  index = tmp_path / "index"
  index.mkdir()
  (index / "index.json").write_text(json.dumps({"files": [], "paths": [], "report": {}}))
  (index / "captions.json").write_text(json.dumps(["c0", "c1", "c2"]))
  np.savez(index / "pairs.npz", caption_id=np.array([2, 0, 2, 1]))
  np.savez(index / "users.npz", user_id=np.array([0]))
  np.savez(tmp_path / "records-validation.npz", pair=np.array([3, 0, 2]))
  got = prompt_sets.read(f"pickapic:{tmp_path}")
  assert [(p.text, p.category) for p in got] == [("c2", "ppd-split-validation"),
                                                  ("c1", "ppd-split-validation")]
  record = prompt_sets.describe(got, f"pickapic:{tmp_path}")
  assert sorted(os.path.basename(f) for f in record["files"]) == [
      "captions.json", "pairs.npz", "records-validation.npz"]

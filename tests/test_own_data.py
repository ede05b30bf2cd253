"""Own preference tables (docs/own_data.md): each format, image forms, bad rows, --columns, and
precompute's latents for them against the source images encoded directly."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module

import own_table_fixtures as tables
import pickapic_fixtures
import tiny_sd
from ppd_jax import backbones
from ppd_jax import config_validation
from ppd_jax.data import images
from ppd_jax.data import make_pickapic
from ppd_jax.data import pickapic
from ppd_jax.data import precompute
from ppd_jax.data import records
from ppd_jax.data import shards
from ppd_jax.data import table_convert
from ppd_jax.data.table_rows import TableError


def _convert(path: str, out: str, columns=None, logs=None):
  plan = table_convert.check(path, columns)
  assert plan is not None
  return table_convert.convert(plan, out, log=(logs.append if logs is not None else lambda m: None))


def _converted(folder: str) -> list[dict]:
  rows = []
  for f in sorted(os.listdir(folder)):
    if f.endswith(".parquet"):
      rows += pq.read_table(os.path.join(folder, f)).to_pylist()
  return rows


def _file_bytes(folder: str, rows: list[dict]) -> list[tuple[bytes, bytes]]:
  return [tuple(open(os.path.join(folder, r[k]), "rb").read() for k in ("image_0", "image_1"))
          for r in rows]


@pytest.mark.parametrize("form", ["jsonl", "csv", "parquet", "parquet_bytes", "jsonl_data_uri"])
def test_each_format_gives_the_rows_and_image_bytes_as_written(tmp_path, form):
  rows = tables.pair_rows(str(tmp_path), [5, 9], 3)
  expected = _file_bytes(str(tmp_path), rows)
  if form in ("parquet_bytes", "jsonl_data_uri"):       # inline images, not paths
    rows = [{**r, "image_0": b0, "image_1": b1} for r, (b0, b1) in zip(rows, expected)]
  path = tables.write_table(str(tmp_path / ("t." + form.split("_")[0])), rows)
  folder, report = _convert(path, str(tmp_path / "out"))
  got = _converted(folder)
  assert report["rows_bad"] == 0 and report["rows_read"] == len(rows) == len(got)
  for g, r, (b0, b1) in zip(got, rows, expected):
    assert (g["user_id"], g["caption"]) == (r["user_id"], r["caption"])
    assert (g["jpg_0"], g["jpg_1"]) == (b0, b1)
    assert (g["label_0"], g["label_1"]) == ((1.0, 0.0) if r["preferred"] == 0 else (0.0, 1.0))
  assert [g["source_row"] for g in got] == list(range(len(rows)))


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
  rows = tables.pair_rows(str(tmp_path / "t"), [1], 12)
  (tmp_path / "outside.png").write_bytes(tables.png(99))
  os.symlink(tmp_path / "outside.png", tmp_path / "t" / "images" / "link.png")
  (tmp_path / "t" / "images" / "broken.png").write_bytes(b"\x89PNG not really")
  rows[1]["caption"] = None
  rows[2]["preferred"] = 2
  rows[3]["image_0"] = "../outside.png"
  rows[4]["image_1"] = str(tmp_path / "outside.png")
  rows[5]["image_0"] = "images/link.png"
  rows[6]["image_1"] = "images/broken.png"
  rows[7]["image_0"] = "data:image/png;base64,@@not base64@@"
  rows[8]["image_1"] = "images/absent.png"
  rows[9]["tie"], rows[9]["preferred"] = True, None       # a tie: kept, the index drops it
  logs = []
  folder, report = _convert(tables.write_table(str(tmp_path / "t" / "p.jsonl"), rows),
                            str(tmp_path / "out"), logs=logs)
  bad = {(b["row"], b["reason"].split(":")[0]) for b in report["bad_rows"]}
  assert bad == {(1, "missing field"), (2, "bad preferred"),
                 (3, "image path leaves the table's folder"),
                 (4, "image path leaves the table's folder"),
                 (5, "image path leaves the table's folder"), (6, "undecodable image"),
                 (7, "bad data URI"), (8, "image file unreadable")}
  assert all(b["file"] == "p.jsonl" for b in report["bad_rows"])
  assert report["bad_reasons"]["image path leaves the table's folder"] == 3
  assert sorted(r["source_row"] for r in _converted(folder)) == [0, 9, 10, 11]
  assert "skipping p.jsonl row 3: image path leaves the table's folder" in "\n".join(logs)
  index = pickapic.build_index(folder, fewshot=1, log=lambda m: None)
  assert index.report["counts"]["rows_tie"] == 1 and index.report["counts"]["pairs"] == 3


def test_column_mapping_reads_other_names(tmp_path):
  rows = tables.pair_rows(str(tmp_path), [3, 4], 2)
  rename = {"user_id": "rater", "caption": "prompt", "image_0": "left", "image_1": "right",
            "preferred": "winner"}
  path = tables.write_table(str(tmp_path / "v.csv"), rows, rename)
  spec = ",".join(f"{k}={v}" for k, v in rename.items())
  folder, report = _convert(path, str(tmp_path / "out"), columns=spec)
  got = _converted(folder)
  assert report["rows_bad"] == 0
  assert [(g["user_id"], g["caption"]) for g in got] == [(r["user_id"], r["caption"]) for r in rows]
  with pytest.raises(TableError, match=r"v\.csv has no column 'caption'.*--columns"):
    table_convert.check(path, "user_id=rater")


def test_mapping_errors_stop_precompute_before_any_work(tmp_path):
  rows = tables.pair_rows(str(tmp_path), [1], 2)
  path = tables.write_table(str(tmp_path / "t.jsonl"), rows)
  config = pickapic_fixtures.config(str(tmp_path / "no-model-needed"))
  out = str(tmp_path / "out")
  with pytest.raises(TableError, match=r"--columns=.*unknown name 'prompt'.*user_id, caption"):
    precompute.run(config, path, out, columns="prompt=text")
  with pytest.raises(TableError, match=r"t\.jsonl has no column 'who' \(for user_id\)"):
    precompute.run(config, path, out, columns="user_id=who")
  assert not os.path.exists(out)


def test_pickapic_layout_is_still_detected_and_mixes_refused(tmp_path):
  make_pickapic.write_synthetic_pickapic(str(tmp_path / "pp"), num_users=2, pairs_per_user=(1, 2),
                                         num_files=1, seed=0)
  assert table_convert.check(str(tmp_path / "pp"), None) is None
  rows = tables.pair_rows(str(tmp_path / "pp"), [1], 1)
  tables.write_table(str(tmp_path / "pp" / "mine.csv"), rows)
  with pytest.raises(TableError, match="mixes Pick-a-Pic parquet files"):
    table_convert.check(str(tmp_path / "pp"), None)


def test_user_names_are_numbered_in_sorted_order(tmp_path):
  rows = tables.pair_rows(str(tmp_path), ["zoe", "ann", "10"], 1)
  folder, report = _convert(tables.write_table(str(tmp_path / "t.jsonl"), rows),
                            str(tmp_path / "out"))
  names = json.loads(open(os.path.join(folder, "user_ids.json")).read())
  assert names == {"10": 0, "ann": 1, "zoe": 2}
  assert [g["user_id"] for g in _converted(folder)] == [2, 1, 0]


# --- precompute on an own table: latents, bad rows in the manifest, resume --------------------
@pytest.fixture(scope="module")
def own(tmp_path_factory):
  root = tmp_path_factory.mktemp("own")
  sd = tiny_sd.save_pipeline(str(root / "tiny-sd15"), "sd15")
  rows = tables.pair_rows(str(root / "t"), [1, 2, 3, 4, 5, 6, 7], 5)
  rows[3]["preferred"] = "left"
  path = tables.write_table(str(root / "t" / "pairs.csv"), rows)
  config = pickapic_fixtures.config(sd)
  config_validation.prepare(config, stage="precompute")
  backbone = backbones.build_backbone(config)
  logs = []
  manifest = precompute.run(config, path, str(root / "shards"), backbone=backbone,
                            log=logs.append)
  return {"root": root, "rows": rows, "path": path, "config": config, "backbone": backbone,
          "manifest": manifest, "logs": logs}


def _records(folder: str, manifest: dict) -> list[dict]:
  out = []
  for s in manifest["shards"]:
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, "pairs", s["file"]))
    out += [records.decode(reader.read()) for _ in range(reader.num_records())]
    reader.close()
  return out


def test_latents_equal_the_source_images_encoded_directly(own):
  folder = str(own["root"] / "shards")
  index = pickapic.PickapicIndex.load(os.path.join(folder, "index"))
  stored = _records(folder, own["manifest"])
  assert len(stored) == 7 * 5 - 1                         # one bad row
  size = own["backbone"].pixel_size
  by_source = {}
  table = pq.read_table(index.paths[0], columns=["source_row"]).column(0).to_pylist()
  for rec in stored:
    source_row = table[index.pairs["row"][int(rec["pair"])]]
    r = own["rows"][source_row]
    files = [open(own["root"] / "t" / r[k], "rb").read() for k in ("image_0", "image_1")]
    pics = [images.load_square(b, size)[0] for b in files]
    direct = own["backbone"].to_latents(np.stack(pics))
    win = r["preferred"]
    np.testing.assert_allclose(rec["preferred"], direct[win], atol=2e-5)
    np.testing.assert_allclose(rec["dispreferred"], direct[1 - win], atol=2e-5)
    assert int(rec["user_id"]) == r["user_id"]
    assert index.captions[int(rec["caption_id"])] == r["caption"]
    by_source[source_row] = rec
  assert 3 not in by_source and len(by_source) == len(stored)
  # The bad row: named in the manifest and the log. Users: the configured exact split fractions.
  named = own["manifest"]["index"]["table"]["bad_rows"]
  assert named == [{"file": "pairs.csv", "row": 3, "reason": "bad preferred: 0 or 1, got 'left'"}]
  assert "skipping pairs.csv row 3: bad preferred" in "\n".join(own["logs"])
  splits = own["manifest"]["index"]["counts"]
  assert (splits["users_train"], splits["users_validation"], splits["users_test"]) == (5, 1, 1)


def test_a_killed_run_resumes_and_a_changed_table_is_refused(own, tmp_path):
  out = str(tmp_path / "shards")

  class Killed(Exception):
    pass

  def kill(name):
    raise Killed(name)
  with pytest.raises(Killed):
    precompute.run(own["config"], own["path"], out, backbone=own["backbone"],
                   log=lambda m: None, after_unit=kill)
  table_dir = os.path.join(out, "table")
  before = {f: shards.sha256(os.path.join(table_dir, f)) for f in os.listdir(table_dir)}
  logs = []
  manifest = precompute.run(own["config"], own["path"], out, backbone=own["backbone"],
                            log=logs.append)
  assert not any("table: converting" in m for m in logs)     # the copy was kept, not redone
  assert {f: shards.sha256(os.path.join(table_dir, f)) for f in os.listdir(table_dir)} == before
  assert manifest["counts"] == own["manifest"]["counts"]
  assert manifest["index"]["table"] == own["manifest"]["index"]["table"]
  with open(own["path"], "a") as f:
    f.write("8,a new row,images/0000-0.png,images/0000-1.png,0\n")
  try:
    with pytest.raises(shards.ShardsError, match="made from another pairs.csv"):
      precompute.run(own["config"], own["path"], out, backbone=own["backbone"],
                     log=lambda m: None)
  finally:
    with open(own["path"]) as f:
      lines = f.readlines()
    with open(own["path"], "w") as f:
      f.writelines(lines[:-1])
  assert {f: shards.sha256(os.path.join(table_dir, f)) for f in os.listdir(table_dir)} == before

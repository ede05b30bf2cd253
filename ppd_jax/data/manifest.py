"""The manifest of a precompute folder (data/precompute.py), written once every unit is done:
per-split record tables, counts, skipped pairs with their reasons, text store and shard lists."""
import json
import os

import numpy as np

from ppd_jax.data import pickapic
from ppd_jax.data import shards

_SKIPPED_LISTED = 1000       # skipped pairs listed one by one in the manifest (all are counted)


def _text_skips(index, text_ids, pairs: list[int]) -> list[dict]:
  """Skipped-list entries of written pairs whose text conditioning is non-finite: their records
  stay in the shards (records-{split}.npz indexes them by position), the loader leaves them out."""
  return [{"pair": p, "file": index.files[index.pairs["file_id"][p]]["name"],
           "row": int(index.pairs["row"][p]),
           "reason": f"non-finite text (text id {int(text_ids[p])})"} for p in pairs]


def finalize(output, index, text_ids, units, settings, config, log) -> dict | None:
  """Per-split record tables and the manifest, once every unit is done (text_ids: as in
  encode_file)."""
  dones = {name: shards.unit_done(output, name, verify=False) for name, _ in units}
  missing = [name for name, done in dones.items() if done is None]
  if missing:
    log(f"precompute: {len(missing)} units are not done yet ({missing[:5]}...); the manifest is "
        "written by the run that finishes the last one")
    return None
  text_units = [dones[n] for n, _ in units if n.startswith("text-")]
  file_units = [dones[n] for n, _ in units if n.startswith("file-")]
  # Done-files from before the check have no "nonfinite": nothing known to be bad there.
  bad_text = sorted(i for unit in text_units for i in unit.get("nonfinite", []))
  shard_list, counts, skipped, bad_pairs = [], {}, [], []
  for name in pickapic.SPLIT_NAMES:
    ids = [i for unit in file_units for i in unit["pair_ids"].get(name, [])]
    ids = np.asarray(ids, np.int64)
    table = {"pair": ids, "user_id": index.pairs["user_id"][ids],
             "caption_id": text_ids[ids]}
    shards.commit_npz(os.path.join(output, f"records-{name}.npz"), table)
    shard_list += [f for unit in file_units for f in unit["files"] if f["split"] == name]
    bad = np.isin(table["caption_id"], bad_text)
    counts[f"pairs_{name}"] = int((~bad).sum())        # the pairs training can use
    bad_pairs += ids[bad].tolist()
  for unit in file_units:
    skipped += unit["skipped"]
  skipped += _text_skips(index, text_ids, sorted(bad_pairs))
  counts["pairs_skipped"] = len(skipped)
  counts["texts_nonfinite"] = len(bad_text)
  reasons = {}
  for s in skipped:
    kind = s["reason"].split(" (")[0]
    reasons[kind] = reasons.get(kind, 0) + 1
  first = text_units[0]["files"]
  manifest = {
      **settings,
      "config": json.loads(config.to_json()),
      "sources": index.files,
      "index": index.report,
      "counts": counts,
      "skipped_reasons": reasons,
      "skipped": skipped[:_SKIPPED_LISTED],
      "text": {"chunk": settings["data"]["text_chunk"], "num_chunks": len(text_units),
               "keys": [f["key"] for f in first],
               "shapes": {f["key"]: f["shape"][1:] for f in first},
               "files": [f for unit in text_units for f in unit["files"]],
               "nonfinite": bad_text},
      "shards": shard_list,
  }
  shards.write_json(os.path.join(output, shards.MANIFEST), manifest)
  log("precompute: done. " + ", ".join(f"{k} {v}" for k, v in counts.items())
      + f"; manifest {os.path.join(output, shards.MANIFEST)}")
  return manifest

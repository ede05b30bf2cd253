"""What made an evaluation's outputs, written beside them and checked before any of them is reused.

An evaluation folder keeps its images, scores and verdicts so that a killed run resumes. Reused
under other settings they would be wrong with no error: verdicts of one opponent stamped with
another's name, images of step 1000 reported as step 2000. So every evaluation command describes
everything that decides its numbers (runs with their resolved checkpoint step and config hash, the
opponent, the judge, the prompt set's file hash and chosen indices, items, seed, each reward's name
and weight-file hashes) and calls `bind(out, fields)` before any work:

  * no DIR/manifest.json yet: it is written, and the work starts;
  * equal fields: the stored work is reused;
  * any difference: ManifestMismatch, naming each changed field with its old and new value.

A field that the stored work is keyed by (e.g. table1 keeps each run's images in a folder named
by its step and config hash) goes in `keyed`: recorded in the manifest, never compared.
"""
import hashlib
import json

from ppd_jax import file_hashes
from ppd_jax import storage

FILE = "manifest.json"


class ManifestMismatch(ValueError):
  """A rerun into an output folder made under other settings; the message names the fields."""


def _flat(d, prefix: str = "") -> dict:
  out = {}
  for k, v in (d or {}).items():
    name = f"{prefix}{k}"
    if isinstance(v, dict) and v:
      out.update(_flat(v, name + "."))
    else:
      out[name] = v
  return out


def _short(v) -> str:
  text = json.dumps(v, sort_keys=True, default=str)
  return text if len(text) <= 80 else text[:77] + "..."


def differences(saved: dict, current: dict) -> list[str]:
  """'field: old -> new' for every leaf that differs (missing on one side included)."""
  a, b = _flat(saved), _flat(current)
  norm = lambda v: json.loads(json.dumps(v, sort_keys=True, default=str))
  return [f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b))
          if norm(a.get(k)) != norm(b.get(k))]


def bind(out, fields: dict, keyed: dict | None = None, command: str = "",
         name: str = FILE) -> dict:
  """Checks `fields` against out/<name> (module docstring), then writes the manifest
  (fields + keyed). Returns what was written."""
  path = storage.path(out) / name
  manifest = {"command": command, "fields": fields, "keyed": keyed or {}}
  if storage.exists(path):
    try:
      saved = json.loads(storage.read_text(path))
    except ValueError as e:
      raise ManifestMismatch(f"{path}: unreadable ({e}); use another --out") from None
    changed = differences(saved.get("fields", {}), fields)
    if changed:
      raise ManifestMismatch(
          f"{out} holds {saved.get('command') or 'evaluation'} outputs made under other "
          f"settings, which would be reused as if made under these; changed: "
          + "; ".join(changed) + ". Use another --out (or delete that folder)")
  storage.makedirs(out)
  storage.write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
  return manifest


def config_sha256(config) -> str:
  """A hash of a run's whole config (ml_collections or dict), for the manifest."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(run) -> dict:
  """A trained run (inference.TrainedRun): its folder, the step restored and its config's hash."""
  return {"workdir": getattr(run, "workdir", ""), "step": int(run.step),
          "config_sha256": config_sha256(run.config)[:16]}


def data_identity(location) -> dict:
  """A data file (its SHA-256) or folder (a hash of its files' names and sizes, two levels down:
  cheap on a shard folder of many GB, and it changes when a file is added, removed or rewritten
  to another size)."""
  p = storage.path(location)
  if not p.exists():
    return {"path": str(location), "missing": True}
  if not p.is_dir():
    return {"path": str(location), "sha256": file_hashes.file_sha256(p)}
  listing = []
  for child in sorted(p.iterdir(), key=lambda c: c.name):
    kids = sorted(child.iterdir(), key=lambda c: c.name) if child.is_dir() else [child]
    listing += [f"{k.relative_to(p)}|{k.stat().length if not k.is_dir() else 'dir'}"
                for k in kids]
  return {"path": str(location),
          "listing_sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest()}


def reward_identity(reward, name: str) -> dict:
  """What a reward object records about itself (`identity`, set where it is loaded), else its
  class: the demo's hidden rewards are code, not weights."""
  found = getattr(reward, "identity", None)
  return dict(found) if found else {"name": name, "kind": type(reward).__name__}

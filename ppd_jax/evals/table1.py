"""Table 1 of the paper: each reward's mean score, per model, on a prompt set.

  python -m ppd_jax.evals.table1 --out=DIR --prompts=PartiPrompts.tsv \
      --run=base=W_PPD --run=diffusion_dpo=W_DPO --run=sft=W_SFT --run=ppd=W1 --run=ppd=W2 \
      --run=dpo_clip_h14=W_C [--val_prompts=VALIDATION_UNIQUE_PARQUET_DIR] \
      [--rewards=clip_h14,aesthetic,hps_v2] [--model=hps_v2=FOLDER] [--aesthetic_head=PATH]

Rows: `base` (the run's frozen base: user branch off), `diffusion_dpo`, `sft`, `dpo_<reward>` (one
image per prompt, scored by every reward; these runs are trained without user information, so
their one shared embedding is used) and `ppd` (per reward, the images made for that reward's
user, scored by that reward). A reward's user is looked up by name in what the PPD run's data
recorded (evals/reward_user_ids.py: the relabel folder's reward_users.json), never by the order
of --rewards; --reward_user=NAME=ID maps one explicitly. Every row draws the same x_T for a
prompt: prompts go in fixed chunks, chunk c with seed + c (evals/image_sets.py). A row given
several runs (e.g. betas) keeps the one with the best validation score (--val_prompts; the mean
over rewards of each reward's mean in units of its
standard deviation, so rewards of different scales weigh alike; a dpo_<reward> row by its own
reward) and reports it on --prompts: the paper's beta selection.

Rows are compared with PPD by paired per-prompt differences (the same prompt and x_T in both
rows), averaged within each caption first where prompts repeat captions, with a Student-t 95%
interval over captions (evals/stats.paired_difference_ci): two rows' own intervals overlapping
says little, as both share each prompt's difficulty.

Writes DIR/table1.json {"rows": {ROW: {REWARD: {"mean", "ci95": [lo, hi], "n"}}},
"differences": {ROW: {REWARD: {"mean", "ci95", ...}}} (PPD minus ROW), "selected", "runs" (each
run's resolved step and config hash), "reward_users", "validation", ...} and DIR/table1.md. Images
(PNG + prompts.jsonl) and scores (JSONL) are kept under DIR/images/<row>-<run>-<step>-<config
hash>/<user>/<set>/, scores by reward name and weight hash, and DIR/manifest.json
(evals/manifest.py) records the prompts, seed and chunking: a rerun under other ones is refused,
and a killed run redoes nothing it finished. DIR, the run
folders and the prompt files may be URLs (gs://...): every file goes through ppd_jax.storage.
"""
import dataclasses
import json
import sys

import numpy as np

from ppd_jax import cli_logging
from ppd_jax import compile_cache
from ppd_jax import storage
from ppd_jax.evals import image_sets
from ppd_jax.evals import manifest as manifest_lib
from ppd_jax.evals import prompt_sets
from ppd_jax.evals import reward_user_ids
from ppd_jax.evals import score_files
from ppd_jax.evals import stats

FIXED_ROWS = ("base", "diffusion_dpo", "sft")


class Table1Error(ValueError):
  """A run, reward or prompt setting that cannot work; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  row: str
  workdir: str
  step: int | None = None
  config_sha256: str = ""        # set by resolve(): the checkpoint's config

  @property
  def tag(self) -> str:
    """The run's folder name under images/: row, run, step and config hash, so that another
    checkpoint or a retrained run never reuses these images."""
    name = storage.path(self.workdir).name
    step = self.step if self.step is not None else "latest"
    return f"{self.row}-{name}-{step}" + (f"-{self.config_sha256[:8]}" if self.config_sha256
                                          else "")


def resolve(spec: RunSpec) -> RunSpec:
  """The spec with its step fixed (the latest checkpoint when none was given) and the hash of
  that checkpoint's config."""
  from ppd_jax import checkpoint
  ckpt = checkpoint.Checkpointer(storage.path(spec.workdir) / "checkpoints", async_save=False)
  try:
    steps = ckpt.all_steps()
    step = spec.step if spec.step is not None else ckpt.latest_step()
    if step is None or step not in steps:
      raise Table1Error(f"--run={spec.row}={spec.workdir}@{spec.step}: no such checkpoint "
                        f"(steps: {steps})")
    config = ckpt.restore_config(step)
  finally:
    ckpt.close()
  return dataclasses.replace(spec, step=int(step),
                             config_sha256=manifest_lib.config_sha256(config)[:16])


def parse_runs(values, rewards) -> list[RunSpec]:
  """--run=ROW=WORKDIR[@STEP] values -> specs; rows and folders are checked here."""
  rows = set(FIXED_ROWS) | {"ppd"} | {f"dpo_{r}" for r in rewards}
  out = []
  for value in values or ():
    row, sep, where = value.partition("=")
    if not sep or row not in rows:
      raise Table1Error(f"--run={value!r}: expected ROW=WORKDIR[@STEP] with ROW one of "
                        f"{', '.join(sorted(rows))}")
    workdir, _, step = where.partition("@")
    if not (storage.path(workdir) / "checkpoints").is_dir():
      raise Table1Error(f"--run={value!r}: {workdir} holds no checkpoints/ (not a training run)")
    out.append(RunSpec(row, workdir, int(step) if step else None))
  if not out:
    raise Table1Error("give at least one --run=ROW=WORKDIR")
  tags = [s.tag for s in out]
  if len(set(tags)) != len(tags):
    raise Table1Error(f"--run: the same run twice ({tags})")
  return out


def _fixed_embedding(run, spec: RunSpec) -> np.ndarray:
  if run.config.data.get("user_conditioning", True):
    raise Table1Error(f"--run={spec.row}={spec.workdir}: a {spec.row} row is a model trained "
                      "without user information (data.user_conditioning=False); this run "
                      "conditions on users")
  return run.source.user_embedding(run.source.train_user_ids[0])


def evaluate_run(spec: RunSpec, set_name: str, prompts, rewards: dict, reward_users: dict | None,
                 out: str, seed: int, chunk: int, log=print,
                 users_seen: dict | None = None) -> dict:
  """{reward: [P] scores} of one run on one prompt set. A ppd run's reward users are its own map
  by name (evals/reward_user_ids.py) with `reward_users` as explicit overrides; the map used is
  put in users_seen[spec.tag]."""
  from ppd_jax import inference
  run = inference.load_trained(spec.workdir, spec.step)
  where = lambda user: storage.path(out) / "images" / spec.tag / user / set_name
  scores = {}
  if spec.row == "ppd":
    users = reward_user_ids.resolve(run, list(rewards), reward_users,
                                    f"--run=ppd={spec.workdir}")
    if users_seen is not None:
      users_seen[spec.tag] = users
    for name, reward in rewards.items():
      folder = where(f"user{users[name]}")
      paths = image_sets.generate_set(run, run.source.user_embedding(users[name]), 1.0, prompts,
                           folder, seed, chunk, log)
      scores[name] = image_sets.score_set(paths, prompts, name, reward, folder)
    return scores
  if spec.row == "base":
    embedding = np.zeros((run.config.model.user_tokens, run.config.model.user_embed_dim),
                         np.float32)
    paths = image_sets.generate_set(run, embedding, 0.0, prompts, where("none"), seed, chunk, log)
  else:
    paths = image_sets.generate_set(run, _fixed_embedding(run, spec), 1.0, prompts,
                                    where("shared"), seed,
                         chunk, log)
  folder = where("none" if spec.row == "base" else "shared")
  for name, reward in rewards.items():
    scores[name] = image_sets.score_set(paths, prompts, name, reward, folder)
  return scores


def selection_score(row: str, candidates: list[dict]) -> list[float]:
  """Per candidate run: its validation score (module docstring)."""
  rewards = list(candidates[0])
  if row.startswith("dpo_"):
    rewards = [row[len("dpo_"):]]
  out = np.zeros(len(candidates))
  for name in rewards:
    pooled = np.concatenate([c[name] for c in candidates])
    scale = pooled.std() or 1.0
    out += np.array([c[name].mean() for c in candidates]) / scale
  return (out / len(rewards)).tolist()


def differences(scores: dict, prompts) -> dict:
  """{row: {reward: PPD minus row}}, paired per prompt and clustered by caption (docstring)."""
  if "ppd" not in scores:
    return {}
  captions = [p.text for p in prompts]
  out = {}
  for row, theirs in scores.items():
    if row == "ppd":
      continue
    out[row] = {}
    for name, mine in scores["ppd"].items():
      d = stats.paired_difference_ci(mine, theirs[name], clusters=captions)
      out[row][name] = {k: d[k] for k in ("mean", "ci95", "n", "clusters")}
  return out


def build_table(specs, prompts, val_prompts, rewards: dict, reward_users: dict | None, out: str,
                seed: int = 0, chunk: int = 16, log=print, prompt_sources: dict | None = None
                ) -> dict:
  """Runs the whole table (module docstring); returns what table1.json holds. reward_users:
  explicit NAME -> ID overrides of the ppd run's own map (None: the run's map alone).
  prompt_sources: how the prompt sets were read (files, hashes, seed), for the manifest."""
  specs = [resolve(s) for s in specs]
  tags = [s.tag for s in specs]
  if len(set(tags)) != len(tags):
    raise Table1Error(f"--run: the same checkpoint twice ({tags})")
  manifest_lib.bind(out, {"prompts": image_sets.prompts_identity(prompts),
                          "val_prompts": image_sets.prompts_identity(val_prompts), "seed": seed,
                          "chunk": chunk, "reward_user_overrides": reward_users or {}},
                    keyed={"runs": {s.tag: dataclasses.asdict(s) for s in specs},
                           "rewards": {n: manifest_lib.reward_identity(r, n)
                                       for n, r in rewards.items()},
                           "prompt_sources": prompt_sources or {}},
                    command="ppd_jax.evals.table1")
  users_seen: dict = {}
  by_row: dict[str, list[RunSpec]] = {}
  for s in specs:
    by_row.setdefault(s.row, []).append(s)
  several = [r for r, runs in by_row.items() if len(runs) > 1]
  if several and not val_prompts:
    raise Table1Error(f"rows {several} have several runs: give --val_prompts to choose")
  selected, validation = {}, {}
  for row, runs in by_row.items():
    if len(runs) == 1:
      selected[row] = runs[0]
      continue
    cands = [evaluate_run(s, "val", val_prompts, rewards, reward_users, out, seed, chunk, log,
                          users_seen) for s in runs]
    scores = selection_score(row, cands)
    selected[row] = runs[int(np.argmax(scores))]
    validation[row] = {s.tag: round(v, 6) for s, v in zip(runs, scores)}
  table = {"rows": {}, "selected": {r: s.tag for r, s in selected.items()},
           "runs": {r: {"workdir": s.workdir, "step": s.step, "config_sha256": s.config_sha256}
                    for r, s in selected.items()},
           "validation": validation, "rewards": list(rewards),
           "reward_identity": {n: manifest_lib.reward_identity(r, n) for n, r in rewards.items()},
           "prompts": len(prompts), "prompt_set": image_sets.prompts_identity(prompts),
           "seed": seed, "chunk": chunk}
  test_scores = {}
  for row, spec in selected.items():
    test_scores[row] = evaluate_run(spec, "test", prompts, rewards, reward_users, out, seed,
                                    chunk, log, users_seen)
    table["rows"][row] = {name: image_sets.cell(v) for name, v in test_scores[row].items()}
  table["reward_users"] = users_seen.get(selected["ppd"].tag) if "ppd" in selected else None
  table["differences"] = differences(test_scores, prompts)
  score_files.write_json_atomic(storage.path(out) / "table1.json", table)
  storage.write_text(storage.path(out) / "table1.md", markdown(table))
  return table


def markdown(table: dict) -> str:
  rewards = table["rewards"]
  lines = ["| row | " + " | ".join(rewards) + " |", "| --- |" + " --- |" * len(rewards)]
  for row, cells in table["rows"].items():
    text = [f"{c['mean']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]"
            if c["ci95"][0] is not None else f"{c['mean']:.4f}" for c in cells.values()]
    lines.append(f"| {row} ({table['selected'][row]}) | " + " | ".join(text) + " |")
  lines.append(f"\nmean [95% CI] over {table['prompts']} prompts")
  diffs = table.get("differences") or {}
  if diffs:
    lines += ["", "| PPD minus | " + " | ".join(rewards) + " |",
              "| --- |" + " --- |" * len(rewards)]
    for row, cells in diffs.items():
      text = [f"{c['mean']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
              if c["ci95"][0] is not None else f"{c['mean']:+.4f}" for c in cells.values()]
      lines.append(f"| {row} | " + " | ".join(text) + " |")
    n = next(iter(next(iter(diffs.values())).values()))
    lines.append(f"\npaired per prompt (same x_T), 95% t interval over {n['clusters']} captions")
  return "\n".join(lines) + "\n"


def reward_names(spec: str) -> list[str]:
  """--rewards=a,b,c -> the names, each checked against the registry."""
  from ppd_jax.rewards import registry
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in registry.SPECS]
  if unknown or not names:
    raise Table1Error(f"--rewards: unknown reward(s) {unknown} (one of "
                      f"{', '.join(registry.NAMES)})")
  return names


def load_rewards(names, model_values, aesthetic_head) -> dict:
  """The rewards, with --model=REWARD=FOLDER and --aesthetic_head where given; each carries its
  `identity` (name, weights and their SHA-256) for the manifests and the score files' names."""
  from ppd_jax.rewards import registry
  models = dict(v.partition("=")[::2] for v in model_values or ())
  out = {}
  for n in names:
    head = aesthetic_head if n == "aesthetic" else None
    out[n] = registry.load(n, models.get(n) or None, head)
    out[n].identity = registry.identity(n, models.get(n) or None, head)
  return out


def reward_user_flags(values, names) -> dict:
  """--reward_user=NAME=ID values -> {name: id} (explicit overrides of the run's own map)."""
  users = {}
  for value in values or ():
    name, _, uid = value.partition("=")
    if name not in names or not uid.lstrip("-").isdigit():
      raise Table1Error(f"--reward_user={value!r}: expected NAME=ID with NAME in {names}")
    users[name] = int(uid)
  return users


def main(argv):
  cli_logging.setup()   # library INFO lines off; ours and every warning on
  from absl import flags
  from ppd_jax import checkpoint
  from ppd_jax.rewards import registry
  from ppd_jax.weights import hf_folder
  del argv
  compile_cache.setup()   # before any compile: reuse the last run's compiles
  f = flags.FLAGS
  try:
    names = reward_names(f.rewards)
    specs = parse_runs(f.run, names)
    storage.check_writable(f.out)     # a wrong bucket fails now, not after the first images
    users = reward_user_flags(f.reward_user, names)
    prompts = prompt_sets.read(f.prompts, f.num_prompts, seed=f.prompt_seed)
    val = (prompt_sets.read(f.val_prompts, f.num_prompts, seed=f.prompt_seed)
           if f.val_prompts else None)
    sources = {"prompts": prompt_sets.describe(prompts, f.prompts),
               "val_prompts": prompt_sets.describe(val, f.val_prompts) if val else None}
    rewards = load_rewards(names, f.model, f.aesthetic_head)
    table = build_table(specs, prompts, val, rewards, users, f.out, f.seed, f.chunk,
                        prompt_sources=sources)
  except (Table1Error, prompt_sets.PromptSetError, registry.RewardConfigError,
          hf_folder.FolderError, checkpoint.CheckpointError, score_files.ScoreInputError,
          storage.StorageError, manifest_lib.ManifestMismatch,
          reward_user_ids.RewardUserError) as e:
    sys.exit(f"ppd_jax.evals.table1: {e}")
  print(markdown(table))
  print(json.dumps({"selected": table["selected"]}))


if __name__ == "__main__":
  from absl import app
  from absl import flags
  flags.DEFINE_string("out", None, "output folder (images, scores, table1.json, table1.md)")
  flags.DEFINE_multi_string("run", None, "ROW=WORKDIR[@STEP]; rows base, diffusion_dpo, sft, "
                            "ppd, dpo_<reward>; a row given several runs is chosen on "
                            "--val_prompts")
  flags.DEFINE_string("prompts", None, "the test prompt set (PartiPrompts TSV, .txt, .jsonl, "
                      "Pick-a-Pic v2 validation_unique .parquet, or pickapic:SHARD_DIR[:split], "
                      "one of this project's own user splits)")
  flags.DEFINE_string("val_prompts", None, "the selection prompt set (the paper: Pick-a-Pic v2's "
                      "validation_unique captions, its parquet file or folder)")
  flags.DEFINE_integer("num_prompts", None, "use N prompts of each set: a seeded sample, "
                       "stratified by category where the set has one (evals/prompt_sets.py)")
  flags.DEFINE_integer("prompt_seed", 0, "seed of the --num_prompts sample")
  flags.DEFINE_string("rewards", "clip_h14,aesthetic,hps_v2", "comma-separated reward names")
  flags.DEFINE_multi_string("model", None, "REWARD=FOLDER: a reward's weights")
  flags.DEFINE_string("aesthetic_head", None, "the aesthetic reward's head file")
  flags.DEFINE_multi_string("reward_user", None, "NAME=ID: the user id of a reward's user, "
                            "over the PPD run's own map (its relabel folder's reward_users.json)")
  flags.DEFINE_integer("seed", 0, "noise seed of the first prompt chunk")
  flags.DEFINE_integer("chunk", 16, "prompts generated together (one seed per chunk)")
  flags.mark_flags_as_required(["out", "prompts"])
  app.run(main)

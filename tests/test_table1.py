"""evals/table1.py on a tiny trained run with the demo's users as the reward users: the cells
against a direct computation, shared noise across rows, the beta selection, resuming, bad input."""
import json
import os

import numpy as np
import pytest

from ppd_jax import images as image_io
from ppd_jax import inference
from ppd_jax.evals import image_sets
from ppd_jax.evals import prompt_sets
from ppd_jax.evals import table1
from ppd_jax.rewards import hidden

PROMPTS = [prompt_sets.Prompt(t) for t in ("a red circle", "a blue square", "a big triangle",
                                           "a small green circle", "a dark square")]
VAL = [prompt_sets.Prompt(t) for t in ("a yellow circle", "a purple triangle", "a red square")]


@pytest.fixture(scope="module")
def workdir(tiny_trained_run):
  return tiny_trained_run                 # checkpoints at steps 2 and 4


def setup(workdir):
  run = inference.load_trained(workdir)
  users = [int(u) for u in run.source.train_user_ids[:2]]
  rewards = {f"u{u}": hidden.HiddenPropertyReward(run.source, u) for u in users}
  return run, rewards, {f"u{u}": u for u in users}


def test_the_table_against_a_direct_computation(workdir, tmp_path):
  scipy_stats = pytest.importorskip("scipy.stats")
  run, rewards, users = setup(workdir)
  specs = [table1.RunSpec("base", workdir), table1.RunSpec("ppd", workdir, 2),
           table1.RunSpec("ppd", workdir, 4)]
  out = str(tmp_path / "t1")
  table = table1.build_table(specs, PROMPTS, VAL, rewards, users, out, seed=5, chunk=2,
                             log=lambda m: None)
  with open(os.path.join(out, "table1.json")) as f:
    assert json.load(f) == json.loads(json.dumps(table))
  assert set(table["rows"]) == {"base", "ppd"} and set(table["rows"]["ppd"]) == set(rewards)
  # Selection: recomputed from the validation images' scores, read back from the files.
  cands = []
  for step in (2, 4):
    tag = table1.resolve(table1.RunSpec("ppd", workdir, step)).tag
    assert tag.startswith(f"ppd-{os.path.basename(workdir)}-{step}-")
    cands.append({n: np.array([json.loads(line)["score"] for line in open(os.path.join(
        out, "images", tag, f"user{users[n]}", "val",
        image_sets.score_file_name(n, rewards[n])))]) for n in rewards})
  pooled = {n: np.concatenate([c[n] for c in cands]) for n in rewards}
  expected = [np.mean([c[n].mean() / pooled[n].std() for n in rewards]) for c in cands]
  best = (2, 4)[int(np.argmax(expected))]
  assert table["selected"]["ppd"] == table1.resolve(table1.RunSpec("ppd", workdir, best)).tag
  # Each cell is the mean and t interval of its images' scores, the images scored afresh.
  chosen = table["selected"]["ppd"]
  for n, reward in rewards.items():
    folder = os.path.join(out, "images", chosen, f"user{users[n]}", "test")
    pics = np.stack([image_io.load_png(os.path.join(folder, f"{i:05d}.png"))
                     for i in range(len(PROMPTS))])
    s = reward.score(pics, None).astype(np.float64)
    lo, hi = scipy_stats.t.interval(0.95, len(s) - 1, loc=s.mean(), scale=scipy_stats.sem(s))
    c = table["rows"]["ppd"][n]
    assert c["n"] == len(PROMPTS) and c["mean"] == pytest.approx(s.mean(), abs=1e-6)
    assert c["ci95"] == pytest.approx([lo, hi], abs=1e-6)
    # PPD minus base, paired per prompt: the t interval of the per-prompt differences.
    base = os.path.join(out, "images", table["selected"]["base"], "none", "test")
    b = reward.score(np.stack([image_io.load_png(os.path.join(base, f"{i:05d}.png"))
                               for i in range(len(PROMPTS))]), None).astype(np.float64)
    d = s - b
    lo, hi = scipy_stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    diff = table["differences"]["base"][n]
    assert diff["mean"] == pytest.approx(d.mean(), abs=1e-6)
    assert diff["ci95"] == pytest.approx([lo, hi], abs=1e-6)
  assert table["runs"]["ppd"]["step"] in (2, 4) and table["runs"]["base"]["step"] == 4
  assert table["reward_users"] == users
  md = open(os.path.join(out, "table1.md")).read()
  assert "| base (" in md and "| ppd (" in md


def test_rows_share_the_noise_of_each_prompt(workdir, tmp_path):
  """The base row's third prompt (chunk 1 of size 2, seed 5 + 1) is what the sampler makes for
  that chunk alone: x_T depends on the prompt's chunk and the seed, not on the row."""
  run, rewards, users = setup(workdir)
  out = str(tmp_path / "t1")
  table1.build_table([table1.RunSpec("base", workdir)], PROMPTS, None, rewards, users, out,
                     seed=5, chunk=2, log=lambda m: None)
  zeros = np.zeros((run.config.model.user_tokens, run.config.model.user_embed_dim), np.float32)
  again = inference.generate(run, [p.text for p in PROMPTS[2:4]], zeros, user_scale=0.0, seed=6)
  tag = table1.resolve(table1.RunSpec("base", workdir)).tag
  assert tag.startswith(f"base-{os.path.basename(workdir)}-4-")      # the latest step, named
  folder = os.path.join(out, "images", tag, "none", "test")
  as_png = image_io.to_uint8(again[0]).astype(np.float32) / 127.5 - 1.0
  np.testing.assert_array_equal(image_io.load_png(os.path.join(folder, "00002.png")), as_png)


def test_a_killed_table_resumes_without_redoing(workdir, tmp_path, monkeypatch):
  run, rewards, users = setup(workdir)
  out = str(tmp_path / "t1")
  specs = [table1.RunSpec("ppd", workdir)]
  real = inference.generate
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    return real(*args, **kwargs)
  monkeypatch.setattr(inference, "generate", failing)
  with pytest.raises(KeyboardInterrupt):
    table1.build_table(specs, PROMPTS, None, rewards, users, out, chunk=2, log=lambda m: None)
  calls.clear()
  monkeypatch.setattr(inference, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
  first = table1.build_table(specs, PROMPTS, None, rewards, users, out, chunk=2,
                             log=lambda m: None)
  assert len(calls) == 2 * 3 - 1          # 3 chunks per user; the first user's first was done
  calls.clear()
  second = table1.build_table(specs, PROMPTS, None, rewards, users, out, chunk=2,
                              log=lambda m: None)
  assert calls == [] and second == first


def test_bad_input_is_named(workdir, tmp_path):
  run, rewards, users = setup(workdir)
  with pytest.raises(table1.Table1Error, match="ROW one of"):
    table1.parse_runs(["best=" + workdir], ["clip_h14"])
  with pytest.raises(table1.Table1Error, match="holds no checkpoints"):
    table1.parse_runs([f"ppd={tmp_path}"], ["clip_h14"])
  assert table1.parse_runs([f"dpo_clip_h14={workdir}@2"], ["clip_h14"])[0].step == 2
  with pytest.raises(table1.Table1Error, match="several runs: give --val_prompts"):
    table1.build_table([table1.RunSpec("ppd", workdir, 2), table1.RunSpec("ppd", workdir, 4)],
                       PROMPTS, None, rewards, users, str(tmp_path / "o"), log=lambda m: None)
  with pytest.raises(table1.Table1Error, match="trained without user information"):
    table1.build_table([table1.RunSpec("sft", workdir)], PROMPTS, None, rewards, users,
                       str(tmp_path / "o"), log=lambda m: None)


def test_prompt_files(tmp_path):
  tsv = tmp_path / "PartiPrompts.tsv"
  tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
                 "a red circle\tArtifacts\tColor\tnote\n")
  assert prompt_sets.read(str(tsv)) == [prompt_sets.Prompt("bond", "Abstract"),
                                        prompt_sets.Prompt("a red circle", "Artifacts")]
  txt = tmp_path / "p.txt"
  txt.write_text("one\n\ntwo\n")
  assert [p.text for p in prompt_sets.read(str(txt))] == ["one", "two"]
  assert len(prompt_sets.read(str(txt), limit=1)) == 1   # a seeded sample: tests/test_prompt_sets
  js = tmp_path / "p.jsonl"
  js.write_text('{"prompt": "x", "category": "c"}\n')
  assert prompt_sets.read(str(js)) == [prompt_sets.Prompt("x", "c")]
  cases = [("bad.tsv", "Text\tCategory\nx\ty\n", r"bad.tsv:1: .*'Prompt' column"),
           ("wide.tsv", "Prompt\tCategory\nx\ty\tz\n", r"wide.tsv:2: 3 fields, the header has 2"),
           ("bad.jsonl", '{"text": "x"}\n', r"bad.jsonl:1: field 'prompt' is missing"),
           ("empty.txt", "\n\n", "empty.txt: no prompts")]
  for name, text, message in cases:
    (tmp_path / name).write_text(text)
    with pytest.raises(prompt_sets.PromptSetError, match=message):
      prompt_sets.read(str(tmp_path / name))
  with pytest.raises(prompt_sets.PromptSetError, match="no such prompt file"):
    prompt_sets.read(str(tmp_path / "absent.tsv"))


def test_selection_weighs_rewards_of_any_scale_alike():
  """A candidate better by 2 standard deviations on a small-scale reward beats one better by a
  tenth of one on a large-scale reward (raw means would pick the latter); a dpo_<reward> row
  looks at its own reward only."""
  rng = np.random.default_rng(0)
  a = {"cos": 0.5 + 0.01 * rng.standard_normal(50), "aes": 100 + 10 * rng.standard_normal(50)}
  b = {"cos": a["cos"] + 0.4, "aes": a["aes"] - 1.0}
  scores = table1.selection_score("ppd", [a, b])
  for name, sign in (("cos", 1), ("aes", -1)):
    pooled = np.concatenate([a[name], b[name]])
    gap = (b[name].mean() - a[name].mean()) / pooled.std()
    assert np.sign(gap) == sign
  expected = [np.mean([c[n].mean() / np.concatenate([a[n], b[n]]).std() for n in a])
              for c in (a, b)]
  assert scores == pytest.approx(expected) and scores[1] > scores[0]
  assert sum(x["aes"].mean() for x in [a]) > b["aes"].mean()     # raw means would pick a
  only = table1.selection_score("dpo_aes", [a, b])
  assert only[0] > only[1]


def test_the_command_line(workdir, tmp_path):
  """python -m ppd_jax.evals.table1 with a (tiny) CLIP reward whose user is a demo user."""
  import subprocess
  import sys
  import tiny_clip
  run, _, users = setup(workdir)
  model = str(tmp_path / "clip")
  tiny_clip.save_clip(model)
  prompts = tmp_path / "PartiPrompts.tsv"
  prompts.write_text("Prompt\tCategory\tChallenge\tNote\n" +
                     "".join(f"{p.text}\tArtifacts\tBasic\t\n" for p in PROMPTS[:2]))
  out = tmp_path / "t1"
  uid = next(iter(users.values()))
  cmd = [sys.executable, "-m", "ppd_jax.evals.table1", f"--out={out}", f"--prompts={prompts}",
         f"--run=ppd={workdir}", "--rewards=clip_h14",
         f"--model=clip_h14={model}", f"--reward_user=clip_h14={uid}", "--chunk=2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  table = json.load(open(out / "table1.json"))
  assert set(table["rows"]) == {"ppd"} and table["rows"]["ppd"]["clip_h14"]["n"] == 2
  # Readable output: no Orbax INFO line (cli_logging.py), our own INFO line kept.
  from test_cli_logging import orbax_info_lines
  assert not orbax_info_lines(done.stderr), orbax_info_lines(done.stderr)[:5]
  assert "restored checkpoint at step 4" in done.stderr, done.stderr[-2000:]


def test_reward_users_are_found_by_name_whatever_the_order(workdir, tmp_path, monkeypatch):
  """The ppd row's user for each reward comes from the run's own map (its relabel folder's
  reward_users.json), not from the order of --rewards; a reward the run has no user for is
  refused by name."""
  run, rewards, users = setup(workdir)
  recorded = dict(users)                       # the relabel order; --rewards gives the reverse
  monkeypatch.setattr(table1.reward_user_ids, "of_run", lambda run: recorded)
  swapped = dict(reversed(list(rewards.items())))
  out = str(tmp_path / "t1")
  table = table1.build_table([table1.RunSpec("ppd", workdir)], PROMPTS[:2], None, swapped, None,
                             out, chunk=2, log=lambda m: None)
  assert table["reward_users"] == {n: users[n] for n in swapped}
  tag = table["selected"]["ppd"]
  for n, reward in swapped.items():
    folder = os.path.join(out, "images", tag, f"user{users[n]}", "test")
    pics = np.stack([image_io.load_png(os.path.join(folder, f"{i:05d}.png")) for i in range(2)])
    expected = inference.generate(run, [p.text for p in PROMPTS[:2]],
                                  run.source.user_embedding(users[n]), seed=0)
    np.testing.assert_allclose(pics, image_io.to_uint8(expected) / 127.5 - 1.0, atol=1e-6)
    assert table["rows"]["ppd"][n]["mean"] == pytest.approx(reward.score(pics, None).mean(),
                                                            abs=1e-6)
  stray = {**rewards, "aesthetic": next(iter(rewards.values()))}
  with pytest.raises(table1.reward_user_ids.RewardUserError, match=r"\['aesthetic'\]"):
    table1.build_table([table1.RunSpec("ppd", workdir)], PROMPTS[:2], None, stray, None,
                       str(tmp_path / "t2"), chunk=2, log=lambda m: None)


def test_the_reward_user_map_is_read_from_the_relabel_folder(tmp_path):
  import types
  import ml_collections
  from ppd_jax.evals import reward_user_ids
  (tmp_path / "reward_users.json").write_text(json.dumps(
      {"rewards": ["clip_h14", "aesthetic", "hps_v2"],
       "user_ids": {"clip_h14": -1, "aesthetic": -2, "hps_v2": -3}}))
  run = types.SimpleNamespace(config=ml_collections.ConfigDict(
      {"data": {"source": "pickapic", "relabel": str(tmp_path)}}))
  assert reward_user_ids.resolve(run, ["hps_v2", "clip_h14"]) == {"hps_v2": -3, "clip_h14": -1}
  assert reward_user_ids.resolve(run, ["aesthetic"], {"aesthetic": 7}) == {"aesthetic": 7}
  with pytest.raises(reward_user_ids.RewardUserError, match="pickscore.*clip_h14 \\(-1\\)"):
    reward_user_ids.resolve(run, ["pickscore"])


def test_a_table_rerun_with_other_prompts_or_seed_is_refused(workdir, tmp_path):
  run, rewards, users = setup(workdir)
  out = str(tmp_path / "t1")
  spec = [table1.RunSpec("base", workdir)]
  table1.build_table(spec, PROMPTS[:2], None, rewards, users, out, chunk=2, log=lambda m: None)
  with pytest.raises(ValueError, match="prompts.texts_sha256"):
    table1.build_table(spec, PROMPTS[1:3], None, rewards, users, out, chunk=2, log=lambda m: None)
  with pytest.raises(ValueError, match="seed: 0 -> 1"):
    table1.build_table(spec, PROMPTS[:2], None, rewards, users, out, seed=1, chunk=2,
                       log=lambda m: None)

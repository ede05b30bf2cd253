"""VLM user-embedding extraction on a tiny random LLaVA-OneVision: the stored embedding is the final
generated token's hidden state from an independent forward pass, the prompt is Table 2's with the
pairs in order, and a killed run resumes into the same store."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_llava import save_tiny_llava
from ppd_jax.data import make_pickapic
from ppd_jax.data import pickapic
from ppd_jax.users import embed
from ppd_jax.users import prompts
from ppd_jax.users import shots
from ppd_jax.users import merge
from ppd_jax.data import user_store as store_lib
from ppd_jax.users import vlm as vlm_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = vlm_lib.Decoding(mode="greedy", max_new_tokens=6)
SAMPLED = vlm_lib.Decoding(mode="sample", temperature=0.7, top_p=1.0, seed=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny checkpoint, its loaded VLM, and a JSONL of 3 users with 5, 6 and 4 pairs (captions of
  different lengths, images of different sizes), one corrupt image and one malformed line."""
  root = tmp_path_factory.mktemp("vlm")
  folder = save_tiny_llava(str(root / "tiny-llava"))
  rng = np.random.default_rng(0)
  rows = []
  for u, n in ((11, 5), (-4, 6), (902, 4)):
    for k in range(n):
      names = []
      for side in (1, 2):
        name = f"u{u}_{k}_{side}.png"
        h, w = (24 + 8 * k, 40) if side == 1 else (64, 48)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
        names.append(name)
      rows.append({"user_id": u, "caption": f"caption {k} of {u}" + " words" * (k * (u % 3)),
                   "image_1": names[0], "image_2": names[1], "preferred": 1 + (k + u) % 2})
  (root / "u902_9_1.png").write_bytes(b"not a png")
  rows.insert(7, {"user_id": -4, "caption": "broken", "image_1": "u902_9_1.png",
                  "image_2": "u-4_0_2.png", "preferred": 1})
  lines = [json.dumps(r) for r in rows]
  lines.insert(3, "{not json")
  (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  return {"root": root, "model": folder, "vlm": vlm_lib.VLM.load(folder),
          "jsonl": str(root / "pairs.jsonl")}


def _options(world, out, **kw) -> embed.Options:
  args = dict(model=world["model"], pairs=world["jsonl"], out=str(world["root"] / out),
              decoding=GREEDY, batch_size=2)
  args.update(kw)
  return embed.Options(**args)


def _run(world, out, **kw):
  return embed.run(_options(world, out, **kw), vlm=world["vlm"], log=lambda _: None)


def _independent_state(vlm, pairs: list) -> tuple[np.ndarray, str]:
  """Unbatched, unpadded: greedy generation, then the model's own forward over prompt + answer."""
  single = vlm.inputs([prompts.user_prompt(pairs)])
  with torch.inference_mode():
    seq = vlm.model.generate(**single, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                             eos_token_id=vlm.eos_id, pad_token_id=vlm.pad_id)
    new = seq[0, single["input_ids"].shape[1]:]
    stop = (new == vlm.eos_id).nonzero()
    new = new[:int(stop[0]) + 1] if len(stop) else new
    ids = torch.cat([single["input_ids"][0], new])[None]
    out = vlm.model(input_ids=ids, pixel_values=single["pixel_values"],
                    image_sizes=single["image_sizes"],
                    batch_num_images=single["batch_num_images"], output_hidden_states=True)
  return (torch.stack([h[0, -1] for h in out.hidden_states]).numpy(),
          vlm.tokenizer.decode(new, skip_special_tokens=True))


def test_prompt_holds_the_pairs_in_template_order(world):
  imgs = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(8)]
  pairs = [prompts.Pair(f"cap-{k}", imgs[2 * k], imgs[2 * k + 1], 1 + k % 2) for k in range(4)]
  segments, images = prompts.user_prompt(pairs)
  assert images == imgs                                  # pair 1 image 1, pair 1 image 2, ...
  assert sum(s is prompts.IMAGE for s in segments) == 8
  text = vlm_lib.chat_text(segments, "<image>")
  assert text.startswith("<|im_start|>system\n" + prompts.SYSTEM_PROMPT)
  assert text.endswith("User Profile: [Description]<|im_end|>\n<|im_start|>assistant\n")
  where = [text.index(f"Here is Pair {k + 1}: Here is the caption: cap-{k} Here is Image 1: "
                      f"<image> Here is Image 2: <image> Prediction of user preference: "
                      f"{1 + k % 2}") for k in range(4)]
  assert where == sorted(where) and text.index(prompts.INTRO) < where[0]
  assert where[-1] < text.index(prompts.STEPS[0]) < text.index("Pair 4: Image 1: [Description]")

  seen = {}
  v = world["vlm"]
  real = v.image_processor

  def spy(images, **kw):
    seen["images"] = images
    return real(images, **kw)

  v.image_processor = spy
  try:
    inputs = v.inputs([(segments, images)])
  finally:
    v.image_processor = real
  assert [im.getpixel((0, 0))[0] for im in seen["images"][0]] == list(range(8))
  ids = inputs["input_ids"][0].tolist()
  assert ids.count(v.model.config.image_token_id) == 8 * v.tokens_per_image == 40
  sent = v.tokenizer.decode(ids)
  assert all(f"caption: cap-{k} Here is Image 1:" in sent for k in range(4))


def test_stored_embedding_is_the_final_tokens_state_from_an_independent_forward(world):
  store = _run(world, "all.safetensors")
  assert store.tokens == v_layers(world) and store.dim == 32
  assert store.source["template"] == prompts.TEMPLATE_VERSION
  assert store.source["decoding"] == {"mode": "greedy", "max_new_tokens": 6}
  assert store.source["model"] == world["model"] and store.source["layers"] == "all"
  np.testing.assert_array_equal(store.users, [-4, 11, 902])
  source = shots.JsonlPairs(world["jsonl"], 4, log=lambda _: None)
  assert source.report == {"rows_skipped": 1, "users_too_few_pairs": 0}
  responses = [json.loads(x) for x in open(str(world["root"] / "all.safetensors")
                                           + ".responses.jsonl")]
  for uid in (-4, 11, 902):
    (row,) = store.rows_of(uid)
    shot_ids = store.shot_ids[row].tolist()
    assert shot_ids == source.candidates(uid)[:4] or uid == -4
    pairs = [p for p in source.load(shot_ids).values()]
    ref, text = _independent_state(world["vlm"], pairs)
    np.testing.assert_allclose(store.embeddings[row], ref, atol=2e-5, rtol=1e-5)
    assert store.profile(uid) == prompts.profile_of(text)
    assert {"user_id": uid, "sample": 0, "response": text} in responses
  # -4's 3rd pair has a corrupt image: replaced by its next pair, as the training reader does.
  first = source.candidates(-4)
  assert store.shot_ids[store.rows_of(-4)[0]].tolist() == first[:2] + first[3:5]
  assert store.source["report"]["problems"] == 1


def v_layers(world) -> int:
  return world["vlm"].num_layers + 1


def test_final_state_stops_at_the_end_of_turn(world):
  """A row that ended early (end-of-turn, then padding) takes the end-of-turn token's state."""
  v = world["vlm"]
  source = shots.JsonlPairs(world["jsonl"], 4, log=lambda _: None)
  pairs = list(source.load(source.candidates(11)[:4]).values())
  inputs = v.inputs([prompts.user_prompt(pairs)] * 2)
  new = torch.tensor([[5, 6, v.eos_id, v.pad_id, v.pad_id], [7, 8, 9, 10, 12]])
  seq = torch.cat([inputs["input_ids"], new], 1)
  states, texts = v.final_states(inputs, seq, "last")
  assert states.shape == (2, 1, 32)
  for b, n in ((0, 3), (1, 5)):
    ids = seq[b:b + 1, :inputs["input_ids"].shape[1] + n]
    with torch.inference_mode():
      out = v.model(input_ids=ids, pixel_values=inputs["pixel_values"][:8],
                    image_sizes=inputs["image_sizes"][:8], batch_num_images=[8],
                    output_hidden_states=True)
    np.testing.assert_allclose(states[b, 0], out.hidden_states[-1][0, -1].numpy(), atol=2e-5)
  assert texts[1] == v.tokenizer.decode(new[1])


def test_last_layer_mode_is_the_last_row_of_all_layers(world):
  every = store_lib.UserEmbeddingStore(world["root"] / "all.safetensors")
  if not os.path.exists(every.path):
    pytest.fail("runs after the all-layers test")
  last = _run(world, "last.safetensors", layers="last")
  assert (last.tokens, last.dim) == (1, 32) and every.tokens == v_layers(world) == 3
  np.testing.assert_allclose(last.embeddings[:, 0], every.embeddings[:, -1], atol=2e-5)


def test_killed_run_resumes_into_the_same_store(world):
  opts = dict(decoding=SAMPLED, batch_size=1, samples=3)
  logged = []
  whole = embed.run(_options(world, "whole.safetensors", **opts), vlm=world["vlm"],
                    log=logged.append)
  # 902 has 4 pairs: a single 4-subset, so a single sample; the run says so, and counts it.
  per_user = [whole.samples[whole.rows_of(u)].tolist() for u in (-4, 11, 902)]
  assert per_user == [[0, 1, 2], [0, 1, 2], [0]]
  said = [m for m in logged if "fewer distinct 4-pair subsets than --samples=3" in m]
  assert len(said) == 1 and "user 902 1" in said[0] and "user 11" not in said[0], logged
  report = whole.source["report"]
  assert report["users_short_of_samples"] == 1 and report["short_of_samples"] == {"902": 1}

  class Killed(Exception):
    pass

  def die(b):
    if b == 3:
      raise Killed

  with pytest.raises(Killed):
    embed.run(_options(world, "resumed.safetensors", **opts), vlm=world["vlm"], after_batch=die,
              log=lambda _: None)
  work = world["root"] / "resumed.safetensors.parts"
  assert len(list(work.glob("part-*.npz"))) == 4
  assert not (world["root"] / "resumed.safetensors").exists()
  with pytest.raises(ValueError, match="layers differ"):
    _run(world, "resumed.safetensors", layers="last", **opts)
  calls = []
  resumed = embed.run(_options(world, "resumed.safetensors", **opts), vlm=world["vlm"],
                      after_batch=calls.append, log=lambda _: None)
  assert calls == [4, 5, 6] and not work.exists()
  for name in ("user_ids", "samples", "shot_ids", "embeddings"):
    np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
  assert [resumed.profile_of_row(r) for r in range(7)] == [whole.profile_of_row(r)
                                                           for r in range(7)]
  for uid in (-4, 11):                        # extra samples are other 4-subsets of the user
    sets = {frozenset(s) for s in whole.shot_ids[whole.rows_of(uid)].tolist()}
    assert len(sets) == 3
  again = embed.run(_options(world, "resumed.safetensors", **opts), vlm=None,
                    log=lambda _: None)          # complete: nothing loaded, nothing redone
  assert again.num_entries == 7


def test_shards_merge_into_the_unsharded_store(world, tmp_path):
  parts = [_run(world, f"shard{i}.safetensors", num_shards=2, shard_index=i, samples=2)
           for i in range(2)]
  assert sorted(parts[0].users.tolist() + parts[1].users.tolist()) == [-4, 11, 902]
  merged = merge.merge_stores(tmp_path / "merged.safetensors", [p.path for p in parts])
  single = _run(world, "single.safetensors", samples=2)
  np.testing.assert_array_equal(merged.user_ids, single.user_ids)
  np.testing.assert_array_equal(merged.shot_ids, single.shot_ids)
  np.testing.assert_allclose(merged.embeddings, single.embeddings, atol=2e-5)
  with pytest.raises(store_lib.StoreError, match=r"shard\(s\) \[1\] of 2 are missing"):
    merge.merge_stores(tmp_path / "x.safetensors", [parts[0].path])


def test_pickapic_input_uses_the_recorded_few_shot_pairs(world, tmp_path):
  parquet = str(tmp_path / "parquet")
  make_pickapic.write_synthetic_pickapic(parquet, num_users=4, pairs_per_user=(4, 6),
                                         num_files=2, corrupt_jpegs=3, row_group_size=4, seed=1)
  store = _run(world, "pickapic.safetensors", pairs=parquet, batch_size=4)
  index = pickapic.build_index(parquet, log=lambda _: None)
  bad = set()
  for r in pickapic.read_pairs(index, np.arange(len(index.pairs["user_id"]))):
    try:
      for k in ("jpg_0", "jpg_1"):
        shots.decode_image(r[k], "")
    except shots.UnreadablePair:
      bad.add(r["pair"])
  assert bad, "the fixture should hold corrupt JPEGs"
  for uid in index.users["user_id"]:
    if uid not in store:
      assert len(set(index.user_order(uid)) - bad) < 4
      continue
    row = store.rows_of(uid)[0]
    np.testing.assert_array_equal(store.shot_ids[row], index.fewshot_pairs(uid, exclude=bad))


def test_cli_writes_a_store_and_names_bad_flags(world, tmp_path):
  out = str(tmp_path / "cli.safetensors")
  args = [sys.executable, "-m", "ppd_jax.users.embed", f"--model={world['model']}",
          f"--pairs={world['jsonl']}", "--decoding=greedy", "--max_new_tokens=3"]
  done = subprocess.run(args + [f"--out={out}", "--layers=last"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert store_lib.UserEmbeddingStore(out).tokens == 1
  assert "entries/s" in done.stdout and os.path.exists(out + ".progress.jsonl")
  bad = subprocess.run(args + [f"--out={out}", "--num_shards=2", "--shard_index=2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--shard_index must be in [0, --num_shards=2)" in bad.stderr


def test_a_new_user_is_embedded_as_the_stores_users_were(world, tmp_path):
  """sample.py --pairs on a Pick-a-Pic run: the VLM, template, decoding and layers come from the
  run's store, so a user's own 4 pairs given as a file reproduce its stored embedding."""
  import ml_collections
  from types import SimpleNamespace
  from ppd_jax.users import new_user
  store = _run(world, "all.safetensors")                 # complete: read back, not redone
  source = shots.JsonlPairs(world["jsonl"], 4, log=lambda _: None)
  rows = [json.loads(x) for x in open(world["jsonl"]) if x.startswith("{\"")]
  mine = [r for r in rows if r["user_id"] == 11][:4]
  for r in mine:
    for k in ("image_1", "image_2"):
      r[k] = str(world["root"] / r[k])
  path = tmp_path / "four.json"
  path.write_text(json.dumps(mine))
  config = ml_collections.ConfigDict({"data": {"source": "pickapic", "fewshot": 4}})
  run = SimpleNamespace(config=config, users=SimpleNamespace(store=store))
  emb, profile = new_user.embed_new_user(run, str(path), log=lambda _: None)
  assert store.shot_ids[store.rows_of(11)[0]].tolist() == source.candidates(11)[:4]
  np.testing.assert_allclose(emb, store[11], atol=2e-5)
  assert profile == store.profile(11)

  other = tmp_path / "other.safetensors"
  store_lib.write_store(other, [1], np.ones((1, 3, 32)), source={"embedder": "statistics"})
  run.users.store = store_lib.UserEmbeddingStore(other)
  with pytest.raises(ValueError, match="not made by the VLM extraction"):
    new_user.embed_new_user(run, str(path))


def test_bad_settings_are_named_before_any_work(world):
  with pytest.raises(ValueError, match="--top_p"):
    vlm_lib.Decoding(top_p=0.0)
  with pytest.raises(ValueError, match="--decoding"):
    vlm_lib.Decoding(mode="beam")
  assert GREEDY.as_dict() == {"mode": "greedy", "max_new_tokens": 6}
  for kw, flag in (({"layers": "middle"}, "--layers"), ({"samples": 0}, "--samples"),
                   ({"storage_dtype": "int8"}, "--storage_dtype"),
                   ({"batch_size": 0}, "--batch_size")):
    with pytest.raises(ValueError, match=flag):
      embed.run(_options(world, "never.safetensors", **kw), vlm=world["vlm"])
  with pytest.raises(ValueError, match="--out must name a .safetensors"):
    embed.run(_options(world, "users.npz"), vlm=world["vlm"])
  with pytest.raises(shots.PairsError, match="--pairs=.*nope"):
    embed.run(_options(world, "never.safetensors", pairs=str(world["root"] / "nope")),
              vlm=world["vlm"])
  assert not (world["root"] / "never.safetensors.parts").exists()

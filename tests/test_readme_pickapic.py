"""docs/pickapic.md's Pick-a-Pic sequence runs exactly as written: make the smoke data, precompute,
embed the users with LLaVA-OneVision (its defaults: sampled decoding, every layer), train with
the pickapic_sd15 variant, which takes the embedding's shape from the store. Only the two model
paths are replaced, by a tiny diffusers folder and a tiny random LLaVA-OneVision."""
import json
import os
import shlex
import subprocess
import sys

import tiny_llava
import tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_PLACEHOLDER = "/path/to/stable-diffusion-v1-5"
VLM_PLACEHOLDER = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


def readme_commands() -> list[str]:
  """The first command block of docs/pickapic.md, one entry per command."""
  with open(os.path.join(ROOT, "docs", "pickapic.md")) as f:
    text = f.read()
  start = text.index("```bash\n") + len("```bash\n")
  block = text[start:text.index("```", start)].replace("\\\n", " ")
  return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_block_is_the_four_steps():
  steps = [c.split()[2] for c in readme_commands()]
  assert steps == ["ppd_jax.data.make_pickapic", "ppd_jax.data.precompute",
                   "ppd_jax.users.embed", "ppd_jax.train"]


def test_readme_pickapic_sequence_runs_as_written(tmp_path):
  sd = tiny_sd.save_pipeline(str(tmp_path / "models" / "tiny-sd15"), "sd15")
  vlm = tiny_llava.save_tiny_llava(str(tmp_path / "models" / "tiny-llava"))
  work = tmp_path / "work"
  work.mkdir()
  os.symlink(os.path.join(ROOT, "configs"), work / "configs")   # --config=configs/ppd.py:...
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for command in readme_commands():
    args = shlex.split(command.replace(SD_PLACEHOLDER, sd).replace(VLM_PLACEHOLDER, vlm))
    assert args[0] == "python"
    done = subprocess.run([sys.executable] + args[1:], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
  log = done.stdout
  assert "step 20/20" in log, log[-2000:]
  # The smoke data's validation split has a user with held-out pairs: validation runs.
  assert "step 20: validation loss" in log, log[-2000:]
  assert os.path.isdir(work / "runs" / "pickapic" / "checkpoints" / "20")

  # Table 1 (docs/table1.md) on the smoke run: the test split's captions as the prompts, the
  # validation split's as the selection set, a tiny CLIP as the reward, a store user as its user.
  import tiny_clip
  from ppd_jax.data import user_store
  clip = str(tmp_path / "models" / "tiny-clip")
  tiny_clip.save_clip(clip)
  uid = int(user_store.UserEmbeddingStore(str(work / "users.safetensors")).users[0])
  done = subprocess.run(
      [sys.executable, "-m", "ppd_jax.evals.table1", "--out=table1",
       "--prompts=pickapic:shards/sd15:test", "--val_prompts=pickapic:shards/sd15",
       "--num_prompts=2", "--chunk=2", "--rewards=clip_h14", f"--model=clip_h14={clip}",
       "--run=base=runs/pickapic", "--run=ppd=runs/pickapic", f"--reward_user=clip_h14={uid}"],
      cwd=work, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  table = json.loads((work / "table1" / "table1.json").read_text())
  assert set(table["rows"]) == {"base", "ppd"}
  assert table["rows"]["ppd"]["clip_h14"]["n"] == 2

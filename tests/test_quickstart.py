"""The README's quickstart (the same five commands as docs/own_data.md) runs as printed: an own JSONL table of 3 users to samples and
an IP-Adapter file. Only the model paths (a tiny SD folder, a tiny random LLaVA-OneVision) and the
step count are replaced; the table is written where the page says it is."""
import glob
import json
import os
import shlex
import subprocess
import sys

import own_table_fixtures
import tiny_llava
import tiny_sd
from test_readme_pickapic import ROOT, SD_PLACEHOLDER, VLM_PLACEHOLDER

MARK = "<!-- quickstart -->"
STEPS = ("--config.total_steps=500", "--config.total_steps=2")


def quickstart_commands(page: str = "README.md") -> list[str]:
  """The bash block after the quickstart mark of `page`, one entry per command."""
  with open(os.path.join(ROOT, page)) as f:
    text = f.read()
  start = text.index("```bash\n", text.index(MARK)) + len("```bash\n")
  block = text[start:text.index("```", start)].replace("\\\n", " ")
  return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_quickstart_is_the_five_steps():
  steps = [c.split()[2] for c in quickstart_commands()]
  assert steps == ["ppd_jax.data.precompute", "ppd_jax.users.embed", "ppd_jax.train",
                   "ppd_jax.sample", "ppd_jax.export"]
  assert sum(STEPS[0] in c for c in quickstart_commands()) == 1
  # docs/own_data.md explains the same commands: the page and the README cannot drift apart.
  assert quickstart_commands(os.path.join("docs", "own_data.md")) == quickstart_commands()


def test_quickstart_runs_as_written(tmp_path):
  sd = tiny_sd.save_pipeline(str(tmp_path / "models" / "tiny-sd15"), "sd15")
  vlm = tiny_llava.save_tiny_llava(str(tmp_path / "models" / "tiny-llava"))
  work = tmp_path / "work"
  table = work / "my_pairs"
  table.mkdir(parents=True)
  own_table_fixtures.write_table(str(table / "pairs.jsonl"),
                                 own_table_fixtures.pair_rows(str(table), [1, 2, 3], 5))
  os.symlink(os.path.join(ROOT, "configs"), work / "configs")   # --config=configs/ppd.py:...
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  logs = []
  for command in quickstart_commands():
    command = command.replace(SD_PLACEHOLDER, sd).replace(VLM_PLACEHOLDER, vlm)
    args = shlex.split(command.replace(*STEPS))
    assert args[0] == "python"
    done = subprocess.run([sys.executable] + args[1:], cwd=work, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    logs.append(done.stdout + done.stderr)
  # Every row of the table got through: 3 users x 5 pairs, none bad, all encoded.
  manifest = json.loads((work / "shards" / "mine" / "manifest.json").read_text())
  assert manifest["index"]["table"]["rows_bad"] == 0
  assert manifest["index"]["counts"]["users"] == 3
  assert sum(manifest["counts"][f"pairs_{s}"] for s in ("train", "validation", "test")) == 15
  assert "step 2/2" in logs[2], logs[2][-2000:]
  assert glob.glob(str(work / "samples" / "*.png"))
  assert glob.glob(str(work / "adapter" / "*.safetensors"))

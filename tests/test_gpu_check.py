"""benchmarks/gpu_check.sh --tiny: every piece of the GPU check runs on this CPU, as a backend
whose cost_analysis() is None (the CUDA plugin's case), and lands the results the GPU run owes.

One run of the script serves every test here (it takes minutes: seven processes, each importing
jax or torch and compiling its tiny step)."""
import json
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
C_API_BACKEND = ROOT / "tests" / "c_api_backend"     # sitecustomize: cost_analysis() is None
PROCESSES = ("jax_sd15", "torch", "jax_cascade", "jax_sdxl", "rewards", "jax_sample",
             "jax_sd15_noremat")
PIECES = ("sd15_train", "torch_sd15_train", "torch_sd15_train_noremat", "cascade_lite_train",
          "sdxl_train", "rewards", "sample", "attention", "sd15_train_noremat")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(stdout lines, summary dict, logs folder) of one --tiny run."""
  assert (C_API_BACKEND / "sitecustomize.py").exists(), C_API_BACKEND
  out = tmp_path_factory.mktemp("gpu_check")
  # The script's own compile-cache settings, and one device as on the GPU (no fake devices).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_")) and k not in (
      "PYTHONPATH", "PPD_C_API_BACKEND_QUIET")}
  env.update(OUT=str(out / "logs"), JAX_PLATFORMS="cpu", PYTHONPATH=str(C_API_BACKEND))
  proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  logs = out / "logs"
  summary = json.loads((logs / "gpu_check.json").read_text())
  return proc.stdout.splitlines(), summary, logs


def _json_lines(log: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in log.read_text().splitlines()
          if line.startswith('{"piece"')]


def test_plan_comes_first_and_names_every_process(tiny_run):
  lines, _, _ = tiny_run
  assert lines[0].startswith("plan: mode tiny"), lines[:3]
  first_run = next(i for i, line in enumerate(lines) if line.startswith("== "))
  plan = lines[1:first_run]
  assert [line.split()[0] for line in plan] == list(PROCESSES), plan
  assert all(re.match(r"\s+\S+\s+\d+s\s", line) for line in plan), plan   # a budget each


def test_every_piece_has_a_final_result(tiny_run):
  _, summary, _ = tiny_run
  pieces = summary["pieces"]
  assert sorted(pieces) == sorted(PIECES)
  for name in PIECES:
    assert "error" not in pieces[name], (name, pieces[name].get("error"))
    assert "partial" not in pieces[name], name
  assert summary["headline"]["errors"] == {}
  assert {p: r["rc"] for p, r in summary["processes"].items()} == {p: "0" for p in PROCESSES}


def test_sd15_partial_line_after_compile_then_flops_without_cost_analysis(tiny_run):
  _, summary, logs = tiny_run
  log = (logs / "jax_sd15.log").read_text()
  assert "cost_analysis() return None" in log       # the C-API backend's behaviour was on
  lines = [r for r in _json_lines(logs / "jax_sd15.log") if r["piece"] == "sd15_train"]
  assert [r.get("partial") for r in lines] == ["compiled", None]
  partial, final = lines
  assert partial["compile_s"] > 0 and partial["memory_gib"]["total"] > 0
  assert "pairs_per_s" not in partial
  assert final["flops_per_step"] > 0 and final["pairs_per_s"] > 0
  assert summary["pieces"]["sd15_train"]["flops_per_step"] == final["flops_per_step"]
  assert summary["headline"]["sd15_train_flops_per_step"] == final["flops_per_step"]


def test_matched_remat_and_ratio_per_setting(tiny_run):
  _, summary, _ = tiny_run
  pieces, head = summary["pieces"], summary["headline"]
  assert pieces["sd15_train"]["remat"] is True
  assert pieces["sd15_train_noremat"]["remat"] is False
  assert pieces["torch_sd15_train"]["gradient_checkpointing"] is True
  assert pieces["torch_sd15_train_noremat"]["gradient_checkpointing"] is False
  ratios = head["sd15_train_ratio_ours_over_pytorch"]
  assert set(ratios) == {"remat", "no_remat"}
  for setting, (ours, theirs) in {"remat": ("sd15_train", "torch_sd15_train"), "no_remat": (
      "sd15_train_noremat", "torch_sd15_train_noremat")}.items():
    expected = pieces[ours]["pairs_per_s"] / pieces[theirs]["pairs_per_s"]
    assert ratios[setting] == pytest.approx(expected), setting


def test_probe_pieces_cascade_kernels_rewards_and_cache(tiny_run):
  _, summary, _ = tiny_run
  pieces = summary["pieces"]
  for name in ("cascade_lite_train", "sdxl_train"):
    assert pieces[name]["pairs"] >= 1 and pieces[name]["attempts"], name
  layers = pieces["cascade_lite_train"]["attention"]["layers"]
  assert layers and [row["call"] for row in layers] == list(range(len(layers)))
  assert all(row["impl"] for row in layers)
  assert pieces["rewards"]["xla_preallocate"] == "false"    # torch and JAX share the device
  # Every compile kept, however small or quick, where a second try on the machine finds it.
  for name in ("sd15_train", "sd15_train_noremat", "cascade_lite_train", "sdxl_train", "sample"):
    assert pieces[name]["compilation_cache"] == {
        "dir": "/tmp/ppd_gpu_check_jax_cache", "min_compile_time_s": 0.0,
        "min_entry_size_bytes": 0}, name
  assert any(pathlib.Path("/tmp/ppd_gpu_check_jax_cache").glob("jit_step-*")), "no step cached"


def test_halved_batch_halves_until_the_proportional_estimate_fits():
  import importlib.util
  spec = importlib.util.spec_from_file_location("jax_gpu_check",
                                                ROOT / "benchmarks" / "jax_gpu_check.py")
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  # 8 pairs: 10 B fixed (arguments + outputs - aliased) and 80 B of temporaries, 10 B a pair.
  need = {"argument": 12, "output": 3, "alias": 5, "temp": 80}
  assert check.halved_batch(8, need, limit=100) == 4      # halved once even where 8 would fit
  assert check.halved_batch(8, need, limit=50) == 2       # 4 pairs: 50 B > 0.95 x 50 B
  assert check.halved_batch(8, need, limit=10) == 0       # the fixed part alone does not fit

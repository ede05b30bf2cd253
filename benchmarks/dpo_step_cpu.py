"""The Diffusion-DPO train step on this CPU, ours against the PyTorch way, side by side.

  python benchmarks/dpo_step_cpu.py [--pairs=4,8] [--steps=10]

Both sides run the tiny SD 1.5 layout of the GPU check's --tiny mode (benchmarks/jax_gpu_check.py
TINY_MODEL["sd15"] = benchmarks/torch_train_step.py TINY_UNET: blocks (32, 64), head dim 8, 8x8
latents, 8 text tokens, user embedding 64), float32, no remat / no gradient checkpointing, and
the whole step: reference forward without the user branch, policy forward with it, backward into
the user branch, clipping and the optimizer update. Ours is piece sd15_train_noremat of
jax_gpu_check.py (the jitted step of ppd_jax/step.py); theirs is torch_train_step.py (diffusers'
UNet with IP-Adapter processors, the reference under no_grad, AdamW) with as many intra-op
threads as the machine has cores, as XLA's CPU client uses.

Each side runs in its own process, one after the other, so neither competes with the other for
the cores; the ratio is the median step time of theirs / ours (> 1: ours faster), per pair count.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def last_json(stdout: str, piece: str) -> dict:
  """The result line of `piece` in a benchmark's stdout; its error, if it printed one."""
  for line in reversed(stdout.splitlines()):
    if line.startswith("{"):
      result = json.loads(line)
      if result.get("piece") == piece and not result.get("partial"):
        if "error" in result:
          raise SystemExit(f"{piece}: {result['error']}")
        return result
  raise SystemExit(f"{piece}: no result line in\n{stdout[-2000:]}")


def run(cmd: list[str]) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent, check=False)
  if done.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return done.stdout


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default="4,8", help="comma list of pairs per step")
  p.add_argument("--steps", type=int, default=10, help="timed steps per side (median reported)")
  args = p.parse_args(argv)
  threads = os.cpu_count()
  print(f"cpu: {threads} cores, load average {os.getloadavg()[0]:.1f}; tiny SD 1.5 layout, fp32, "
        f"8x8 latents, no remat; median of {args.steps} steps", flush=True)
  for pairs in [int(x) for x in args.pairs.split(",")]:
    ours = last_json(run([sys.executable, str(HERE / "jax_gpu_check.py"), "--tiny",
                          "--pieces=sd15_train_noremat", f"--pairs={pairs}",
                          f"--steps={args.steps}"]), "sd15_train_noremat")
    theirs = last_json(run([sys.executable, str(HERE / "torch_train_step.py"), "--tiny",
                            f"--pairs={pairs}", "--gradient_checkpointing=off",
                            f"--steps={args.steps}", "--warmup=3", f"--threads={threads}",
                            "--text_length=8"]), "torch_sd15_train_noremat")
    print(f"{pairs} pairs/step: ours {ours['step_ms_median']:.1f} ms (first step "
          f"{ours['first_step_s']:.1f} s, compile {ours['compile_s']:.1f} s), PyTorch "
          f"{theirs['step_ms_median']:.1f} ms ({theirs['device']}); ratio "
          f"{theirs['step_ms_median'] / ours['step_ms_median']:.2f}x", flush=True)


if __name__ == "__main__":
  main()

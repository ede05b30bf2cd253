#!/usr/bin/env bash
# One short run on a GPU machine (one H100 / H200) that prints the figures docs/performance.md quotes.
# It prints its plan first: each process in order, with the seconds it may take at most (what
# one leaves unused goes to the next; the whole run fits GPU_CHECK_BUDGET_S, default 470 s,
# under 8 minutes on one H100):
#   jax_sd15         ours: the SD 1.5 train step with remat (configs/ppd.py:sd15), alone, first
#                    and with the largest share; a partial JSON line as soon as it is compiled
#                    (compile seconds, memory_analysis()), then pairs/s and MFU
#   torch            the same step the PyTorch way (benchmarks/torch_train_step.py) with gradient
#                    checkpointing (like for like with our remat), then without, on one model
#   jax_cascade      the Stable Cascade Stage C lite train step (the paper's backbone), batch by
#                    probe-and-halve, and the attention kernel of each Stage C attention call
#   jax_sdxl         the SDXL train step, batch by probe-and-halve
#   rewards          the ViT-H/14 CLIP reward, ours against transformers' CLIPModel on the same
#                    random weights, bf16, batch 64 (benchmarks/rewards.py; torch and JAX in one
#                    process, so JAX does not preallocate)
#   jax_sample       50-step CFG sampling (images/s), and the kernel "auto" picks for every
#                    attention call of the SD 1.5 and SDXL UNets
#   jax_sd15_noremat ours without remat, like for like with PyTorch without checkpointing: last,
#                    in what time is left
# The headline: ours / PyTorch for the SD 1.5 step with remat/checkpointing on both sides and off
# on both. Each process runs under `timeout`; one that fails or runs out of time is recorded as
# such (with its last partial line) while the others still run.
#
#   bash benchmarks/gpu_check.sh            # the GPU run (needs nvidia-smi)
#   bash benchmarks/gpu_check.sh --tiny     # tiny models on the CPU: tests this script anywhere
#   bash benchmarks/gpu_check.sh --dry      # full-size configs traced and lowered on the CPU
#   GPU_CHECK_MODE=tiny bash benchmarks/gpu_check.sh      # the same as --tiny
#
# With the device tool (the wheels of benchmarks/fetch_wheels.sh travel as the carried .whl/):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Output: $OUT/gpu_check.json if OUT is set, else gpu_check.json in the repo root, rewritten as
# each process ends (so a run cut short keeps what finished) and printed at the end; beside it
# setup.log, processes.txt and one log per process (10 files, within what the device tool brings
# back); without OUT the logs go to a /tmp folder named on the last line.
#
# Environment it sets, and why:
#   PYTHONPATH                     the repo (ppd_jax, configs) and, if the image lacks diffusers
#                                  or ml_collections, the carried wheels installed offline
#   XLA_PYTHON_CLIENT_MEM_FRACTION 0.92: JAX may take most of the GPU (its pieces run alone)
#   XLA_PYTHON_CLIENT_PREALLOCATE  false for the rewards process only (torch shares the GPU)
#   JAX_COMPILATION_CACHE_DIR      /tmp/ppd_gpu_check_jax_cache, with
#   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0:
#                                  every compile is kept, so a second try on the same machine
#                                  skips them (and XLA's GPU autotuning, cached beside them), and
#                                  the SD 1.5 init compiled once serves the later SD 1.5 pieces.
#                                  PyTorch compiles nothing here (no torch.compile).
#   TF32                           torch_train_step.py allows TF32 matmuls / convolutions, which
#                                  XLA's default precision already uses for float32 on the GPU
#                                  (both sides compute the UNet in bf16; f32 is the small rest)
#   XLA_FLAGS                      left as XLA's defaults (a caller's value is kept)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD

MODE=${GPU_CHECK_MODE:-full}
[[ ${GPU_CHECK_TINY:-0} == 1 ]] && MODE=tiny
for arg in "$@"; do
  case $arg in
    --tiny) MODE=tiny ;;
    --dry) MODE=dry ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (--tiny, --dry)" >&2; exit 2 ;;
  esac
done
case $MODE in
  full|tiny|dry) ;;
  *) echo "gpu_check.sh: GPU_CHECK_MODE must be full, tiny or dry, not $MODE" >&2; exit 2 ;;
esac

# The plan ---------------------------------------------------------------------------------------
# One row per process: NAME CAP_S (full, tiny, dry) JSON-PIECES-IT-OWES WHAT.
PLAN=(
  "jax_sd15 150 300 300 sd15_train SD 1.5 train step, ours, remat on"
  "torch 60 150 90 torch_sd15_train,torch_sd15_train_noremat SD 1.5 step, PyTorch, ckpt on, off"
  "jax_cascade 60 300 200 cascade_lite_train Stage C lite step, probe-and-halve, kernels per layer"
  "jax_sdxl 100 300 300 sdxl_train SDXL step, probe-and-halve"
  "rewards 30 150 120 rewards ViT-H/14 reward, ours and transformers', no JAX preallocation"
  "jax_sample 50 200 300 sample,attention 50-step CFG sampling; attention kernels of SD 1.5, SDXL"
  "jax_sd15_noremat 120 300 300 sd15_train_noremat SD 1.5 step, ours, remat off (what is left)"
)
# full: 450 s of caps before the last process, which gets what the others leave (it is skipped
# under 20 s); tiny (a shared 2-core CPU) and dry (full-size tracing on a CPU): generous caps.
case $MODE in
  full) BUDGET=${GPU_CHECK_BUDGET_S:-470}; COLUMN=1 ;;
  tiny) BUDGET=${GPU_CHECK_BUDGET_S:-1500}; COLUMN=2 ;;
  dry) BUDGET=${GPU_CHECK_BUDGET_S:-1500}; COLUMN=3 ;;
esac
cap_of() {   # cap_of NAME: the process's cap in this mode
  local row
  for row in "${PLAN[@]}"; do
    read -r -a f <<<"$row"
    [[ ${f[0]} == "$1" ]] && echo "${f[COLUMN]}" && return
  done
}
echo "plan: mode $MODE, budget ${BUDGET}s; processes in order, each with the seconds it may take" \
  "at most (less if the budget runs short; what one leaves goes to the next):"
for row in "${PLAN[@]}"; do
  read -r -a f <<<"$row"
  printf '  %-17s %4ss  %s: %s\n' "${f[0]}" "${f[COLUMN]}" "${f[4]}" "${f[*]:5}"
done

if [[ $MODE == full ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check.sh: no GPU (nvidia-smi -L failed); use --tiny or --dry here" >&2
  exit 2
fi

T0=$(date +%s)
if [[ -n ${OUT:-} ]]; then
  LOGS=$OUT
  SUMMARY=$OUT/gpu_check.json
else
  LOGS=$(mktemp -d /tmp/gpu_check.XXXXXX)
  SUMMARY=$REPO/gpu_check.json
fi
mkdir -p "$LOGS"
: >"$LOGS/processes.txt"

PY=${GPU_CHECK_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi

# Set-up ---------------------------------------------------------------------------------------
{
  echo "mode: $MODE"
  echo "python: $PY ($("$PY" -V 2>&1))"
  echo "host: $(uname -srm), $(nproc) cores"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "nvidia-smi: none"
} >"$LOGS/setup.log" 2>&1

SITE=/tmp/ppd_gpu_check_site
if ! "$PY" -c "import diffusers, ml_collections" >/dev/null 2>&1; then
  # Wheels for this Python only: pip rejects the whole install if one file does not fit.
  tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
  wheels=()
  for whl in "$REPO"/.whl/*.whl; do
    [[ -e $whl ]] || continue
    case ${whl##*/} in
      *-py3-none-any.whl|*-py2.py3-none-any.whl|*-"$tag"-*) wheels+=("$whl") ;;
    esac
  done
  echo "installing ${#wheels[@]} carried wheels into $SITE" >>"$LOGS/setup.log"
  if ((${#wheels[@]})); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${wheels[@]}" >>"$LOGS/setup.log" 2>&1 ||
      echo "pip install of the wheels failed" >>"$LOGS/setup.log"
  else
    echo "no .whl/ wheels here (benchmarks/fetch_wheels.sh; carry .whl)" >>"$LOGS/setup.log"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/ppd_gpu_check_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}
echo "compilation cache: $JAX_COMPILATION_CACHE_DIR ($(find "$JAX_COMPILATION_CACHE_DIR" \
  -type f 2>/dev/null | wc -l) files before this run)" >>"$LOGS/setup.log"
# Versions from the installed metadata: importing torch and jax here would cost seconds.
"$PY" - >>"$LOGS/setup.log" 2>&1 <<'EOF'
from importlib import metadata
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "diffusers",
             "transformers", "ml-collections", "grain", "numpy"):
  try:
    print(f"{name} {metadata.version(name)}")
  except metadata.PackageNotFoundError:
    print(f"{name} MISSING")
EOF

# Summary: merges the processes' JSON lines; run after each process, and at the end with --print.
summarize() {
  "$PY" - "$LOGS" "$SUMMARY" "$MODE" "$(($(date +%s) - T0))" "$@" <<'EOF'
"""Merges the pieces' JSON lines into one summary, with the headline figures for docs/performance.md."""
import json
import pathlib
import sys

logs, summary_path, mode, total = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
pieces, processes = {}, {}
for row in (logs / "processes.txt").read_text().splitlines():
  name, rc, wall, limit, owed = row.split()
  processes[name] = {"rc": rc, "wall_s": int(wall), "limit_s": int(limit)}
  log = logs / f"{name}.log"
  lines = log.read_text(errors="replace").splitlines() if log.exists() else []
  for line in lines:
    if line.startswith('{"piece"'):
      try:
        result = json.loads(line)
      except json.JSONDecodeError:
        continue
      pieces[result["piece"]] = result      # the last line of a piece wins (partial ones first)
  for piece in owed.split(","):
    got = pieces.get(piece)
    if got is not None and "partial" not in got:
      continue
    why = {"skipped": "skipped: the budget was spent", "124": f"timed out after {limit}s",
           "137": f"killed after {limit}s (timeout or memory)"}.get(
               rc, f"exited {rc} without a result")
    pieces[piece] = {**(got or {"piece": piece}), "error": why,
                     "log_tail": "\n".join(lines[-15:])[-2000:]}

def get(piece, key):
  return pieces.get(piece, {}).get(key)

head = {"mode": mode, "total_wall_s": int(total),
        "device": get("sd15_train", "device_kind") or get("torch_sd15_train", "device")}
# Like for like: remat (ours) against gradient checkpointing (PyTorch), on both or off on both.
settings = {"remat": ("sd15_train", "torch_sd15_train"),
            "no_remat": ("sd15_train_noremat", "torch_sd15_train_noremat")}
head["sd15_train_pairs_per_s"] = {}
head["sd15_train_ratio_ours_over_pytorch"] = {}
for setting, (ours_piece, theirs_piece) in settings.items():
  ours, theirs = get(ours_piece, "pairs_per_s"), get(theirs_piece, "pairs_per_s")
  head["sd15_train_pairs_per_s"][setting] = {"ours": ours, "pytorch": theirs}
  head["sd15_train_ratio_ours_over_pytorch"][setting] = ours / theirs if ours and theirs else None
head["sd15_train_compile_s"] = get("sd15_train", "compile_s")
head["sd15_train_mfu"] = {"ours": get("sd15_train", "mfu"),
                          "ours_no_remat": get("sd15_train_noremat", "mfu")}
flops, peak = get("sd15_train", "flops_per_step"), get("sd15_train", "peak_tflops")
head["sd15_train_flops_per_step"] = flops
theirs = get("torch_sd15_train", "pairs_per_s")
if theirs and flops and peak:   # the same model FLOPs per step, at PyTorch's step rate
  head["sd15_train_mfu"]["pytorch_same_flops"] = flops * theirs / get("sd15_train", "pairs") / (
      peak * 1e12)
head["sd15_train_peak_memory_gib"] = {
    setting: {"ours": get(o, "peak_memory_gib"), "pytorch": get(t, "peak_memory_gib")}
    for setting, (o, t) in settings.items()}
head["sdxl_train"] = {k: get("sdxl_train", k) for k in ("pairs", "pairs_per_s", "mfu",
                                                          "peak_memory_gib", "attempts")}
head["cascade_lite_train"] = {k: get("cascade_lite_train", k) for k in (
    "pairs", "pairs_per_s", "mfu", "peak_memory_gib", "base_params", "user_params")}
head["cascade_lite_train"]["attention_impls"] = (
    get("cascade_lite_train", "attention") or {}).get("implementations")
head["sample_50_step_cfg"] = {k: get("sample", k) for k in ("images", "images_per_s", "mfu")}
head["sample_50_step_cfg"]["vae_decode"] = "not included"
head["rewards_vit_h14"] = {k: get("rewards", k) for k in (
    "batch", "dtype", "ours_images_per_s", "pytorch_images_per_s", "ratio_ours_over_pytorch",
    "max_abs_cos_difference")}
head["attention_impls"] = {v: (get("attention", v) or {}).get("implementations")
                           for v in ("sd15", "sdxl")}
head["errors"] = {k: v["error"] for k, v in pieces.items() if "error" in v}

summary = {"headline": head, "processes": processes, "pieces": pieces}
pathlib.Path(summary_path).write_text(json.dumps(summary, indent=1) + "\n")

def brief(value):
  """The summary as printed: no tracebacks, log tails or per-layer attention lists."""
  if isinstance(value, dict):
    return {k: brief(v) for k, v in value.items() if k not in ("traceback", "log_tail", "layers")}
  return value

if "--print" in sys.argv[5:]:
  print("pieces:", json.dumps(brief(pieces))[:6000])
  print("headline:", json.dumps(head, indent=1))
  print(f"summary: {summary_path}; logs: {logs}")
EOF
}

# Pieces ---------------------------------------------------------------------------------------
FLAGS=()
[[ $MODE == tiny ]] && FLAGS=(--tiny)
[[ $MODE == dry ]] && FLAGS=(--dry)

# run_piece NAME PIECES COMMAND...: runs COMMAND --budget_s S under timeout, where S is the
# smaller of NAME's cap and what is left of the whole budget; PIECES names the JSON lines it owes.
run_piece() {
  local name=$1 pieces=$2
  shift 2
  local cap left limit
  cap=$(cap_of "$name")
  left=$((BUDGET - ($(date +%s) - T0)))
  limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "$name skipped 0 $limit $pieces" >>"$LOGS/processes.txt"
    echo "== $name: skipped (budget spent)"
    summarize
    return
  fi
  echo "== $name (up to ${limit}s)"
  local start
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" --budget_s $((limit - 5)) >"$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(($(date +%s) - start)) $limit $pieces" >>"$LOGS/processes.txt"
  grep '^{"piece"' "$LOGS/$name.log" | cut -c1-400
  if ((rc != 0)); then
    echo "   exit $rc; last lines of $name.log:"
    tail -n 5 "$LOGS/$name.log" | cut -c1-300 | sed 's/^/   | /'
  fi
  summarize
}

JAX=("$PY" "$REPO/benchmarks/jax_gpu_check.py" "${FLAGS[@]}")
run_piece jax_sd15 sd15_train "${JAX[@]}" --pieces=sd15_train
run_piece torch torch_sd15_train,torch_sd15_train_noremat "$PY" \
  "$REPO/benchmarks/torch_train_step.py" "${FLAGS[@]}" --gradient_checkpointing=on,off
run_piece jax_cascade cascade_lite_train "${JAX[@]}" --pieces=cascade_lite_train
run_piece jax_sdxl sdxl_train "${JAX[@]}" --pieces=sdxl_train
# The reward benchmark has no meta-device mode: --dry runs it tiny, like --tiny.
REWARD_FLAGS=(--batch=64 --dtype=bfloat16)
[[ $MODE != full ]] && REWARD_FLAGS=(--tiny)
run_piece rewards rewards env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" \
  "$REPO/benchmarks/rewards.py" "${REWARD_FLAGS[@]}"
run_piece jax_sample sample,attention "${JAX[@]}" --pieces=sample,attention
run_piece jax_sd15_noremat sd15_train_noremat "${JAX[@]}" --pieces=sd15_train_noremat

summarize --print

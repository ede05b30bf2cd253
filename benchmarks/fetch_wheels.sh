#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the lent GPU machine's Python image lacks, so that
# benchmarks/gpu_check.sh can install them there offline (that machine reaches no registry).
#
#   bash benchmarks/fetch_wheels.sh            # run here, where pip reaches a registry
#
# Why this list and no more: the image (see /work/.library/device/KINDS.md) already has jax,
# flax, optax, orbax, torch, transformers, huggingface-hub, safetensors, numpy, pillow, absl,
# etils, cloudpickle, protobuf, pyyaml, regex, requests, filelock, psutil, zipp, packaging. What
# it lacks is pyproject.toml's diffusers / grain / array-record / ml-collections / tensorboardX
# and, of their requirements (the METADATA files in .venv), importlib-metadata (diffusers),
# its lazy-importer, and portpicker (grain). Versions are the ones .venv resolved.
#
# --no-deps: pip must not resolve anything else (it would pull torch & co). Binary wheels are for
# the image's CPython only (3.12 as seen there; WHEEL_PYTHON=3.11 etc. for another): wheels of
# two Python versions side by side would make `pip install .whl/*.whl` fail on the foreign one.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PIP_PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3
PYVER=${WHEEL_PYTHON:-3.12}
DEST=.whl

# Pure-Python wheels (py3-none-any): one file serves every CPython.
PURE=(
  diffusers==0.42.1
  ml-collections==1.1.0
  tensorboardX==2.6.5
  importlib-metadata==10.2.0
  lazy-importer==0.1.0
  portpicker==1.6.0
)
# Compiled wheels: manylinux x86_64 for CPython $PYVER.
BINARY=(
  grain==0.2.18
  array-record==0.8.6
)

PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PURE[@]}" "${BINARY[@]}"

# One version of each distribution: two would stop the whole offline install there.
"$PY" - "$DEST" <<'EOF'
import collections, pathlib, re, sys
names = collections.defaultdict(list)
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
  names[re.sub(r"[-_.]+", "_", whl.name.split("-")[0]).lower()].append(whl.name)
dupes = {k: v for k, v in names.items() if len(v) > 1}
for k, v in dupes.items():
  print(f"WARNING: {len(v)} wheels of {k} in .whl/: {v}; keep one", file=sys.stderr)
sys.exit(1 if dupes else 0)
EOF

ls -l "$DEST"
du -sh "$DEST"
echo "carry it with the device tool: carry [\".whl\"] (at most 64 MiB with the working tree)"

#!/usr/bin/env bash
# The prep step for a GPU machine without network: the wheels bench/_gpu_env.py may need there,
# into bench/gpu_wheels/ (ignored by git; the device tool's `carry` ships it). Run it here, where
# pip reaches the package index. About 9 MB; seconds once pip's cache holds them.
#
#   bash bench/_gpu_prep.sh                     # for Python 3.12 (the lent H200) and this python
#   PY_VERSIONS="3.12 3.13" bash bench/_gpu_prep.sh
#
# Versions are constraints.txt's pins. No torch (the machine's own stays) and nothing the runs do
# not import (datasets, wandb, tensorboard). deepspeed and antlr4 come as source only: built here
# into pure-Python wheels (py3-none-any; no ops are compiled, DeepSpeed JIT-builds an op if one is
# ever asked for, and gradcycle asks for none). The binary ones are downloaded per Python version.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${GPU_WHEELS:-$ROOT/bench/gpu_wheels}"
PY="${PYTHON:-python3}"
HERE="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PY_VERSIONS="${PY_VERSIONS:-3.12 $HERE}"
pin() { grep -i "^$1==" "$ROOT/constraints.txt" || { echo "_gpu_prep: $1 is not in constraints.txt" >&2; exit 1; }; }

# Source-only on the index: built into wheels (pure Python).
BUILT=(deepspeed antlr4-python3-runtime)
# What a machine with only torch (+ transformers) lacks: deepspeed's and hydra's requirements,
# accelerate (HfDeepSpeedConfig for zero3), and a few the lent image may already have.
FETCHED=(hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
         hydra-core omegaconf PyYAML accelerate einops msgpack ninja psutil py-cpuinfo)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
built=() specs=()
for p in "${BUILT[@]}"; do built+=("$(pin "$p")"); done
for p in "${FETCHED[@]}"; do specs+=("$(pin "$p")"); done
"$PY" -m pip wheel -q --no-deps -w "$DIR" "${built[@]}"
for v in $PY_VERSIONS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR" --python-version "$v" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    "${specs[@]}"
done
for w in "$DIR"/*.whl; do
  case "$(basename "$w")" in torch-*|Torch-*) echo "_gpu_prep: a torch wheel in $DIR" >&2; exit 1 ;; esac
done
n=$(find "$DIR" -name '*.whl' | wc -l)
echo "_gpu_prep: $n wheels, $(du -sh "$DIR" | cut -f1) in $DIR (Python $PY_VERSIONS)"

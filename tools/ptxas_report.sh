#!/usr/bin/env bash
# Prints, for every kernel in kernels/*.cu, the registers, shared memory and spills ptxas reports for
# sm_90 (H100). A kernel that spills says why in a comment in its .cu file.
# Needs nvcc and ptxas: $NVCC, or nvcc on PATH (ptxas is looked up beside nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ]; then
  echo "ptxas report: no nvcc (set NVCC)" >&2
  exit 1
fi
ptxas="$(dirname "$nvcc")/ptxas"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for source in kernels/*.cu; do
  stem="$(basename "$source" .cu)"
  "$nvcc" --ptx -O3 -arch=sm_90 -std=c++17 --prec-div=true --prec-sqrt=true --ftz=false \
    -I kernels -o "$work/$stem.ptx" "$source"
  # ptxas -v prints "Compiling entry function 'name'" then "Used N registers, ..." per kernel.
  "$ptxas" -arch=sm_90 -v "$work/$stem.ptx" -o "$work/$stem.cubin" 2>&1 |
    awk -v file="$stem.cu" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes spill stores/ { spills = $0; sub(/^ptxas info *: */, "", spills) }
      /Used [0-9]+ registers/ { regs = $0; sub(/^ptxas info *: */, "", regs); printf "%-16s %-34s %s | %s\n", file, name, regs, spills }'
done

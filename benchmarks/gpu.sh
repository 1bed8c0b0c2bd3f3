#!/usr/bin/env bash
# The GPU section of BENCHMARKS.md, on a machine with one CUDA GPU, in under ten minutes:
#   1. the FlashAttention-2 equality tests (tests/test_flash_path.py);
#   2. the paper's efficiency comparison at LLaVA-1.5-7B's decoder shape (random weights, fp16,
#      576 vision tokens -> 128 on average): prefill latency, decode tok/s and peak memory for the
#      untouched model, V²Drop, FastV as its original code runs it (full attention matrix) and FastV
#      with tokencomp's q/k probes;
#   3. python benchmarks/tables.py benchmarks/results/gpu --gpu --update BENCHMARKS.md
# With --video instead: the video methods side by side at LLaVA-OneVision-7B's decoder shape
# (Qwen2-7B: 28 layers, hidden 3584, 28 heads, 4 KV heads; 6272 vision tokens as 32 frames of 196),
# one bench per shipped recipe (about a minute each), then the gpu-video table.
# Usage: benchmarks/gpu.sh [--dry-run] [--video]  (--dry-run: print the commands, run nothing, need no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
VIDEO=0
for arg in "$@"; do case $arg in
  --dry-run) DRY=1 ;;
  --video) VIDEO=1 ;;
  *) echo "usage: $0 [--dry-run] [--video]" >&2; exit 2 ;;
esac; done
PY=${PY:-.venv/bin/python}
TC=${TC:-.venv/bin/tokencomp}
OUT=${OUT:-benchmarks/results/gpu}
SHAPE="llava-1.5-7b:layers=32,hidden=4096,heads=32,kv_heads=32,intermediate=11008"   # LLaVA-1.5-7B's decoder
# FastV at the same 128-token average as V²Drop's setting: K = 2, (2*576 + 30*98) / 32 = 127.9.
FASTV128="{name: fastv/llava-1.5-7b-k2-128, scorer: fastv, selector: topk, schedule: {stages: [{layer: 2, keep: 0.1704}]}}"

step() {  # step SECONDS CMD...: echo, then run under a time limit (or only echo with --dry-run)
  local limit=$1; shift
  printf '+'; printf ' %q' "$@"; echo
  [[ $DRY == 1 ]] && return 0
  timeout "$limit" "$@"
}

if [[ $DRY == 0 ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "$0: no CUDA GPU visible (use --dry-run to see the commands)" >&2
    exit 3
  fi
  mkdir -p "$OUT"
fi
ATTN=sdpa
if [[ $DRY == 1 ]] || "$PY" -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; fi
if [[ $VIDEO == 1 ]]; then
  OUT=${OUT_VIDEO:-benchmarks/results/gpu-video}
  [[ $DRY == 0 ]] && mkdir -p "$OUT"
  OV="llava-onevision-7b:layers=28,hidden=3584,heads=28,kv_heads=4,intermediate=18944"   # its Qwen2-7B decoder
  for r in $(< benchmarks/video-recipes.txt); do  # the shipped video recipes compared (one list for CPU and GPU)
    step 120 "$TC" bench "$r" --synthetic "$OV" --device cuda --dtype float16 --attn "$ATTN" --vision-tokens 6272 \
      --frames 32 --text-tokens 40 --repeat 5 --new-tokens 32 --quiet --json "$OUT/${r//\//-}.json"
  done
  step 30 "$PY" benchmarks/tables.py "$OUT" --tag gpu-video --update BENCHMARKS.md
  exit 0
fi
COMMON=(--synthetic "$SHAPE" --device cuda --dtype float16 --attn "$ATTN" --vision-tokens 576 --text-tokens 60
        --repeat 10 --new-tokens 32 --quiet)

step 150 "$PY" -m pytest -q tests/test_flash_path.py
step 180 "$TC" bench v2drop/llava-1.5-7b-128 "${COMMON[@]}" --no-peer --json "$OUT/v2drop-128.json"
step 180 "$TC" bench "$FASTV128" "${COMMON[@]}" --json "$OUT/fastv-128.json"
step 30 "$PY" benchmarks/tables.py "$OUT" --gpu --update BENCHMARKS.md

#!/usr/bin/env bash
# The CPU benchmark scenarios of BENCHMARKS.md. Each writes benchmarks/cpu/<name>.json and .log;
# `python benchmarks/tables.py benchmarks/cpu` turns the JSON into the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/cpu; mkdir -p "$out"
TC=${TC:-.venv/bin/tokencomp}
LLAVA="llava-1.5-7b:hidden=512,heads=8,kv_heads=8,intermediate=1376"       # 32 layers, as LLaVA-1.5-7B
OV="llava-onevision-7b:hidden=512,heads=8,kv_heads=2,intermediate=2368"    # 28 layers, GQA 4:1, as OneVision-7B
run() { name=$1; shift; echo "== $name: $*"; "$TC" bench "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1; tail -n 16 "$out/$name.log"; }
run v2drop-192-576   v2drop/llava-1.5-7b-192   --synthetic "$LLAVA" --vision-tokens 576  --repeat 5 --new-tokens 8
run v2drop-128-576   v2drop/llava-1.5-7b-128   --synthetic "$LLAVA" --vision-tokens 576  --repeat 5 --new-tokens 8
run v2drop-64-576    v2drop/llava-1.5-7b-64    --synthetic "$LLAVA" --vision-tokens 576  --repeat 5 --new-tokens 8
run fastv-k2-576     fastv/llava-1.5-7b-k2-r50 --synthetic "$LLAVA" --vision-tokens 576  --repeat 5 --new-tokens 8
run v2drop-128-2880  v2drop/llava-1.5-7b-128   --synthetic "$LLAVA" --vision-tokens 2880 --repeat 3 --new-tokens 4
run fastv-k2-2880    fastv/llava-1.5-7b-k2-r50 --synthetic "$LLAVA" --vision-tokens 2880 --repeat 3 --new-tokens 4
run v2drop-ov25-6272 v2drop/llava-onevision-7b-video-25 --synthetic "$OV" --vision-tokens 6272 --repeat 2 --new-tokens 2
run fastv-k2-6272    fastv/llava-1.5-7b-k2-r50 --synthetic "$OV" --vision-tokens 6272 --repeat 2 --new-tokens 2

#!/usr/bin/env bash
# The CPU benchmark scenarios of BENCHMARKS.md (a shared 2-core machine: small shapes, 15 rounds: enough
# for an interval that a rerun's median falls in with probability 99.8% when rounds are exchangeable, widened by
# the run's drift: see tokencomp.bench.rerun_bounds).
# Each writes $RES/<table>/<name>.json and .log (RES=benchmarks/results by default; the reproduction
# check reruns the same commands with RES=benchmarks/results/rerun, then
#   python benchmarks/tables.py benchmarks/results/cpu --reproduce benchmarks/results/rerun/cpu --tag reproduce-cpu --update BENCHMARKS.md
# and the same for scaling and video); then
#   python benchmarks/tables.py benchmarks/results/cpu --update BENCHMARKS.md
#   python benchmarks/tables.py benchmarks/results/scaling --scaling --update BENCHMARKS.md
#   python benchmarks/tables.py benchmarks/results/video --update BENCHMARKS.md
#   python benchmarks/tables.py benchmarks/results/video-batch --scaling --update BENCHMARKS.md
# Usage: benchmarks/run-cpu.sh [cpu|scaling|input|video|video-batch]...   (default: cpu, input, scaling)
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${TC:-.venv/bin/tokencomp}
RES=${RES:-benchmarks/results}
ROUNDS=${ROUNDS:-15}
# LLaVA-1.5-7B's head layout (32 heads, MHA) and MLP ratio, 8 of its 32 layers, width 512: the
# attention matrix of the peer variant has the real head count; a 2-core CPU finishes in minutes.
L8="llava-1.5-7b:layers=8,hidden=512,heads=32,kv_heads=32,intermediate=1376"
# Smaller still, for the long prompts of the scaling and input-stage runs: 4 layers, width 256/512.
L4="llava-1.5-7b:layers=4,hidden=256,heads=8,kv_heads=8,intermediate=688"
L4W="llava-1.5-7b:layers=4,hidden=512,heads=8,kv_heads=8,intermediate=1376"
PDROP8="{name: pdrop/8-layer, scorer: pdrop, schedule: {stages: [{layer: 2, keep: 0.5}, {layer: 4, keep: 0.5}, {layer: 6, keep: 0.5}]}}"
FASTV4="{name: fastv/4-layer-k1-r25, scorer: fastv, selector: topk, schedule: {stages: [{layer: 1, keep: 0.25}]}}"
INPUT="{name: input-uniform-0.3334, schedule: {stages: [{phase: input, keep: 0.3334, scorer: uniform}]}}"
run() { dir=$1; name=$2; shift 2; mkdir -p "$RES/$dir"; echo "== $dir/$name: $*"
        "$TC" bench "$@" --json "$RES/$dir/$name.json" --quiet > "$RES/$dir/$name.log" 2>&1
        tail -n 12 "$RES/$dir/$name.log"; }
groups=("${@:-cpu input scaling}"); groups=(${groups[*]})
for g in "${groups[@]}"; do case $g in
cpu)
  run cpu fastv-k2-576   fastv/llava-1.5-7b-k2-r50 --synthetic "$L8" --vision-tokens 576 --repeat $ROUNDS --new-tokens 16
  run cpu pdrop-576      "$PDROP8"                 --synthetic "$L8" --vision-tokens 576 --repeat $ROUNDS --new-tokens 16 ;;
input)  # issue 15's example (an input stage keeping a third), on the 4-layer width-512 shape
  run cpu input-2880 "$INPUT" --synthetic "$L4W" --vision-tokens 2880 --repeat $ROUNDS --new-tokens 16 ;;
scaling)
  for n in 576 1152 2880 5760; do
    run scaling fastv-k1-$n-b1 "$FASTV4" --synthetic "$L4" --vision-tokens $n --repeat $ROUNDS --new-tokens 16 --no-peer
  done
  for b in 2 4; do
    run scaling fastv-k1-576-b$b "$FASTV4" --synthetic "$L4" --vision-tokens 576 --batch $b --repeat $ROUNDS --new-tokens 16 --no-peer
  done ;;
video)  # the video methods side by side: 6272 tokens as 32 frames, a narrow 28-layer OneVision shape
  # (no end-to-end generate timing: prefill and decode are timed separately, and it would double the untouched round)
  OV="llava-onevision-7b:layers=28,hidden=128,heads=2,kv_heads=1,intermediate=256"
  for r in $(< benchmarks/video-recipes.txt); do  # the shipped video recipes compared (one list for CPU and GPU)
    run video "${r//\//-}" "$r" --synthetic "$OV" --vision-tokens 6272 --frames 32 --text-tokens 40 --repeat $ROUNDS --new-tokens 32 --no-generate
  done ;;
video-batch)  # decode as the batch grows: a decode step's fixed cost (the model's per-layer work, the same at
  # any cache length) is paid once per step for the whole batch, the cache reads once per sample
  OV="llava-onevision-7b:layers=28,hidden=128,heads=2,kv_heads=1,intermediate=256"
  for b in 1 2 4; do
    run video-batch v2drop-25-b$b v2drop/llava-onevision-7b-video-25 --synthetic "$OV" --vision-tokens 6272 --frames 32 --text-tokens 40 --batch $b --repeat $ROUNDS --new-tokens 32 --no-generate
  done ;;
*) echo "unknown group $g (cpu, input, scaling, video, video-batch)" >&2; exit 2 ;;
esac; done

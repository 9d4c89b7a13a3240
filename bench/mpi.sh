#!/usr/bin/env bash
# Data-parallel training on this machine: the default recipe on Fashion-MNIST for STEPS
# optimizer steps (default 100, batch 128) as
#   1 process with every core (the default),
#   1 process with one thread (RAYON_NUM_THREADS=1), and
#   `mpirun -np 2` (one thread each, as vit sets it),
# alternating for ROUNDS rounds (default 3); prints each run's training images/s and, for
# the MPI runs, the share of time in collectives (metrics.jsonl's sync_share); checks the
# one-process and two-process runs' weights are identical; then times the all-reduce alone
# (examples/allreduce.rs) for 2 processes. Needs Open MPI (openmpi-bin libopenmpi-dev
# libclang-dev). Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-100}
ROUNDS=${ROUNDS:-3}
MPIRUN=(mpirun --allow-run-as-root --oversubscribe)
cargo build --release --features mpi --bin vit --example allreduce -q
VIT=target/release/vit
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

field() { # field RUN KEY: the last epoch's KEY from RUN/metrics.jsonl
  python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1]).get(sys.argv[2], ''))" "$1/metrics.jsonl" "$2"
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;" \
  "AVX-512: $(grep -q avx512f /proc/cpuinfo && echo yes || echo no); $(date -u +%F)"
echo
echo "| round | setup | training images/s | time in collectives |"
echo "|---|---|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  for setup in one-2t one-1t mpi-2; do
    run="$OUT/$setup-$r"
    args=(train --max-steps "$STEPS" --out "$run" --quiet)
    case $setup in
      one-2t) "$VIT" "${args[@]}" > /dev/null ;;
      one-1t) RAYON_NUM_THREADS=1 "$VIT" "${args[@]}" > /dev/null ;;
      mpi-2) "${MPIRUN[@]}" -np 2 "$VIT" "${args[@]}" > /dev/null ;;
    esac
    share=$(field "$run" sync_share)
    [ -n "$share" ] && share=$(python3 -c "print(f'{100*$share:.1f}%')")
    echo "| $r | $setup | $(field "$run" images_per_second | xargs printf '%.0f') | ${share:-} |"
  done
done
echo
echo "one process vs two processes, round 1:"
python3 scripts/compare_checkpoints.py "$OUT/one-2t-1/checkpoint-last.safetensors" \
  "$OUT/mpi-2-1/checkpoint-last.safetensors" | grep -v "train_state.position\|metadata vit.recipe" || true
echo
"${MPIRUN[@]}" -np 2 target/release/examples/allreduce

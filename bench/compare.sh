#!/usr/bin/env bash
# Side by side: `vit bench` against PyTorch + timm eager (and ONNX Runtime for inference), both
# workloads, alternating the runtimes for ROUNDS rounds, THREADS (2) threads each. Prints a markdown
# table (medians over rounds) on stdout; progress goes to stderr.
#
#   bash bench/compare.sh                 # from anywhere; works in the repository root
#   ROUNDS=5 ITERS=20 bash bench/compare.sh
#   ISA=avx2 bash bench/compare.sh        # the AVX2 tier on an AVX-512 machine (below)
#   DTYPE=bf16 WORKLOADS=infer-b16 bash bench/compare.sh   # bf16 inference: ours against autocast
#   WORKLOADS="infer-b16 infer-b16-int8" bash bench/compare.sh  # int8: ours against PyTorch's
#                                         # dynamic quantization and ORT's quantize_dynamic
#
# ISA=avx2 holds the runtimes to AVX2 + FMA: ours is built without the `avx512` feature (the
# `gemm` crate's AVX-512 kernels left out; into target/isa-avx2) and run with VIT_SIMD=avx2;
# PyTorch runs with ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2
# and FBGEMM_ENABLE_INSTRUCTIONS=AVX2 (its int8 kernels). ONNX Runtime has no such switch: its column stays uncapped, and
# the table says so. The header records the kernels each runtime reported.
#
# Environment: ROUNDS (3), ITERS (10), WARMUP (2), THREADS (2), VENV (.venv; created and filled
# with torch (CPU), timm, onnxruntime and onnx where they are not importable), TORCH_INDEX (the
# CPU wheel index tried first for torch), WORKLOADS ("train-fm infer-b16 infer-b16-int8
# train-resnet infer-swin-t").
set -euo pipefail

cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
THREADS=${THREADS:-2}
VENV=${VENV:-.venv}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
WORKLOADS=${WORKLOADS:-train-fm infer-b16 infer-b16-int8 train-resnet infer-swin-t}
DTYPE=${DTYPE:-f32}
PY="$VENV/bin/python"
ISA=${ISA:-native}
case "$ISA" in
    native)
        BUILD=(cargo build --release --quiet)
        VIT=./target/release/vit
        OURS_ENV=()
        TORCH_ENV=()
        ;;
    avx2)
        BUILD=(cargo build --release --quiet --no-default-features --target-dir target/isa-avx2)
        VIT=./target/isa-avx2/release/vit
        OURS_ENV=(VIT_SIMD=avx2)
        TORCH_ENV=(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
            FBGEMM_ENABLE_INSTRUCTIONS=AVX2)
        ;;
    *)
        echo "compare.sh: ISA=$ISA: use native or avx2" >&2
        exit 2
        ;;
esac

say() { echo "compare.sh: $*" >&2; }

# (a) Python side.
if [ ! -x "$PY" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
if ! "$PY" -c 'import torch, timm' 2>/dev/null; then
    say "installing torch (CPU) and timm into $VENV"
    "$PY" -m pip install --quiet --index-url "$TORCH_INDEX" torch ||
        "$PY" -m pip install --quiet torch
    "$PY" -m pip install --quiet timm
fi
if ! "$PY" -c 'import onnxruntime, onnx' 2>/dev/null; then
    say "installing onnxruntime and onnx into $VENV"
    "$PY" -m pip install --quiet onnxruntime onnx ||
        say "warning: could not install onnxruntime/onnx; the ORT column will be empty"
fi

# (b) Our side.
say "${BUILD[*]}"
"${BUILD[@]}"

# (c) Alternate the runtimes, round by round.
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for w in $WORKLOADS; do
    for r in $(seq 1 "$ROUNDS"); do
        say "$w round $r/$ROUNDS: vit"
        # RAYON_NUM_THREADS sizes the pool our kernels and gemm run on. CANDLE_NUM_THREADS is
        # left alone: unset, `vit` gives candle's separate elementwise pool no spinning
        # workers (src/runtime.rs); set to $THREADS it would compete with ours for the cores.
        env ${OURS_ENV[@]+"${OURS_ENV[@]}"} RAYON_NUM_THREADS=$THREADS \
            "$VIT" bench --workload "$w" --iters "$ITERS" --warmup "$WARMUP" --profile \
            --dtype "$DTYPE" --format json >"$OUT/ours-$w-$r.json"
        if [ "${w#infer-}" != "$w" ]; then
            say "$w round $r/$ROUNDS: pytorch, then onnxruntime"
        else
            say "$w round $r/$ROUNDS: pytorch"
        fi
        env ${TORCH_ENV[@]+"${TORCH_ENV[@]}"} OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS \
            "$PY" bench/torch_bench.py --workload "$w" --iters "$ITERS" --warmup "$WARMUP" \
            --threads "$THREADS" --dtype "$DTYPE" >"$OUT/torch-$w-$r.json"
    done
done

# (d) Which kernels PyTorch picks under these settings: ATen's CPU capability and oneDNN's ISA
# (MKL, which runs its matrix products, does not report its code path).
TORCH_KERNELS=$(env ${TORCH_ENV[@]+"${TORCH_ENV[@]}"} ONEDNN_VERBOSE=1 "$PY" -c '
import torch
x = torch.nn.functional.conv2d(torch.randn(2, 64, 28, 28), torch.randn(64, 64, 3, 3), padding=1)
print("aten", torch.backends.cpu.get_cpu_capability())
' 2>/dev/null | sed -n -e 's/^aten \(.*\)/ATen \1/p' -e 's/^onednn_verbose,.*info,cpu,isa:\(.*\)/oneDNN \1/p' | tr '\n' ';' || true)

# (e) The table.
CPU=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|fma|avx512[a-z_0-9]*|amx[a-z_0-9]*)$' | tr '\n' ' ' || true)
"$PY" - "$OUT" "$ROUNDS" "$ITERS" "$WARMUP" "$THREADS" "${CPU:-unknown}" "$(nproc)" "$ISA" "${FLAGS:-}" "${TORCH_KERNELS:-}" $WORKLOADS <<'EOF'
import datetime, json, statistics, sys

out, rounds, iters, warmup, threads, cpu, cores, isa, flags, torch_kernels, *workloads = sys.argv[1:]
load = lambda p: json.load(open(f"{out}/{p}"))
med = lambda xs: statistics.median(xs) if xs else None
mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
num = lambda x: "n/a" if x is None else f"{x:.1f}"

rows, phase_rows, notes, provider, torch_provider, ort_provider = [], [], [], "", "", ""
int8_kernel, int8_torch, int8_ort = None, "", ""
for w in workloads:
    ours = [load(f"ours-{w}-{r}.json") for r in range(1, int(rounds) + 1)]
    pt = [load(f"torch-{w}-{r}.json") for r in range(1, int(rounds) + 1)]
    ort = [p["onnxruntime"] for p in pt if p.get("onnxruntime")]
    notes += sorted({p["onnxruntime_skipped"] for p in pt if p.get("onnxruntime_skipped")})
    kernels = ours[0].get("kernels", "?")
    if w.endswith("-int8"):
        # The int8 runs' providers name their quantization; the f32 ones go in the header.
        int8_kernel = ours[0].get("int8_kernel", "?")
        int8_torch = pt[0]["provider"]
        int8_ort = ort[0]["provider"] if ort else int8_ort
    else:
        provider, torch_provider = ours[0]["provider"], pt[0]["provider"]
        ort_provider = ort[0]["provider"] if ort else ort_provider
    o = med([x["images_per_second"]["median"] for x in ours])
    t = med([x["images_per_second"]["median"] for x in pt])
    infer = w.startswith("infer-")
    x = med([x["images_per_second"]["median"] for x in ort]) if infer else None
    rss = lambda rs: med([r["peak_rss_bytes"] for r in rs if r.get("peak_rss_bytes") is not None])
    rows.append(
        f"| {w} | {num(o)} | {num(t)} | {num(x) if infer else '—'} | "
        f"{o / t:.2f} | {f'{o / x:.2f}' if x else '—'} | {mib(rss(ours))} | {mib(rss(pt))} |"
    )
    phase = lambda rs, i: med([r["phases"][i]["median_ms"] for r in rs if r.get("phases")])
    for i, p in enumerate(ours[0].get("phases") or []):
        phase_rows.append(f"| {w} | {p['name']} | {num(phase(ours, i))} | {num(phase(pt, i))} |")

now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(f"{now}; CPU: {cpu}; {cores} cores; {threads} threads per runtime")
print(f"CPU flags: {flags.strip() or 'unknown'}")
if isa == "avx2":
    print("ISA cap: avx2 (ours: built without `avx512`, VIT_SIMD=avx2; PyTorch: ATEN_CPU_CAPABILITY=avx2, "
          "ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2, FBGEMM_ENABLE_INSTRUCTIONS=AVX2; ONNX "
          "Runtime cannot be capped: its column runs the CPU's widest kernels)")
print(f"ours: vit bench, kernels {kernels}, matmul {provider}")
print(f"PyTorch: {torch_provider}; kernels seen: {torch_kernels.strip(';').replace(';', ', ') or 'unknown'}")
if ort_provider:
    print(f"ORT: {ort_provider}{' (not capped)' if isa == 'avx2' else ''}")
if int8_kernel:
    print(f"int8: ours {int8_kernel} kernel (vit quantize's scheme); PyTorch: {int8_torch.split(', ')[-1]}; "
          f"ORT: {int8_ort.split('torch ')[-1].rstrip(')') or 'skipped'}")
print(f"median over {rounds} rounds of each run's median of {iters} iterations (after {warmup} warm-up)")
print()
print("| workload | ours img/s | PyTorch img/s | ORT img/s | ours/PyTorch | ours/ORT | peak RSS ours | peak RSS PyTorch |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
if phase_rows:
    print()
    print("| workload | phase | ours ms | PyTorch ms |")
    print("|---|---|---|---|")
    print("\n".join(phase_rows))
for n in notes:
    print(f"\nONNX Runtime skipped: {n}")
EOF

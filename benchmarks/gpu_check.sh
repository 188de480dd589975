#!/usr/bin/env bash
# The GPU check: one script, run from the repository root on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT (default benchmarks/results)
#   SMALL=1 bash benchmarks/gpu_check.sh    # a dry run of every step, tiny sizes (CPU is fine)
#   STEPS="bench" bash benchmarks/gpu_check.sh   # some of the steps: tests, bench, diag, jpeg
#
# 1. installs the wheels in .whl/ (zarr, numcodecs, faiss-cpu, ... that the machine lacks),
# 2. runs the tests marked `gpu`,
# 3. benchmarks vit_small_patch16_224 and resnet50 (random init) at batch 256, bf16, compiled
#    and eager, from synthetic tensors and from the pixel cache; each row lands in JSON as soon
#    as it is measured,
# 4. takes the host side of ViT-S compiled apart (benchmarks/diag_extract_host.py),
# 5. with the time left: a JPEG folder decoded by CPU workers and on the GPU.
# Every step has its own time limit, cut to what is left of BUDGET seconds (default 540), so
# the whole check ends within 9 minutes.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${BUDGET:-540}
step() { echo "== [$(($(date +%s) - T0)) s] $*"; }
limit() {  # limit MAX: MAX seconds, or what is left of the budget if less
    local left=$((T0 + BUDGET - $(date +%s)))
    left=$((left > 1 ? left : 1))  # timeout 0 would mean no limit
    echo $(($1 < left ? $1 : left))
}

has_all() {  # what probekit needs beyond torch, at the versions it needs
    $PY - <<'PY' 2>/dev/null
import faiss, numcodecs, zarr, timm
assert int(zarr.__version__.split(".")[0]) >= 3
assert tuple(int(v) for v in timm.__version__.split(".")[:3]) >= (1, 0, 15)
PY
}
if ! has_all && compgen -G ".whl/*.whl" > /dev/null; then
    step "installing carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/probekit-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/probekit-site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1

step "environment"
{
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    $PY - <<'PY'
import torch, timm, zarr, numpy, faiss
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("timm", timm.__version__, "zarr", zarr.__version__, "numpy", numpy.__version__,
      "faiss", faiss.__version__)
import os; print("cpus", os.cpu_count())
PY
} 2>&1 | tee "$OUT/gpu_env.txt"

if $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    DEVICE=cuda; DECODES="cpu gpu"
else
    DEVICE=cpu; DECODES="cpu"  # a dry run
fi
if [ -n "${SMALL:-}" ]; then
    MODELS=test_vit,test_resnet; IMAGES=512; BATCH=64; JPEGS=128; BENCH_LIMIT=300
else
    MODELS=vit_small_patch16_224,resnet50; IMAGES=32768; BATCH=256; JPEGS=2048; BENCH_LIMIT=200
fi

STEPS=${STEPS:-tests bench attentive diag jpeg decode}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# the whole log goes to the file (failures in full, no captured debug logging), its end here
has_step tests && step "tests marked gpu" && timeout "$(limit 180)" $PY -m pytest -q -o addopts="" \
    -W default -m gpu -p no:cacheprovider -p no:logging -rfs --tb=short tests/test_gpu.py 2>&1 \
    | tee "$OUT/gpu_tests.txt" | tail -n 40

has_step bench && step "bench: $MODELS, batch $BATCH, bf16, compiled, eager; synthetic, pixels" &&
timeout "$(limit "$BENCH_LIMIT")" $PY benchmarks/bench_extract.py --device "$DEVICE" \
    --precision bf16 --models "$MODELS" --batch-size "$BATCH" --images "$IMAGES" --compile both \
    --source pixels,synthetic --repeats 1 --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.txt"

has_step attentive && step "attentive: one epoch from the token cache vs the backbone loop" &&
timeout "$(limit 120)" $PY benchmarks/bench_attentive.py --device "$DEVICE" --images 2048 \
    --batch-size 256 --out "$OUT" 2>&1 | tee "$OUT/gpu_attentive.txt"

has_step diag && step "diag: the host side of ${MODELS%%,*} compiled, parts taken out" &&
timeout "$(limit 170)" $PY benchmarks/diag_extract_host.py --model "${MODELS%%,*}" \
    --images "$IMAGES" --batch-size "$BATCH" --out "$OUT" 2>&1 | tee "$OUT/gpu_diag.txt"

has_step jpeg && for dec in $DECODES; do
    [ "$(limit 50)" -ge 30 ] || break
    step "bench: $JPEGS JPEGs decoded by $dec (eager, ${MODELS%%,*})"
    timeout "$(limit 50)" $PY benchmarks/bench_extract.py --device "$DEVICE" --precision bf16 \
        --models "${MODELS%%,*}" --batch-size "$BATCH" --images "$JPEGS" --compile off \
        --source jpeg --decode "$dec" --repeats 1 --out "$OUT/jpeg_$dec" 2>&1 \
        | tee -a "$OUT/gpu_bench.txt"
done
has_step decode && [ "$(limit 60)" -ge 40 ] && step "decode: JPEG decode workers vs a bare loop, PIL draft" &&
timeout "$(limit 60)" $PY benchmarks/bench_decode.py --small "$((JPEGS / 2))" --large 24 --out "$OUT" \
    2>&1 | tee "$OUT/gpu_decode.txt"
step "done"

#!/usr/bin/env bash
# The GPU check: one script, run from the repository root on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT (default benchmarks/results)
#   SMALL=1 bash benchmarks/gpu_check.sh    # a dry run of every step, tiny sizes (CPU is fine)
#   STEPS="bench" bash benchmarks/gpu_check.sh   # some of the steps (see STEPS below)
#
# On a lent GPU machine (`device` tool), after `bash benchmarks/gpu_wheels.sh` here: one call,
# carry [".whl"], timeout_s 600, command
#   BUNDLE=$OUT/gpu_check.tgz OUT=/tmp/gc bash benchmarks/gpu_check.sh
# (a call brings back 8 files at most: BUNDLE, when set, is every file of OUT in one archive,
# written however the script ends)
#
# 1. installs the wheels in .whl/ (zarr, numcodecs, faiss-cpu, ... that the machine lacks),
# 2. bench: each model (random init) at batch 256, bf16, compiled: the bare forward, `extract`
#    from the pixel cache (and ViT-S from memory), their ratio, the extractor's device work
#    alone and the loop's waits. ViT-S/16, ViT-B/16, ViT-L/16, a DINOv2-shaped ViT-S/14 with
#    registers at 224, ResNet-50; one JSON file per model, written as soon as a row is measured
#    (ViT-S first, then the tests, then the other models),
# 3. tests: the tests marked `gpu` (failures in full in gpu_tests.txt),
# 4. jpeg: a first pass over a JPEG folder (500x375): every core decoding, nvJPEG on the
#    device, the default workers; decode: bench_decode.py (decode workers vs a bare loop, the
#    encoded loader, nvJPEG alone and its feature cosine, PIL draft's),
# 5. diag: the host side of ViT-S compiled taken apart (benchmarks/diag_extract_host.py).
# Every step has its own time limit, cut to what is left of BUDGET seconds (default 570), so
# the whole check ends within one 10-minute call.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -n "${BUNDLE:-}" ]; then
    trap 'tar czf "$BUNDLE" -C "$OUT" . && echo "bundled $OUT in $BUNDLE"' EXIT
    trap 'exit 143' TERM INT
fi
PY=${PYTHON:-python3}
T0=$(date +%s)
BUDGET=${BUDGET:-570}
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
    DEVICE=cuda
else
    DEVICE=cpu  # a dry run
fi
# the bench's models: name, images, sources, extra bench_extract.py arguments
if [ -n "${SMALL:-}" ]; then
    BATCH=64; JPEGS=128; COMPILE=both
    MODELS=(
        "test_vit 512 synthetic,pixels"
        "test_resnet 512 pixels"
        "vit_small_patch14_reg4_dinov2 256 pixels --img-size 56"
    )
else
    BATCH=256; JPEGS=2048; COMPILE=on
    MODELS=(
        "vit_small_patch16_224 32768 pixels,synthetic"
        "vit_base_patch16_224 16384 pixels"
        "vit_large_patch16_224 8192 pixels"
        "vit_small_patch14_reg4_dinov2 16384 pixels --img-size 224"
        "resnet50 16384 pixels"
    )
fi
read -r FIRST FIRST_IMAGES _ <<< "${MODELS[0]}"

STEPS=${STEPS:-bench jpeg tests decode diag}  # and attentive (issue 21's, on request)
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

bench_model() {  # one line of MODELS: bench_extract.py's rows for that model
    local name images sources extra
    read -r name images sources extra <<< "$1"
    [ "$(limit 80)" -ge 40 ] || { step "bench: no time left for $name"; return; }
    step "bench: $name, $images images, batch $BATCH, bf16, compile $COMPILE; $sources"
    # shellcheck disable=SC2086  # extra: more arguments, split on purpose
    timeout "$(limit 110)" $PY benchmarks/bench_extract.py --device "$DEVICE" \
        --precision bf16 --models "$name" --batch-size "$BATCH" --images "$images" \
        --compile "$COMPILE" --source "$sources" --repeats 1 --tag "$name" $extra \
        --out "$OUT" 2>&1 | tee -a "$OUT/gpu_bench.txt"
}

# ViT-S first, then the tests (their failures in full), then the other models
has_step bench && bench_model "${MODELS[0]}"

# the whole log goes to the file (failures in full, no captured debug logging), its end here
has_step tests && [ "$(limit 120)" -ge 60 ] && step "tests marked gpu" &&
    timeout "$(limit 150)" $PY -m pytest -q -o addopts="" -W default -m gpu -p no:cacheprovider \
    -p no:logging -rfs --tb=short tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -n 40

if has_step bench; then
    for m in "${MODELS[@]:1}"; do
        bench_model "$m"
    done
fi

# the first pass over JPEGs: the default workers, every core decoding, nvJPEG on the device
if has_step jpeg; then
    CORES=$(nproc)
    for run in "cpu $CORES" $([ "$DEVICE" = cuda ] && echo "gpu default") "cpu default"; do
        read -r dec workers <<< "$run"
        [ "$(limit 50)" -ge 30 ] || break
        args=(); [ "$workers" = default ] || args=(--workers "$workers")
        step "jpeg: $JPEGS JPEGs decoded by $dec, workers $workers (eager $FIRST)"
        timeout "$(limit 50)" $PY benchmarks/bench_extract.py --device "$DEVICE" --precision bf16 \
            --models "$FIRST" --batch-size "$BATCH" --images "$JPEGS" --compile off \
            --source jpeg --decode "$dec" --repeats 1 "${args[@]}" --tag "jpeg-$dec-$workers" \
            --out "$OUT" 2>&1 | tee -a "$OUT/gpu_bench.txt"
    done
fi

has_step decode && [ "$(limit 60)" -ge 40 ] && step "decode: JPEG decode workers vs a bare loop, PIL draft" &&
    timeout "$(limit 60)" $PY benchmarks/bench_decode.py --small "$((JPEGS / 2))" --large 24 \
    --device "$DEVICE" --out "$OUT" 2>&1 | tee "$OUT/gpu_decode.txt"

has_step diag && [ "$(limit 60)" -ge 40 ] && step "diag: the host side of $FIRST compiled, parts taken out" &&
    timeout "$(limit 170)" $PY benchmarks/diag_extract_host.py --model "$FIRST" \
    --images "$FIRST_IMAGES" --batch-size "$BATCH" --out "$OUT" 2>&1 | tee "$OUT/gpu_diag.txt"
has_step attentive && step "attentive: one epoch from the token cache vs the backbone loop" &&
    timeout "$(limit 120)" $PY benchmarks/bench_attentive.py --device "$DEVICE" --images 2048 \
    --batch-size 256 --out "$OUT" 2>&1 | tee "$OUT/gpu_attentive.txt"
step "done"

#!/usr/bin/env bash
# Every GPU number of docs/benchmarks.md in one go, on a CUDA machine with gemlabel installed
# (`make install`, or `pip install -c constraints.txt -e '.[test]'`), from the repository root:
#
#     bash benchmarks/gpu.sh 2>&1 | tee gpu.log
#
# 1. the Labeler, mask, model and decode tests, which run on the GPU when there is one;
# 2. model-only and Labeler-stage rates (ViT-B-16, 448 px, batch 128, random weights), and
#    the model-only forward's top kernels (eager and compiled); SCLIP, ClearCLIP, NACLIP,
#    GEM and PAMR against plain CLIP (448 px, batch 32, fp32 with TF32 off);
# 3. the whole pipeline against a bare Labeler loop (640x480 JPEGs, one actor per GPU),
#    with 1 and 2 concurrent actor calls, then with resize, JPEG decode and masks on the GPU.
# Each step's failure is reported and the next one runs. About 10 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
PYTHON=${PYTHON:-python}
CPUS=$(nproc)
$PYTHON -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), torch.__version__)" || exit 1
failed=()
step() {
    echo "=== $*"
    "$@" || failed+=("$*")
}
step $PYTHON -m pytest -q -x tests/test_label.py tests/test_masks.py tests/test_model.py \
    tests/test_decode.py tests/test_ovss.py tests/test_pamr.py tests/test_sliding.py
step $PYTHON -m benchmarks.labeler_throughput --batch 128 --iters 10 --compile --profile
step $PYTHON -m benchmarks.ovss_cost --batch 32 --rounds 10
E2E=(--size 448 --shards 32 --per-shard 256 --batch-size 128 --source-size 640x480
    --formats jpg --memory-per-shard 0 --num-cpus "$CPUS")
step $PYTHON -m benchmarks.pipeline_overhead "${E2E[@]}" --actor-concurrency 1,2,1,2
step $PYTHON -m benchmarks.pipeline_overhead "${E2E[@]}" --resize-stage actor \
    --mask-stage actor --jpeg-stage actor
if ((${#failed[@]})); then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi

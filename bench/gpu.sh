#!/usr/bin/env bash
# The GPU checks of issue 4 in one lease of a GPU machine (see bench/README.md):
#   1. bench/inference.py on CUDA: the node's inference path against bare MONAI, same model,
#      same volume, same mixed precision; first and second job on a pool;
#   2. bench/gpu_oom.py: a real CUDA out-of-memory and the runner's fallback;
#   3. models/train_lesion_ct.py: reference-model variants trained side by side on the GPU,
#      then models/eval_lesion_ct.py scores them and the shipped bundle on fresh phantoms.
# Run from the repository root: `bash bench/gpu.sh [TRAIN_SECONDS]`. Everything it makes
# goes to $OUT (default /tmp/pacsnode-gpu). Python packages the GPU image lacks can come as
# wheels in .whl/ (Python 3.12, see the device notes); they are installed to /tmp/site.
set -u
OUT=${OUT:-/tmp/pacsnode-gpu}
TRAIN_SECONDS=${1:-240}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD   # node/ for the scripts in models/
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
stage "machine"
nvidia-smi -L
python3 -c "import torch, monai, sys; print(sys.version.split()[0], 'torch', torch.__version__,
    'monai', monai.__version__, torch.cuda.get_device_name(0))" || exit 1

stage "inference bench, 96 x 256^2"
timeout 120 python3 bench/inference.py --device cuda --repeat 5 --results "$OUT/RESULTS-gpu.md"
stage "inference bench, 300 x 512^2"
timeout 180 python3 bench/inference.py --device cuda --slices 300 --size 512 --repeat 3 \
    --results "$OUT/RESULTS-gpu.md"
stage "real CUDA out-of-memory"
timeout 90 python3 bench/gpu_oom.py 2>&1 | tee "$OUT/oom.txt"

stage "training variants, ${TRAIN_SECONDS} s each, side by side"
train() {  # name, then train_lesion_ct.py arguments
    local name=$1; shift
    OMP_NUM_THREADS=3 timeout $((TRAIN_SECONDS + 150)) python3 models/train_lesion_ct.py \
        --seed 0 --volumes 160 --workers 4 --batch 8 --steps-per-epoch 100 --lr 3e-3 \
        --time-limit "$TRAIN_SECONDS" --out "/tmp/bundles/$name" "$@" \
        >"$OUT/train-$name.log" 2>&1
}
train in64 --norm INSTANCE --roi 64 64 64 &
train bn64 --norm BATCH --roi 64 64 64 &
train in128 --norm INSTANCE --roi 64 128 128 &
train bn128 --norm BATCH --roi 64 128 128 &
wait
tail -n 3 "$OUT"/train-*.log
(cd /tmp && tar cf "$OUT/bundles.tar" bundles)

stage "scoring on fresh phantoms"
timeout 150 python3 models/eval_lesion_ct.py models/lesion_ct /tmp/bundles/* --fresh 16 \
    --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.txt"
stage "done"

#!/usr/bin/env bash
# One prepared GPU session, under 8 minutes on one GPU (run it from the repository root):
#   1. sdfa bench on CUDA in float32 and with bf16 autocast (main, depth, conv and the 1000-class
#      heads), JSON and text into OUT;
#   2. an end-to-end training run on the GPU (digits), and, with two or more GPUs, layer-parallel
#      DFA over NCCL under torchrun;
# Usage: bash benchmarks/gpu.sh [OUT]   (default OUT: gpu-bench)
set -euo pipefail
out=${1:-gpu-bench}
mkdir -p "$out"
py=${PYTHON:-python}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/device.txt" || true

bench="$py -m sdfa bench --device cuda --rounds 9 --warmup 5 --round-time 0.2"
rules="autograd bp fa usf frsf dfa dfa:k=1"
$bench --workloads main depth conv heads --rules $rules --json "$out/float32.json" \
    | tee "$out/float32.txt"
$bench --workloads main conv heads --rules $rules --autocast bf16 --json "$out/bf16.json" \
    | tee "$out/bf16.txt"

"$py" -m sdfa train --device cuda --epochs 3 --rule dfa:k=1 --quiet --out "$out/train-digits" \
    | tee "$out/train.txt"
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    "$py" -m torch.distributed.run --nproc-per-node 2 -m sdfa train --parallel layer \
        --rule dfa:k=1 --device cuda --epochs 3 --quiet --out "$out/layer-parallel" \
        | tee "$out/layer-parallel.txt"
fi
echo "written to $out"

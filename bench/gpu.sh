#!/usr/bin/env bash
# One command for a GPU machine: folder -> caption sidecars for CLIP-prefix (ViT-L-14 + GPT-2) and
# FuseCap (BLIP-base) at fp16, batch 64 and 256, through the batch engine, with JPEGs decoded by the
# CPU workers and by the GPU (--gpu-decode) side by side, and CLIP-prefix's decoding steps as usual and
# replayed as CUDA graphs (--cuda-graphs). Prints images/s, the fraction of time the
# GPU waited for decoded images, and each image encoder's GFLOP/s against a matmul of its shapes;
# appends the rows to bench/results/bench_sidecars.csv.
#
#   bench/gpu.sh                      # 512 generated JPEGs, decoding workers: CPUs - 1 (at most 8)
#   bench/gpu.sh --images 2048 --batch-size 64 256 auto
#   PYTHON=/path/to/python bench/gpu.sh
#
# Extra arguments go to bench/bench_sidecars.py (see its --help). The models (random weights, about
# 3 GB) and images are built once into the --cache folder (default: $TMPDIR/captioners-bench-batch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: $PYTHON cannot import torch or torch sees no CUDA GPU; run it on a GPU machine (PYTHON=... to" \
         "pick the interpreter), or bench/bench_sidecars.py --device cpu for CPU figures." >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
exec "$PYTHON" bench/bench_sidecars.py --family clip-prefix fusecap --device cuda --dtype fp16 \
    --batch-size 64 256 --decode cpu gpu --graphs off on "$@"

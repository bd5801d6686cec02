#!/usr/bin/env bash
# Set up (once) and run the command line: tools/run.sh caption IMAGE_OR_DIR... [options]
# The first call creates .venv with PyTorch (a CUDA build, ~6 GB to download; see TORCH_PACKAGES in
# tools/setup.sh for a CPU-only one) and the package; later calls only check it (about a second).
# Weights are downloaded into the models folder on first use (see README: Models).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/tools/setup.sh" run)
exec "$venv/bin/python" -m captioners "$@"

#!/usr/bin/env bash
# Set up (once) and run the command line: tools/run.sh caption IMAGE_OR_DIR... [options]
# Weights are downloaded into the models folder on first use (see README: Models).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/tools/setup.sh" current)
exec "$venv/bin/python" -m captioners "$@"

#!/usr/bin/env bash
# Run the test suite: tools/test.sh [current|a1111|forge|forge-neo] [pytest args...]
# Sets up the environment first (see tools/setup.sh); no network is used by the tests themselves.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pins=current
if [ $# -gt 0 ] && [ -f "$root/tools/pins/$1.txt" -o "$1" = current ]; then pins=$1; shift; fi
venv=$(bash "$root/tools/setup.sh" "$pins")
export CAPTIONERS_PIN_SET=$pins  # tests of what a WebUI never runs (the Ray engine) run with current releases
cd "$root"
echo "[test] pin set $pins: $("$venv/bin/python" -c 'import transformers, torch; from importlib.metadata import version as v; print("torch", torch.__version__, "transformers", transformers.__version__, "open_clip", v("open_clip_torch"))')" >&2
exec "$venv/bin/python" -m pytest "$@"

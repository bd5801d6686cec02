#!/usr/bin/env bash
# Create or update a virtual environment with the package and its test tools; print its path.
#
#   tools/setup.sh            current releases, in .venv
#   tools/setup.sh a1111      A1111 1.10's pins (tools/pins/a1111.txt), in .venv-a1111
#   tools/setup.sh forge      Forge's pins (tools/pins/forge.txt), in .venv-forge
#
# The pinned environments reuse .venv's torch through a .pth file instead of installing a second
# multi-GB copy; their own packages come first on sys.path, so the pins are what gets imported.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pins=${1:-current}
python=${PYTHON:-python3}
# torch 2.14.1 / torchvision 0.29.1 are a matching pair (PyPI's torchvision does not import beside
# some other torch builds); override with TORCH_PACKAGES="torch torchvision" to take the newest.
torch_packages=${TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
pip_flags=(--quiet --disable-pip-version-check)

log() { echo "[setup] $*" >&2; }

# Make venv $1 see the packages of venv $2 after its own (so its own pins win).
overlay() {
  local site base_site
  site=$("$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  base_site=$("$2/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import site; site.addsitedir('$base_site')" > "$site/_base_venv.pth"
}

base="$root/.venv"
if [ ! -x "$base/bin/python" ]; then
  log "creating $base"
  "$python" -m venv "$base"
  # BASE_VENV: reuse another checkout's environment (e.g. a git worktree) instead of a new torch.
  if [ -n "${BASE_VENV:-}" ]; then overlay "$base" "$BASE_VENV"; fi
fi
if ! "$base/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing $torch_packages (large, once)"
  "$base/bin/pip" install "${pip_flags[@]}" $torch_packages 2>&1 | grep -v "is ignored" >&2 || true
  "$base/bin/python" -c "import torch, torchvision" || { log "torch did not install"; exit 1; }
fi
log "installing the package and test tools into $base"
"$base/bin/pip" install "${pip_flags[@]}" -e "$root[test]" 2>&1 | grep -v "is ignored" >&2 || true

if [ "$pins" = current ]; then
  echo "$base"
  exit 0
fi

pin_file="$root/tools/pins/$pins.txt"
[ -f "$pin_file" ] || { log "no pin set $pins (have: $(ls "$root/tools/pins" | sed 's/.txt//' | tr '\n' ' '))"; exit 1; }
venv="$root/.venv-$pins"
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
overlay "$venv" "$base"
log "installing pin set $pins into $venv"
"$venv/bin/pip" install "${pip_flags[@]}" -r "$pin_file" 2>&1 | grep -v -e "is ignored" -e "outside environment" >&2 || true
"$venv/bin/python" - "$pin_file" <<'PY'
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, wanted = line.split("==")
        got = version(name)
        assert got == wanted, f"{name}: wanted {wanted}, got {got}"
PY
echo "$venv"

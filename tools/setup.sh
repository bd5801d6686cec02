#!/usr/bin/env bash
# Create or update a virtual environment with the package; print its path.
#
#   tools/setup.sh run        the package alone, in .venv (what tools/run.sh uses); with its extras
#                             named in CAPTIONERS_EXTRAS, e.g. CAPTIONERS_EXTRAS=ray for the Ray engine
#   tools/setup.sh current    the package, its test tools and Ray, current releases, in .venv
#   tools/setup.sh a1111      the same with A1111 1.10's pins (tools/pins/a1111.txt), in .venv-a1111
#   tools/setup.sh forge      the same with Forge's pins (tools/pins/forge.txt), in .venv-forge
#   tools/setup.sh forge-neo  the same with Forge Neo's pins (tools/pins/forge-neo.txt), in .venv-forge-neo
#
# Installing is skipped when this checkout's pyproject.toml (and pin file) were installed into that
# environment already: a second call costs a second, not pip's ~30 s of resolving.
# The pinned environments reuse .venv's torch through a .pth file instead of installing a second
# multi-GB copy; their own packages come first on sys.path, so the pins are what gets imported.
# CAPTIONERS_VENV puts the main environment elsewhere (default: .venv in the checkout).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-current}
python=${PYTHON:-python3}
# torch 2.14.1 / torchvision 0.29.1 are a matching pair (PyPI's torchvision does not import beside
# some other torch builds); a CUDA build, ~6 GB. Another torch: TORCH_PACKAGES="torch torchvision
# --index-url https://download.pytorch.org/whl/cpu" (CPU only, ~1 GB), or any pip arguments.
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

# install VENV WHAT FILE... : run `pip install WHAT` unless the same FILEs were installed with WHAT
# before (a stamp in the venv) and the package imports from this checkout.
install() {
  local venv=$1 what=$2 stamp="$1/.captioners-installed" key
  shift 2
  key="$(cat "$@" | sha256sum | cut -d' ' -f1) $what"
  if [ -f "$stamp" ] && grep -qxF -- "$key" "$stamp" && "$venv/bin/python" -c \
      "import captioners, sys; sys.exit(not captioners.__file__.startswith('$root/'))" >/dev/null 2>&1; then
    return 0
  fi
  log "installing $what into $venv"
  # shellcheck disable=SC2086  # $what is pip arguments
  "$venv/bin/pip" install "${pip_flags[@]}" $what 2>&1 | grep -v -e "is ignored" -e "outside environment" >&2 || true
  echo "$key" >> "$stamp"
}

case "$mode" in
  run) extras="${CAPTIONERS_EXTRAS:+[$CAPTIONERS_EXTRAS]}" ;;  # e.g. CAPTIONERS_EXTRAS=ray (comma-separated)
  current) extras="[test,ray]" ;;  # Ray (the distributed engine) is tested with current releases only
  *) extras="[test]" ;;
esac

base="${CAPTIONERS_VENV:-$root/.venv}"
if [ ! -x "$base/bin/python" ]; then
  log "creating $base"
  "$python" -m venv "$base"
  # BASE_VENV: reuse another checkout's environment (e.g. a git worktree) instead of a new torch.
  if [ -n "${BASE_VENV:-}" ]; then overlay "$base" "$BASE_VENV"; fi
fi
# Found, not imported: importing a CUDA torch takes seconds, and it is imported for real after installing.
if ! "$base/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('torchvision')))" \
    >/dev/null 2>&1; then
  log "installing $torch_packages (large, once)"
  # shellcheck disable=SC2086
  "$base/bin/pip" install "${pip_flags[@]}" $torch_packages 2>&1 | grep -v "is ignored" >&2 || true
  "$base/bin/python" -c "import torch, torchvision" || { log "torch did not install"; exit 1; }
fi
# The test tools include the package itself, so a test install also serves the plain one (and one
# with Ray serves the pinned sets' base environment).
served=""
if { [ -z "$extras" ] || [ "$extras" = "[test]" ]; } && [ -f "$base/.captioners-installed" ]; then
  for tested in "[test,ray]" "[test]"; do
    if grep -qF " -e $root$tested" "$base/.captioners-installed"; then served=$tested; break; fi
  done
fi
install "$base" "-e $root${served:-$extras}" "$root/pyproject.toml"

if [ "$mode" = current ] || [ "$mode" = run ]; then
  echo "$base"
  exit 0
fi

pin_file="$root/tools/pins/$mode.txt"
[ -f "$pin_file" ] || { log "no pin set $mode (have: $(ls "$root/tools/pins" | sed 's/.txt//' | tr '\n' ' '))"; exit 1; }
venv="$root/.venv-$mode"
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  "$python" -m venv "$venv"
fi
overlay "$venv" "$base"
# A pin file installs in steps split at "# then" lines, as its host's launcher installs them (Forge
# Neo installs its gradio, then requirements that move Pillow past gradio's bound).
step=0
while [ -n "$(awk -v want="$step" 'BEGIN{n=0} /^# then/{n++; next} n==want' "$pin_file")" ]; do
  awk -v want="$step" 'BEGIN{n=0} /^# then/{n++; next} n==want' "$pin_file" > "$venv/.pins-step$step.txt"
  install "$venv" "-r $venv/.pins-step$step.txt" "$pin_file" "$root/pyproject.toml"
  step=$((step + 1))
done
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

#!/usr/bin/env bash
# gum-ray set-up: creates .venv in the checkout and installs everything, including mmcv 2.1.0
# built from source with its CPU ops (what mmsegmentation 1.2.2 needs; PyPI has no wheel).
# The mmcv build runs in its own throw-away build environment (tools/build_mmcv.sh): its setup.py
# needs setuptools < 70 (pkg_resources), while torch 2.13 in .venv requires setuptools >= 77.
# The built wheel is cached in a wheelhouse (default $XDG_CACHE_HOME/gum-ray/wheelhouse, i.e.
# ~/.cache/gum-ray/wheelhouse, or $GUM_WHEELHOUSE), so the slow build happens once per machine.
# Every run checks the build path (mmcv's metadata step, seconds), even with the wheel cached.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WHEELHOUSE=${GUM_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/gum-ray/wheelhouse}
MMCV_VERSION=2.1.0
TORCH_VERSION=2.13.0

say() { printf '[gum-ray setup] %s\n' "$*"; }
t0=$(date +%s)

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip<26" wheel
# torch first: the CPU build lies on this machine's disk; mmcv's build imports it.
"${PIP[@]}" install "torch==${TORCH_VERSION}" numpy ninja

# The build path, checked every time (seconds): an impossible build environment fails here.
bash tools/build_mmcv.sh .venv/bin/python "$WHEELHOUSE" --check

if ! ls "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1; then
  say "building mmcv ${MMCV_VERSION} with its CPU ops: once per machine, about 10-30 minutes on 2 cores"
  say "(the wheel goes to $WHEELHOUSE; later set-ups take about a minute)"
  tb=$(date +%s)
  bash tools/build_mmcv.sh .venv/bin/python "$WHEELHOUSE"
  say "mmcv build took $(( $(date +%s) - tb )) s"
else
  say "using cached mmcv wheel from $WHEELHOUSE"
fi

"${PIP[@]}" install --find-links "$WHEELHOUSE" "mmcv==${MMCV_VERSION}"
"${PIP[@]}" install --find-links "$WHEELHOUSE" -e ".[test]"
.venv/bin/python -c "import mmcv.ops, mmseg, gum_ray; print('[gum-ray setup] ok: mmcv', mmcv.__version__, 'with ops, mmseg', mmseg.__version__, ', gum-ray', gum_ray.__version__)"
# the web-map viewer's JS library (npm) and, for its browser test, Debian's chromium
bash tools/setup_viewer.sh
say "set-up took $(( $(date +%s) - t0 )) s"

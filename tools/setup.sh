#!/usr/bin/env bash
# gum-ray set-up: creates .venv in the checkout and installs everything, including mmcv 2.1.0
# built from source with its CPU ops (what mmsegmentation 1.2.2 needs; PyPI has no wheel).
# The built mmcv wheel is cached in a wheelhouse (default ~/.cache/gum-ray/wheelhouse, or
# $GUM_WHEELHOUSE), so the slow build (about 12 minutes on 2 cores) happens once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
WHEELHOUSE=${GUM_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/gum-ray/wheelhouse}
MMCV_VERSION=2.1.0
TORCH_VERSION=2.13.0

say() { printf '[gum-ray setup] %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip<26" "setuptools<70" wheel
# torch first: the CPU build lies on this machine's disk; mmcv's build imports it.
"${PIP[@]}" install "torch==${TORCH_VERSION}" numpy ninja

mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/mmcv-${MMCV_VERSION}-*.whl >/dev/null 2>&1; then
  say "building mmcv ${MMCV_VERSION} with CPU ops (once per machine, about 12 minutes on 2 cores)"
  build_dir=$(mktemp -d)
  (cd "$build_dir" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
     "$OLDPWD/.venv/bin/python" -m pip --disable-pip-version-check wheel -q --no-build-isolation \
     --no-deps -w "$build_dir/out" "mmcv==${MMCV_VERSION}")
  mv "$build_dir"/out/mmcv-*.whl "$WHEELHOUSE"/
  rm -rf "$build_dir"
else
  say "using cached mmcv wheel from $WHEELHOUSE"
fi

"${PIP[@]}" install --find-links "$WHEELHOUSE" "mmcv==${MMCV_VERSION}"
"${PIP[@]}" install --find-links "$WHEELHOUSE" -e ".[test]"
.venv/bin/python -c "import mmcv.ops, mmseg, gum_ray; print('[gum-ray setup] ok: mmcv', mmcv.__version__, 'with ops, mmseg', mmseg.__version__, ', gum-ray', gum_ray.__version__)"

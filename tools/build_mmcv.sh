#!/usr/bin/env bash
# Builds the mmcv wheel (with its compiled ops) for a runtime Python, in an isolated build
# environment whose setuptools still has pkg_resources (mmcv 2.1.0's setup.py imports it;
# torch 2.13 requires setuptools >= 77, which no longer ships it).
#
#   tools/build_mmcv.sh RUNTIME_PYTHON OUT_DIR            build the wheel into OUT_DIR
#   tools/build_mmcv.sh RUNTIME_PYTHON OUT_DIR --check    only prepare mmcv's metadata (seconds):
#                                                          proves the build path works without building
#
# The build environment is a throw-away venv of the runtime's own interpreter holding only
# setuptools<70 and wheel; the runtime's site-packages (torch, numpy, ninja) are appended to its
# sys.path by a .pth file, after its own packages, so its setuptools wins and torch is the
# runtime's. Used by tools/setup.sh and cluster/Dockerfile (FORCE_CUDA=1 there).
set -euo pipefail
RUNTIME_PY=$1
OUT=$2
MODE=${3:-build}
MMCV_VERSION=${MMCV_VERSION:-2.1.0}

say() { printf '[gum-ray setup] %s\n' "$*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/gum-mmcv-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

base_py=$("$RUNTIME_PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
"$base_py" -m venv "$work/env"
BPY="$work/env/bin/python"
"$BPY" -m pip --disable-pip-version-check -q install "setuptools>=61,<70" wheel
build_site=$("$BPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$RUNTIME_PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
  | sort -u > "$build_site/zz_gum_runtime.pth"
"$BPY" -c 'import pkg_resources, setuptools, torch; assert int(setuptools.__version__.split(".")[0]) < 70' \
  2>/dev/null || { echo "[gum-ray setup] error: the mmcv build environment lacks pkg_resources or torch" >&2; exit 1; }

cd "$work"
if [ "$MODE" = "--check" ]; then
  # pip prepares the sdist's metadata (runs mmcv's setup.py egg_info) and stops before building
  "$BPY" -m pip --disable-pip-version-check -q install --dry-run --no-deps --no-build-isolation \
    --no-binary mmcv --ignore-installed "mmcv==${MMCV_VERSION}"
  say "mmcv ${MMCV_VERSION} build path ok (metadata prepared in the build environment)"
  exit 0
fi

MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$BPY" -m pip --disable-pip-version-check wheel -q --no-build-isolation --no-deps \
  --no-binary mmcv -w "$work/out" "mmcv==${MMCV_VERSION}"
mkdir -p "$OUT"
mv "$work"/out/mmcv-*.whl "$OUT"/
say "built $(cd "$OUT" && ls mmcv-${MMCV_VERSION}-*.whl | head -1)"

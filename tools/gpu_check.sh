#!/usr/bin/env bash
# The checks that need a GPU, in one call on a lent machine (docs/performance.md, "On a GPU"):
# the CUDA tests, then tools/bench_infer.py (MFU of the forward and of the scene path, AMP against
# fp32) and tools/bench_actor.py (the model actor's whole cell path from an imagery cache: the
# number the 35 % goal is about), GUM 1 and GUM 2.0, on the synthetic world (no GeoTIFF, no
# rasterio). Made here, carried there:
#
#   bash tools/gpu_kit.sh                                   # here: gpu-kit/, the wheels its image lacks
#   run(command="bash tools/gpu_check.sh", carry=["gpu-kit"], timeout_s=600)
#
# Logs go to $OUT (or out/gpu-check here); the tables are printed last. Each step has its own time
# limit, so one that hangs leaves the others their time. On a machine without CUDA it runs the same
# steps on the CPU, smaller (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
KIT=${GPU_KIT:-gpu-kit}
PY=${GPU_PYTHON:-python3}
export PYTHONUNBUFFERED=1

site=$(mktemp -d)
if [[ -d "$KIT" ]]; then
    "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$site" "$KIT"/*.whl \
        > "$OUT/kit.log" 2>&1 || { echo "gpu_check: installing $KIT failed:"; tail -5 "$OUT/kit.log"; exit 1; }
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || { echo "gpu_check: torch does not import"; exit 1; }
if [[ "$cuda" == 1 ]]; then
    dev=cuda cells=8 iters=50 repeats=3 family=both limit=240
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
else
    dev=cpu cells=1 iters=1 repeats=1 family=gum1 limit=900
fi
"$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| numpy', numpy.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log, its status to the summary
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
step tests 150 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider -k "not gcs" \
    tests/test_device_path.py tests/test_shuffled.py tests/test_store_shards.py
step bench_infer "$limit" "$PY" tools/bench_infer.py --device "$dev" --synthetic --family "$family" \
    --forward-iters "$iters"
step bench_actor "$limit" "$PY" tools/bench_actor.py --device "$dev" --synthetic --family "$family" --cells "$cells" \
    --repeats "$repeats" --forward-iters "$iters"

echo
echo "== tests"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -10
echo "== bench_infer"; grep -vE "^(WARNING|Task|task)" "$OUT/bench_infer.log" | tail -16
echo "== bench_actor"; grep -E "^(#|[0-9]|repeat)" "$OUT/bench_actor.log" | tail -20
grep -E "Error|Traceback" "$OUT/bench_infer.log" "$OUT/bench_actor.log" | head -5
echo "== summary"; cat "$OUT/summary.txt"

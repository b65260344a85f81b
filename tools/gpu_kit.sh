#!/usr/bin/env bash
# The wheels a lent GPU machine needs to run tools/gpu_check.sh: gum-ray's imports on the checked
# paths that its image lacks, for its Python (3.12, x86_64). That machine reaches no registry; its
# image holds torch (CUDA), numpy and most of the rest (the device tool's KINDS.md lists them), and
# these travel with the call:  run(command="bash tools/gpu_check.sh", carry=["gpu-kit"]).
#
#   bash tools/gpu_kit.sh [folder]        # default gpu-kit/ (git-ignored); about 21 MB
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-gpu-kit}
PY=${GPU_KIT_PYTHON:-3.12}
PIP=${PIP:-.venv/bin/pip}
# what the checked paths import that the image has not (tools/bench_actor.py and tools/bench_infer.py
# on the synthetic world, without mmseg or rasterio: rasterio's wheel alone is 36 MB of the 64 MiB that
# travel; the CUDA tests' modules), at the versions this checkout's .venv tests with; their
# own dependencies resolved by pip below
WANT=()
for dist in odc-geo pyproj shapely zarr numcodecs google-crc32c donfig dask affine cachetools lazy-importer \
            importlib-metadata; do
    WANT+=("$dist==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")")
done
# on the image already (KINDS.md, 2026-11-17): not carried
HAVE=" numpy packaging typing_extensions typing-extensions attrs certifi click pyparsing fsspec toolz
 cloudpickle pyyaml psutil zipp msgpack jinja2 markupsafe setuptools
 xarray pandas python_dateutil python-dateutil six pytz tzdata aiohttp yarl multidict frozenlist aiosignal
 propcache idna tqdm filelock "
rm -rf "$KIT"
mkdir -p "$KIT"
"$PIP" download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$KIT" "${WANT[@]}" 2> >(grep -v "^WARNING: Location" >&2)
HAVE=" $(echo $HAVE) "
for whl in "$KIT"/*.whl; do
    name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
    if [[ "$HAVE" == *" $name "* || "$HAVE" == *" ${name//_/-} "* ]]; then
        rm "$whl"
    fi
done
echo "gpu_kit: $(ls "$KIT" | wc -l) wheels, $(du -sh "$KIT" | cut -f1) in $KIT/ (Python $PY):"
ls "$KIT" | sed 's/-py[23].*//; s/-cp3.*//' | tr '\n' ' '
echo

"""Predict GUM export GeoTIFFs into Cloud-Optimized GeoTIFFs (``gum predict``).

Output per input: a COG on the input's grid with band 1 = P(urban) as uint8 percent (0-100) and
band 2 = class (0/1), 255 = no data in both (pixels without Sentinel-2). Scenes stream through the
engine in row blocks, so memory does not grow with the scene. Every output is written under a
temporary name in the destination folder and renamed when complete: an interrupted run never leaves
a file that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from gum_ray.errors import InputError
from gum_ray.export_io import ExportFile, list_exports, open_export
from gum_ray.imagery import NODATA, probability_to_uint8
from gum_ray.inference import InferenceEngine, crop_count
from gum_ray.network import check_compatible
from gum_ray.store.cog import write_cog
from gum_ray.version import __version__

BAND_DESCRIPTIONS = ("urban_probability_percent", "urban_class")


@dataclasses.dataclass
class PredictResult:
    input: Path
    output: Path
    skipped: bool
    pixels: int = 0
    seconds: float = 0.0


def output_path_for(input_path: Path, output: Path, many: bool) -> Path:
    """Where the prediction of ``input_path`` goes: OUTPUT itself, or OUTPUT/<stem>_gum.tif."""
    if many or output.is_dir() or str(output).endswith(os.sep):
        return output / f"{input_path.stem}_gum.tif"
    if output.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"output {output}: give a .tif file name, or an existing folder")
    return output


def plan_outputs(input_path: str | Path, output: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs for a GeoTIFF or a folder of GeoTIFFs."""
    inp, out = Path(input_path), Path(output)
    if not inp.exists():
        raise InputError(f"input {inp}: no such file or folder")
    if inp.is_dir():
        if out.exists() and not out.is_dir():
            raise InputError(f"output {out}: is a file; for a folder of inputs give an output folder")
        return [(f, output_path_for(f, out, many=True)) for f in list_exports(inp)]
    return [(inp, output_path_for(inp, out, many=False))]


def predict_file(
    engine: InferenceEngine,
    input_path: Path,
    output_path: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    rows_per_block: int = 1024,
) -> PredictResult:
    """Predict one export into a COG with ``engine`` (and its model). ``on_start(total_crops)`` is
    called before compute."""
    if output_path.exists() and not overwrite:
        return PredictResult(input_path, output_path, skipped=True)
    t0 = time.perf_counter()
    model = engine.model
    with open_export(input_path) as src:
        check_compatible(model, src.with_products, what=str(input_path))
        if on_start is not None:
            on_start(crop_count(src.height, src.width, engine.settings.stride))
        valid_rows: dict[int, np.ndarray] = {}

        def read_rows(y0: int, y1: int) -> np.ndarray:
            raw = src.read_rows(y0, y1)
            valid_rows[y0] = model.validity(raw)
            return model.preprocess(raw)

        output_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{output_path.name}.", dir=output_path.parent) as tmpdir:
            plain = Path(tmpdir) / "plain.tif"
            profile = _output_profile(src)
            with rasterio.open(plain, "w", **profile) as dst:
                for y0, prob, label in engine.predict_rows(read_rows, src.height, src.width, progress):
                    valid = _valid_for(valid_rows, y0, prob.shape[0], src, model)
                    p8 = probability_to_uint8(prob, valid)
                    lab = label.copy()
                    lab[p8 == NODATA] = NODATA
                    win = Window(0, y0, src.width, prob.shape[0])
                    dst.write(p8, 1, window=win)
                    dst.write(lab, 2, window=win)
                dst.descriptions = BAND_DESCRIPTIONS
                prov = model.provenance()
                dst.update_tags(
                    gum_ray_version=__version__,
                    checkpoint_sha256=prov["checkpoint_sha256"],
                    checkpoint=prov["checkpoint"],
                    settings=json.dumps(engine.settings.as_dict(), sort_keys=True),
                    source=os.path.basename(str(input_path)),
                    model_channels=str(model.in_channels),
                )
                dst.update_tags(1, units="percent", meaning="P(urban) x 100, 255 = no data")
                dst.update_tags(2, meaning="1 = urban, 0 = not urban, 255 = no data")
            cog_tmp = Path(tmpdir) / "cog.tif"
            # nearest overviews: band 2 holds classes
            write_cog(plain, cog_tmp, overview_resampling="nearest")
            os.replace(cog_tmp, output_path)
        pixels = src.height * src.width
    return PredictResult(input_path, output_path, False, pixels, time.perf_counter() - t0)




def _valid_for(valid_rows: dict[int, np.ndarray], y0: int, n: int, src: ExportFile, model) -> np.ndarray:
    """Validity (has Sentinel-2) of rows [y0, y0 + n), from blocks already read, else re-read."""
    out = np.zeros((n, src.width), dtype=bool)
    filled = np.zeros(n, dtype=bool)
    for top in sorted(valid_rows):
        block = valid_rows[top]
        a, b = max(top, y0), min(top + block.shape[0], y0 + n)
        if a < b:
            out[a - y0 : b - y0] = block[a - top : b - top]
            filled[a - y0 : b - y0] = True
    if not filled.all():
        out = model.validity(src.read_rows(y0, y0 + n))
    for top in [t for t in valid_rows if t + valid_rows[t].shape[0] <= y0 + n]:
        del valid_rows[top]
    return out


def _output_profile(src: ExportFile) -> dict:
    p = src.profile
    return dict(
        driver="GTiff",
        width=src.width,
        height=src.height,
        count=2,
        dtype="uint8",
        nodata=NODATA,
        crs=p["crs"],
        transform=p["transform"],
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )

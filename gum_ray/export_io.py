"""Reading GUM export GeoTIFFs (the authors' Earth Engine export layout), with validation.

:func:`open_export` checks what a user can get wrong before any compute starts: the file exists and
is a readable GeoTIFF, has 11 or 14 bands, floating-point values (reflectance 0-1, dB), and a CRS
with a real geotransform. Each problem is an :class:`~gum_ray.errors.InputError` naming the file.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from gum_ray import bands
from gum_ray.errors import InputError, require_file

GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclasses.dataclass
class ExportFile:
    """An open, validated GUM export; read it with :meth:`read_rows`. Close when done."""

    path: Path
    dataset: rasterio.DatasetReader
    with_products: bool

    @property
    def height(self) -> int:
        return self.dataset.height

    @property
    def width(self) -> int:
        return self.dataset.width

    @property
    def profile(self) -> dict:
        return dict(self.dataset.profile)

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Export rows [y0, y1) as float32 (bands, rows, width), NaN kept."""
        return self.read_window(y0, y1, 0, self.width)

    def read_window(self, y0: int, y1: int, x0: int, x1: int, indexes: list[int] | None = None) -> np.ndarray:
        """Rows [y0, y1) x columns [x0, x1) as float32 (bands, rows, cols), NaN kept.

        ``indexes``: 1-based bands to read (default all). Callers keep windows bounded (gum predict
        reads column strips), so memory does not follow the width a header claims.
        """
        try:
            data = self.dataset.read(indexes, window=Window(x0, y0, x1 - x0, y1 - y0), out_dtype="float32")
        except RasterioIOError as exc:
            raise InputError(f"{self.path}: could not read rows {y0}-{y1} ({exc}); the file is corrupt or truncated") from None
        nodata = self.dataset.nodata
        if nodata is not None and not np.isnan(nodata):
            data[data == nodata] = np.nan
        self._absent_blocks_to_nan(data, y0, y1, x0, x1, indexes)
        return data

    def _absent_blocks_to_nan(self, data: np.ndarray, y0: int, y1: int, x0: int, x1: int,
                              indexes: list[int] | None) -> None:
        """NaN where the TIFF never wrote a block (a sparse file): GDAL reads those as nodata, or
        as 0 when the file has no nodata value, but they hold no data either way."""
        ds = self.dataset
        if ds.driver != "GTiff" or y1 <= y0 or x1 <= x0:
            return
        bh, bw = ds.block_shapes[0]
        for i, band in enumerate(indexes or range(1, ds.count + 1)):
            for by in range(y0 // bh, (y1 - 1) // bh + 1):
                for bx in range(x0 // bw, (x1 - 1) // bw + 1):
                    if ds.get_tag_item(f"BLOCK_OFFSET_{bx}_{by}", "TIFF", bidx=band) not in (None, "", "0"):
                        continue
                    ra, rb = max(by * bh, y0) - y0, min((by + 1) * bh, y1) - y0
                    ca, cb = max(bx * bw, x0) - x0, min((bx + 1) * bw, x1) - x0
                    data[i, ra:rb, ca:cb] = np.nan

    def close(self) -> None:
        self.dataset.close()

    def __enter__(self) -> "ExportFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_export(path: str | Path) -> ExportFile:
    """Open and validate a GUM export GeoTIFF (11 or 14 float bands, georeferenced)."""
    path = require_file(path, label=str(path), expect="a GeoTIFF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"{path}: not a readable GeoTIFF ({str(exc).splitlines()[0][:160]})") from None
    try:
        with_products = bands.with_products_for_band_count(ds.count, source=str(path))
        dtypes = set(ds.dtypes)
        if not all(np.issubdtype(np.dtype(d), np.floating) for d in dtypes):
            raise InputError(
                f"{path}: bands are {', '.join(sorted(dtypes))}; a GUM export is float "
                "(reflectance 0-1, backscatter in dB). Export with the GUM recipe, or convert "
                "(e.g. divide Sentinel-2 digital numbers by 10000) to float32 first"
            )
        if ds.crs is None or ds.transform.is_identity:
            raise InputError(
                f"{path}: has no georeferencing (no CRS or geotransform); gum-ray needs to know "
                "where the pixels are. Export with a CRS (Earth Engine does by default)"
            )
        if ds.width < 1 or ds.height < 1:
            raise InputError(f"{path}: has no pixels")
        # touch the first block so a truncated file fails here, not half-way through
        ds.read(1, window=Window(0, 0, min(ds.width, 16), min(ds.height, 16)))
    except InputError:
        ds.close()
        raise
    except RasterioIOError as exc:
        ds.close()
        raise InputError(f"{path}: could not read pixels ({str(exc).splitlines()[0][:160]}); the file is corrupt or truncated") from None
    return ExportFile(path=path, dataset=ds, with_products=with_products)


def list_exports(folder: str | Path) -> list[Path]:
    """GeoTIFFs directly in ``folder``, sorted by name."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in GEOTIFF_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: contains no .tif/.tiff files")
    return files

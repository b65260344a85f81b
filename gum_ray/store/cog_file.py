"""A uint8 GeoTIFF -> a Cloud-Optimized GeoTIFF (rio-cogeo): the one COG layout gum-ray writes.

Its own module so that ``gum predict`` imports rio-cogeo alone, not the product store (zarr) and the
grid (odc-geo, pyproj) that :mod:`gum_ray.store.cog`'s product export needs.
"""

from __future__ import annotations

import os
import warnings

from gum_ray.imagery import NODATA

BLOCK = 512  # px, the COG's blocks and its overviews'


def write_cog(src: str | os.PathLike, dst: str | os.PathLike, *, overview_resampling: str,
              metadata: dict[str, str] | None = None) -> None:
    """Translate a uint8 GeoTIFF into a COG: 512 px blocks (overviews too), ZSTD, nodata 255,
    internal overviews, band tags kept. ``overview_resampling``: ``average`` for probabilities,
    ``nearest`` where a band holds classes."""
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Non-standard compression schema.*")
        profile = dict(cog_profiles.get("zstd"))
        profile.update({"blockxsize": BLOCK, "blockysize": BLOCK, "BIGTIFF": "IF_SAFER"})
        cog_translate(
            str(src),
            str(dst),
            profile,
            nodata=NODATA,
            overview_resampling=overview_resampling,
            in_memory=False,
            quiet=True,
            forward_band_tags=True,
            additional_cog_metadata=metadata,
            config={"GDAL_NUM_THREADS": "2", "GDAL_TIFF_OVR_BLOCKSIZE": str(BLOCK)},
        )

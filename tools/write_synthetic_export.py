#!/usr/bin/env python
"""Write a GUM export (11 float bands) of the synthetic world: 1000 x 1000 px on EPSG:32632, 10 m,
origin 462000 E / 5253000 N (around the demo town), year 2021; for the benchmarks' synthetic rows.

    .venv/bin/python tools/write_synthetic_export.py OUT.tif [clouds|clear]
"""
import sys
import numpy as np, rasterio
from odc.geo.geobox import GeoBox
from affine import Affine
from gum_ray.sources.synthetic import SyntheticSource
gb = GeoBox((1000, 1000), Affine(10, 0, 462000, 0, -10, 5253000), "EPSG:32632")
img = SyntheticSource(clouds=(sys.argv[2] == "clouds")).fetch(gb, 2021)
e = img.export.astype(np.float32)
with rasterio.open(sys.argv[1], "w", driver="GTiff", width=1000, height=1000, count=e.shape[0], dtype="float32",
                   crs="EPSG:32632", transform=gb.affine) as dst:
    dst.write(e)
print("s2 missing share", float(np.isnan(e[0]).mean()))

"""The GUM recipe as ``ee.Image`` objects, one per modality (building them makes no request).

The cloud- and shadow-masked Sentinel-2 median (s2cloudless join, ``directionalDistanceTransform``
shadows, ``focalMin``/``focalMax`` buffer), Sentinel-1 ascending/descending means (IW at 10 m, else
EW resampled bilinear, an empty pass -> constant 0), SRTM filled with GMTED and
``ee.Terrain.products``, and the optional built-up products (GUM_REFERENCE.md, "The Earth Engine
recipe"); :func:`encode_image` casts a modality to its wire encoding, :func:`grid_params` turns a
GeoBox into a ``computePixels`` grid.
"""

from __future__ import annotations

from typing import Any

from odc.geo.geobox import GeoBox

from gum_ray.imagery import MODALITY_BANDS
from gum_ray.sources.earthengine.wire import (
    MARKER_COUNTS,
    MARKER_ENCODING,
    MARKER_MODALITY,
    MARKER_YEAR,
    band_codes,
)

#: bump when the recipe changes what a request returns (cached imagery of another version is not reused)
RECIPE_VERSION = 1

S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
S2_CLOUD_COLLECTION = "COPERNICUS/S2_CLOUD_PROBABILITY"
S1_COLLECTION = "COPERNICUS/S1_GRD"
SRTM_IMAGE = "USGS/SRTMGL1_003"
GMTED_IMAGE = "USGS/GMTED2010_FULL"
WORLDCOVER_COLLECTION = "ESA/WorldCover/v100"
GISA_COLLECTION = "projects/sat-io/open-datasets/GISA_1972_2019"
WSF_COLLECTION = "projects/sat-io/open-datasets/WSF/WSF_2019"

CLOUDY_PIXEL_PERCENTAGE_MAX = 90
CLOUD_PROBABILITY_THRESHOLD = 50
NIR_DARK_THRESHOLD = 0.15
CLOUD_PROJECTION_DISTANCE_KM = 1
CLOUD_BUFFER_M = 50


def collections(with_products: bool) -> dict[str, Any]:
    """The collections the recipe reads (for provenance)."""
    out: dict[str, Any] = {
        "s2": [S2_COLLECTION, S2_CLOUD_COLLECTION],
        "s1": [S1_COLLECTION],
        "terrain": [SRTM_IMAGE, f"{GMTED_IMAGE}:be75"],
    }
    if with_products:
        out["products"] = [WORLDCOVER_COLLECTION, GISA_COLLECTION, WSF_COLLECTION]
    return out


def _s2_median(ee: Any, region: Any, start: str, end: str) -> tuple[Any, Any]:
    """The cloud/shadow-masked Sentinel-2 SR median (B4, B3, B2, B8 reflectance) and its collection."""
    s2 = (
        ee.ImageCollection(S2_COLLECTION)
        .filterBounds(region)
        .filterDate(start, end)
        .filter(ee.Filter.lte("CLOUDY_PIXEL_PERCENTAGE", CLOUDY_PIXEL_PERCENTAGE_MAX))
    )
    prob = ee.ImageCollection(S2_CLOUD_COLLECTION).filterBounds(region).filterDate(start, end)
    joined = ee.ImageCollection(
        ee.Join.saveFirst("s2cloudless").apply(
            primary=s2,
            secondary=prob,
            condition=ee.Filter.equals(leftField="system:index", rightField="system:index"),
        )
    )

    def mask_clouds_and_shadows(img: Any) -> Any:
        cloud_prob = ee.Image(img.get("s2cloudless")).select("probability")
        is_cloud = cloud_prob.gt(CLOUD_PROBABILITY_THRESHOLD)
        not_water = img.select("SCL").neq(6)
        dark = img.select("B8").lt(NIR_DARK_THRESHOLD * 1e4).multiply(not_water)
        azimuth = ee.Number(90).subtract(ee.Number(img.get("MEAN_SOLAR_AZIMUTH_ANGLE")))
        cloud_projection = (
            is_cloud.directionalDistanceTransform(azimuth, CLOUD_PROJECTION_DISTANCE_KM * 10)
            .reproject(crs=img.select(0).projection(), scale=100)
            .select("distance")
            .mask()
        )
        shadow = cloud_projection.multiply(dark)
        cloud_or_shadow = (
            is_cloud.add(shadow)
            .gt(0)
            .focalMin(2)
            .focalMax(CLOUD_BUFFER_M * 2 / 20)
            .reproject(crs=img.select([0]).projection(), scale=20)
        )
        return img.select(list(MODALITY_BANDS["s2"])).updateMask(cloud_or_shadow.Not())

    masked = joined.map(mask_clouds_and_shadows)
    # an empty year gives a fully masked image (missing), not a band-less one
    empty = ee.Image.constant([0, 0, 0, 0]).rename(list(MODALITY_BANDS["s2"])).updateMask(0)
    median = masked.merge(ee.ImageCollection([empty])).median().divide(10000).toFloat()
    return median.rename(list(MODALITY_BANDS["s2"])), joined


def _s1_means(ee: Any, region: Any, start: str, end: str) -> tuple[Any, dict[str, Any]]:
    """Sentinel-1 VV/VH means by orbit pass, IW 10 m preferred, EW 40 m resampled, empty -> 0."""
    s1 = (
        ee.ImageCollection(S1_COLLECTION)
        .filterBounds(region)
        .filterDate(start, end)
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VV"))
        .filter(ee.Filter.listContains("transmitterReceiverPolarisation", "VH"))
    )
    iw = s1.filter(ee.Filter.eq("instrumentMode", "IW")).filter(ee.Filter.eq("resolution_meters", 10))
    ew = (
        s1.filter(ee.Filter.eq("instrumentMode", "EW"))
        .filter(ee.Filter.eq("resolution_meters", 40))
        .map(lambda img: img.resample("bilinear"))
    )
    col = ee.ImageCollection(ee.Algorithms.If(iw.size().gt(0), iw, ew)).select(["VV", "VH"])
    passes = {}
    images = []
    for orbit, suffix in (("ASCENDING", "ascending"), ("DESCENDING", "descending")):
        p = col.filter(ee.Filter.eq("orbitProperties_pass", orbit))
        passes[suffix] = p
        mean = ee.Image(ee.Algorithms.If(p.size().gt(0), p.mean(), ee.Image.constant([0, 0])))
        images.append(mean.rename([f"VV_{suffix}", f"VH_{suffix}"]).toFloat())
    return ee.Image.cat(images), passes


def _terrain(ee: Any) -> Any:
    srtm = ee.Image(SRTM_IMAGE).select("elevation")
    gmted = ee.Image(GMTED_IMAGE).select("be75").rename("elevation")
    dem = srtm.unmask(gmted)
    return ee.Terrain.products(dem).select(["elevation", "slope", "aspect"]).resample("bilinear").toFloat()


def _products(ee: Any) -> Any:
    worldcover = ee.ImageCollection(WORLDCOVER_COLLECTION).first().select(0).remap([50], [1], 0)
    gisa = ee.ImageCollection(GISA_COLLECTION).mosaic().select(0).lte(37).unmask(0)
    wsf = ee.ImageCollection(WSF_COLLECTION).mosaic().select(0).eq(255).unmask(0)
    return ee.Image.cat([worldcover, gisa, wsf]).rename(list(MODALITY_BANDS["products"])).toUint8()


def region_geometry(ee: Any, geobox: GeoBox) -> Any:
    """The grid's footprint as a planar polygon in the grid's own CRS."""
    crs = geobox.crs
    crs_code = f"EPSG:{crs.epsg}" if crs.epsg is not None else crs.to_wkt()
    coords = [list(map(float, p)) for p in geobox.extent.geom.exterior.coords]
    return ee.Geometry.Polygon([coords], proj=crs_code, geodesic=False)


def build_recipe(ee: Any, geobox: GeoBox, year: int, *, with_products: bool) -> dict[str, Any]:
    """The GUM export as one ``ee.Image`` per modality (GUM units: reflectance, dB, m, degrees)."""
    region = region_geometry(ee, geobox)
    start, end = f"{year}-01-01", f"{year + 1}-01-01"
    s2, s2_col = _s2_median(ee, region, start, end)
    s1, s1_passes = _s1_means(ee, region, start, end)
    recipe = {"s2": s2, "s1": s1, "terrain": _terrain(ee)}
    if with_products:
        recipe["products"] = _products(ee)
    recipe["_counts"] = ee.Dictionary(
        {
            MARKER_COUNTS: 1,
            "s2": s2_col.size(),
            "s1_ascending": s1_passes["ascending"].size(),
            "s1_descending": s1_passes["descending"].size(),
        }
    )
    return recipe


def encode_image(ee: Any, image: Any, modality: str, year: int, encoding: str = "compact") -> Any:
    """Cast a modality image to its wire encoding; missing values become the sentinel."""
    bands = []
    for c in band_codes(modality, encoding):
        b = image.select(c.name)
        if c.dtype == "float32":
            b = b.toFloat().unmask(c.nodata, False)
        else:
            if c.scale != 1.0:
                b = b.multiply(c.scale)
            b = b.round()
            if c.modulo:
                b = b.mod(c.modulo)
            b = b.clamp(c.lo, c.hi).unmask(c.nodata, False)
            b = {"uint16": b.toUint16, "int16": b.toInt16, "uint8": b.toUint8}[c.dtype]()
        bands.append(b)
    names = [c.name for c in band_codes(modality, encoding)]
    return (
        ee.Image.cat(bands)
        .rename(names)
        .set(MARKER_MODALITY, modality)
        .set(MARKER_YEAR, year)
        .set(MARKER_ENCODING, encoding)
    )


def grid_params(geobox: GeoBox) -> dict[str, Any]:
    """The ``grid`` of a computePixels request for this GeoBox (PixelGrid of the REST API)."""
    a = geobox.affine
    h, w = geobox.shape
    grid: dict[str, Any] = {
        "dimensions": {"width": int(w), "height": int(h)},
        "affineTransform": {
            "scaleX": a.a, "shearX": a.b, "translateX": a.c,
            "shearY": a.d, "scaleY": a.e, "translateY": a.f,
        },
    }
    if geobox.crs.epsg is not None:
        grid["crsCode"] = f"EPSG:{geobox.crs.epsg}"
    else:
        grid["crsWkt"] = geobox.crs.to_wkt()
    return grid

"""The synthetic world as an imagery source: a deterministic planet with a known urban ground truth.

Everything is a pure function of longitude, latitude and year (the rules are in
``docs/synthetic_world.md``, the rasteriser in :mod:`gum_ray.sources.synthetic_world`): towns on a
hashed lattice that grow from year to year, roads between neighbouring towns, lakes, a synthetic
ocean, vegetation and smooth terrain. Any grid samples it at its pixel centres, so the same place
looks the same in a UTM grid and in a lat/lon grid, and a tile of a grid gets bit-for-bit the pixels
of the whole grid there.

Values are quantised exactly to the precision of the compact integer encodings (Sentinel-2 to 1e-4
reflectance, Sentinel-1 to 0.01 dB, elevation to 1 m, slope and aspect to 0.01 degree), the same
float32 arithmetic the decoder uses, so an encode/decode round trip (the Earth Engine emulator's)
is exact.

Public API: :func:`render`, :func:`world_export`, :func:`class_map`, :func:`ground_truth`,
:func:`cloud_cover`,
:func:`is_land`, :func:`is_ocean`, :func:`towns_near`, :data:`DEMO_BBOX`, :data:`OCEAN_BBOX`,
:class:`SyntheticSource` (options :class:`SyntheticOptions`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.bands import export_band_names
from gum_ray.errors import InputError
from gum_ray.imagery import MODALITY_SLICES, Imagery, modalities
from gum_ray.sources.base import ImagerySource, SourceOptions, check_geobox
from gum_ray.sources.synthetic_world import (  # noqa: F401 - the world's public names live here too
    CLASS_LAKE,
    CLASS_NAMES,
    CLASS_OCEAN,
    CLASS_ROAD,
    CLASS_TOWN,
    CLASS_VEGETATION,
    DEMO_BBOX,
    DEMO_LONLAT,
    EARTH_RADIUS_M,
    GISA_YEAR,
    M_PER_DEG,
    OCEAN_BBOX,
    WORLDCOVER_YEAR,
    WORLD_VERSION,
    WSF_YEAR,
    Town,
    _class_map,
    _Frame,
    _ocean_map,
    _render_rows,
    _terrain_nodes,
    _vigour_nodes,
    _water_only,
    is_land,
    is_ocean,
    towns_near,
)

WORLD = "gum-ray synthetic world v1 (docs/synthetic_world.md)"


def render(
    geobox: GeoBox,
    year: int,
    *,
    with_products: bool = False,
    modalities_wanted: Iterable[str] | None = None,
    block_rows: int = 256,
    clouds: bool = False,
) -> tuple[Imagery, np.ndarray | None]:
    """Sample the synthetic world on ``geobox`` for ``year``: (imagery, class map).

    ``modalities_wanted`` limits the work to some modalities (``s2``, ``s1``, ``terrain``,
    ``products``); the other bands are NaN. With ``clouds``, Sentinel-2 is NaN under the year's
    clouds (:mod:`gum_ray.sources.synthetic_clouds`). The class map is uint8 ``CLASS_*`` codes
    (None when only terrain was rendered). No year validation here: see :class:`SyntheticSource`.
    """
    geobox = check_geobox(geobox, source="synthetic world")
    year = int(year)
    all_mods = modalities(with_products)
    want = set(all_mods if modalities_wanted is None else modalities_wanted)
    unknown = want - set(all_mods)
    if unknown:
        raise InputError(f"synthetic world: unknown or unavailable modalities {sorted(unknown)}")
    frame = _Frame(geobox)
    if want <= {"terrain"}:  # terrain needs only to know where the ocean is
        cls = np.zeros((frame.h, frame.w), np.uint8)
        _ocean_map(frame, cls)
    else:
        cls = _class_map(frame, year)
    names = export_band_names(with_products)
    export = np.empty((len(names), frame.h, frame.w), np.float32)
    for m in set(all_mods) - want:
        export[MODALITY_SLICES[m]] = np.nan
    fields: dict[str, Any] = {}
    if want & {"s2", "s1"}:
        fields["vigour"] = frame.xpass(_vigour_nodes(frame.node_lon, frame.node_lat), dtype=np.float32)
    if "terrain" in want:
        e, ge, gn = _terrain_nodes(frame.node_lon, frame.node_lat)
        fields["elev"], fields["ge"], fields["gn"] = (frame.xpass(v, dtype=np.float32) for v in (e, ge, gn))
    views = {m: export[MODALITY_SLICES[m]] for m in want if m != "products"}
    pix = want - {"products"}
    if pix:
        for r0 in range(0, frame.h, block_rows):
            _render_rows(frame, cls, r0, min(frame.h, r0 + block_rows), fields, pix, views)
    if clouds and "s2" in want:
        _apply_clouds(frame, year, export[MODALITY_SLICES["s2"]], block_rows)
    if "products" in want:
        water = _water_only(cls)
        prod = export[MODALITY_SLICES["products"]]
        for b, (yr, roads) in enumerate(((WORLDCOVER_YEAR, True), (GISA_YEAR, True), (WSF_YEAR, False))):
            c = cls if yr == year else _class_map(frame, yr, water=water)
            urban = (c == CLASS_TOWN) | ((c == CLASS_ROAD) if roads else False)
            prod[b] = urban.astype(np.float32)
    provenance = {"source": "synthetic", "year": year, "world": WORLD, "clouds": bool(clouds)}
    imagery = Imagery.from_export(export, geobox, provenance, with_products=with_products)
    return imagery, None if want <= {"terrain"} else cls


def _apply_clouds(frame: _Frame, year: int, s2: np.ndarray, block_rows: int) -> None:
    """Set Sentinel-2 to NaN under the year's clouds, in place."""
    from gum_ray.sources.synthetic_clouds import cloud_margin, cloud_mask, frame_may_be_overcast

    passes = frame.xpass(cloud_margin(frame.node_lon, frame.node_lat, year), dtype=np.float32)
    any_overcast = frame_may_be_overcast(frame, year)
    for r0 in range(0, frame.h, block_rows):
        r1 = min(frame.h, r0 + block_rows)
        cloud = cloud_mask(frame, year, r0, r1, passes, any_overcast)
        s2[:, r0:r1][:, cloud] = np.nan


def cloud_cover(geobox: GeoBox, year: int) -> np.ndarray:
    """Where the synthetic world's clouds hide Sentinel-2 on ``geobox`` in ``year``: bool (H, W)."""
    from gum_ray.sources.synthetic_clouds import cloud_mask, cloud_margin, frame_may_be_overcast

    frame = _Frame(check_geobox(geobox, source="synthetic world"))
    passes = frame.xpass(cloud_margin(frame.node_lon, frame.node_lat, int(year)), dtype=np.float32)
    return cloud_mask(frame, int(year), 0, frame.h, passes, frame_may_be_overcast(frame, int(year)))


def urban(classes: np.ndarray) -> np.ndarray:
    """The urban pixels (towns and roads, not water) of a class map: bool (H, W)."""
    return (classes == CLASS_TOWN) | (classes == CLASS_ROAD)


def world_export(geobox: GeoBox, year: int, *, with_products: bool = False) -> np.ndarray:
    """The GUM export (float32, 11 or 14 bands) of the synthetic world on ``geobox``."""
    return render(geobox, year, with_products=with_products)[0].export


def class_map(geobox: GeoBox, year: int) -> np.ndarray:
    """uint8 class codes (:data:`CLASS_NAMES`) of the synthetic world on ``geobox`` in ``year``."""
    return _class_map(_Frame(check_geobox(geobox, source="synthetic world")), int(year))


def ground_truth(geobox: GeoBox, year: int) -> np.ndarray:
    """The urban ground truth (towns and roads, not water) on ``geobox`` in ``year``: bool (H, W)."""
    return urban(class_map(geobox, year))


# ----------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticOptions(SourceOptions):
    """The synthetic world's options: ``with_products`` (the world has every product) and
    ``clouds`` (Sentinel-2 missing under the year's clouds, :mod:`gum_ray.sources.synthetic_clouds`;
    off by default, so the cloud-free world of earlier versions stays the default)."""

    clouds: bool = False


class SyntheticSource(ImagerySource):
    """Imagery from the synthetic world: offline, instant, with a known ground truth.

    Its default checkpoint is the demo model (trained on this world); only cells with land can
    hold data.
    """

    name = "synthetic"
    recipe_version = WORLD_VERSION
    Options = SyntheticOptions
    default_checkpoint = "demo"

    def _fetch(self, geobox: GeoBox, year: int) -> Imagery:
        imagery, classes = render(geobox, year, with_products=self.with_products, clouds=self.options.clouds)
        imagery.provenance.update({
            "dates": [f"{year}-01-01", f"{year + 1}-01-01"],
            "collections": {"s2": "synthetic", "s1": "synthetic", "terrain": "synthetic"}
            | ({"products": "synthetic (towns of 2020 / 2019 / 2019)"} if self.with_products else {}),
            "urban_fraction": float(urban(classes).mean()),
        })
        return imagery

    def may_hold_data(self, bounds: tuple[float, float, float, float]) -> bool:
        """False where the box is all ocean (land sampled on a 9 x 9 lattice over the box)."""
        w, s, e, n = bounds
        lon, lat = np.meshgrid(np.linspace(w, e, 9), np.linspace(s, n, 9))
        return bool(np.asarray(is_land(lon, lat)).any())

    def cache_identity(self) -> dict[str, Any]:
        """Clouds change the imagery: a cached cell rendered with the other setting is refetched."""
        return {"clouds": bool(self.options.clouds)}

    def ground_truth(self, geobox: GeoBox, year: int) -> np.ndarray:
        """The urban ground truth for the same grid and year."""
        return ground_truth(geobox, year)

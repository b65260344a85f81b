"""GIS access to the whole product: one COG per written cell, a GDAL VRT and a STAC collection.

GDAL before 3.13 (rasterio's wheels, QGIS 4.0) cannot read sharded Zarr v3, so ``gum export
--cogs OUT --year Y`` writes, for every cell of ``Y`` that holds data (within ``--bbox`` if given)::

    OUT/<year>/cogs/<cell id>.tif          the cell as a COG (store.cog.export_cog: uint8 percent,
                                           255 = no data, 512 px blocks, ZSTD, internal overviews)
    OUT/<year>/gum_<year>.vrt              a GDAL VRT mosaic of all of them on the product grid
                                           (QGIS: drag it in; GDAL uses the COGs' overviews)
    OUT/<year>/collection.json             a STAC 1.x collection, one item per COG (projection and
    OUT/<year>/items/<item id>.json        raster extensions), the VRT as a collection asset
    OUT/<year>/quality/<cell id>.tif       where the product records it: the cell's input quality
    OUT/<year>/gum_<year>_quality.vrt      (uint8 bit flags 1 = Sentinel-2, 2 = Sentinel-1,
                                           4 = terrain, 255 = not mapped; nearest overviews), its
                                           VRT, and an ``input_quality`` asset on each STAC item

COGs already there are kept (resume; each is written under a temporary name and renamed). The VRT
and the STAC collection are rewritten from all COGs of the year in the folder at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

from gum_ray.version import __version__
from gum_ray.errors import InputError
from gum_ray.grid import AOI, PIXEL_DEG, PRODUCT_CRS, Cell
from gum_ray.store import fs
from gum_ray.store.product import NODATA, ProductStore

PROJECTION_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_EXT = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
VRT_MEDIA_TYPE = "application/x-gdal-vrt+xml"


@dataclass(frozen=True)
class CogsResult:
    out: str
    year: int
    cells: int
    written: int
    skipped: int
    vrt: str
    collection: str


def _cells_in(cells: Sequence[Cell], aoi: AOI | None) -> list[Cell]:
    if aoi is None:
        return list(cells)
    from shapely.geometry import box

    return [c for c in cells if any(box(*c.bounds).intersection(p).area > 0 for p in aoi.parts)]


def vrt_xml(year: int, cells: Sequence[Cell], names: Sequence[str],
            description: str = "P(urban) percent") -> str:
    """A VRT mosaic of the cells' COGs (``names``: paths relative to the VRT) on the product grid."""
    n = cells[0].grid.cell_px
    r0, r1 = min(c.row for c in cells), max(c.row for c in cells) + 1
    c0, c1 = min(c.col for c in cells), max(c.col for c in cells) + 1
    west, north = cells[0].grid.cell(r0, c0).bounds[0], cells[0].grid.cell(r0, c0).bounds[3]
    width, height = (c1 - c0) * n, (r1 - r0) * n
    gt = f"{west!r}, {PIXEL_DEG!r}, 0.0, {north!r}, 0.0, {-PIXEL_DEG!r}"
    sources = []
    for cell, name in zip(cells, names):
        x, y = (cell.col - c0) * n, (cell.row - r0) * n
        sources.append(
            f'    <SimpleSource>\n'
            f'      <SourceFilename relativeToVRT="1">{escape(name)}</SourceFilename>\n'
            f'      <SourceBand>1</SourceBand>\n'
            f'      <SourceProperties RasterXSize="{n}" RasterYSize="{n}" DataType="Byte" BlockXSize="512" BlockYSize="512"/>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{n}" ySize="{n}"/>\n'
            f'      <DstRect xOff="{x}" yOff="{y}" xSize="{n}" ySize="{n}"/>\n'
            f'    </SimpleSource>'
        )
    return (
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">\n'
        f'  <SRS dataAxisToSRSAxisMapping="2,1">{escape(PRODUCT_CRS.to_wkt())}</SRS>\n'
        f'  <GeoTransform>{gt}</GeoTransform>\n'
        f'  <Metadata><MDI key="gum_year">{year}</MDI><MDI key="software">gum-ray {__version__}</MDI></Metadata>\n'
        '  <VRTRasterBand dataType="Byte" band="1">\n'
        f'    <Description>{escape(description)}, {year}</Description>\n'
        f'    <NoDataValue>{NODATA}</NoDataValue>\n'
        '    <ColorInterp>Gray</ColorInterp>\n'
        + "\n".join(sources) + "\n"
        '  </VRTRasterBand>\n'
        '</VRTDataset>\n'
    )


def stac_collection(year: int, cells: Sequence[Cell], cog_names: Sequence[str], vrt_name: str,
                    product_root: str, quality_names: Sequence[str | None] | None = None) -> Any:
    """A pystac Collection with one item per COG (hrefs relative, as given)."""
    import pystac

    start = dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(year, 12, 31, 23, 59, 59, tzinfo=dt.timezone.utc)
    w = min(c.bounds[0] for c in cells)
    s = min(c.bounds[1] for c in cells)
    e = max(c.bounds[2] for c in cells)
    n = max(c.bounds[3] for c in cells)
    coll = pystac.Collection(
        id=f"gum-urban-{year}",
        title=f"GUM urban probability {year}",
        description=(
            "Probability of urban land cover (GlobalUrbanMapper, Sentinel-2 + Sentinel-1 + terrain) "
            "in percent, uint8, 255 = no data, on the ESA WorldCover grid (EPSG:4326, 1/12000 degree); "
            f"one COG per product cell, exported by gum-ray {__version__} from {product_root}."
        ),
        extent=pystac.Extent(pystac.SpatialExtent([[w, s, e, n]]), pystac.TemporalExtent([[start, end]])),
        license="other",
        stac_extensions=[PROJECTION_EXT, RASTER_EXT],
    )
    coll.add_asset("mosaic", pystac.Asset(href=vrt_name, media_type=VRT_MEDIA_TYPE, roles=["data"],
                                          title=f"GDAL VRT mosaic of all COGs ({year})"))
    for k, (cell, name) in enumerate(zip(cells, cog_names)):
        cw, cs, ce, cn = cell.bounds
        npx = cell.grid.cell_px
        item = pystac.Item(
            id=f"gum-urban-{year}-{cell.id}",
            geometry={"type": "Polygon", "coordinates": [[[cw, cs], [ce, cs], [ce, cn], [cw, cn], [cw, cs]]]},
            bbox=[cw, cs, ce, cn],
            datetime=None,
            start_datetime=start,
            end_datetime=end,
            properties={
                "gum:cell": cell.id, "gum:year": year,
                "proj:code": "EPSG:4326", "proj:shape": [npx, npx],
                "proj:transform": [PIXEL_DEG, 0.0, cw, 0.0, -PIXEL_DEG, cn],
            },
            stac_extensions=[PROJECTION_EXT, RASTER_EXT],
        )
        item.add_asset("data", pystac.Asset(
            href=name, media_type=pystac.MediaType.COG, roles=["data"], title="P(urban) percent",
            extra_fields={"raster:bands": [{"nodata": NODATA, "data_type": "uint8", "unit": "percent",
                                            "spatial_resolution": PIXEL_DEG}]},
        ))
        if quality_names is not None and quality_names[k]:
            item.add_asset("input_quality", pystac.Asset(
                href=quality_names[k], media_type=pystac.MediaType.COG, roles=["metadata"],
                title="input quality (bit flags: 1 Sentinel-2, 2 Sentinel-1, 4 terrain; 255 not mapped)",
                extra_fields={"raster:bands": [{"nodata": NODATA, "data_type": "uint8",
                                                "spatial_resolution": PIXEL_DEG}]},
            ))
        coll.add_item(item)
    return coll


def export_cogs(
    product: str | ProductStore,
    out: str,
    *,
    year: int,
    aoi: AOI | None = None,
    workers: int = 2,
) -> CogsResult:
    """Write one COG per written cell of ``year`` (within ``aoi``), a VRT and a STAC collection."""
    import pystac
    from pystac.layout import TemplateLayoutStrategy

    from gum_ray.store.cog import export_cog
    from gum_ray.store.tiles import written_cells

    p = product if isinstance(product, ProductStore) else ProductStore.open(product)
    p.year_index(year)
    cells = _cells_in(written_cells(p, year), aoi)
    if not cells:
        raise InputError(f"the product {p.root} has no written cells for {year}"
                         + (" within the bbox" if aoi is not None else "") + ": nothing to export")
    out = fs.normalize(out)
    if not fs.is_remote(out) and os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output {out} is a file; --cogs writes a folder")
    year_dir = fs.join(out, str(year))
    have = set(fs.list_names(fs.join(year_dir, "cogs")))
    todo = [c for c in cells if f"{c.id}.tif" not in have]

    def one(cell: Cell) -> None:
        # the quality COG first: a cell's P(urban) COG existing means both are complete (resume)
        export_cog(p, fs.join(year_dir, "cogs", f"{cell.id}.tif"), year=year, aoi=AOI.from_bbox(*cell.bounds),
                   quality_out=fs.join(year_dir, "quality", f"{cell.id}.tif"))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, todo))
    # the VRT and the collection cover every COG of the year in the folder (earlier runs too)
    grid = p.grid
    all_cells = sorted(
        {grid.cell_from_id(n[:-4]) for n in fs.list_names(fs.join(year_dir, "cogs")) if n.endswith(".tif")},
        key=lambda c: (c.row, c.col),
    )
    names = [f"cogs/{c.id}.tif" for c in all_cells]
    vrt_name = f"gum_{year}.vrt"
    have_q = set(fs.list_names(fs.join(year_dir, "quality")))
    q_names = [f"quality/{c.id}.tif" if f"{c.id}.tif" in have_q else None for c in all_cells]
    with tempfile.TemporaryDirectory(prefix="gum-cogs-") as tmp:
        (Path(tmp) / vrt_name).write_text(vrt_xml(year, all_cells, names), encoding="utf-8")
        if any(q_names):
            q_cells = [c for c, q in zip(all_cells, q_names) if q]
            (Path(tmp) / f"gum_{year}_quality.vrt").write_text(
                vrt_xml(year, q_cells, [q for q in q_names if q], "input quality (bit flags)"), encoding="utf-8")
        coll = stac_collection(year, all_cells, [f"../{n}" for n in names], vrt_name, p.root,
                               [f"../{q}" if q else None for q in q_names])
        # items in items/<item id>.json, their assets relative to them (../cogs/...)
        coll.normalize_hrefs(tmp, strategy=TemplateLayoutStrategy(item_template="items"))
        coll.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
        for f in sorted(Path(tmp).rglob("*")):
            if f.is_file():
                fs.write_bytes(fs.join(year_dir, *f.relative_to(tmp).parts), f.read_bytes())
    return CogsResult(out=out, year=year, cells=len(cells), written=len(todo), skipped=len(cells) - len(todo),
                      vrt=fs.join(year_dir, vrt_name), collection=fs.join(year_dir, "collection.json"))

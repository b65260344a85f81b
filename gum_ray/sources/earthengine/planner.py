"""The request planner: one request per modality and tile, each within Earth Engine's limits.

A request is at most 48 MiB as Earth Engine counts it (band bytes plus one mask byte per band) and
at most 32768 px a side; :func:`plan_tiles` cuts a grid into such tiles, :func:`split_window` halves
a tile whose request failed for size, memory or time.
"""

from __future__ import annotations

import math

from gum_ray.errors import InputError

MAX_REQUEST_BYTES = 48 * 1024 * 1024  # Earth Engine's computePixels limit: 50331648 bytes
MAX_GRID_SIDE = 32768  # Earth Engine's limit on a request's width and height, and ours on a grid

Window = tuple[int, int, int, int]  # row0, row1, col0, col1


def check_grid_size(height: int, width: int, *, max_side: int = MAX_GRID_SIDE) -> None:
    """Reject grids the source will not fetch in one go (more than ``max_side`` px a side)."""
    if height <= 0 or width <= 0:
        raise InputError(
            f"Earth Engine source: the grid is empty ({width} x {height} px); give an area of interest "
            "with west < east and south < north"
        )
    if height > max_side or width > max_side:
        raise InputError(
            f"Earth Engine source: the grid is {width} x {height} px, over the {max_side} px a side "
            f"that one fetch (and one Earth Engine request) allows; split the area into cells "
            f"(e.g. the product's 0.25-degree cells) or fetch a coarser grid"
        )


def plan_tiles(
    height: int,
    width: int,
    bytes_per_pixel: int,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_side: int = MAX_GRID_SIDE,
    tile_side: int | None = None,
) -> list[Window]:
    """Cover a ``height x width`` grid with the fewest balanced tiles that each fit one request.

    A tile holds at most ``max_request_bytes // bytes_per_pixel`` pixels (``bytes_per_pixel`` as
    Earth Engine counts it, mask bytes included) and at most ``max_side`` (or ``tile_side``) px a
    side. Tiles do not overlap and cover the grid exactly.
    """
    check_grid_size(height, width)
    if bytes_per_pixel <= 0:
        raise ValueError("bytes_per_pixel must be positive")
    max_px = max_request_bytes // bytes_per_pixel
    if max_px < 1:
        raise InputError(
            f"Earth Engine source: max_request_bytes={max_request_bytes} cannot hold one pixel "
            f"({bytes_per_pixel} bytes); raise it (Earth Engine allows {MAX_REQUEST_BYTES})"
        )
    side = max(1, min(max_side, MAX_GRID_SIDE, tile_side or MAX_GRID_SIDE))
    if height * width <= max_px and height <= side and width <= side:
        return [(0, height, 0, width)]
    s = max(1, min(side, math.isqrt(max_px)))
    if height <= s:
        th, tw = height, min(width, side, max_px // height)
    elif width <= s:
        tw, th = width, min(height, side, max_px // width)
    else:
        th = tw = s
    nx, ny = math.ceil(width / tw), math.ceil(height / th)
    tw, th = math.ceil(width / nx), math.ceil(height / ny)
    assert th * tw <= max_px and th <= side and tw <= side
    return [
        (r, min(r + th, height), c, min(c + tw, width))
        for r in range(0, height, th)
        for c in range(0, width, tw)
    ]


def split_window(win: Window) -> list[Window]:
    """Two halves of a window, cut across its longer side (one pixel cannot be split)."""
    r0, r1, c0, c1 = win
    h, w = r1 - r0, c1 - c0
    if h <= 1 and w <= 1:
        return []
    if w >= h:
        m = c0 + w // 2
        return [(r0, r1, c0, m), (r0, r1, m, c1)]
    m = r0 + h // 2
    return [(r0, m, c0, c1), (m, r1, c0, c1)]

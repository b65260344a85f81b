"""The band contract: the GUM export layout and the model input (DESIGN.md "Band contract").

The GUM Earth Engine export stacks 11 bands (14 with the built-up products)::

    B4 B3 B2 B8 | VV_ascending VH_ascending VV_descending VH_descending | elevation slope aspect
    [| worldcover_built gisa_2019 wsf_2019]

The model sees 10 channels (13 with products), made exactly as the seed notebook does:

1. every NaN and +-inf becomes 0 (so a missing Sentinel-1 value is 0 dB, which becomes 1.0 below,
   the same as Earth Engine's constant-0 fallback for an empty pass: the trained model expects it);
2. Sentinel-2 reflectance clipped to [0, 1];
3. Sentinel-1 dB clipped to [-25, 0], then (x + 25) / 25;
4. elevation dropped; slope / 90 and aspect / 360, each clipped to [0, 1];
5. the three product bands (0/1) appended unchanged for the 13-channel model.

A pixel with no Sentinel-2 value (any of the four S2 bands NaN in the export) is "no data" in the
output: the network would otherwise predict on zeros.

:func:`preprocess`, :func:`validity_mask` and :func:`decode_compact` take numpy arrays or torch
tensors (on any device) and return the same kind, with identical values: the arithmetic is written
once with operations both share (``.clip``, ``-``, :func:`true_div`) and a few helpers
(:func:`finite_or_zero`, :func:`empty_float32`, :func:`constant`) that another model family's
preprocessing uses the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gum_ray.errors import InputError

S2_BANDS = ("B4", "B3", "B2", "B8")
S1_BANDS = ("VV_ascending", "VH_ascending", "VV_descending", "VH_descending")
TERRAIN_BANDS = ("elevation", "slope", "aspect")
PRODUCT_BANDS = ("worldcover_built", "gisa_2019", "wsf_2019")

EXPORT_BANDS = S2_BANDS + S1_BANDS + TERRAIN_BANDS  # 11 bands
EXPORT_BANDS_WITH_PRODUCTS = EXPORT_BANDS + PRODUCT_BANDS  # 14 bands

MODEL_CHANNELS = 10
MODEL_CHANNELS_WITH_PRODUCTS = 13

S2_SLICE = slice(0, 4)
S1_SLICE = slice(4, 8)
ELEVATION = 8
SLOPE = 9
ASPECT = 10
PRODUCT_SLICE = slice(11, 14)

S1_MIN_DB = -25.0
S1_MAX_DB = 0.0

# Compact integer encodings used by the Earth Engine source and the imagery cache
# (DESIGN.md decision 5): reflectance x 10000 as uint16, dB x 100 as int16, terrain as int16
# (elevation in m, slope and aspect in centi-degrees; aspect offset by -180 deg so 0-360 fits
# int16), products as uint8.
COMPACT_ENCODING_VERSION = 2  # 2: aspect offset by -180 deg (1 clipped aspect above 327.67 deg)
S2_SCALE = 10000.0
S1_SCALE = 100.0
SLOPE_ASPECT_SCALE = 100.0
_TERRAIN_SCALES = np.array([1.0, SLOPE_ASPECT_SCALE, SLOPE_ASPECT_SCALE], np.float32)[:, None, None]
_TERRAIN_OFFSETS = np.array([0.0, 0.0, -180.0], np.float32)[:, None, None]


def export_band_names(with_products: bool) -> tuple[str, ...]:
    return EXPORT_BANDS_WITH_PRODUCTS if with_products else EXPORT_BANDS


def model_channels(with_products: bool) -> int:
    return MODEL_CHANNELS_WITH_PRODUCTS if with_products else MODEL_CHANNELS


def with_products_for_band_count(count: int, *, source: str = "input") -> bool:
    """Whether an export with ``count`` bands carries the product bands (11 -> no, 14 -> yes)."""
    if count == len(EXPORT_BANDS):
        return False
    if count == len(EXPORT_BANDS_WITH_PRODUCTS):
        return True
    raise InputError(
        f"{source}: has {count} bands; a GUM export has 11 (B4 B3 B2 B8, S1 VV/VH ascending and "
        f"descending, elevation slope aspect) or 14 (plus the three built-up products). "
        f"Export it with the GUM recipe (or gum-ray's Earth Engine source)."
    )


def validity_mask(export):
    """True where the pixel has Sentinel-2 data (all four S2 bands finite). Shape (H, W).

    ``export``: a numpy array or a torch tensor; the mask is of the same kind.
    """
    if _is_numpy(export):
        return np.isfinite(export[S2_SLICE]).all(axis=0)
    import torch

    return torch.isfinite(export[S2_SLICE]).all(dim=0)


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def finite_or_zero(x):
    """``x`` with every NaN, +inf and -inf set to 0 (a numpy array or a torch tensor, kept as such)."""
    if _is_numpy(x):
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    import torch

    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def finite(x):
    """Elementwise "is finite" of ``x`` (a numpy array or a torch tensor, the result of the same kind)."""
    if _is_numpy(x):
        return np.isfinite(x)
    import torch

    return torch.isfinite(x)


def empty_float32(like, shape: tuple[int, ...]):
    """An uninitialised float32 array of ``shape`` of ``like``'s kind (numpy, or torch on its device)."""
    if _is_numpy(like):
        return np.empty(shape, dtype=np.float32)
    import torch

    return like.new_empty(shape, dtype=torch.float32)


def constant(like, values) -> "np.ndarray | Any":
    """Per-band constants ``values`` as a float32 (n, 1, 1) array of ``like``'s kind (numpy, or a
    tensor on its device), to broadcast against (n, H, W) bands: e.g. a family's vmin / vmax."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
    if _is_numpy(like):
        return arr
    import torch

    return torch.from_numpy(arr).to(like.device)


def _float32(x):
    if _is_numpy(x):
        return x.astype(np.float32, copy=False)
    import torch

    return x.to(torch.float32)


def true_div(x, d: float):
    """``x / d`` in float32, correctly rounded on every device.

    (CUDA divides by a host scalar as a multiplication by its reciprocal, 1 ulp off; dividing by
    a tensor on the device is a true division, as numpy's and the CPU's.)
    """
    if _is_numpy(x) or x.device.type == "cpu":
        return x / d
    import torch

    return x / torch.tensor(d, dtype=x.dtype, device=x.device)


def _check_export(export, with_products: bool | None) -> bool:
    if export.ndim != 3:
        raise InputError(f"expected an array (bands, height, width), got shape {tuple(export.shape)}")
    has_products = with_products_for_band_count(export.shape[0])
    if with_products is None:
        with_products = has_products
    if with_products and not has_products:
        raise InputError(
            "the 13-channel (with products) model needs a 14-band export; this one has 11 bands. "
            "Use the 10-channel checkpoint, or export the three built-up products too."
        )
    return with_products


def preprocess(export, *, with_products: bool | None = None, out=None):
    """GUM export (11 or 14, H, W) -> model input (10 or 13, H, W) float32, the notebook's way.

    ``export`` is a numpy array or a torch tensor (on any device); the result is of the same kind,
    on the same device, and the values are identical either way (the same IEEE float32 operations:
    clip, subtract, divide). ``out``, if given, receives the result (same kind, right shape).
    ``with_products`` defaults to what the band count says; asking for products from an 11-band
    export is an error.
    """
    with_products = _check_export(export, with_products)
    x = finite_or_zero(_float32(export))
    if out is None:
        out = empty_float32(x, (model_channels(with_products),) + tuple(x.shape[1:]))
    out[0:4] = x[S2_SLICE].clip(0.0, 1.0)
    out[4:8] = true_div(x[S1_SLICE].clip(S1_MIN_DB, S1_MAX_DB) - S1_MIN_DB, S1_MAX_DB - S1_MIN_DB)
    out[8] = true_div(x[SLOPE], 90.0).clip(0.0, 1.0)
    out[9] = true_div(x[ASPECT], 360.0).clip(0.0, 1.0)
    if with_products:
        out[10:13] = x[PRODUCT_SLICE]
    return out


def encode_compact(export: np.ndarray) -> dict[str, np.ndarray]:
    """GUM export floats -> compact integer arrays per modality (the imagery cache and EE wire format).

    NaN is kept apart as a validity mask per modality (uint8 0/1, the "mask byte").
    Returns keys ``s2`` (uint16), ``s1`` (int16), ``terrain`` (int16), and ``products`` (uint8)
    when present, plus ``s2_mask``, ``s1_mask``, ``terrain_mask``.
    """
    x = export.astype(np.float32, copy=False)
    out: dict[str, np.ndarray] = {}
    s2 = x[S2_SLICE]
    out["s2_mask"] = np.isfinite(s2).astype(np.uint8)
    out["s2"] = np.clip(np.rint(np.nan_to_num(s2) * S2_SCALE), 0, 65535).astype(np.uint16)
    s1 = x[S1_SLICE]
    out["s1_mask"] = np.isfinite(s1).astype(np.uint8)
    out["s1"] = np.clip(np.rint(np.nan_to_num(s1) * S1_SCALE), -32768, 32767).astype(np.int16)
    t = x[ELEVATION : ASPECT + 1]
    out["terrain_mask"] = np.isfinite(t).astype(np.uint8)
    t = (np.nan_to_num(t) + _TERRAIN_OFFSETS) * _TERRAIN_SCALES
    out["terrain"] = np.clip(np.rint(t), -32768, 32767).astype(np.int16)
    if x.shape[0] == len(EXPORT_BANDS_WITH_PRODUCTS):
        out["products"] = np.nan_to_num(x[PRODUCT_SLICE]).astype(np.uint8)
    return out


#: GUM 1's model channels by the compact band each comes from, ``(part, band)``: its preprocessing
#: is per band (each channel a function of one export band), so a table over every code of that
#: band gives the channel (:func:`code_tables`). 10 channels, then the 3 products.
GUM1_CHANNEL_SOURCES = (("s2", 0), ("s2", 1), ("s2", 2), ("s2", 3), ("s1", 0), ("s1", 1), ("s1", 2),
                        ("s1", 3), ("terrain", 1), ("terrain", 2), ("products", 0), ("products", 1),
                        ("products", 2))

#: a code table's length: entry ``TABLE_HALF * present + code`` (+ 32768 for the int16 parts)
TABLE_HALF = 65536
INT16_OFFSET = 32768  # int16 codes (s1, terrain) start at table entry 0 after this shift
# the compact parts as encode_compact writes them: (bands, dtype)
_PARTS: dict[str, tuple[int, type]] = {"s2": (len(S2_BANDS), np.uint16), "s1": (len(S1_BANDS), np.int16),
          "terrain": (len(TERRAIN_BANDS), np.int16), "products": (len(PRODUCT_BANDS), np.uint8)}


#: the compact parts whose codes are int16 (their table entries start at code + INT16_OFFSET)
INT16_PARTS = tuple(p for p, (_, dtype) in _PARTS.items() if dtype == np.int16)


def code_index(code, present=None, out=None):
    """The table entry of each compact ``code`` (a torch tensor of a part's band), given its mask
    byte ``present`` (None for the mask-less products): int32, ``TABLE_HALF * present + code`` with
    int16 codes offset to start at 0, in ``out`` if given (int32, ``code``'s shape). ``present``
    must be 0/1, as the cache and the EE source write it."""
    import torch

    i = code.to(torch.int32) if out is None else out.copy_(code)
    offset = INT16_OFFSET if code.dtype == torch.int16 else 0
    if present is None:
        return i.add_(TABLE_HALF + offset)
    i.add_(present, alpha=TABLE_HALF)
    return i.add_(offset) if offset else i


def code_tables(preprocess, sources) -> np.ndarray:
    """(C, 2 * TABLE_HALF) float32: per model channel ``c``, the value ``preprocess`` gives for every
    code of its band ``sources[c]`` (a compact part and band), absent (first half) and present
    (second half), found by running :func:`decode_compact` and ``preprocess`` on probes of every
    code: a lookup then equals them bit for bit. Checked: each channel must not change when every
    other band does (a family whose preprocessing mixes bands cannot use tables: ValueError)."""
    n = 2 * TABLE_HALF
    codes = np.arange(n) % TABLE_HALF

    def probe(fill: int) -> np.ndarray:
        parts: dict[str, np.ndarray] = {}
        for part, (bands_, dtype) in _PARTS.items():
            parts[part] = np.full((bands_, 1, n), fill, dtype)
            if part != "products":
                parts[part + "_mask"] = np.full((bands_, 1, n), fill % 2, np.uint8)
        if not any(p == "products" for p, _ in sources):
            del parts["products"]
        out = np.empty((len(sources), n), np.float32)
        for c, (part, band) in enumerate(sources):
            own = {k: v.copy() for k, v in parts.items()}
            if part == "products":
                own[part][band, 0] = (codes % 256).astype(np.uint8)
            else:
                offset = INT16_OFFSET if own[part].dtype == np.int16 else 0
                own[part][band, 0] = (codes - offset).astype(own[part].dtype)
                own[part + "_mask"][band, 0] = np.arange(n) >= TABLE_HALF
            out[c] = preprocess(decode_compact(own))[c, 0]
        return out

    a, b = probe(0), probe(1)
    if not np.array_equal(a, b, equal_nan=True):
        raise ValueError("this preprocessing mixes bands: a channel changed with another band's value")
    return a


def decode_compact(parts: dict, rows: slice | None = None):
    """Inverse of :func:`encode_compact`: float32 GUM export, NaN where a mask says missing.

    ``parts`` hold numpy arrays or torch tensors (on one device); the export is of the same kind.
    ``rows``: decode only these rows (a cell is decoded in row blocks that stay in cache).
    """
    rows = rows if rows is not None else slice(None)
    first = parts["s2"]
    if _is_numpy(first):
        nan = np.float32(np.nan)

        def where(mask, x):
            return np.where(mask != 0, x, nan)
    else:
        import torch

        nan = torch.tensor(float("nan"), device=first.device)

        def where(mask, x):
            return torch.where(mask != 0, x, nan)

    n = 14 if "products" in parts else 11
    h = len(range(*rows.indices(first.shape[1])))
    out = empty_float32(first, (n, h, first.shape[2]))
    out[S2_SLICE] = where(parts["s2_mask"][:, rows], true_div(_float32(parts["s2"][:, rows]), S2_SCALE))
    out[S1_SLICE] = where(parts["s1_mask"][:, rows], true_div(_float32(parts["s1"][:, rows]), S1_SCALE))
    scales, offsets = _TERRAIN_SCALES, _TERRAIN_OFFSETS
    if not _is_numpy(first):
        scales, offsets = (torch.from_numpy(a).to(first.device) for a in (scales, offsets))
    t = _float32(parts["terrain"][:, rows]) / scales - offsets
    out[ELEVATION : ASPECT + 1] = where(parts["terrain_mask"][:, rows], t)
    if "products" in parts:
        out[PRODUCT_SLICE] = _float32(parts["products"][:, rows])
    return out

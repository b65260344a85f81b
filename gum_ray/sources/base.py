"""The imagery source contract: a grid and a year in, the GUM export layout out.

Every source (the synthetic world, Earth Engine, a folder of GeoTIFF exports) answers the same
question: *for this target grid and this year, what does the GUM export look like?* The grid is an
odc-geo :class:`~odc.geo.geobox.GeoBox` (CRS, affine transform, shape), the one grid type used
across gum-ray. The answer is an :class:`~gum_ray.imagery.Imagery`: a float32
``(bands, height, width)`` array in the band order of :mod:`gum_ray.bands` (11 bands, or 14 with the
built-up products) with NaN where a value is missing, a validity mask per modality, and a
provenance record.

Besides fetching, a source answers what its callers would otherwise branch on its name for:

* :meth:`ImagerySource.may_hold_data` - can this area hold data at all (the planner skips cells
  that cannot, e.g. the synthetic world's ocean);
* :attr:`ImagerySource.default_checkpoint` - the checkpoint to use when none is given (``"demo"``
  for the synthetic world, None = the user must give one);
* :attr:`ImagerySource.with_products` - whether it carries the three built-up product bands;
* :meth:`ImagerySource.request_limit` - a driver-side resource: the cap on requests in flight that
  a job must share among all its workers (the job owns the limiter, :mod:`gum_ray.mapping.limits`,
  and hands it to every copy of the source with :meth:`ImagerySource.use_limiter`).

Options are a frozen, typed dataclass per source (:class:`SourceOptions` and its subclasses),
parsed once at the edge by :func:`parse_options` (strings from the command line converted to each
field's type, unknown options refused).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as _dt
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
from odc.geo.geobox import GeoBox

from gum_ray.errors import InputError
from gum_ray.imagery import (  # noqa: F401 - re-exported: the source contract's vocabulary
    MODALITY_BANDS,
    MODALITY_SLICES,
    Imagery,
    masks_from_export,
    modalities,
)

#: First year with Sentinel-2 surface reflectance (COPERNICUS/S2_SR_HARMONIZED) over the globe.
MIN_YEAR = 2017

def max_year() -> int:
    """The latest year a source can be asked for: the current (UTC) calendar year."""
    return _dt.datetime.now(_dt.timezone.utc).year


def check_year(year: Any, *, source: str = "imagery source") -> int:
    """Validate a mapping year: an integer from 2017 (first Sentinel-2 SR year) to this year."""
    try:
        y = int(year)
    except (TypeError, ValueError):
        raise InputError(f"{source}: year {year!r} is not a year; give a calendar year such as 2021") from None
    if y != year and not (isinstance(year, str) and year.strip().isdigit()):
        raise InputError(f"{source}: year {year!r} is not a whole year; give a calendar year such as 2021")
    if y < MIN_YEAR:
        raise InputError(
            f"{source}: year {y} is before {MIN_YEAR}, the first year of Sentinel-2 surface reflectance "
            f"(COPERNICUS/S2_SR_HARMONIZED) that the GUM recipe needs; choose a year from {MIN_YEAR} "
            f"to {max_year()}"
        )
    if y > max_year():
        raise InputError(
            f"{source}: year {y} is in the future; choose a year from {MIN_YEAR} to {max_year()}"
        )
    return y


def check_geobox(geobox: Any, *, source: str = "imagery source") -> GeoBox:
    """Validate a target grid: an odc-geo GeoBox with a CRS and at least one pixel."""
    if not isinstance(geobox, GeoBox):
        raise InputError(
            f"{source}: the target grid must be an odc.geo.geobox.GeoBox, got {type(geobox).__name__}; "
            "build one with GeoBox.from_bbox(bbox, crs, resolution=...)"
        )
    if geobox.crs is None:
        raise InputError(f"{source}: the target grid has no CRS; give the GeoBox a CRS (e.g. 'EPSG:32632')")
    h, w = geobox.shape
    if h <= 0 or w <= 0:
        raise InputError(
            f"{source}: the area of interest is empty (target grid {w} x {h} px); give a bounding box with "
            "west < east and south < north, at least one pixel wide"
        )
    a = geobox.affine
    if not all(np.isfinite([a.a, a.b, a.c, a.d, a.e, a.f])) or a.a * a.e - a.b * a.d == 0:
        raise InputError(f"{source}: the target grid's transform {tuple(a)[:6]} is degenerate; fix the GeoBox")
    return geobox


class RequestLimit(NamedTuple):
    """A cap on a source's requests in flight that all fetches of a job share.

    Attributes:
        cap: requests in flight at most.
        scope: ``process`` (threads of one process), ``cluster`` (every worker of a Ray cluster) or
            ``auto`` (cluster when running inside Ray, else process).
        name: what the cap is for (one limiter per name and cap).
    """

    cap: int
    scope: str = "auto"
    name: str = "source"


@dataclasses.dataclass(frozen=True)
class SourceOptions:
    """Options every source takes; each source extends this with its own (frozen, typed).

    Attributes:
        with_products: fetch the three built-up product bands too (14-band export).
    """

    with_products: bool = False

    #: option names whose values are secrets: never in :meth:`public`, a manifest or a log
    SECRETS: ClassVar[frozenset[str]] = frozenset()

    def public(self) -> dict[str, Any]:
        """The options less the secrets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.SECRETS}


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}


def _coerce(value: str, hint: Any) -> Any:
    """A command-line string as the type ``hint`` declares (bool, int, float, str, optional)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] or [hint]
    low = value.strip().lower()
    if optional and low == "none":
        return None
    kind = kinds[0] if len(kinds) == 1 else Any
    if kind is bool:
        if low not in _TRUE | _FALSE:
            raise ValueError(value)
        return low in _TRUE
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return value


def parse_options(cls: type[SourceOptions], source: str, raw: Mapping[str, Any]) -> SourceOptions:
    """``raw`` options (values may be strings, ``KEY=VALUE`` on a command line) as ``cls``.

    Raises:
        InputError: an unknown option, or a value that is not of the option's type.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise InputError(
                f"imagery source {source!r}: bad options: {key!r} is not an option; its options are "
                f"{', '.join(names)}",
                param="source_options",
            )
        if isinstance(value, str):
            try:
                value = _coerce(value, hints[key])
            except ValueError:
                kind = getattr(hints[key], "__name__", str(hints[key]))
                raise InputError(
                    f"imagery source {source!r}: option {key}={value!r} is not a valid {kind}",
                    param="source_options",
                ) from None
        values[key] = value
    return cls(**values)


class ImagerySource(abc.ABC):
    """Where imagery comes from. Subclasses set :attr:`Options` and implement :meth:`_fetch`.

    ``fetch`` validates the grid and the year and returns an :class:`Imagery` on exactly that grid.
    Sources are cheap to construct and safe to pickle (Ray ships them to workers); connections are
    opened lazily on the first fetch. Construct one from keyword options (``SyntheticSource(
    with_products=True)``) or from its options object (``SyntheticSource(SyntheticOptions())``).
    """

    #: short name used by :func:`gum_ray.sources.get_source` and in provenance records
    name: str = "source"
    #: the options dataclass of this source
    Options: ClassVar[type[SourceOptions]] = SourceOptions
    #: the checkpoint used when none is given ("demo": the demo model), None: one must be given
    default_checkpoint: ClassVar[str | None] = None

    def __init__(self, options: SourceOptions | None = None, /, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give an options object or keyword options, not both")
        if options is None:
            options = parse_options(self.Options, self.name, kwargs)
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.limiter: Any = None

    @property
    def with_products(self) -> bool:
        """Whether this source carries the three built-up product bands (a 14-band export)."""
        return self.options.with_products

    def fetch(self, geobox: GeoBox, year: int) -> Imagery:
        """Imagery for ``geobox`` in calendar year ``year`` (GUM export layout, NaN = missing).

        Raises:
            InputError: the grid or the year is not one a source can serve.
        """
        geobox = check_geobox(geobox, source=f"{self.name} source")
        year = check_year(year, source=f"{self.name} source")
        imagery = self._fetch(geobox, year)
        if tuple(imagery.geobox.shape) != tuple(geobox.shape):
            raise RuntimeError(f"{self.name} source returned a grid of the wrong shape")
        return imagery

    @abc.abstractmethod
    def _fetch(self, geobox: GeoBox, year: int) -> Imagery:
        """Fetch for a validated grid and year."""

    def may_hold_data(self, bounds: tuple[float, float, float, float]) -> bool:
        """Whether the lon/lat box (west, south, east, north) can hold data; True unless known empty."""
        return True

    def request_limit(self) -> RequestLimit | None:
        """The cap on requests in flight that all fetches of a job must share, or None (no cap).

        A job that runs the source on many workers (or threads) makes one limiter for it
        (:func:`gum_ray.mapping.limits.limiter_for`) and gives it to every copy of the source with
        :meth:`use_limiter`; without one, a source caps only its own fetch.
        """
        return None

    def use_limiter(self, limiter: Any) -> None:
        """Share ``limiter`` (``acquire() -> token``, ``release(token)``) for this source's requests."""
        self.limiter = limiter

    def cache_identity(self) -> dict[str, Any]:
        """Provenance values an imagery-cache entry must hold to be reused by this source.

        The cache is keyed by (year, cell); an entry fetched with settings that change the pixels
        (the synthetic world's clouds) does not match and is fetched again. Empty by default.
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """Settings that identify this source (for manifests); never secrets."""
        return {"source": self.name, **self.options.public()}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["limiter"] = None  # runtime state: the job re-installs it where the source lands
        return state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "source")
        return f"{type(self).__name__}({args})"

"""The manifest: one create-only commit marker per (year, cell) (DESIGN.md decision 7).

Layout under the product root::

    _manifest/<year>/<cell_id>.json                        commit marker: the cell is done
    _manifest/failed/<year>/<cell_id>/<run_id>-attempt-<n>.json   one record per failed attempt
    _manifest/overviews/<year>/<level>/<shard_id>.json     an overview shard is built over n cells

Failures count per run: a cell's attempts are those of one run (the run id is in the record's
name, so counting is a listing, never a read), so a cell set aside by one run gets
``max_attempts`` fresh tries in the next. (``attempt-<n>.json`` without a run id: older records,
counted as one run.)

A cell is done when its marker exists. The marker is written **after** the cell's data, with a
create-only write (a conditional upload on GCS, a hard link locally), so it needs no lock and a
second writer of the same cell simply finds it there. A process killed between data and marker
leaves a cell without a marker: a rerun writes the (identical) data again and commits it.

Overview shards have markers too (:meth:`Manifest.commit_overview`), written after the shard and
holding how many committed cells lay under it then: a shard is **stale** (to build) when more cells
under it are committed now than its marker counts, or it has no marker
(:meth:`Manifest.stale_overviews`). So a run that died after committing its cells but before its
pyramid leaves stale shards, ``gum status`` reports them and the next run builds them.

Resume lists markers with one listing per year (:meth:`Manifest.done`). Failures are counted per
cell; after a bounded number of attempts the run sets the cell aside (:meth:`Manifest.set_aside`).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from gum_ray.version import __version__
from gum_ray.errors import InputError
from gum_ray.grid import Cell, ProductGrid
from gum_ray.store import fs

MANIFEST_DIR = "_manifest"
FAILED_DIR = "failed"
OVERVIEW_DIR = "overviews"
MARKER_VERSION = 1
DEFAULT_MAX_ATTEMPTS = 3
_ATTEMPT = re.compile(r"^(?:(?P<run>[A-Za-z0-9_]+)-)?attempt-(?P<n>\d+)\.json$")
_CELL = re.compile(r"^r(\d+)c(\d+)$")
_SHARD = re.compile(r"^r(\d+)c(\d+)\.json$")


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds, for markers."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (_dt.date, _dt.datetime)):
        return obj.isoformat()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


@dataclass(frozen=True)
class FailureRecord:
    """One failed attempt at a cell."""

    year: int
    cell_id: str
    attempt: int
    error: str
    error_type: str
    time: str
    record: dict[str, Any]


class Manifest:
    """Commit markers and failure records of one product (``<root>/_manifest``)."""

    def __init__(self, product_root: str, grid: ProductGrid | None = None):
        self.product_root = fs.normalize(product_root)
        self.root = fs.join(self.product_root, MANIFEST_DIR)
        self.grid = grid

    # ---- paths

    def marker_path(self, year: int, cell: Cell | str) -> str:
        return fs.join(self.root, str(int(year)), f"{_cell_id(cell)}.json")

    def _failed_dir(self, year: int, cell: Cell | str | None = None) -> str:
        parts = [FAILED_DIR, str(int(year))] + ([_cell_id(cell)] if cell is not None else [])
        return fs.join(self.root, *parts)

    # ---- commit markers

    def commit(
        self,
        year: int,
        cell: Cell,
        *,
        checkpoint_sha256: str | None,
        settings: Mapping[str, Any],
        source: str,
        source_dates: tuple[str, str] | list[str] | None,
        counts: Mapping[str, int],
        times: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write the commit marker of (year, cell) after its data; True if written now.

        False means a marker was already there (the cell was committed before, by this run or
        another): not an error. ``times`` holds stage timestamps or durations (``started``,
        ``fetched``, ``predicted``, ``written`` ...); ``committed`` is added.
        """
        record = {
            "marker_version": MARKER_VERSION,
            "year": int(year),
            "cell_id": cell.id,
            "row": cell.row,
            "col": cell.col,
            "bounds": list(cell.bounds),
            "grid": cell.grid.to_attrs(),
            "checkpoint_sha256": checkpoint_sha256,
            "settings": dict(settings),
            "source": {"name": source, "dates": list(source_dates) if source_dates else None},
            "software": {"gum_ray": __version__, "python": platform.python_version()},
            "host": socket.gethostname(),
            "times": {**dict(times or {}), "committed": utc_now()},
            "counts": dict(counts),
            **dict(extra or {}),
        }
        data = json.dumps(_jsonable(record), indent=1, sort_keys=True).encode()
        return fs.create_only(self.marker_path(year, cell), data)

    def is_done(self, year: int, cell: Cell | str) -> bool:
        return fs.exists(self.marker_path(year, cell))

    def marker(self, year: int, cell: Cell | str) -> dict[str, Any] | None:
        """The commit marker of (year, cell), or None if the cell is not committed."""
        try:
            return json.loads(fs.read_bytes(self.marker_path(year, cell)))
        except FileNotFoundError:
            return None

    def done(self, year: int) -> set[str]:
        """Ids of the committed cells of ``year`` (one listing)."""
        names = fs.list_names(fs.join(self.root, str(int(year))))
        return {n[:-5] for n in names if n.endswith(".json")}

    def years(self) -> list[int]:
        """Years that have at least one commit marker."""
        return sorted(int(n) for n in fs.list_names(self.root) if n.isdigit())

    def pending(self, year: int, cells: Iterable[Cell]) -> list[Cell]:
        """``cells`` minus those committed for ``year``: what a resumed run still has to do."""
        done = self.done(year)
        return [c for c in cells if c.id not in done]

    # ---- overview shards

    def _overview_dir(self, year: int, level: int) -> str:
        return fs.join(self.root, OVERVIEW_DIR, str(int(year)), str(int(level)))

    def commit_overview(self, year: int, level: int, row: int, col: int, cells: int,
                        extra: Mapping[str, Any] | None = None) -> None:
        """Record that overview shard (level, row, col) of ``year`` was built over ``cells`` cells.

        Overwrites: a rebuild over more cells replaces the record.
        """
        record = {"year": int(year), "level": int(level), "row": int(row), "col": int(col),
                  "cells": int(cells), "built": utc_now(), "host": socket.gethostname(), **dict(extra or {})}
        fs.write_bytes(fs.join(self._overview_dir(year, level), f"r{row:05d}c{col:05d}.json"),
                       json.dumps(_jsonable(record), sort_keys=True).encode())

    def overview_counts(self, year: int, level: int) -> dict[tuple[int, int], int]:
        """Cells counted by each built overview shard of (year, level) (one listing, one read each)."""
        base = self._overview_dir(year, level)
        out: dict[tuple[int, int], int] = {}
        for name in fs.list_names(base):
            m = _SHARD.match(name)
            if m:
                rec = json.loads(fs.read_bytes(fs.join(base, name)))
                out[(int(m.group(1)), int(m.group(2)))] = int(rec.get("cells", 0))
        return out

    def stale_overviews(self, year: int, levels: int) -> dict[int, dict[tuple[int, int], int]]:
        """Per level 1..``levels``: the overview shards of ``year`` to (re)build, with their cell counts.

        A shard is needed where any cell under it is committed; it is stale when its marker is
        missing or counts fewer committed cells than there are now.
        """
        under: dict[int, dict[tuple[int, int], int]] = {lv: {} for lv in range(1, levels + 1)}
        for cid in self.done(year):
            m = _CELL.match(cid)
            if not m:
                continue
            r, c = int(m.group(1)), int(m.group(2))
            for lv in under:
                key = (r >> lv, c >> lv)
                under[lv][key] = under[lv].get(key, 0) + 1
        out: dict[int, dict[tuple[int, int], int]] = {}
        for lv, need in under.items():
            built = self.overview_counts(year, lv) if need else {}
            out[lv] = {k: n for k, n in need.items() if built.get(k, -1) < n}
        return out

    # ---- failures

    def record_failure(
        self,
        year: int,
        cell: Cell,
        error: BaseException | str,
        *,
        extra: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> int:
        """Record a failed attempt at (year, cell) by run ``run_id``; returns its attempt number in
        that run (1, 2, ...).

        Each attempt is its own create-only object, so concurrent recorders never overwrite
        each other.
        """
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            etype = type(error).__name__
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-8000:]
        else:
            message, etype, tb = str(error), "str", ""
        if run_id is not None and not re.match(r"^[A-Za-z0-9_]+$", run_id):
            raise InputError(f"run id {run_id!r}: letters, digits and _ only")
        attempt = self.attempts(year, cell, run_id) + 1
        prefix = f"{run_id}-" if run_id else ""
        while True:
            record = {
                "year": int(year),
                "cell_id": cell.id,
                "attempt": attempt,
                "run_id": run_id,
                "error": message,
                "error_type": etype,
                "traceback": tb,
                "time": utc_now(),
                "host": socket.gethostname(),
                "software": {"gum_ray": __version__},
                **dict(extra or {}),
            }
            path = fs.join(self._failed_dir(year, cell), f"{prefix}attempt-{attempt}.json")
            if fs.create_only(path, json.dumps(_jsonable(record), indent=1).encode()):
                return attempt
            attempt += 1

    def attempts(self, year: int, cell: Cell | str, run_id: str | None = None) -> int:
        """Failed attempts recorded for (year, cell) by run ``run_id`` (None: the records without a
        run id)."""
        return sum(1 for n in fs.list_names(self._failed_dir(year, cell))
                   if (m := _ATTEMPT.match(n)) and m["run"] == run_id)

    def failures(self, year: int) -> dict[str, list[FailureRecord]]:
        """Failure records of ``year`` by cell id, attempts in order (one recursive listing)."""
        base = self._failed_dir(year)
        out: dict[str, list[FailureRecord]] = {}
        for rel in fs.find(base):
            parts = rel.split("/")
            if len(parts) != 2 or not _ATTEMPT.match(parts[1]):
                continue
            rec = json.loads(fs.read_bytes(fs.join(base, *parts)))
            out.setdefault(parts[0], []).append(
                FailureRecord(
                    year=int(year),
                    cell_id=parts[0],
                    attempt=int(rec.get("attempt", 0)),
                    error=rec.get("error", ""),
                    error_type=rec.get("error_type", ""),
                    time=rec.get("time", ""),
                    record=rec,
                )
            )
        for recs in out.values():
            recs.sort(key=lambda r: (r.time, r.attempt))
        return out

    def failure_counts(self, year: int) -> dict[str, int]:
        """Failed attempts per cell id for ``year``: of the run that failed it most often (failures
        do not carry over between runs); one recursive listing, no reads."""
        per_run: dict[tuple[str, str | None], int] = {}
        for rel in fs.find(self._failed_dir(year)):
            parts = rel.split("/")
            if len(parts) == 2 and (m := _ATTEMPT.match(parts[1])):
                key = (parts[0], m["run"])
                per_run[key] = per_run.get(key, 0) + 1
        counts: dict[str, int] = {}
        for (cid, _), n in per_run.items():
            counts[cid] = max(counts.get(cid, 0), n)
        return counts

    def set_aside_errors(self, year: int, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict[str, str]:
        """The last error of each cell of ``year`` set aside (not committed): one listing, then one
        read per set-aside cell (not one per failure record)."""
        done = self.done(year)
        last: dict[str, tuple[int, str]] = {}
        per_run: dict[tuple[str, str | None], int] = {}
        for rel in fs.find(self._failed_dir(year)):
            parts = rel.split("/")
            if len(parts) == 2 and (m := _ATTEMPT.match(parts[1])) and parts[0] not in done:
                key = (parts[0], m["run"])
                per_run[key] = per_run.get(key, 0) + 1
                if per_run[key] >= max_attempts and int(m["n"]) >= last.get(parts[0], (0, ""))[0]:
                    last[parts[0]] = (int(m["n"]), rel)
        out = {}
        for cid, (_, rel) in sorted(last.items()):
            try:
                out[cid] = json.loads(fs.read_bytes(fs.join(self._failed_dir(year), rel))).get("error", "")
            except (FileNotFoundError, ValueError):
                out[cid] = ""
        return out

    def set_aside(self, year: int, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> set[str]:
        """Cells of ``year`` that failed ``max_attempts`` times or more and are not committed."""
        done = self.done(year)
        return {c for c, n in self.failure_counts(year).items() if n >= max_attempts and c not in done}

    def status(self, year: int, cells: Iterable[Cell] | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict[str, int]:
        """Counts for ``year``: done, failed (set aside), retrying, and pending (of ``cells``)."""
        done = self.done(year)
        fails = self.failure_counts(year)
        aside = {c for c, n in fails.items() if n >= max_attempts and c not in done}
        retrying = {c for c, n in fails.items() if n < max_attempts and c not in done}
        out = {"done": len(done), "set_aside": len(aside), "retrying": len(retrying)}
        if cells is not None:
            ids = {c.id for c in cells}
            out["total"] = len(ids)
            out["done"] = len(ids & done)
            out["set_aside"] = len(ids & aside)
            out["retrying"] = len(ids & retrying)
            out["pending"] = len(ids - done - aside)
        return out


def _cell_id(cell: Cell | str) -> str:
    if isinstance(cell, Cell):
        return cell.id
    if not re.match(r"^r\d+c\d+$", str(cell)):
        raise InputError(f"cell id {cell!r}: expected 'r<row>c<col>'")
    return str(cell)


def write_and_commit(
    product: Any,
    manifest: Manifest,
    year: int,
    cell: Cell,
    probability: np.ndarray,
    *,
    checkpoint_sha256: str | None,
    settings: Mapping[str, Any],
    source: str,
    source_dates: tuple[str, str] | list[str] | None,
    times: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    quality: np.ndarray | None = None,
) -> tuple[Any, bool]:
    """The write stage's protocol: write the cell's data (P(urban), and the input quality when
    given), then its commit marker.

    Returns ``(CellWriteResult, committed_now)``. Safe to repeat: the data write is idempotent and
    the marker create-only.
    """
    started = utc_now()
    result = product.write_cell(year, cell, probability, quality)
    t = {"write_started": started, "write_seconds": round(result.seconds, 4), **dict(times or {})}
    committed = manifest.commit(
        year,
        cell,
        checkpoint_sha256=checkpoint_sha256,
        settings=settings,
        source=source,
        source_dates=source_dates,
        counts={**result.counts(), "empty": int(result.empty)},
        times=t,
        extra={"shard_key": None if result.empty else result.shard_key, **dict(extra or {})},
    )
    return result, committed

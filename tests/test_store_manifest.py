"""Commit markers and failure records, on a local folder and on gs:// (fake-gcs-server)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from gum_ray.errors import InputError
from gum_ray.grid import ProductGrid
from gum_ray.store import fs
from gum_ray.store.manifest import Manifest

GRID = ProductGrid(cell_deg=0.01, chunk_px=40)
CELL = GRID.cell_at(13.41, 52.51)


def commit(m: Manifest, year: int, cell=CELL, **kw) -> bool:
    args = dict(
        checkpoint_sha256="ab" * 32, settings={"stride": 192, "precision": "bf16"}, source="synthetic",
        source_dates=("2020-01-01", "2021-01-01"), counts={"valid_px": 14400, "urban_px": 12},
        times={"fetched": "2026-01-01T00:00:00Z"},
    )
    args.update(kw)
    return m.commit(year, cell, **args)


def test_marker_is_create_only_with_provenance(store_root):
    m = Manifest(store_root)
    assert not m.is_done(2020, CELL) and m.marker(2020, CELL) is None
    assert commit(m, 2020) is True
    assert commit(m, 2020, checkpoint_sha256="cd" * 32) is False  # already done: not an error
    rec = m.marker(2020, CELL)
    assert rec["checkpoint_sha256"] == "ab" * 32  # the first marker stays
    assert rec["cell_id"] == CELL.id and (rec["row"], rec["col"]) == (CELL.row, CELL.col)
    assert rec["source"] == {"name": "synthetic", "dates": ["2020-01-01", "2021-01-01"]}
    assert rec["settings"]["stride"] == 192 and rec["counts"]["urban_px"] == 12
    assert rec["software"]["gum_ray"] and rec["times"]["committed"] and rec["times"]["fetched"]
    assert rec["grid"]["cell_px"] == 120 and rec["bounds"] == list(CELL.bounds)
    raw = fs.read_bytes(fs.join(store_root, "_manifest", "2020", f"{CELL.id}.json"))
    assert json.loads(raw) == rec
    assert m.is_done(2020, CELL) and not m.is_done(2021, CELL)


def test_listing_for_resume(store_root):
    m = Manifest(store_root)
    cells = [GRID.cell(CELL.row, CELL.col + i) for i in range(25)]
    for c in cells[::2]:
        commit(m, 2020, c)
    commit(m, 2021, cells[0])
    assert m.done(2020) == {c.id for c in cells[::2]}
    assert m.done(2019) == set()
    assert m.years() == [2020, 2021]
    assert m.pending(2020, cells) == cells[1::2]
    m.record_failure(2020, cells[1], RuntimeError("x"))  # failures do not count as done
    assert m.done(2020) == {c.id for c in cells[::2]} and m.years() == [2020, 2021]


def test_concurrent_commits_of_one_cell_make_one_marker(store_root):
    m = Manifest(store_root)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: commit(m, 2020, counts={"k": k}), range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert fs.list_names(fs.join(store_root, "_manifest", "2020")) == [f"{CELL.id}.json"]


def test_failures_are_counted_and_set_aside(store_root):
    m = Manifest(store_root)
    other = GRID.cell(CELL.row + 1, CELL.col)
    try:
        raise ValueError("Earth Engine said: quota")
    except ValueError as exc:
        assert m.record_failure(2020, CELL, exc, extra={"stage": "fetch"}) == 1
    assert m.record_failure(2020, CELL, "timeout") == 2
    assert m.record_failure(2020, other, "oom") == 1
    assert m.attempts(2020, CELL) == 2 and m.attempts(2020, other) == 1 and m.attempts(2021, CELL) == 0
    fails = m.failures(2020)
    assert [f.attempt for f in fails[CELL.id]] == [1, 2]
    first = fails[CELL.id][0]
    assert first.error == "ValueError: Earth Engine said: quota" and first.error_type == "ValueError"
    assert "Traceback" in first.record["traceback"] and first.record["stage"] == "fetch"
    assert m.failure_counts(2020) == {CELL.id: 2, other.id: 1}
    assert m.set_aside(2020, max_attempts=2) == {CELL.id}
    st = m.status(2020, [CELL, other, GRID.cell(0, 0)], max_attempts=2)
    assert st == {"done": 0, "set_aside": 1, "retrying": 1, "total": 3, "pending": 2}
    commit(m, 2020, other)  # a retry that succeeded
    st = m.status(2020, [CELL, other], max_attempts=2)
    assert st["done"] == 1 and st["retrying"] == 0 and st["set_aside"] == 1
    # concurrent recorders never overwrite each other
    with ThreadPoolExecutor(4) as pool:
        attempts = list(pool.map(lambda k: m.record_failure(2021, CELL, f"e{k}"), range(4)))
    assert sorted(attempts) == [1, 2, 3, 4]


def test_failure_counts_do_not_carry_over_between_runs(store_root):
    m = Manifest(store_root)
    for _ in range(3):
        m.record_failure(2020, CELL, "quota", run_id="run1")  # set aside by the first run
    assert m.attempts(2020, CELL, "run1") == 3 and m.attempts(2020, CELL, "run2") == 0
    assert m.set_aside(2020, max_attempts=3) == {CELL.id}
    # the next run starts the count again: one failure does not set the cell aside
    assert m.record_failure(2020, CELL, "quota", run_id="run2", extra={"stage": "predict"}) == 1
    assert m.failure_counts(2020) == {CELL.id: 3}
    assert m.set_aside_errors(2020, max_attempts=3) == {CELL.id: "quota"}
    commit(m, 2020)  # the second run maps it
    assert m.set_aside(2020, max_attempts=3) == set() and m.set_aside_errors(2020, 3) == {}


def test_bad_cell_id(store_root):
    with pytest.raises(InputError):
        Manifest(store_root).is_done(2020, "12/34")

"""The fenced lease (DESIGN.md 14): one writer per product, on local disk and on gs:// (the emulator).

Scenarios: a paused holder that wakes after another run took over (its heartbeat is refused, it
stops and never writes again), release by a stale holder, simultaneous takeover (exactly one wins),
two runs adding different years to one new product at once (no year lost), a client clock 30 s off
(judged on the store's clock), and a holder process gone on this host (taken over at once).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gum_ray.errors import GumError
from gum_ray.mapping.lease import LeaseLost, RunLease, assert_lease_held, read_lease
from gum_ray.store import fs, versioned
from tests.helpers import REPO


def _product(store_root: str) -> str:
    return fs.join(store_root, "p.zarr")


def _wait_expired(product: str, ttl_s: float, margin_s: float = 1.5, limit_s: float = 120) -> None:
    """Wait (on the monotonic clock) until the lease is older than its TTL on the store's clock."""
    deadline = time.monotonic() + limit_s
    while read_lease(product)["age_s"] <= ttl_s + margin_s:
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.5)


# ------------------------------------------------------------------------------------ the CAS object


def test_conditional_write_one_winner_per_generation(store_root):
    path = fs.join(store_root, "_manifest", "cas.json")
    assert versioned.read(path) is None
    first = versioned.write(path, b"first", 0)
    assert first is not None and versioned.write(path, b"again", 0) is None  # create-only
    # eight writers replace the same generation at once: exactly one succeeds
    barrier = threading.Barrier(8)

    def attempt(i: int):
        barrier.wait()
        return versioned.write(path, f"writer {i}".encode(), first.generation)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(8)))
    won = [r for r in results if r is not None]
    assert len(won) == 1
    now = versioned.read(path)
    assert now.data == won[0].data and now.generation == won[0].generation != first.generation
    # a writer that read long ago (two generations back) is refused, and the object is unchanged
    newer = versioned.write(path, b"newer", now.generation)
    assert versioned.write(path, b"stale", first.generation) is None
    assert versioned.write(path, b"stale", now.generation) is None
    assert versioned.read(path).data == b"newer" and versioned.read(path).generation == newer.generation


# ------------------------------------------------------------------------------------ pause / wake

HOLDER = r"""
import os, signal, sys, time
from gum_ray.mapping.lease import LeaseLost, RunLease, assert_lease_held
from gum_ray.store import fs

product, ttl = sys.argv[1], float(sys.argv[2])
lease = RunLease(product, ttl)
lease.acquire()
lease.start_heartbeat()
print("acquired", lease.run_id, lease.generation, flush=True)
i = 0
try:
    while True:  # the driver loop: check the lease, then a lease-checked write
        lease.beat()
        assert_lease_held(product, lease.run_id, lease.generation)
        fs.create_only(fs.join(product, "writes", f"{lease.run_id}-{i:04d}"), b"x")
        i += 1
        if i == 3:
            os.kill(os.getpid(), signal.SIGSTOP)  # paused (a stalled VM, a long GC) right here
        time.sleep(0.1)
except LeaseLost as exc:
    print("stopped:", exc, flush=True)
    deadline = time.monotonic() + 60
    while not lease.lost and time.monotonic() < deadline:  # the heartbeat thread's next beat
        time.sleep(0.1)
    print("heartbeat refused" if lease.lost else "heartbeat not refused", flush=True)
    lease.release()
    sys.exit(5)
"""


def test_paused_holder_wakes_after_takeover_is_refused_and_stops(store_root):
    product = _product(store_root)
    ttl = 4.0
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, product, str(ttl)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # until it has paused itself
        assert os.WIFSTOPPED(status), proc.stdout.read()
        first = read_lease(product)
        assert first["state"] == "held" and first["generation"] == 1
        writes_before = fs.list_names(fs.join(product, "writes"))
        assert len(writes_before) == 3
        # the paused holder is alive but silent: refused while fresh, taken over once expired
        with pytest.raises(GumError, match="another run"):
            RunLease(product, 30).acquire()
        _wait_expired(product, ttl)
        second = RunLease(product, 30)
        second.acquire()
        assert second.generation == 2
        taken = read_lease(product)
        os.kill(proc.pid, signal.SIGCONT)  # the first run wakes up
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert proc.returncode == 5, out
    assert "stopped:" in out and ("no longer holds the lease" in out or "lost the lease" in out), out
    assert "heartbeat refused" in out, out
    # it never wrote again: not the lease (still the second run's, same object generation) ...
    now = read_lease(product)
    assert now["run_id"] == second.run_id and now["generation"] == 2 and now["state"] == "held"
    assert now["object_generation"] == taken["object_generation"]
    # ... nor data
    assert fs.list_names(fs.join(product, "writes")) == writes_before
    second.beat_now()  # the new holder's heartbeat goes on
    assert_lease_held(product, second.run_id, 2)
    second.release()


def test_refused_heartbeat_in_process(store_root):
    product = _product(store_root)
    first = RunLease(product, ttl_s=2.0)
    first.acquire()
    _wait_expired(product, 2.0)
    second = RunLease(product, ttl_s=30)
    second.acquire()
    with pytest.raises(LeaseLost, match="took it over"):
        first.beat_now()
    with pytest.raises(LeaseLost):  # and the driver loop's check raises from now on
        first.beat()
    with pytest.raises(LeaseLost, match="generation 2"):
        assert_lease_held(product, first.run_id, 1)
    assert read_lease(product)["run_id"] == second.run_id
    assert_lease_held(product, second.run_id, 2)


# ------------------------------------------------------------------------------------ release


def test_release_by_a_stale_holder_leaves_the_new_lease(store_root):
    product = _product(store_root)
    stale = RunLease(product, ttl_s=2.0)
    stale.acquire()
    _wait_expired(product, 2.0)
    holder = RunLease(product, ttl_s=30)
    holder.acquire()
    before = read_lease(product)
    stale.release()  # the stale run finishes and releases "its" lease
    after = read_lease(product)
    assert after["object_generation"] == before["object_generation"]  # nothing written
    assert after["run_id"] == holder.run_id and after["state"] == "held"
    assert_lease_held(product, holder.run_id, 2)
    holder.beat_now()
    with pytest.raises(GumError, match="another run"):
        RunLease(product, 30).acquire()
    holder.release()  # the holder's own release frees it: the next run takes generation 3
    assert read_lease(product)["state"] == "released"
    nxt = RunLease(product, 30)
    nxt.acquire()
    assert nxt.generation == 3
    nxt.release()


# ------------------------------------------------------------------------------------ takeover race


@pytest.mark.parametrize("expired", [True, False], ids=["expired-lease", "no-lease"])
def test_simultaneous_takeover_exactly_one_wins(store_root, expired):
    product = _product(store_root)
    if expired:
        RunLease(product, ttl_s=2.0).acquire()
        _wait_expired(product, 2.0)
    n = 8
    runs = [RunLease(product, ttl_s=60) for _ in range(n)]
    barrier = threading.Barrier(n)

    def take(lease: RunLease):
        barrier.wait()
        try:
            lease.acquire()
            return None
        except GumError as exc:
            return str(exc)

    with ThreadPoolExecutor(n) as pool:
        errors = list(pool.map(take, runs))
    winners = [r for r, e in zip(runs, errors) if e is None]
    assert len(winners) == 1, errors
    assert all("another run" in e for e in errors if e is not None), errors
    lease = read_lease(product)
    assert lease["run_id"] == winners[0].run_id and lease["generation"] == (2 if expired else 1)
    for r, e in zip(runs, errors):
        if e is not None:
            r.release()  # a loser writes nothing
            with pytest.raises(LeaseLost):
                assert_lease_held(product, r.run_id, r.generation)
    assert read_lease(product)["object_generation"] == lease["object_generation"]
    winners[0].beat_now()


# ------------------------------------------------------------------------------------ clock skew


@pytest.mark.parametrize("skew_s", [30.0, -30.0])
def test_clock_skew_of_30_s_judges_by_the_store(store_root, monkeypatch, skew_s):
    fresh_product = fs.join(store_root, "fresh.zarr")
    stale_product = fs.join(store_root, "stale.zarr")
    holder = RunLease(fresh_product, ttl_s=60)  # written with a true clock
    holder.acquire()
    dead = RunLease(stale_product, ttl_s=3)
    dead.acquire()
    expired_at = time.monotonic() + 3 + 2  # 2 s of margin, on a clock no skew touches
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew_s)  # this client's clock is off
    # a fresh lease is neither taken over nor judged stale
    with pytest.raises(GumError, match="another run"):
        RunLease(fresh_product, ttl_s=60).acquire()
    assert_lease_held(fresh_product, holder.run_id, 1)
    assert read_lease(fresh_product)["age_s"] < 30
    holder.beat_now()  # the holder itself, on the skewed clock
    # an expired lease is not refused
    time.sleep(max(0.0, expired_at - time.monotonic()))
    with pytest.raises(LeaseLost):
        assert_lease_held(stale_product, dead.run_id, 1)
    taker = RunLease(stale_product, ttl_s=60)
    taker.acquire()
    assert taker.generation == 2
    assert_lease_held(stale_product, taker.run_id, 2)


# ------------------------------------------------------------------------------------ holder gone


def test_holder_process_gone_on_this_host_is_taken_over_at_once(store_root):
    product = _product(store_root)
    code = ("import sys; from gum_ray.mapping.lease import RunLease; "
            "l = RunLease(sys.argv[1], 600); l.acquire(); print(l.run_id)")
    r = subprocess.run([sys.executable, "-c", code, product], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lease = read_lease(product)
    assert lease["run_id"] == r.stdout.strip() and lease["age_s"] < 600  # fresh, its process gone
    taker = RunLease(product, ttl_s=60)
    taker.acquire()
    assert taker.generation == 2
    # a live holder on this host (this process) is not taken over
    with pytest.raises(GumError, match="another run"):
        RunLease(product, ttl_s=60).acquire()


# ------------------------------------------------------------------------------------ years


def test_refused_run_creates_no_product_and_adds_no_year(store_root, tmp_path, capsys):
    from gum_ray.cli import main
    from gum_ray.grid import ProductGrid
    from gum_ray.model import ModelSpec, random_checkpoint
    from gum_ray.store.product import ProductSettings, ProductStore

    ckpt = tmp_path / "tiny.pth"
    random_checkpoint(ckpt, ModelSpec(10, 8, 4), seed=1)
    product = _product(store_root)
    other = RunLease(product, ttl_s=600)  # another run (alive: this process) holds it
    other.acquire()
    args = ["map", "--bbox", "8.571", "47.371", "8.579", "47.379", "--cell-deg", "0.01",
            "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview", "--checkpoint", str(ckpt),
            "--product", product, "--cache", str(tmp_path / "cache")]
    assert main([*args, "--year", "2020"]) != 0
    err = capsys.readouterr().err
    assert "another run" in err
    assert not fs.exists(fs.join(product, "zarr.json"))  # not created outside the lease
    other.release()
    ProductStore.create(product, settings=ProductSettings(grid=ProductGrid(cell_deg=0.01, chunk_px=40)),
                        years=[2020])
    other = RunLease(product, ttl_s=600)
    other.acquire()
    assert main([*args, "--year", "2021"]) != 0
    assert "another run" in capsys.readouterr().err
    assert ProductStore.open(product).years == [2020]  # no year added outside the lease
    other.release()


@pytest.mark.slow
def test_two_years_added_at_once_no_year_lost(store_root, tmp_path):
    """Two `gum map` runs for different years start on one new product at the same moment, on one
    Ray cluster: the one without the lease is refused before it changes anything, and succeeds when
    run again; both years are there afterwards, each with its cell committed."""
    from gum_ray.grid import ProductGrid, cells_for_aoi, parse_aoi
    from gum_ray.model import ModelSpec, random_checkpoint
    from gum_ray.store.manifest import Manifest
    from gum_ray.store.product import NODATA, ProductStore
    from tests.raycluster import ray_head

    ckpt = tmp_path / "tiny.pth"
    random_checkpoint(ckpt, ModelSpec(10, 8, 4), seed=1)
    product = _product(store_root)
    bbox = (8.571, 47.371, 8.579, 47.379)  # one 0.01-degree cell

    def gum_map(year: int, address: str, env: dict) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "gum_ray.cli", "map", "--bbox", *map(str, bbox), "--year", str(year),
             "--cell-deg", "0.01", "--chunk-px", "40", "--halo", "32", "--quiet", "--no-preview",
             "--checkpoint", str(ckpt), "--product", product, "--cache", str(tmp_path / "cache"),
             "--ray-address", address],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    with ray_head() as (address, _, env):
        env = {**env, "STORAGE_EMULATOR_HOST": os.environ.get("STORAGE_EMULATOR_HOST", "")}
        runs = {year: gum_map(year, address, env) for year in (2020, 2021)}
        outs = {year: p.communicate(timeout=900)[0] for year, p in runs.items()}
        codes = {year: p.returncode for year, p in runs.items()}
        assert 0 in codes.values(), outs
        for year in (2020, 2021):
            if codes[year] != 0:  # refused with one line, then run again once the first is done
                assert "another run" in outs[year] and "is writing this product" in outs[year], outs[year]
                again = gum_map(year, address, env)
                out = again.communicate(timeout=900)[0]
                assert again.returncode == 0, out
    store = ProductStore.open(product)
    assert sorted(store.years) == [2020, 2021]
    (cell,) = cells_for_aoi(parse_aoi(bbox=bbox), ProductGrid(cell_deg=0.01, chunk_px=40))
    manifest = Manifest(product)
    for year in (2020, 2021):
        marker = manifest.marker(year, cell)
        assert marker is not None and marker["lease_generation"] >= 1
        assert (store.read_cell(year, cell) != NODATA).any()  # data, not just the fill value


def test_a_beat_whose_answer_was_lost_is_not_a_lost_lease(store_root, monkeypatch):
    """A heartbeat that landed but whose answer never came (a reset connection) must not make the
    next beat look refused: the run still holds the lease."""
    product = _product(store_root)
    lease = RunLease(product, ttl_s=60)
    lease.acquire()
    real_write = versioned.write
    lost_answers = []

    def write_then_lose_the_answer(path, data, if_generation):
        done = real_write(path, data, if_generation)
        if not lost_answers:
            lost_answers.append(done)
            raise ConnectionResetError("the answer was lost")
        return done

    monkeypatch.setattr(versioned, "write", write_then_lose_the_answer)
    with pytest.raises(ConnectionResetError):
        lease.beat_now()
    assert lost_answers[0] is not None  # it did land
    lease.beat_now()  # not LeaseLost
    assert_lease_held(product, lease.run_id, 1)
    lease.release()
    assert read_lease(product)["state"] == "released"

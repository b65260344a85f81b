"""fs.read_object: a cache object received on the calling thread. For gs:// each thread has its own
event loop and HTTP session, so a model actor's reader threads receive and decrypt at once instead
of queueing on fsspec's one IO thread (tools/bench_gcs_read.py)."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import threading

import pytest

from gum_ray.store import fs


def test_read_object_equals_read_bytes_on_both_backends(store_root):
    blobs = {f"o{i}": os.urandom(100_000 * i + 7) for i in range(3)}
    for name, data in blobs.items():
        fs.write_bytes(fs.join(store_root, name), data)
    for name, data in blobs.items():
        assert fs.read_object(fs.join(store_root, name)) == data == fs.read_bytes(fs.join(store_root, name))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # threads at once, each its own session
        got = list(pool.map(lambda n: fs.read_object(fs.join(store_root, n)), list(blobs) * 2))
    assert got == list(blobs.values()) * 2
    with pytest.raises(FileNotFoundError):
        fs.read_object(fs.join(store_root, "absent"))


def test_reader_threads_do_not_queue_on_fsspec_s_io_thread(gcs_emulator):
    """fsspec's IO thread held busy: objects still arrive on the readers' own loops (through the
    IO thread they would wait for it, and this test would time out)."""
    import fsspec.asyn

    root = f"gs://gum-test/read-object-{os.getpid()}"
    fs.write_bytes(fs.join(root, "a"), b"x" * 50_000)
    release, held = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(60)

    fsspec.asyn.get_loop().call_soon_threadsafe(hold)
    assert held.wait(10)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            reads = [pool.submit(fs.read_object, fs.join(root, "a")) for _ in range(4)]
            assert [r.result(timeout=30) for r in reads] == [b"x" * 50_000] * 4
        shared = concurrent.futures.ThreadPoolExecutor(1)
        late = shared.submit(fs.read_bytes, fs.join(root, "a"))
        with pytest.raises(concurrent.futures.TimeoutError):  # the shared way waits for the IO thread
            late.result(timeout=1)
    finally:
        release.set()
    assert late.result(timeout=30) == b"x" * 50_000
    shared.shutdown()


def test_a_thread_s_session_is_per_emulator_and_closed_with_the_thread(gcs_emulator, monkeypatch):
    from gum_ray.store.fs import _ThreadGCS

    root = f"gs://gum-test/read-object-close-{os.getpid()}"
    fs.write_bytes(fs.join(root, "a"), b"abc")

    def in_thread():
        assert fs.read_object(fs.join(root, "a")) == b"abc"
        first = _ThreadGCS.of_this_thread()
        assert _ThreadGCS.of_this_thread() is first  # kept for the thread's next reads
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator + "/")  # another address: another session
        other = _ThreadGCS.of_this_thread()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
        assert other is not first
        return first.loop, other.loop

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loops = pool.submit(in_thread).result()
    gc.collect()
    assert all(loop.is_closed() for loop in loops)

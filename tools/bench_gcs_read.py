#!/usr/bin/env python
"""Host cost of reading a cached cell from ``gs://``: the HTTPS receive and its TLS decryption,
per crop, on 1..N reader threads, through fsspec's one IO thread against each thread's own loop.

A cached cell of the default grid (the synthetic world, or the real Aberystwyth scene mirrored, as
``tools/bench_host.py`` builds it) is written to fake-gcs-server speaking HTTPS (TLS 1.3, a
certificate made for the run), and its objects are read whole, as a model actor's reader threads
read them, in two ways:

  shared loop   ``fs.read_bytes``: gcsfs's synchronous API, which runs every call of the
                process on fsspec's one IO thread (what the shard reader did before)
  own loop      ``fs.read_object``: each reader thread receives on an event loop and HTTP session
                of its own (what the shard reader does)

Per way and thread count it prints the wall time per crop (cells read at once by the threads),
this process's CPU time per crop (the receive, the decryption, gcsfs) and how busy its busiest
thread was (CPU time over wall time, from /proc): the shared loop's IO thread does all the
receiving, so where it is busy all the time, more reader threads cannot read faster. The
emulator runs in another process on the same cores, so on a 2-core machine the wall times of
several threads are bounded by it, not a measure of a GPU node. Local disk, for scale:
``bench_host``'s "read".

    .venv/bin/python tools/bench_gcs_read.py [--synthetic] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (one run's) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process (Linux: /proc/self/task), by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", action="store_true", help="the synthetic world's cell, not the real scene")
    ap.add_argument("--fill", choices=("mirrored", "tiled"), default="mirrored",
                    help="how the real scene fills the cell (tools/bench_host.py --fill)")
    ap.add_argument("--image", default=str(REPO.parent / "shared" / "realdata" / "aberystwyth_2021-05-27_gum11.tif"))
    ap.add_argument("--threads", type=int, default=2, help="reader threads, 1..N")
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_gcs_read_"))
    cert, key = certificate(tmp)
    # before gcsfs and aiohttp make their TLS contexts: trust the run's certificate
    os.environ["SSL_CERT_FILE"] = str(cert)
    from tests.gcs import binary_path, free_port

    port = free_port()
    url = f"https://127.0.0.1:{port}"
    server = subprocess.Popen([str(binary_path()), "-scheme", "https", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-cert-location", str(cert),
                               "-private-key-location", str(key), "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1, context=context).close()
                break
            except OSError:
                time.sleep(0.05)
        req = urllib.request.Request(f"{url}/storage/v1/b?project=bench", data=json.dumps({"name": "bench"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=5, context=context).close()
        os.environ["STORAGE_EMULATOR_HOST"] = url
        return measure(args)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args) -> int:
    from gum_ray import bands
    from gum_ray.devices import one_malloc_arena

    one_malloc_arena()  # as a model actor beside a GPU, before its reader threads start
    from gum_ray.grid import DEFAULT_GRID, DEFAULT_HALO_PX
    from gum_ray.store import fs
    from gum_ray.store.cache import ImageryCache
    from gum_ray.tiling import crop_count

    cell = DEFAULT_GRID.cell_at(-4.08, 52.41)
    gbox = cell.utm_geobox(DEFAULT_HALO_PX)
    h, w = gbox.shape.y, gbox.shape.x
    if args.synthetic:
        from gum_ray.sources import get_source

        export = get_source("synthetic").fetch(gbox, 2021).export
    else:
        from bench_host import scene_cell

        from gum_ray.export_io import open_export

        with open_export(args.image) as src:
            scene = src.read_rows(0, src.height)
        export = scene_cell(scene, h, w, args.fill)
    cache = ImageryCache("gs://bench/cache")
    cache.put_compact(2021, cell, bands.encode_compact(export), gbox, {})
    del export
    path = cache.path(2021, cell)
    objects = [fs.join(path, name, "c", "0", "0", "0") for name in fs.list_names(path)
               if fs.exists(fs.join(path, name, "c", "0", "0", "0"))]
    crops = crop_count(h, w, 192)
    nbytes = sum(len(fs.read_bytes(o)) for o in objects)
    print(f"# bench_gcs_read  {datetime.datetime.now():%Y-%m-%d %H:%M}  cell {cell.id} ({'synthetic world' if args.synthetic else 'real scene ' + args.fill}): "
          f"{len(objects)} objects, {nbytes / 1e6:.1f} MB, {crops} crops at stride 192; fake-gcs-server over HTTPS "
          f"(TLS 1.3) on loopback, {os.cpu_count()} cores")
    print(f"{'way':<12} {'threads':>7} {'wall ms/crop':>13} {'CPU ms/crop':>12} {'MB/s':>8} {'busiest thread':>15}")
    for way, read in (("shared loop", fs.read_bytes), ("own loop", fs.read_object)):
        for k in range(1, args.threads + 1):
            with concurrent.futures.ThreadPoolExecutor(k) as pool:
                def cell_read(_):
                    for o in objects:
                        read(o)

                list(pool.map(cell_read, range(k)))  # connections and sessions made
                best = (float("inf"), float("inf"), 0.0)
                for _ in range(args.repeats):
                    before = thread_cpu()
                    c0, t0 = time.process_time(), time.perf_counter()
                    list(pool.map(cell_read, range(2 * k)))
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    after = thread_cpu()
                    busiest = max(after[t] - before.get(t, 0.0) for t in after)
                    best = min(best, (wall, cpu, busiest / wall))
            wall, cpu, busy = best
            print(f"{way:<12} {k:>7} {wall * 1e3 / (2 * k * crops):>13.3f} {cpu * 1e3 / (2 * k * crops):>12.3f} "
                  f"{2 * k * nbytes / wall / 1e6:>8.0f} {busy:>14.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

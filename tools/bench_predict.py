#!/usr/bin/env python
"""Whole process, as a user runs it: the seed notebook's path against ``gum predict``, interleaved.

Each round runs, as separate processes on the same image and the same (random) GUM weights:

  seed       ``tools/seed_predict.py``: the notebook's path (mmseg ``test_step``, 256/256, batch 1)
  defaults   ``gum predict IMAGE OUT --checkpoint CKPT`` (stride 192, Hann, precision auto)
  seed-set.  ``gum predict ... --seed-settings`` (stride 256, logits averaged, fp32): its classes are
             compared with the seed's (0 px may differ, DESIGN decision 4)

and reports per path the median wall time, user and system CPU seconds, minor page faults and peak
RSS, and the speed against the seed path's. ``--avx2`` runs every process with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``: an AVX2-only CPU
(no AVX-512, no bf16), emulated (oneDNN's convolutions, ATen's kernels and MKL's matrix products).
``--paths`` may add ``no-winograd`` (the defaults with ``--winograd off``).

    .venv/bin/python tools/bench_predict.py [--avx2] [--rounds 2] [--image X.tif]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_IMAGE = REPO.parent / "shared" / "realdata" / "aberystwyth_2021-05-27_gum11.tif"
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "minflt": ru.ru_minflt,
            "rss": ru.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--avx2", action="store_true", help="emulate an AVX2-only CPU (oneDNN, ATen and MKL ISA caps)")
    ap.add_argument("--paths", default="seed,defaults,seed-settings")
    args = ap.parse_args()

    import rasterio

    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    ckpt = tmp / "gum_random.pth"
    config = str(REPO / "gum_ray" / "configs" / "gum_unet_psp.py")
    # the weights are made in a child process: this one stays small, so a child's peak RSS (which
    # counts the image forked before exec) is its own
    subprocess.run([sys.executable, "-c", (
        "import sys; from gum_ray import bands; from gum_ray.export_io import open_export; "
        "from gum_ray.model import GUM_10, random_checkpoint; src = open_export(sys.argv[1]); "
        "random_checkpoint(sys.argv[2], GUM_10, seed=11, calibrate_on=bands.preprocess(src.read_rows(0, src.height)))"),
        args.image, str(ckpt)], check=True, cwd=REPO, capture_output=True)
    env = dict(os.environ, **(AVX2_ENV if args.avx2 else {}))
    py = sys.executable
    gum = [py, "-m", "gum_ray.cli", "predict", args.image]
    cmds = {
        "seed": [py, str(REPO / "tools" / "seed_predict.py"), args.image, str(tmp / "seed.tif"),
                 config, str(ckpt)],
        "defaults": gum + [str(tmp / "defaults.tif"), "--checkpoint", str(ckpt), "--overwrite", "--quiet"],
        "no-winograd": gum + [str(tmp / "nowino.tif"), "--checkpoint", str(ckpt), "--overwrite", "--quiet",
                              "--winograd", "off"],
        "seed-settings": gum + [str(tmp / "seedset.tif"), "--checkpoint", str(ckpt), "--overwrite", "--quiet",
                                "--seed-settings"],
    }
    paths = args.paths.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for p in paths:
            runs[p].append(timed(cmds[p], env))
    check = "-"
    if "seed" in paths and "seed-settings" in paths:
        with rasterio.open(tmp / "seed.tif") as a, rasterio.open(tmp / "seedset.tif") as b:
            ref, got = a.read(1), b.read(2)
            mapped = got != 255  # gum-ray's no data: pixels without Sentinel-2 (the seed predicts on zeros)
            check = (f"{int((ref != got)[mapped].sum())} px differ from the seed's classes "
                     f"(of {int(mapped.sum())} mapped; {int((~mapped).sum())} px without Sentinel-2 are no data)")
    load = os.getloadavg()
    print(f"# bench_predict  {time.strftime('%Y-%m-%d %H:%M')}  {'AVX2-only (emulated: ' + ' '.join(f'{k}={v}' for k, v in AVX2_ENV.items()) + ')' if args.avx2 else 'native ISA'}"
          f"  image {Path(args.image).name}  rounds {args.rounds} (median)  load {load[0]:.2f} {load[1]:.2f}")
    print(f"{'path':<16} {'wall s':>7} {'x seed':>7} {'user s':>7} {'sys s':>6} {'minflt':>9} {'peak RSS MiB':>13} {'x seed':>7}")
    med = {p: {k: statistics.median(r[k] for r in runs[p]) for k in runs[p][0]} for p in paths}
    base = med.get("seed")
    for p in paths:
        m = med[p]
        sx = f"{base['wall'] / m['wall']:.2f}" if base else "-"
        rx = f"{m['rss'] / base['rss']:.2f}" if base else "-"
        walls = "/".join(f"{r['wall']:.1f}" for r in runs[p])
        print(f"{p:<16} {m['wall']:>7.1f} {sx:>7} {m['user']:>7.1f} {m['sys']:>6.1f} {m['minflt']:>9.0f} "
              f"{m['rss']:>13.0f} {rx:>7}   (walls {walls})")
    print(f"# seed-settings classes: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

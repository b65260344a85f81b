"""Products written before and after issue 10's redesign are byte-identical.

The test maps a small area (four 0.01-degree cells) twice on this machine, with the same checkpoint
(``tests/data/tiny_gum1.pth``) and settings: once with the code of commit ``8670111`` (the code
before the redesign, taken from this repository's history with ``git archive``), once with the code
now; then it compares every product shard (levels and overviews; not the commit markers, whose
times differ, nor the ``zarr.json`` metadata). Both runs on one machine: fp32 results may differ in
the last bit between CPUs (AVX2 and AVX-512 kernels), so stored hashes would not travel.

Both runs pin the network's arithmetic to what the reference's fp32 defaults were: NCHW with
BatchNorm unfolded (``--channels-last off``) and batch 8. Issue 14 made channels_last with folded
BatchNorm and a CPU batch of 1 the defaults, which round fp32 differently (a few pixels' percent,
docs/design-notes.md); this test is about the redesign of the code paths, not about that choice.

The ``input_quality`` variable (issue 11) is new in the code now and absent from the reference's
product: its shards are left out of the comparison (they are tested in ``test_input_quality.py``).
The synthetic world's clouds are off by default, so both runs see the same imagery.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

REFERENCE_COMMIT = "8670111"
CHECKPOINT = Path(__file__).parent / "data" / "tiny_gum1.pth"
ARGS = ["map", "--bbox", "8.571", "47.371", "8.589", "47.389", "--year", "2021", "--cell-deg", "0.01",
        "--chunk-px", "40", "--halo", "32", "--precision", "fp32", "--quiet", "--no-preview",
        "--channels-last", "off", "--batch-size", "8", "--checkpoint", str(CHECKPOINT)]


def shard_hashes(product: Path) -> dict[str, str]:
    return {str(p.relative_to(product)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(product.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and "_manifest" not in p.parts
            and "input_quality" not in p.parts}


def reference_code(dest: Path) -> Path:
    """The ``gum_ray`` package of :data:`REFERENCE_COMMIT`, extracted into ``dest``."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs this repository's git history (a clone, not an archive)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", REFERENCE_COMMIT, "gum_ray"],
                             capture_output=True, timeout=120)
    if archive.returncode != 0:
        pytest.skip(f"commit {REFERENCE_COMMIT} not in this clone's history (shallow clone?)")
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
    return dest


def gum_map(data_dir: Path, pythonpath: Path | None, cwd: Path) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)  # before site-packages: the old package wins, Ray workers too
    code = ("import sys, gum_ray, pathlib; from gum_ray.cli import main; "
            "print('GUM_RAY_FROM', pathlib.Path(gum_ray.__file__).resolve(), file=sys.stderr); "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, *ARGS, "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    where = Path(next(line for line in r.stderr.splitlines() if line.startswith("GUM_RAY_FROM "))[13:].strip())
    expected_root = (pythonpath or REPO).resolve()
    assert where.is_relative_to(expected_root), f"ran {where}, not the code under {expected_root}"
    return data_dir / "product.zarr"


@pytest.mark.slow
def test_a_small_map_is_byte_identical_to_the_code_before_the_redesign(tmp_path):
    old_src = reference_code(tmp_path / "ref-src")
    before = shard_hashes(gum_map(tmp_path / "before", old_src, tmp_path))
    after = shard_hashes(gum_map(tmp_path / "after", None, REPO))
    assert len(before) >= 4 and any(k.startswith("probability/c/") for k in before), sorted(before)[:5]
    assert sorted(after) == sorted(before), "a different set of shard files"
    differ = [k for k in after if after[k] != before[k]]
    assert not differ, f"{len(differ)} of {len(after)} shards differ from commit {REFERENCE_COMMIT}: {differ[:5]}"

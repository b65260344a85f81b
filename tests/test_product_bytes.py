"""Products written before and after issue 10's redesign are byte-identical.

``tests/data/product_bytes.json`` holds the sha256 of every product shard (levels and overviews,
not the commit markers, whose times differ, nor the ``zarr.json`` metadata) that ``gum map`` wrote
for a small area (four 0.01-degree cells) with the code before the redesign; the file says which
commit and the command, and ``tests/data/make_product_bytes.sh`` remakes it. This test maps the same
area with the same checkpoint (``tests/data/tiny_gum1.pth``) and settings now and compares.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gum_ray.cli import main

DATA = Path(__file__).parent / "data"


def shard_hashes(product: Path) -> dict[str, str]:
    return {str(p.relative_to(product)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(product.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and "_manifest" not in p.parts}


@pytest.mark.slow
def test_a_small_map_is_byte_identical_to_the_code_before_the_redesign(tmp_path, capsys):
    ref = json.loads((DATA / "product_bytes.json").read_text())
    code = main(ref["args"] + ["--checkpoint", str(DATA / "tiny_gum1.pth"), "--data-dir", str(tmp_path / "d")])
    assert code == 0, capsys.readouterr().err
    got = shard_hashes(tmp_path / "d" / "product.zarr")
    assert len(got) >= 4 and any("/c/" in k or k.startswith("c/") or "/c" in k for k in got)
    assert sorted(got) == sorted(ref["shards"]), "a different set of shard files"
    differ = [k for k in got if got[k] != ref["shards"][k]]
    assert not differ, f"{len(differ)} of {len(got)} shards differ from commit {ref['commit']}: {differ[:5]}"

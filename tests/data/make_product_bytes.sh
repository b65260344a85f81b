#!/usr/bin/env bash
# Makes tests/data/product_bytes.json: the sha256 of every product shard that `gum map` writes for a
# small area with the code of a given commit (default 8670111, the code before issue 10's redesign),
# for tests/test_product_bytes.py. Usage, from the repository root, with the set-up's .venv:
#   bash tests/data/make_product_bytes.sh [COMMIT]
# The checkpoint is tests/data/tiny_gum1.pth (GUM 1 architecture, 10 channels, base width 4, random
# calibrated weights: random_checkpoint(path, ModelSpec(10, 4, 4), seed=10)); fp32 keeps the bytes
# independent of bf16 support.
set -euo pipefail
commit=${1:-8670111}
repo=$(pwd)
ref=$(mktemp -d /tmp/gum-ref-XXXX)
git worktree add --detach "$ref/src" "$commit" >/dev/null
trap 'git -C "$repo" worktree remove --force "$ref/src"; rm -rf "$ref"' EXIT
cd "$ref"
PYTHONPATH="$ref/src" "$repo/.venv/bin/python" - "$repo" "$commit" <<'PY'
import hashlib, json, pathlib, sys
import gum_ray
from gum_ray.cli import main
repo, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
assert pathlib.Path(gum_ray.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()), gum_ray.__file__
args = ["map", "--bbox", "8.571", "47.371", "8.589", "47.389", "--year", "2021", "--cell-deg", "0.01",
        "--chunk-px", "40", "--halo", "32", "--precision", "fp32", "--quiet", "--no-preview"]
code = main(args + ["--checkpoint", str(repo / "tests/data/tiny_gum1.pth"), "--data-dir", "data"])
assert code == 0, code
root = pathlib.Path("data/product.zarr")
shards = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zarr.json" and "_manifest" not in p.parts}
out = {"commit": commit, "command": "gum " + " ".join(args) + " --checkpoint tests/data/tiny_gum1.pth --data-dir DIR",
       "made_by": "bash tests/data/make_product_bytes.sh " + commit, "args": args, "shards": shards}
(repo / "tests/data/product_bytes.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
print(len(shards), "shards")
PY

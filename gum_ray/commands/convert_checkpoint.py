"""``gum convert-checkpoint [--trust] SRC DST.safetensors``: a tensors-only copy of a checkpoint."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert-checkpoint",
        help="write a tensors-only (.safetensors) copy of a GUM checkpoint that loads everywhere",
        description="Copy the GUM weights of a checkpoint into a tensors-only safetensors file that "
        "records the source's sha256. gum-ray reads .pth files with tensors and inert training state "
        "only; a file that names other Python objects is refused. With --trust such a file is "
        "unpickled fully, here, once (this runs whatever it names: use it only for a file you trust "
        "from a source you trust); the result is a plain-tensor file for every other command and "
        "every cluster worker.",
    )
    p.add_argument("source", help="the checkpoint to convert (.pth)")
    p.add_argument("output", help="the tensors-only checkpoint to write (.safetensors)")
    p.add_argument("--trust", action="store_true",
                   help="unpickle the source fully if it holds objects outside the allow-list")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.checkpoint_convert import convert_checkpoint

    sha, loaded = convert_checkpoint(args.source, args.output, trust=args.trust, overwrite=args.overwrite)
    spec = loaded.spec
    base = getattr(spec, "base_channels", None) or getattr(spec, "width", None)
    family = "GUM 2.0" if loaded.meta.get("family") == "gum2" else "GUM 1"
    print(f"wrote {args.output} ({family}, {spec.in_channels} channels, base {base}; sha256 {sha[:12]}; "
          f"source sha256 {loaded.meta['source_sha256'][:12]})", file=sys.stderr)
    return 0

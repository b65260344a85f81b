"""``gum demo-model``: train (once) or show the demo model of the synthetic world."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo-model",
        help="train (once, cached) the demo model for the synthetic world and print its path",
        description="Train a GUM-architecture network (reduced width) on the synthetic world, cached "
        "per machine ($GUM_DEMO_MODEL, else ~/.cache/gum-ray/demo-model/), and report its held-out "
        "IoU. With the model cached, prints its path and what its training measured.",
    )
    p.add_argument("--out", help="where the checkpoint goes (default $GUM_DEMO_MODEL, else the cache)")
    p.add_argument("--force", action="store_true", help="train again even if the file exists")
    p.add_argument("--evaluate", action="store_true",
                   help="also predict the held-out areas now and print their IoU")
    p.add_argument("--checkpoint", help="with --evaluate: evaluate this checkpoint instead of the demo model")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--max-seconds", type=float, help="training time budget in seconds (default: the recipe's)")
    return p


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from gum_ray.demo_model import DemoRecipe, default_path, ensure_demo_model, evaluate_held_out, train_demo_model
    from gum_ray.model import load_checkpoint

    def say(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.max_seconds is not None:
        changes["max_train_seconds"] = args.max_seconds
    recipe = dataclasses.replace(DemoRecipe(), **changes)
    path = Path(args.out).expanduser() if args.out else default_path(recipe)
    if args.checkpoint and not args.evaluate:
        say("gum demo-model: --checkpoint is used with --evaluate; nothing to do")
        return 2
    if not args.checkpoint:
        if args.force:
            res = train_demo_model(path, recipe, echo=say)
            say(f"trained in {res.train_seconds:.0f} s ({res.steps} steps), {res.total_seconds:.0f} s in all")
        else:
            path = ensure_demo_model(path, recipe, echo=say)
    target = Path(args.checkpoint) if args.checkpoint else path
    loaded = load_checkpoint(target)
    info = loaded.meta.get("gum_ray_demo", {})
    if info:
        held = info.get("held_out", {})
        say(f"demo model {target}: {loaded.spec.base_channels}-channel base, {info.get('steps_done')} steps "
            f"in {info.get('train_seconds', 0):.0f} s (total {info.get('total_seconds', 0):.0f} s, "
            f"{info.get('precision')}, {info.get('threads')} threads); held-out IoU at training "
            f"{held.get('total', {}).get('iou', float('nan')):.4f}")
    if args.evaluate:
        res = evaluate_held_out(loaded.model, recipe)
        for name, m in res.per_area.items():
            say(f"  {name:12s} IoU {m.iou:.4f}  F1 {m.f1:.4f}  ({m.tp + m.fn} urban px)")
        say(f"held-out IoU {res.iou:.4f} (year {res.year}, {res.seconds:.1f} s)")
    print(target)
    return 0

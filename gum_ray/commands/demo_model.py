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
    p.add_argument("--model", choices=("gum1", "gum2"), default="gum1",
                   help="which family's demo model: gum1 (default) or gum2 (GUM 2.0, trained with the "
                        "authors' missing-modality corruption; its cache is gum2-<hash>.pth)")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.demo_model import DemoRecipe, default_path, ensure_demo_model, evaluate_held_out, train_demo_model
    from gum_ray.model import load_checkpoint

    def say(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if args.model == "gum2":
        return _run_gum2(args, say)

    got = _recipe_and_target(args, say, DemoRecipe, default_path, ensure_demo_model, train_demo_model)
    if got is None:
        return 2
    recipe, target = got
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


def _run_gum2(args: argparse.Namespace, say) -> int:
    from gum_ray.demo_gum2 import (
        Gum2DemoRecipe,
        default_path,
        ensure_gum2_demo_model,
        evaluate_model,
        train_gum2_demo_model,
    )
    from gum_ray.network import load_model

    got = _recipe_and_target(args, say, Gum2DemoRecipe, default_path, ensure_gum2_demo_model,
                             train_gum2_demo_model)
    if got is None:
        return 2
    recipe, target = got
    model = load_model(target, family="gum2")
    info = model.meta.get("gum_ray_demo", {})
    if info:
        held, cloudy = info.get("held_out", {}), info.get("held_out_clouds", {})
        say(f"GUM 2.0 demo model {target}: width {model.spec.width}, {info.get('steps_done')} steps in "
            f"{info.get('train_seconds', 0):.0f} s ({info.get('precision')}, {info.get('threads')} threads); "
            f"held-out IoU at training {held.get('total', {}).get('iou', float('nan')):.4f}; with clouds "
            f"{cloudy.get('s2_present', {}).get('iou', float('nan')):.4f} where S2 is present, "
            f"{cloudy.get('s2_missing', {}).get('iou', float('nan')):.4f} where it is missing")
    if args.evaluate:
        res = evaluate_model(model, recipe.held_out_areas, year=recipe.held_out_year,
                             size=recipe.held_out_area_px, clouds=True)
        for name, m in res.per_area.items():
            say(f"  {name:12s} IoU {m.iou:.4f}  F1 {m.f1:.4f}  ({m.tp + m.fn} urban px mapped)")
        say(f"with clouds: no data {res.nodata_share:.2%}; IoU {res.s2_present.iou:.4f} where S2 is present, "
            f"{res.s2_missing.iou:.4f} where it is missing (year {res.year}, {res.seconds:.1f} s)")
    print(target)
    return 0


def _recipe_and_target(args: argparse.Namespace, say, recipe_cls, default_path, ensure, train):
    """The recipe (with --steps / --max-seconds) and the checkpoint to report on: the one given to
    --evaluate, else the cached demo model (trained now if missing, or anew with --force); None when
    the flags ask for nothing."""
    import dataclasses
    from pathlib import Path

    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.max_seconds is not None:
        changes["max_train_seconds"] = args.max_seconds
    recipe = dataclasses.replace(recipe_cls(), **changes)
    path = Path(args.out).expanduser() if args.out else default_path(recipe)
    if args.checkpoint and not args.evaluate:
        say("gum demo-model: --checkpoint is used with --evaluate; nothing to do")
        return None
    if not args.checkpoint:
        if args.force:
            res = train(path, recipe, echo=say)
            say(f"trained in {res.train_seconds:.0f} s ({res.steps} steps), {res.total_seconds:.0f} s in all")
        else:
            path = ensure(path, recipe, echo=say)
    return recipe, (Path(args.checkpoint) if args.checkpoint else path)

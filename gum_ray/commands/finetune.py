"""``gum finetune --init CKPT --data PATCHES --out NEW.pth``: transfer learning on patch data."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    from gum_ray.finetune import FinetuneSettings

    d = FinetuneSettings()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a GUM checkpoint on a patches dataset (pseudo-labels or your labels)",
        description="Train the GUM network from a checkpoint on the patches of `gum patches` (the "
        "user's 'label' arrays where present, else the pseudo-label 'class'). A validation split by "
        "patch reports urban IoU/F1 before training and after each epoch; the best epoch is saved in "
        "the mmseg format that `gum predict` and `gum map` load.",
    )
    p.add_argument("--init", required=True, help="starting checkpoint (.pth, mmseg format; 'demo' = the demo model)")
    from gum_ray.commands.predict import add_model_argument

    add_model_argument(p)
    p.add_argument("--data", required=True, help="the patches dataset (folder made by `gum patches`)")
    p.add_argument("--out", required=True, help="the new checkpoint (.pth)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training patches (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"patches per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr:g})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay:g})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"share of the patches held out for validation (default {d.val_fraction})")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and head (GUM 2.0: its three encoders frozen)")
    p.add_argument("--labels", choices=("auto", "label", "class"), default="auto",
                   help="auto: your 'label' arrays where present, else the pseudo-label 'class' (default)")
    p.add_argument("--keep", choices=("best", "last"), default="best",
                   help="save the epoch with the best validation IoU (default) or the last one")
    p.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto = bf16 where the device has it natively, else fp32")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the order and the augmentation")
    p.add_argument("--max-seconds", type=float, help="stop after the epoch that passes this time")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return p


def run(args: argparse.Namespace) -> int:
    from gum_ray.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        val_fraction=args.val_fraction, freeze_encoder=args.freeze_encoder, precision=args.precision,
        device=args.device, seed=args.seed, augment=not args.no_augment, labels=args.labels,
        keep=args.keep, max_seconds=args.max_seconds, model=args.model,
    )
    echo = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    res = finetune(args.init, args.data, args.out, settings, echo=echo)
    print(f"gum finetune: val IoU {res.before.iou:.4f} -> {res.after.iou:.4f}, F1 {res.before.f1:.4f} -> "
          f"{res.after.f1:.4f} (best epoch {res.best_epoch}); wrote {res.path} in {res.seconds:.0f} s",
          file=sys.stderr)
    return 0

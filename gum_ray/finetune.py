"""Transfer learning: fine-tune a GUM checkpoint on patch data (pseudo-labels or the user's labels).

A plain PyTorch loop on any model family through :class:`gum_ray.network.UrbanModel` (for GUM 1,
the mmsegmentation ``EncoderDecoder`` that mmseg's own runner would train, without its runner's
configuration machinery): the model's ``forward`` gives the logits of whole crops, the loss is
cross-entropy with ignore index 255 (mmseg's ``CrossEntropyLoss`` of the GUM config, weight 1.0), AdamW with a linear
warm-up and a cosine decay, random flips and 90-degree rotations as augmentation, bf16 autocast on
a CPU that has native bf16 (AVX512-BF16/AMX) or a GPU, fp32 elsewhere, and optionally a frozen
encoder (the model's ``encoder``: GUM 1's UNet encoder, GUM 2.0's three encoders; their BatchNorm
statistics are frozen too).

The patches are split into training and validation sets by patch (deterministic for a seed). The
validation IoU and F1 of the urban class are measured before training (the starting checkpoint)
and after each epoch; the best epoch's weights (or the last, ``keep="last"``) are saved with the
model's ``save`` (GUM 1: :func:`gum_ray.model.save_checkpoint`, the mmseg format; GUM 2.0: the
authors' layout, :func:`gum_ray.gum2.save_network`; both load in ``gum predict`` and ``gum map``), with the training settings and the per-epoch history in its ``meta``.

The training steps (:class:`~gum_ray.training.Metrics`, :func:`~gum_ray.training.train_step`, ...)
live in :mod:`gum_ray.training`, shared with :mod:`gum_ray.demo_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from gum_ray.errors import InputError
from gum_ray.network import UrbanModel, check_compatible
from gum_ray.training import (  # noqa: F401 - Metrics, lr_at, ... re-exported for callers of finetune
    IGNORE,
    Metrics,
    augment,
    freeze_encoder,
    lr_at,
    predict_logits,
    set_train_mode,
    train_step,
    training_autocast,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class PatchSamples:
    """Model inputs and labels of the complete patches of a dataset, read on demand.

    ``labels_used[key]`` says which array each patch's labels come from (``label`` = the user's,
    ``class`` = the pseudo-label of ``gum patches``). Pixels without Sentinel-2 data are ignored.
    """

    root: str
    keys: list[str]
    labels_used: dict[str, str]
    model: UrbanModel  # whose preprocessing and validity make the inputs and the ignored pixels
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    cache_limit: int = 400  # patches kept in memory (about 2.6 MB each for 10 channels)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 model input and (H, W) uint8 labels (255 = ignore) of one patch."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        from gum_ray.patches import PatchDataset

        rec = PatchDataset(self.root).read(key)
        export = rec.imagery.export
        y = (rec.label if self.labels_used[key] == "label" else rec.cls).astype(np.uint8).copy()
        y[~self.model.validity(export)] = IGNORE
        y[(y != 0) & (y != 1)] = IGNORE
        x = self.model.preprocess(export)
        if len(self.cache) < self.cache_limit:
            self.cache[key] = (x, y)
        return x, y

    def batch(self, keys: Sequence[str], rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for k in keys:
            x, y = self.get(k)
            if rng is not None:
                x, y = augment(x, y, rng)
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def load_samples(data: str | os.PathLike[str], labels: str = "auto", *, model: UrbanModel) -> PatchSamples:
    """The labelled patches of a dataset, checked against the model (:func:`~gum_ray.network.check_compatible`).

    ``labels``: ``auto`` (the user's ``label`` where a patch has one, else the pseudo-label
    ``class``), ``label`` or ``class``. No labels at all -> :class:`InputError`; a model that needs
    bands the patches lack (the 13-channel model, patches without products) -> :class:`CheckpointError`.
    """
    from gum_ray.patches import PatchDataset

    if labels not in ("auto", "label", "class"):
        raise InputError(f"labels {labels!r}: use auto, label or class", param="labels")
    ds = PatchDataset(data)
    attrs = ds.attrs  # InputError if not a patches dataset
    keys = ds.complete_keys()
    if not keys:
        raise InputError(
            f"{ds.root}: holds no complete patches ({len(ds.keys())} entries, none with imagery); "
            "make patches with `gum patches` first"
        )
    used: dict[str, str] = {}
    unlabelled: list[str] = []
    for k in keys:
        have = ds.label_arrays(k)
        pick = next((n for n in (("label", "class") if labels == "auto" else (labels,)) if n in have), None)
        if pick is None:
            unlabelled.append(k)
        else:
            used[k] = pick
    if unlabelled:
        what = {"auto": "neither 'label' (your own labels) nor 'class' (the pseudo-label)",
                "label": "no 'label' array (your own labels)", "class": "no 'class' array (pseudo-label)"}[labels]
        raise InputError(
            f"{ds.root}: {len(unlabelled)} of {len(keys)} patches have {what} (e.g. patch "
            f"{unlabelled[0]!r}); fine-tuning needs labels: make the patches with a model "
            "(`gum patches --checkpoint CKPT`) for pseudo-labels, or add your labels with "
            "gum_ray.patches.PatchDataset(...).set_label(key, array)"
            + ("; or let labels be auto" if labels != "auto" else "")
        )
    check_compatible(model, bool(attrs.get("with_products")), what=f"the patches in {ds.root}")
    return PatchSamples(ds.root, keys, used, model)


def split_keys(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by patch: (train, validation); at least one of each when there are 2+."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction}: give a fraction between 0 and 1 (e.g. 0.2)", param="val_fraction")
    keys = sorted(keys)
    if len(keys) < 2:
        raise InputError(
            f"fine-tuning needs at least 2 patches (one to train on, one to validate); the data has {len(keys)}"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = min(max(1, int(round(len(keys) * val_fraction))), len(keys) - 1)
    val = sorted(keys[i] for i in order[:n_val])
    train = sorted(keys[i] for i in order[n_val:])
    return train, val


# ----------------------------------------------------------------------------------- fine-tune


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """How to fine-tune (recorded in the checkpoint's meta)."""

    epochs: int = 10
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    freeze_encoder: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    augment: bool = True
    labels: Literal["auto", "label", "class"] = "auto"
    keep: Literal["best", "last"] = "best"
    max_seconds: float | None = None
    model: str | None = None  # model family to insist on ("gum1", "gum2"); None = read from the checkpoint

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs {self.epochs}: must be at least 1", param="epochs")
        if self.batch_size < 1:
            raise InputError(f"batch_size {self.batch_size}: must be at least 1", param="batch_size")
        if not self.lr > 0:
            raise InputError(f"lr {self.lr}: must be positive", param="lr")
        if self.keep not in ("best", "last"):
            raise InputError(f"keep {self.keep!r}: use best or last", param="keep")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    val: Metrics
    lr: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_loss": self.val_loss,
                "lr": self.lr, "seconds": self.seconds, **self.val.as_dict()}

    def line(self, epochs: int) -> str:
        return (f"epoch {self.epoch}/{epochs}  train loss {self.train_loss:.4f}  val loss {self.val_loss:.4f}  "
                f"val IoU {self.val.iou:.4f}  F1 {self.val.f1:.4f}  ({self.seconds:.1f} s)")


@dataclasses.dataclass
class FinetuneResult:
    path: str
    sha256: str
    before: Metrics
    after: Metrics
    best_epoch: int
    history: list[EpochStats]
    train_keys: list[str]
    val_keys: list[str]
    seconds: float


def evaluate(model: UrbanModel, samples: PatchSamples, keys: Sequence[str], batch_size: int,
             device: torch.device, autocast_dtype: torch.dtype | None) -> tuple[Metrics, float]:
    """Urban-class metrics and mean loss of whole-patch predictions on ``keys`` (eval mode)."""
    model.module.eval()
    total, loss_sum, n_pix = Metrics(), 0.0, 0
    for i in range(0, len(keys), batch_size):
        x, y = samples.batch(keys[i : i + batch_size])
        x, y = x.to(device), y.to(device)
        logits = predict_logits(model, x, autocast_dtype)
        valid = int((y != IGNORE).sum())
        if valid:
            loss_sum += float(F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum"))
            n_pix += valid
        total = total + Metrics.of(logits.argmax(1).cpu(), y.cpu())
    return total, loss_sum / max(n_pix, 1)


def finetune(
    init: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    *,
    echo: Callable[[str], None] | None = print,
) -> FinetuneResult:
    """Fine-tune checkpoint ``init`` on the patches dataset ``data``; save to ``out`` (mmseg format).

    ``init`` may be ``demo`` for the demo model of the synthetic world. Prints one line per epoch
    through ``echo`` (None = silent).
    """
    from gum_ray.demo_model import resolve_checkpoint
    from gum_ray.inference import resolve_device
    from gum_ray.network import load_model

    s = settings or FinetuneSettings()
    say = echo or (lambda _m: None)
    t_start = time.perf_counter()
    init = resolve_checkpoint(str(init))
    out = Path(out)
    if out.suffix != ".pth":
        raise InputError(f"out {out}: give a .pth file name for the new checkpoint", param="out")
    if out.resolve() == Path(init).resolve():
        raise InputError(f"out {out}: is the init checkpoint; write the fine-tuned model to a new file", param="out")
    model = load_model(init, family=s.model)
    init_provenance = model.provenance()
    samples = load_samples(data, s.labels, model=model)
    train_keys, val_keys = split_keys(samples.keys, s.val_fraction, s.seed)

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    device = resolve_device(s.device)
    amp = training_autocast(s.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    model.module.to(device)
    frozen = freeze_encoder(model) if s.freeze_encoder else 0
    params = [p for p in model.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    n_label = sum(v == "label" for v in samples.labels_used.values())
    arch = ", ".join(f"{k} {v}" for k, v in (init_provenance.get("spec") or {}).items() if k != "in_channels")
    say(f"fine-tuning {Path(init).name} ({model.in_channels} channels{', ' + arch if arch else ''}) on "
        f"{len(train_keys)} patches, validating on {len(val_keys)}; labels: {n_label} user, "
        f"{len(samples.keys) - n_label} pseudo; {'bf16' if amp == torch.bfloat16 else 'fp16' if amp else 'fp32'} "
        f"on {device}" + (f"; encoder frozen ({frozen} tensors)" if frozen else ""))

    before, before_loss = evaluate(model, samples, val_keys, s.batch_size, device, amp)
    say(f"epoch 0/{s.epochs}  (starting checkpoint)  val loss {before_loss:.4f}  "
        f"val IoU {before.iou:.4f}  F1 {before.f1:.4f}")
    best_iou, best_epoch = before.iou, 0
    best_state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
    steps_per_epoch = math.ceil(len(train_keys) / s.batch_size)
    total_steps = steps_per_epoch * s.epochs
    history: list[EpochStats] = []
    step = 0
    for epoch in range(1, s.epochs + 1):
        t0 = time.perf_counter()
        set_train_mode(model, bool(frozen))
        order = [train_keys[i] for i in rng.permutation(len(train_keys))]
        losses = []
        for i in range(0, len(order), s.batch_size):
            lr = lr_at(step / max(total_steps, 1), s.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            keys = order[i : i + s.batch_size]
            if len(keys) == 1:  # BatchNorm (the PSP's 1x1 pool) needs 2+ samples in training
                keys = keys * 2
            x, y = samples.batch(keys, rng if s.augment else None)
            loss = train_step(model, opt, x.to(device), y.to(device), amp, scaler)
            if math.isfinite(loss):
                losses.append(loss)
            step += 1
        val, val_loss = evaluate(model, samples, val_keys, s.batch_size, device, amp)
        st = EpochStats(epoch, float(np.mean(losses)) if losses else float("nan"), val_loss, val, lr,
                        time.perf_counter() - t0)
        history.append(st)
        say(st.line(s.epochs))
        if s.keep == "last" or val.iou > best_iou:
            best_iou, best_epoch = val.iou, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
        if s.max_seconds is not None and time.perf_counter() - t_start > s.max_seconds and epoch < s.epochs:
            say(f"stopping after epoch {epoch}: --max-seconds {s.max_seconds:g} reached")
            break
    model.module.load_state_dict(best_state)
    model.module.eval().cpu()
    for p in model.module.parameters():
        p.requires_grad_(True)
    after = before if best_epoch == 0 else history[best_epoch - 1].val
    meta = {
        "gum_ray_finetune": {
            "init": str(init),
            "init_sha256": init_provenance["checkpoint_sha256"],
            "data": samples.root,
            "settings": s.as_dict(),
            "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "device": str(device),
            "n_train": len(train_keys),
            "n_val": len(val_keys),
            "val_keys": val_keys[:2000],
            "labels": {"user": n_label, "pseudo": len(samples.keys) - n_label},
            "val_before": before.as_dict(),
            "val_after": after.as_dict(),
            "best_epoch": best_epoch,
            "history": [h.as_dict() for h in history],
        },
        "init_meta": {k: v for k, v in model.meta.items() if k != "gum_ray_finetune"},
    }
    sha = model.save(out, meta)
    if best_epoch == 0:
        say("no epoch beat the starting checkpoint on the validation patches; saved the starting weights")
    say(f"val IoU {before.iou:.4f} -> {after.iou:.4f} (epoch {best_epoch}); wrote {out} (sha256 {sha[:12]})")
    return FinetuneResult(str(out), sha, before, after, best_epoch, history, train_keys, val_keys,
                          time.perf_counter() - t_start)


__all__ = [
    "EpochStats",
    "FinetuneResult",
    "FinetuneSettings",
    "Metrics",
    "PatchSamples",
    "augment",
    "evaluate",
    "finetune",
    "freeze_encoder",
    "load_samples",
    "lr_at",
    "predict_logits",
    "split_keys",
    "train_step",
    "training_autocast",
]

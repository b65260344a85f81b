"""Transfer learning: fine-tune a GUM checkpoint on patch data (pseudo-labels or the user's labels).

A plain PyTorch loop on the mmsegmentation ``EncoderDecoder`` that :func:`gum_ray.model.build_model`
builds (the same network mmseg's own runner would train, without its runner's configuration
machinery): ``encode_decode`` gives the logits at the input size, the loss is cross-entropy with
ignore index 255 (mmseg's ``CrossEntropyLoss`` of the GUM config, weight 1.0), AdamW with a linear
warm-up and a cosine decay, random flips and 90-degree rotations as augmentation, bf16 autocast on
a CPU that has native bf16 (AVX512-BF16/AMX) or a GPU, fp32 elsewhere, and optionally a frozen
encoder (the UNet's encoder; its BatchNorm statistics are frozen too).

The patches are split into training and validation sets by patch (deterministic for a seed). The
validation IoU and F1 of the urban class are measured before training (the starting checkpoint)
and after each epoch; the best epoch's weights (or the last, ``keep="last"``) are saved with
:func:`gum_ray.model.save_checkpoint`, i.e. in the mmseg format that ``gum predict`` and
``gum map`` load, with the training settings and the per-epoch history in its ``meta``.

The training primitives (:class:`Metrics`, :func:`train_step`, :func:`predict_logits`,
:func:`lr_at`, :func:`training_autocast`) are shared with :mod:`gum_ray.demo_model`.
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

from gum_ray.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

IGNORE = 255
CROP = 256


# ------------------------------------------------------------------------------------- metrics


@dataclasses.dataclass
class Metrics:
    """Confusion counts of the urban class over the labelled pixels (label 255 is ignored)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> "Metrics":
        """Counts from a predicted class map and a target (0/1, 255 = ignore), any equal shapes."""
        p = torch.as_tensor(pred)
        t = torch.as_tensor(target)
        keep = t != IGNORE
        p, t = p[keep].bool(), t[keep].bool()
        tp = int((p & t).sum())
        fp = int((p & ~t).sum())
        fn = int((~p & t).sum())
        return cls(tp, fp, fn, int(keep.sum()) - tp - fp - fn)

    def __add__(self, other: "Metrics") -> "Metrics":
        return Metrics(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def iou(self) -> float:
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else 1.0

    @property
    def f1(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else 1.0

    @property
    def precision(self) -> float:
        d = self.tp + self.fp
        return self.tp / d if d else 1.0

    @property
    def recall(self) -> float:
        d = self.tp + self.fn
        return self.tp / d if d else 1.0

    @property
    def accuracy(self) -> float:
        n = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / n if n else 1.0

    def as_dict(self) -> dict[str, float]:
        return {"iou": self.iou, "f1": self.f1, "precision": self.precision, "recall": self.recall,
                "accuracy": self.accuracy, "tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


# ---------------------------------------------------------------------------------- primitives


def training_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training: ``auto`` = bf16 where the device has it natively, else fp32."""
    from gum_ray.inference import resolve_precision

    return resolve_precision(precision, device)  # type: ignore[arg-type]


def _metas(x: torch.Tensor) -> list[dict[str, Any]]:
    return [dict(img_shape=(x.shape[2], x.shape[3]))] * x.shape[0]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    scaler: Any = None,
) -> float:
    """One optimisation step on a batch (B, C, H, W) / (B, H, W) int64 (255 = ignore); the loss."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model.encode_decode(x, _metas(x))
    loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):  # all pixels ignored, or a diverging step: skip it
        return float("nan")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Logits (B, 2, H, W) float32 of whole crops in eval mode (the network's view of one crop)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model.encode_decode(x, _metas(x)).float()


def lr_at(progress: float, base_lr: float, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Learning rate at ``progress`` in [0, 1]: linear warm-up, then cosine decay to ``floor`` x base."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return base_lr * (0.1 + 0.9 * progress / warmup)
    t = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip / 90-degree rotation (the 8 symmetries of the square) of a (C, H, W) crop + label."""
    k = int(rng.integers(4))
    if k:
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k, axes=(0, 1))
    if rng.integers(2):
        x, y = x[:, :, ::-1], y[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def freeze_encoder(model: torch.nn.Module) -> int:
    """Freeze the UNet encoder's weights (and its BatchNorm statistics); returns tensors frozen."""
    n = 0
    for p in model.backbone.encoder.parameters():
        p.requires_grad_(False)
        n += 1
    return n


def set_train_mode(model: torch.nn.Module, frozen_encoder: bool) -> None:
    model.train()
    if frozen_encoder:
        model.backbone.encoder.eval()  # BN running statistics stay those of the checkpoint


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
    with_products: bool  # feed the 13-channel model
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    cache_limit: int = 400  # patches kept in memory (about 2.6 MB each for 10 channels)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W) float32 model input and (H, W) uint8 labels (255 = ignore) of one patch."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        from gum_ray.bands import preprocess, validity_mask
        from gum_ray.patches import PatchDataset

        rec = PatchDataset(self.root).read(key)
        export = rec.export
        y = (rec.label if self.labels_used[key] == "label" else rec.cls).astype(np.uint8).copy()
        y[~validity_mask(export)] = IGNORE
        y[(y != 0) & (y != 1)] = IGNORE
        x = preprocess(export, with_products=self.with_products)
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


def load_samples(data: str | os.PathLike[str], labels: str = "auto", *, spec_channels: int,
                 init: str = "checkpoint") -> PatchSamples:
    """The labelled patches of a dataset, checked against the model's input channels.

    ``labels``: ``auto`` (the user's ``label`` where a patch has one, else the pseudo-label
    ``class``), ``label`` or ``class``. No labels at all -> :class:`InputError`; a 13-channel model
    and patches without the product bands -> :class:`CheckpointError`.
    """
    from gum_ray.patches import PatchDataset

    if labels not in ("auto", "label", "class"):
        raise InputError(f"--labels {labels!r}: use auto, label or class")
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
            + ("; or use --labels auto" if labels != "auto" else "")
        )
    data_products = bool(attrs.get("with_products"))
    if spec_channels == 13 and not data_products:
        raise CheckpointError(
            f"{init}: is a 13-channel ('with products') model, but the patches in {ds.root} have no "
            "product bands (11-band imagery, 10 model channels); fine-tune the 10-channel checkpoint, "
            "or make the patches with --products"
        )
    if spec_channels not in (10, 13):
        raise CheckpointError(f"{init}: takes {spec_channels} input channels; GUM models take 10 or 13")
    return PatchSamples(ds.root, keys, used, with_products=spec_channels == 13)


def split_keys(keys: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split by patch: (train, validation); at least one of each when there are 2+."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction}: give a fraction between 0 and 1 (e.g. 0.2)")
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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: must be at least 1")
        if not self.lr > 0:
            raise InputError(f"--lr {self.lr}: must be positive")
        if self.keep not in ("best", "last"):
            raise InputError(f"--keep {self.keep!r}: use best or last")

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


def evaluate(model: torch.nn.Module, samples: PatchSamples, keys: Sequence[str], batch_size: int,
             device: torch.device, autocast_dtype: torch.dtype | None) -> tuple[Metrics, float]:
    """Urban-class metrics and mean loss of whole-patch predictions on ``keys`` (eval mode)."""
    model.eval()
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
    from gum_ray.inference import resolve_device
    from gum_ray.model import file_sha256, load_checkpoint, save_checkpoint

    s = settings or FinetuneSettings()
    say = echo or (lambda _m: None)
    t_start = time.perf_counter()
    init = str(init)
    if init == "demo":
        from gum_ray.demo_model import ensure_demo_model

        init = str(ensure_demo_model())
    out = Path(out)
    if out.suffix != ".pth":
        raise InputError(f"--out {out}: give a .pth file name for the new checkpoint")
    if out.resolve() == Path(init).resolve():
        raise InputError(f"--out {out}: is the --init checkpoint; write the fine-tuned model to a new file")
    loaded = load_checkpoint(init)
    spec = loaded.spec
    samples = load_samples(data, s.labels, spec_channels=spec.in_channels, init=f"checkpoint {init}")
    train_keys, val_keys = split_keys(samples.keys, s.val_fraction, s.seed)

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    device = resolve_device(s.device)
    amp = training_autocast(s.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    model = loaded.model.to(device)
    frozen = freeze_encoder(model) if s.freeze_encoder else 0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    n_label = sum(v == "label" for v in samples.labels_used.values())
    say(f"fine-tuning {Path(init).name} ({spec.in_channels} channels, base {spec.base_channels}) on "
        f"{len(train_keys)} patches, validating on {len(val_keys)}; labels: {n_label} user, "
        f"{len(samples.keys) - n_label} pseudo; {'bf16' if amp == torch.bfloat16 else 'fp16' if amp else 'fp32'} "
        f"on {device}" + (f"; encoder frozen ({frozen} tensors)" if frozen else ""))

    before, before_loss = evaluate(model, samples, val_keys, s.batch_size, device, amp)
    say(f"epoch 0/{s.epochs}  (starting checkpoint)  val loss {before_loss:.4f}  "
        f"val IoU {before.iou:.4f}  F1 {before.f1:.4f}")
    best_iou, best_epoch = before.iou, 0
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
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
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if s.max_seconds is not None and time.perf_counter() - t_start > s.max_seconds and epoch < s.epochs:
            say(f"stopping after epoch {epoch}: --max-seconds {s.max_seconds:g} reached")
            break
    model.load_state_dict(best_state)
    model.eval().cpu()
    for p in model.parameters():
        p.requires_grad_(True)
    after = before if best_epoch == 0 else history[best_epoch - 1].val
    meta = {
        "gum_ray_finetune": {
            "init": str(init),
            "init_sha256": file_sha256(init),
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
        "init_meta": {k: v for k, v in loaded.meta.items() if k != "gum_ray_finetune"},
    }
    sha = save_checkpoint(model, out, spec, meta=meta)
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

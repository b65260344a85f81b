"""Training steps shared by fine-tuning (:mod:`gum_ray.finetune`) and the demo model (:mod:`gum_ray.demo_model`).

Family-agnostic: a model is a :class:`gum_ray.network.UrbanModel` (its ``forward`` gives the logits
of whole crops, its ``encoder`` is what a fine-tune may freeze). The loss is cross-entropy with
ignore index :data:`IGNORE` (255, :data:`gum_ray.imagery.NODATA`: mmseg's ``CrossEntropyLoss`` of
the GUM config, weight 1.0); :func:`augment` draws one of the 8 symmetries of the square;
:func:`lr_at` is a linear warm-up then a cosine decay; :class:`Metrics` counts the urban class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gum_ray.imagery import NODATA
from gum_ray.network import UrbanModel

#: label value that is not trained on (pixels without imagery, the user's "ignore")
IGNORE = NODATA


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


def train_step(
    model: UrbanModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    scaler: Any = None,
) -> float:
    """One optimisation step on a batch (B, C, H, W) / (B, H, W) int64 (255 = ignore); the loss."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model.forward(x)
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
def predict_logits(model: UrbanModel, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Logits (B, 2, H, W) float32 of whole crops in eval mode (the network's view of one crop)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model.forward(x).float()


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


def freeze_encoder(model: UrbanModel) -> int:
    """Freeze the model's encoder weights (and its BatchNorm statistics); returns tensors frozen."""
    n = 0
    for p in model.encoder.parameters():
        p.requires_grad_(False)
        n += 1
    return n


def set_train_mode(model: UrbanModel, frozen_encoder: bool) -> None:
    model.module.train()
    if frozen_encoder:
        model.encoder.eval()  # BN running statistics stay those of the checkpoint


__all__ = [
    "IGNORE",
    "Metrics",
    "augment",
    "freeze_encoder",
    "lr_at",
    "predict_logits",
    "set_train_mode",
    "train_step",
    "training_autocast",
]

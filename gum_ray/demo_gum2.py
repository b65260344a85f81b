"""The GUM 2.0 demo model: a reduced-width GUM 2.0 trained on the synthetic world, cached per machine.

As for GUM 1 (:mod:`gum_ray.demo_model`, whose training and held-out places and crop sampling rule
it shares), so that the offline pipeline runs either family: ``gum demo-model --model
gum2``, and ``gum map --model gum2`` on the synthetic source without ``--checkpoint``
(:func:`resolve_demo_checkpoint`). The network is :class:`gum_ray.gum2.Gum2` at width 4 (stages
4, 4, 4, 8, 16; PSP 2 channels; :data:`DEMO_GUM2_SPEC`), fed the notebook's preprocessing: the
synthetic world's classes are separable per pixel, and on the project's shared 2-core CPUs a wider
network trains too slowly (width 16 took 10-30 s a step against 0.7-2.7 s for width 8, batch of 4
crops of 256 px; under load even width 8 got about 20 % of a core, 18 s a step). Training runs in fp32
(on the project's CPUs, without native bf16, a bf16-autocast step took 16 s against 6 s in fp32
under load) on crops of 128 px, 4 a batch (an eighth of the cost of a step of 8 crops of 256 px:
on a 2-core machine shared with other work a 4 x 256 px step took up to 19 s, and 13 steps in the
time budget learnt nothing; 49 steps of 8 x 128 px reached an urban IoU of 0.31 only). The time
budget (360 s) stops training early, but never before ``min_steps`` (100), after which the
learning-rate schedule follows the steps. Inference uses 256 px crops as always. Training runs on
one thread: on a 2-core machine shared with other work, OpenMP's spin-waiting made two threads
five times slower (11 s a step against 2.3 s).

**The authors' corruption scheme.** The student of GUM 2.0 was trained on batches where a modality
is missing, with a missing modality set to the normalised value 0 (``INPUT.MASK_VALUE``). Each
training crop here is, independently (:class:`Gum2DemoRecipe`): without Sentinel-2 (its four
channels 0) with probability 0.2, without Sentinel-1 with 0.15, under simulated clouds with 0.3 (a
smooth random field thresholded to cover 20-80 % of the crop; Sentinel-2 0 there), else clean. The
training imagery itself is the cloud-free world; the clouds of the world
(:mod:`gum_ray.sources.synthetic_clouds`) are only in the evaluation.

**Held-out evaluation** (:func:`evaluate_model`, any model family): the standard engine's
:meth:`~gum_ray.inference.InferenceEngine.predict_imagery` (the model's own preprocessing and
validity) on the held-out places, compared with the world's ground truth; pixels the model does not
map count as no data (not as errors), and the urban IoU is split by whether the pixel had
Sentinel-2. The checkpoint's meta records it without clouds and with the world's clouds.

The file is cached at ``$GUM_DEMO_MODEL_GUM2`` if set, else
``~/.cache/gum-ray/demo-model/gum2-<recipe hash>.pth``, trained once per machine and recipe under
a file lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gum_ray.demo_model import (
    DEMO,
    HELD_OUT_AREAS,
    TRAIN_AREAS,
    _Area,
    _urban,
    area_geobox,
    cache_dir,
    world_fingerprint,
)
from gum_ray.errors import InputError
from gum_ray.gum2 import Gum2, Gum2Spec
from gum_ray.tiling import CROP

DEMO_GUM2_VERSION = 1
DEMO_GUM2_SPEC = Gum2Spec(width=4, psp_channels=2)
ENV_PATH_GUM2 = "GUM_DEMO_MODEL_GUM2"
S2_CHANNELS = slice(0, 4)
S1_CHANNELS = slice(4, 8)


@dataclasses.dataclass(frozen=True)
class Gum2DemoRecipe:
    """Everything that decides the GUM 2.0 demo model (its hash names the cached file)."""

    spec: Gum2Spec = DEMO_GUM2_SPEC
    train_areas: tuple[tuple[str, float, float], ...] = TRAIN_AREAS
    train_years: tuple[int, ...] = (2018, 2023)
    train_area_px: int = 640
    held_out_areas: tuple[tuple[str, float, float], ...] = HELD_OUT_AREAS
    held_out_year: int = 2021
    held_out_area_px: int = 768
    steps: int = 330
    min_steps: int = 100
    batch_size: int = 4
    train_crop_px: int = 128
    lr: float = 6e-3
    weight_decay: float = 1e-4
    road_centre_fraction: float = 0.3
    town_centre_fraction: float = 0.3
    no_s2_fraction: float = 0.2
    no_s1_fraction: float = 0.15
    cloud_fraction: float = 0.3
    cloud_cover: tuple[float, float] = (0.2, 0.8)
    max_train_seconds: float = 360.0
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not 1 <= self.min_steps <= self.steps:
            raise InputError("GUM 2.0 demo model: steps and batch size must be at least 1, min_steps 1..steps")
        if self.train_crop_px % 16 or not 32 <= self.train_crop_px <= CROP:
            raise InputError(f"GUM 2.0 demo model: training crops must be a multiple of 16 px, 32-{CROP}")
        if self.train_area_px < CROP or self.held_out_area_px < CROP:
            raise InputError(f"GUM 2.0 demo model: areas must be at least {CROP} px on a side")
        if self.no_s2_fraction + self.no_s1_fraction + self.cloud_fraction > 1.0:
            raise InputError("GUM 2.0 demo model: the corruption fractions add up to more than 1")

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.as_dict()
        return d

    def identity(self) -> dict[str, Any]:
        """The recipe less the time budget, plus the synthetic world it learns."""
        d = self.as_dict()
        d.pop("max_train_seconds")
        return {"demo_gum2_version": DEMO_GUM2_VERSION, "world": world_fingerprint(), **d}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def default_path(recipe: Gum2DemoRecipe | None = None) -> Path:
    """``$GUM_DEMO_MODEL_GUM2`` if set, else the per-recipe file in the user's cache."""
    env = os.environ.get(ENV_PATH_GUM2)
    if env:
        return Path(env).expanduser()
    return cache_dir() / f"gum2-{(recipe or Gum2DemoRecipe()).hash()}.pth"


# ---------------------------------------------------------------------------------------- data


def _training_data(recipe: Gum2DemoRecipe) -> list[_Area]:
    from gum_ray.gum2 import preprocess
    from gum_ray.sources.synthetic import CLASS_ROAD, CLASS_TOWN, SyntheticSource, class_map

    out = []
    source = SyntheticSource()  # the cloud-free world: missing inputs come from the corruption
    for _, lon, lat in recipe.train_areas:
        for year in recipe.train_years:
            gb = area_geobox(lon, lat, recipe.train_area_px)
            x = preprocess(source.fetch(gb, year).export)
            classes = class_map(gb, year)
            out.append(_Area(x.astype(np.float16), _urban(classes).astype(np.uint8),
                             np.flatnonzero(classes == CLASS_TOWN), np.flatnonzero(classes == CLASS_ROAD)))
    return out


def sample_batch(areas: Sequence[_Area], recipe: Gum2DemoRecipe, rng: np.random.Generator):
    """A batch of ``train_crop_px`` crops (as the GUM 1 demo samples: around road pixels, town
    pixels or anywhere; random flips and rotations): x (B, 10, c, c) float32, y (B, c, c) int64."""
    from gum_ray.training import augment

    xs, ys = [], []
    n, c = recipe.train_area_px, recipe.train_crop_px
    for _ in range(recipe.batch_size):
        a = areas[int(rng.integers(len(areas)))]
        u = rng.random()
        pool = a.roads if u < recipe.road_centre_fraction else (
            a.towns if u < recipe.road_centre_fraction + recipe.town_centre_fraction else None)
        if pool is not None and pool.size:
            cy, cx = divmod(int(pool[int(rng.integers(pool.size))]), n)
            jitter = c // 3
            y0 = int(np.clip(cy - c // 2 + rng.integers(-jitter, jitter + 1), 0, n - c))
            x0 = int(np.clip(cx - c // 2 + rng.integers(-jitter, jitter + 1), 0, n - c))
        else:
            y0, x0 = (int(v) for v in rng.integers(0, n - c + 1, size=2))
        x, y = augment(a.x[:, y0 : y0 + c, x0 : x0 + c].astype(np.float32), a.y[y0 : y0 + c, x0 : x0 + c], rng)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def simulated_clouds(rng: np.random.Generator, cover: float, size: int = CROP) -> np.ndarray:
    """A bool (size, size) cloud mask covering ``cover`` of the crop: smooth random blobs (two
    octaves of bilinearly upsampled noise, thresholded at the matching quantile)."""
    field = np.zeros((size, size), np.float32)
    for cells, weight in ((6, 0.7), (16, 0.3)):
        coarse = torch.from_numpy(rng.random((1, 1, cells, cells), dtype=np.float32))
        up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        field += weight * up[0, 0].numpy()
    return field < np.quantile(field, cover)


def corrupt(x: torch.Tensor, rng: np.random.Generator, recipe: Gum2DemoRecipe) -> list[str]:
    """Apply the authors' corruption scheme to a preprocessed batch (B, 10, H, W) in place; returns
    what each crop got (``clean``, ``no_s2``, ``no_s1``, ``clouds``)."""
    what = []
    for b in range(x.shape[0]):
        u = rng.random()
        if u < recipe.no_s2_fraction:
            x[b, S2_CHANNELS] = 0.0
            what.append("no_s2")
        elif u < recipe.no_s2_fraction + recipe.no_s1_fraction:
            x[b, S1_CHANNELS] = 0.0
            what.append("no_s1")
        elif u < recipe.no_s2_fraction + recipe.no_s1_fraction + recipe.cloud_fraction:
            cover = float(rng.uniform(*recipe.cloud_cover))
            mask = torch.from_numpy(simulated_clouds(rng, cover, x.shape[-1]))
            x[b, S2_CHANNELS] = x[b, S2_CHANNELS].masked_fill(mask, 0.0)
            what.append("clouds")
        else:
            what.append("clean")
    return what


# ---------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class WorldEvaluation:
    """A model on held-out places of the synthetic world: no data share and urban IoU by S2."""

    model_family: str
    clouds: bool
    year: int
    pixels: int
    nodata_px: int
    s2_missing_px: int
    all: Any  # training.Metrics over mapped pixels
    s2_present: Any
    s2_missing: Any
    per_area: dict[str, Any]
    seconds: float

    @property
    def nodata_share(self) -> float:
        return self.nodata_px / self.pixels if self.pixels else float("nan")

    @property
    def iou(self) -> float:
        return self.all.iou

    def as_dict(self) -> dict[str, Any]:
        return {"model_family": self.model_family, "clouds": self.clouds, "year": self.year,
                "pixels": self.pixels, "nodata_px": self.nodata_px, "nodata_share": self.nodata_share,
                "s2_missing_px": self.s2_missing_px, "total": self.all.as_dict(),
                "s2_present": self.s2_present.as_dict(), "s2_missing": self.s2_missing.as_dict(),
                "per_area": {k: v.as_dict() for k, v in self.per_area.items()}, "seconds": self.seconds}


def evaluate_model(
    model: Any,
    areas: Sequence[tuple[str, float, float]] = HELD_OUT_AREAS,
    *,
    year: int = 2021,
    size: int = 768,
    clouds: bool = True,
    settings: Any = None,
) -> WorldEvaluation:
    """Predict synthetic-world places with any model family and compare with the ground truth.

    The engine's :meth:`~gum_ray.inference.InferenceEngine.predict_imagery` decides which pixels the
    model maps (its validity); unmapped pixels are counted as no data, mapped ones are scored, all
    together and split by whether the pixel had Sentinel-2.
    """
    from gum_ray.inference import InferenceEngine, InferenceSettings
    from gum_ray.sources.synthetic import SyntheticSource, ground_truth
    from gum_ray.training import Metrics

    t0 = time.perf_counter()
    engine = InferenceEngine(model, settings or InferenceSettings())
    source = SyntheticSource(clouds=clouds)
    total, present, missing = Metrics(), Metrics(), Metrics()
    per_area: dict[str, Any] = {}
    pixels = nodata = s2_missing = 0
    for name, lon, lat in areas:
        gb = area_geobox(lon, lat, size)
        imagery = source.fetch(gb, year)
        truth = ground_truth(gb, year).astype(np.uint8)
        pred = engine.predict_imagery(imagery)
        mapped = pred.valid
        has_s2 = imagery.masks["s2"]
        label = np.where(mapped, pred.label, 0).astype(np.uint8)

        def scored(where: np.ndarray) -> Any:
            return Metrics.of(label, np.where(where & mapped, truth, 255).astype(np.uint8))

        per_area[name] = scored(np.ones_like(mapped))
        total = total + per_area[name]
        present = present + scored(has_s2)
        missing = missing + scored(~has_s2)
        pixels += mapped.size
        nodata += int((~mapped).sum())
        s2_missing += int((~has_s2).sum())
    return WorldEvaluation(getattr(model, "family", "gum1"), clouds, year, pixels, nodata, s2_missing, total,
                           present, missing, per_area, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class Gum2DemoResult:
    path: Path
    sha256: str
    held_out: WorldEvaluation
    held_out_clouds: WorldEvaluation
    train_seconds: float
    total_seconds: float
    steps: int


def train_gum2_demo_model(
    out: str | os.PathLike[str],
    recipe: Gum2DemoRecipe | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> Gum2DemoResult:
    """Train the GUM 2.0 demo model with ``recipe`` (corrupted batches), evaluate it, save it to ``out``."""
    recipe = recipe or Gum2DemoRecipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(out, recipe, echo or (lambda _m: None))
    finally:
        torch.set_num_threads(threads)


def _train(out: str | os.PathLike[str], recipe: Gum2DemoRecipe, say: Callable[[str], None]) -> Gum2DemoResult:
    from gum_ray.gum2 import build_network
    from gum_ray.training import lr_at, train_step, training_autocast

    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    areas = _training_data(recipe)
    t_data = time.perf_counter() - t_start
    say(f"GUM 2.0 demo model: rendered {len(areas)} training grids of {recipe.train_area_px} px in {t_data:.1f} s")
    amp = training_autocast(recipe.precision, torch.device("cpu"))
    model = Gum2(build_network(recipe.spec))
    model.module.train()
    opt = torch.optim.AdamW(model.module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    t_train = time.perf_counter()
    losses: list[float] = []
    kinds: dict[str, int] = {}
    step, stopped_by = 0, "steps"
    while step < recipe.steps:
        # the time budget may end training early, but never before min_steps (a loaded machine
        # would otherwise stop after a few dozen steps that learnt little): the schedule then
        # follows min_steps
        timed = min((time.perf_counter() - t_train) / recipe.max_train_seconds, step / recipe.min_steps)
        progress = max(step / recipe.steps, timed)
        if progress >= 1.0:
            stopped_by = "time"
            break
        lr = lr_at(progress, recipe.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = sample_batch(areas, recipe, rng)
        for k in corrupt(x, rng, recipe):
            kinds[k] = kinds.get(k, 0) + 1
        loss = train_step(model, opt, x, y, amp)
        if math.isfinite(loss):
            losses.append(loss)
        step += 1
        if step % 40 == 0 or step == 1:
            say(f"GUM 2.0 demo model: step {step}/{recipe.steps}  loss {np.mean(losses[-40:]):.4f}  "
                f"lr {lr:.2e}  {time.perf_counter() - t_train:.0f} s")
    train_seconds = time.perf_counter() - t_train
    model.module.eval()
    from gum_ray.inference import InferenceSettings

    # fp32: on CPUs without native bf16 it is the faster precision too
    kw = dict(year=recipe.held_out_year, size=recipe.held_out_area_px, settings=InferenceSettings(precision="fp32"))
    held = evaluate_model(model, recipe.held_out_areas, clouds=False, **kw)
    cloudy = evaluate_model(model, recipe.held_out_areas, clouds=True, **kw)
    total_seconds = time.perf_counter() - t_start
    say(f"GUM 2.0 demo model: {step} steps in {train_seconds:.0f} s (stopped by {stopped_by}); held-out IoU "
        f"{held.iou:.4f}; with clouds: IoU {cloudy.s2_present.iou:.4f} where S2 is present, "
        f"{cloudy.s2_missing.iou:.4f} where it is missing; total {total_seconds:.0f} s")
    meta = {
        "gum_ray_demo": {
            "note": "GUM 2.0 architecture at reduced width, trained on gum-ray's synthetic world only with "
                    "the authors' corruption scheme (no S2, no S1, clouds); for demos and tests, not for "
                    "real imagery",
            "family": "gum2",
            "recipe": recipe.as_dict(),
            "recipe_hash": recipe.hash(),
            "steps_done": step,
            "stopped_by": stopped_by,
            "corruptions": kinds,
            "final_loss": float(np.mean(losses[-40:])) if losses else None,
            "precision": "bf16" if amp == torch.bfloat16 else "fp32",
            "threads": torch.get_num_threads(),
            "data_seconds": t_data,
            "train_seconds": train_seconds,
            "total_seconds": total_seconds,
            "held_out": held.as_dict(),
            "held_out_clouds": cloudy.as_dict(),
        },
    }
    sha = model.save(out, meta)
    return Gum2DemoResult(Path(out), sha, held, cloudy, train_seconds, total_seconds, step)


def ensure_gum2_demo_model(
    path: str | os.PathLike[str] | None = None,
    recipe: Gum2DemoRecipe | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """The GUM 2.0 demo model's checkpoint: the cached file, or trained now (once; a few minutes),
    under a file lock (``<path>.lock``) so that concurrent callers train it once."""
    import fcntl

    p = Path(path).expanduser() if path is not None else default_path(recipe)
    if p.is_file() and p.stat().st_size > 0:
        return p
    if echo is None:
        def echo(msg: str) -> None:
            print(f"gum: {msg}", file=sys.stderr, flush=True)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_name(p.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if p.is_file() and p.stat().st_size > 0:  # trained by another process meanwhile
                return p
            echo(f"training the GUM 2.0 demo model for the synthetic world (once per machine, a few "
                 f"minutes); it will be cached at {p}")
            res = train_gum2_demo_model(p, recipe, echo=echo)
            echo(f"GUM 2.0 demo model ready: {p} (held-out IoU {res.held_out.iou:.3f}, {res.total_seconds:.0f} s)")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return p


def resolve_demo_checkpoint(checkpoint: str | None, source: Any = None, family: str | None = None) -> str:
    """The checkpoint to use for either family: ``checkpoint``, else the source's default, where
    ``"demo"`` is the demo model of ``family`` (``gum2``: this module's; else GUM 1's).

    Raises:
        InputError: no checkpoint given and the source has no default (``param`` = ``checkpoint``).
    """
    from gum_ray.demo_model import resolve_checkpoint

    name = checkpoint or (source.default_checkpoint if source is not None else None)
    if name == DEMO and family == "gum2":
        return str(ensure_gum2_demo_model())
    return resolve_checkpoint(checkpoint, source)


__all__ = [
    "DEMO_GUM2_SPEC",
    "ENV_PATH_GUM2",
    "Gum2DemoRecipe",
    "Gum2DemoResult",
    "WorldEvaluation",
    "corrupt",
    "default_path",
    "ensure_gum2_demo_model",
    "evaluate_model",
    "resolve_demo_checkpoint",
    "simulated_clouds",
    "train_gum2_demo_model",
]

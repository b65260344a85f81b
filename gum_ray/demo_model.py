"""The demo model: a GUM-architecture network trained on the synthetic world, cached per machine.

gum-ray ships no weights (the released GUM checkpoint is the user's to supply). So that the whole
pipeline runs offline and its accuracy is measurable, ``gum demo-model`` (and
:func:`ensure_demo_model`, which ``gum map``/``gum patches`` call for the synthetic source) trains
the GUM network, the same mmseg UNet + PSP head at a reduced width recorded in the checkpoint
(:data:`DEMO_SPEC`: base 16 channels instead of 64, PSP 8 instead of 16), on the synthetic world:

* **training areas** (:data:`TRAIN_AREAS`): square 10 m UTM grids around a dozen places spread over
  the globe, rendered for two years; random 256 x 256 crops are cut from them in memory (30 % centred
  on a road pixel, 30 % on a town pixel, the rest anywhere; random flips and rotations): the
  20 m wide roads are rare, and a network that seldom sees them misses them;
* **held-out areas** (:data:`HELD_OUT_AREAS`): other places, at least half a degree from every
  training area (the first is the README's demo town, :data:`gum_ray.sources.synthetic.DEMO_LONLAT`),
  predicted with the standard :class:`~gum_ray.inference.InferenceEngine` (overlapping 256 crops,
  default settings) and compared with the world's ground truth: the urban IoU is stored in the
  checkpoint's meta (``gum_ray_demo.held_out``).

Training takes a fixed number of steps or a time budget, whichever ends first: the learning-rate
schedule follows whichever is further along, so a slow machine still ends on a fully annealed
model. bf16 autocast where the CPU has native bf16. The result is cached at
``$GUM_DEMO_MODEL`` if set, else ``~/.cache/gum-ray/demo-model/<recipe hash>.pth`` (``$XDG_CACHE_HOME``
respected): trained once per machine and recipe, under a file lock so that concurrent callers train
it only once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gum_ray.errors import InputError
from gum_ray.tiling import CROP
from gum_ray.model import Gum1, ModelSpec

log = logging.getLogger(__name__)

DEMO_VERSION = 1
DEMO_SPEC = ModelSpec(in_channels=10, base_channels=16, psp_channels=8)
ENV_PATH = "GUM_DEMO_MODEL"
#: the checkpoint name that means "the demo model" (a source's ``default_checkpoint``, ``--checkpoint demo``)
DEMO = "demo"

#: Training places (name, lon, lat): the centres of square UTM training grids.
TRAIN_AREAS: tuple[tuple[str, float, float], ...] = (
    ("paris", 2.35, 48.0),
    ("madrid", -3.7, 40.4),
    ("berlin", 13.4, 52.5),
    ("belgrade", 21.0, 44.8),
    ("new-york", -74.0, 40.7),
    ("johannesburg", 28.0, -26.2),
    ("bangkok", 100.5, 13.8),
    ("tokyo", 139.7, 35.7),
    ("delhi", 77.2, 28.6),
    ("sydney", 151.2, -33.9),
    ("lima", -77.0, -12.0),
    ("nairobi", 36.8, -1.3),
    ("atlantic-coast", -19.95, 30.0),
)
#: Held-out places (never trained on): the first is the demo town of the synthetic world.
HELD_OUT_AREAS: tuple[tuple[str, float, float], ...] = (
    ("demo", 8.5823, 47.3818),
    ("cape-town", 18.4, -33.9),
    ("quito", -78.5, -0.2),
    ("helsinki", 24.9, 60.2),
    ("beijing", 116.4, 39.9),
)
MIN_SEPARATION_DEG = 0.5


@dataclasses.dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model (its hash names the cached file)."""

    spec: ModelSpec = DEMO_SPEC
    train_areas: tuple[tuple[str, float, float], ...] = TRAIN_AREAS
    train_years: tuple[int, ...] = (2018, 2023)
    train_area_px: int = 640
    held_out_areas: tuple[tuple[str, float, float], ...] = HELD_OUT_AREAS
    held_out_year: int = 2021
    held_out_area_px: int = 768
    steps: int = 330
    batch_size: int = 4
    lr: float = 6e-3
    weight_decay: float = 1e-4
    road_centre_fraction: float = 0.3
    town_centre_fraction: float = 0.3
    max_train_seconds: float = 240.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("demo model: steps and batch size must be at least 1")
        if self.train_area_px < CROP or self.held_out_area_px < CROP:
            raise InputError(f"demo model: areas must be at least {CROP} px on a side")
        for name, lon, lat in self.held_out_areas:
            for tname, tlon, tlat in self.train_areas:
                if max(abs(lon - tlon), abs(lat - tlat)) < MIN_SEPARATION_DEG:
                    raise InputError(
                        f"demo model: held-out area {name!r} is within {MIN_SEPARATION_DEG} degree of "
                        f"training area {tname!r}; held-out areas must be disjoint from training"
                    )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.as_dict()
        return d

    def identity(self) -> dict[str, Any]:
        """What names the cached model: the recipe less the time budget (a safety stop only), and
        the synthetic world it learns (a change of the world means a new model)."""
        d = self.as_dict()
        d.pop("max_train_seconds")
        return {"demo_version": DEMO_VERSION, "world": world_fingerprint(), **d}

    def hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------- paths


@functools.lru_cache(maxsize=1)
def world_fingerprint() -> str:
    """A hash of a small sample of the synthetic world (imagery and classes near the demo town)."""
    from gum_ray.grid import point_geobox
    from gum_ray.sources.synthetic import DEMO_LONLAT, render

    imagery, classes = render(point_geobox(*DEMO_LONLAT, size=48), 2021)
    h = hashlib.sha256(np.ascontiguousarray(imagery.export).tobytes())
    h.update(np.ascontiguousarray(classes).tobytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gum-ray" / "demo-model"


def default_path(recipe: DemoRecipe | None = None) -> Path:
    """``$GUM_DEMO_MODEL`` if set, else the per-recipe file in the user's cache."""
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env).expanduser()
    return cache_dir() / f"{(recipe or DemoRecipe()).hash()}.pth"


# ---------------------------------------------------------------------------------------- data


def area_geobox(lon: float, lat: float, size: int):
    """A ``size`` x ``size`` 10 m grid in the UTM zone of (lon, lat), centred on it."""
    from gum_ray.grid import point_geobox

    return point_geobox(lon, lat, size=size)


@dataclasses.dataclass
class _Area:
    x: np.ndarray  # (C, H, W) float16 model input
    y: np.ndarray  # (H, W) uint8 ground truth
    towns: np.ndarray  # flat indices of town pixels
    roads: np.ndarray  # flat indices of road pixels


def render_area(lon: float, lat: float, size: int, year: int) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed synthetic imagery (C, H, W) float32 and the urban ground truth (H, W) bool."""
    x, classes = _render_classes(lon, lat, size, year)
    return x, _urban(classes)


def _render_classes(lon: float, lat: float, size: int, year: int) -> tuple[np.ndarray, np.ndarray]:
    from gum_ray.bands import preprocess
    from gum_ray.sources.synthetic import SyntheticSource, class_map

    gb = area_geobox(lon, lat, size)
    imagery = SyntheticSource().fetch(gb, year)
    return preprocess(imagery.export), class_map(gb, year)


def _urban(classes: np.ndarray) -> np.ndarray:
    from gum_ray.sources.synthetic import CLASS_ROAD, CLASS_TOWN

    return (classes == CLASS_TOWN) | (classes == CLASS_ROAD)


def _training_data(recipe: DemoRecipe) -> list[_Area]:
    from gum_ray.sources.synthetic import CLASS_ROAD, CLASS_TOWN

    out = []
    for _, lon, lat in recipe.train_areas:
        for year in recipe.train_years:
            x, classes = _render_classes(lon, lat, recipe.train_area_px, year)
            out.append(_Area(x.astype(np.float16), _urban(classes).astype(np.uint8),
                             np.flatnonzero(classes == CLASS_TOWN), np.flatnonzero(classes == CLASS_ROAD)))
    return out


def _sample_batch(areas: Sequence[_Area], recipe: DemoRecipe, rng: np.random.Generator):
    from gum_ray.training import augment

    xs, ys = [], []
    n = recipe.train_area_px
    for _ in range(recipe.batch_size):
        a = areas[int(rng.integers(len(areas)))]
        u = rng.random()
        # a crop around a road pixel, a town pixel, or anywhere: thin roads are rare, and missed
        # unless the network sees them often
        pool = a.roads if u < recipe.road_centre_fraction else (
            a.towns if u < recipe.road_centre_fraction + recipe.town_centre_fraction else None)
        if pool is not None and pool.size:
            cy, cx = divmod(int(pool[int(rng.integers(pool.size))]), n)
            y0 = int(np.clip(cy - CROP // 2 + rng.integers(-96, 97), 0, n - CROP))
            x0 = int(np.clip(cx - CROP // 2 + rng.integers(-96, 97), 0, n - CROP))
        else:
            y0, x0 = (int(v) for v in rng.integers(0, n - CROP + 1, size=2))
        x = a.x[:, y0 : y0 + CROP, x0 : x0 + CROP].astype(np.float32)
        y = a.y[y0 : y0 + CROP, x0 : x0 + CROP]
        x, y = augment(x, y, rng)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


# ---------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class HeldOutResult:
    """Urban IoU of a model on the held-out areas (per area and pooled over all pixels)."""

    per_area: dict[str, Any]
    total: Any  # training.Metrics
    year: int
    seconds: float

    @property
    def iou(self) -> float:
        return self.total.iou

    def as_dict(self) -> dict[str, Any]:
        return {"year": self.year, "seconds": self.seconds, "total": self.total.as_dict(),
                "per_area": {k: v.as_dict() for k, v in self.per_area.items()}}


def evaluate_held_out(
    model: torch.nn.Module,
    recipe: DemoRecipe | None = None,
    *,
    settings: Any = None,
    areas: Sequence[tuple[str, float, float]] | None = None,
    year: int | None = None,
    size: int | None = None,
) -> HeldOutResult:
    """Predict the held-out areas with the standard engine and compare with the ground truth."""
    from gum_ray.training import Metrics
    from gum_ray.inference import InferenceEngine, InferenceSettings

    recipe = recipe or DemoRecipe()
    areas = recipe.held_out_areas if areas is None else areas
    year = recipe.held_out_year if year is None else year
    size = recipe.held_out_area_px if size is None else size
    t0 = time.perf_counter()
    engine = InferenceEngine(model, settings or InferenceSettings())
    per_area: dict[str, Metrics] = {}
    for name, lon, lat in areas:
        x, gt = render_area(lon, lat, size, year)
        pred = engine.predict(x)
        per_area[name] = Metrics.of(pred.label, gt.astype(np.uint8))
    total = Metrics()
    for m in per_area.values():
        total = total + m
    return HeldOutResult(per_area, total, year, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class DemoResult:
    path: Path
    sha256: str
    held_out: HeldOutResult
    train_seconds: float
    total_seconds: float
    steps: int


def train_demo_model(
    out: str | os.PathLike[str],
    recipe: DemoRecipe | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train the demo model with ``recipe``, evaluate it on the held-out areas, save it to ``out``."""
    from gum_ray.model import build_model
    from gum_ray.training import lr_at, train_step, training_autocast

    recipe = recipe or DemoRecipe()
    say = echo or (lambda _m: None)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    areas = _training_data(recipe)
    t_data = time.perf_counter() - t_start
    say(f"demo model: rendered {len(areas)} training grids of {recipe.train_area_px} px in {t_data:.1f} s")

    device = torch.device("cpu")
    amp = training_autocast("auto", device)
    model = Gum1(build_model(recipe.spec), recipe.spec)
    model.module.train()
    memory_format = torch.channels_last if amp is not None else torch.contiguous_format
    model.module.to(memory_format=memory_format)
    opt = torch.optim.AdamW(model.module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    t_train = time.perf_counter()
    losses: list[float] = []
    step = 0
    stopped_by = "steps"
    while step < recipe.steps:
        elapsed = time.perf_counter() - t_train
        progress = max(step / recipe.steps, elapsed / recipe.max_train_seconds)
        if progress >= 1.0:
            stopped_by = "time"
            break
        lr = lr_at(progress, recipe.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = _sample_batch(areas, recipe, rng)
        x = x.contiguous(memory_format=memory_format)
        loss = train_step(model, opt, x, y, amp)
        if math.isfinite(loss):
            losses.append(loss)
        step += 1
        if step % 40 == 0 or step == 1:
            say(f"demo model: step {step}/{recipe.steps}  loss {np.mean(losses[-40:]):.4f}  lr {lr:.2e}  "
                f"{time.perf_counter() - t_train:.0f} s")
    train_seconds = time.perf_counter() - t_train
    model.module.eval()
    model.module.to(memory_format=torch.contiguous_format)
    held = evaluate_held_out(model, recipe)
    total_seconds = time.perf_counter() - t_start
    say(f"demo model: {step} steps in {train_seconds:.0f} s (stopped by {stopped_by}); held-out IoU "
        f"{held.iou:.4f} ({', '.join(f'{k} {v.iou:.3f}' for k, v in held.per_area.items())}); "
        f"total {total_seconds:.0f} s")
    meta = {
        "gum_ray_demo": {
            "note": "GUM architecture at reduced width, trained on gum-ray's synthetic world only; "
                    "for demos and tests, not for real imagery",
            "recipe": recipe.as_dict(),
            "recipe_hash": recipe.hash(),
            "steps_done": step,
            "stopped_by": stopped_by,
            "final_loss": float(np.mean(losses[-40:])) if losses else None,
            "precision": "bf16" if amp == torch.bfloat16 else "fp32",
            "threads": torch.get_num_threads(),
            "data_seconds": t_data,
            "train_seconds": train_seconds,
            "total_seconds": total_seconds,
            "held_out": held.as_dict(),
        },
        "config": {"model": {"backbone": "UNet", "base_channels": recipe.spec.base_channels,
                             "decode_head": "PSPHead", "psp_channels": recipe.spec.psp_channels,
                             "in_channels": recipe.spec.in_channels, "num_classes": 2}},
    }
    sha = model.save(out, meta)
    return DemoResult(Path(out), sha, held, train_seconds, total_seconds, step)


def resolve_checkpoint(checkpoint: str | None, source: Any = None) -> str:
    """The checkpoint file to use: ``checkpoint``, else the source's default; ``"demo"`` is the demo model.

    Args:
        checkpoint: a checkpoint path, ``"demo"``, or None.
        source: the imagery source (its :attr:`~gum_ray.sources.base.ImagerySource.default_checkpoint`
            applies when ``checkpoint`` is None).

    Raises:
        InputError: no checkpoint given and the source has no default (``param`` = ``checkpoint``).
    """
    name = checkpoint or (source.default_checkpoint if source is not None else None)
    if not name:
        where = f"the {source.name!r} source" if source is not None else "this model"
        raise InputError(
            f"checkpoint is required with {where} (a GUM checkpoint .pth, e.g. stage2.pth); only "
            'the synthetic world has a built-in demo model ("demo")',
            param="checkpoint",
        )
    return str(ensure_demo_model()) if name == DEMO else str(name)


def ensure_demo_model(
    path: str | os.PathLike[str] | None = None,
    recipe: DemoRecipe | None = None,
    *,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """The demo model's checkpoint: the cached file, or trained now (once; a few minutes).

    ``path`` defaults to :func:`default_path`. Training is announced on stderr unless ``echo`` is
    given. A file lock (``<path>.lock``) makes concurrent callers wait for one training run.
    """
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
            echo(f"training the demo model for the synthetic world (once per machine, a few minutes); "
                 f"it will be cached at {p}")
            res = train_demo_model(p, recipe, echo=echo)
            echo(f"demo model ready: {p} (held-out IoU {res.held_out.iou:.3f}, "
                 f"{res.total_seconds:.0f} s)")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return p


__all__ = [
    "DEMO_SPEC",
    "DemoRecipe",
    "DemoResult",
    "ENV_PATH",
    "HELD_OUT_AREAS",
    "HeldOutResult",
    "TRAIN_AREAS",
    "area_geobox",
    "cache_dir",
    "default_path",
    "ensure_demo_model",
    "resolve_checkpoint",
    "evaluate_held_out",
    "render_area",
    "train_demo_model",
]

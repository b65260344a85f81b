"""The GUM network (mmsegmentation's UNet + PSP head of the configs shipped in ``gum_ray/configs``,
rebuilt in plain torch by :mod:`gum_ray.unet`), and the loader for user-supplied checkpoints.

A checkpoint is an mmseg/mmengine file (a dict with ``state_dict``, or a bare state dict; keys may
carry a ``module.`` prefix from DataParallel). The loader infers the architecture from the weight
shapes (input channels 10 or 13; the base width, which is 64 for the released GUM weights and may be
smaller for gum-ray's demo model), checks every key and shape against the network, and
records the file's sha256 for provenance. Anything wrong is a :class:`CheckpointError` naming the
file and the problem. Files are read by :mod:`gum_ray.checkpoint_io`: tensors and inert training
state only, never arbitrary unpickling (``gum convert-checkpoint --trust`` converts other files).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gum_ray.checkpoint_io import file_sha256, read_checkpoint
from gum_ray.errors import CheckpointError
from gum_ray.unet import UNetPSP, uninitialised

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
FIRST_CONV = "backbone.encoder.0.0.convs.0.conv.weight"
PSP_BOTTLENECK = "decode_head.bottleneck.conv.weight"
CLASSIFIER = "decode_head.conv_seg.weight"
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture knobs that vary between GUM checkpoints."""

    in_channels: int = 10
    base_channels: int = 64
    psp_channels: int = 16

    @property
    def with_products(self) -> bool:
        return self.in_channels == 13

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


GUM_10 = ModelSpec(10, 64, 16)
GUM_13 = ModelSpec(13, 64, 16)


def build_model(spec: ModelSpec = GUM_10, *, initialise: bool = True) -> UNetPSP:
    """A freshly initialised GUM network in eval mode, on the CPU: mmseg's ``EncoderDecoder`` of the
    shipped config (``configs/gum_unet_psp.py``, UNet + PSP head) rebuilt in plain torch
    (:class:`gum_ray.unet.UNetPSP`: the same keys, the same logits to the bit, no mmseg import).
    ``initialise=False``: weights left unset, to be loaded (:func:`gum_ray.unet.uninitialised`)."""
    if spec.in_channels not in (10, 13):
        raise CheckpointError(
            f"GUM models take 10 or 13 input channels, not {spec.in_channels}"
        )

    def factory() -> UNetPSP:
        return UNetPSP(spec.in_channels, spec.base_channels, spec.psp_channels)

    return (factory() if initialise else uninitialised(factory)).eval()


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    sha256: str
    path: str
    meta: dict[str, Any]


def _read_checkpoint_file(path: Path) -> Any:
    """The checkpoint's content, read without running code from it (:mod:`gum_ray.checkpoint_io`)."""
    return read_checkpoint(path)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def extract_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of an mmseg checkpoint (``state_dict`` key or bare dict), ``module.`` stripped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise CheckpointError(
            f"checkpoint {path}: holds a {type(obj).__name__}, not a state dict; "
            "expected an mmsegmentation checkpoint (a dict with 'state_dict')"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            continue
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    if not out:
        raise CheckpointError(f"checkpoint {path}: contains no tensors")
    return out


def infer_spec(state_dict: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> ModelSpec:
    missing = [k for k in (FIRST_CONV, PSP_BOTTLENECK, CLASSIFIER) if k not in state_dict]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: is not a GUM (mmseg UNet + PSPHead) checkpoint: "
            f"key {missing[0]!r} is missing"
        )
    first = state_dict[FIRST_CONV]
    if first.ndim != 4:
        raise CheckpointError(f"checkpoint {path}: {FIRST_CONV} has shape {tuple(first.shape)}")
    num_classes = state_dict[CLASSIFIER].shape[0]
    if num_classes != 2:
        raise CheckpointError(
            f"checkpoint {path}: predicts {num_classes} classes; GUM has 2 (background, urban)"
        )
    return ModelSpec(
        in_channels=int(first.shape[1]),
        base_channels=int(first.shape[0]),
        psp_channels=int(state_dict[PSP_BOTTLENECK].shape[0]),
    )


def load_checkpoint(
    path: str | Path, *, expect_channels: int | None = None, raw: Any = None
) -> LoadedModel:
    """Load and validate a GUM checkpoint; returns the model in eval mode on the CPU.

    ``raw``: the file's content if the caller has already read it (:func:`read_checkpoint`).
    """
    path = Path(path)
    if raw is None:
        raw = _read_checkpoint_file(path)
    sd = extract_state_dict(raw, path)
    spec = infer_spec(sd, path)
    if spec.in_channels not in (10, 13):
        raise CheckpointError(
            f"checkpoint {path}: its first layer takes {spec.in_channels} channels; GUM models take "
            "10 (S2 + S1 + slope/aspect) or 13 (plus the built-up products)"
        )
    if expect_channels is not None and spec.in_channels != expect_channels:
        raise CheckpointError(
            f"checkpoint {path}: is a {spec.in_channels}-channel model but the imagery gives "
            f"{expect_channels} channels; use "
            + (
                "a 14-band export (with products) for this checkpoint"
                if spec.in_channels == 13
                else "the 13-channel 'with products' checkpoint, or drop the product bands"
            )
        )
    model = build_model(spec, initialise=False)  # every key but the BN counters is loaded below
    expected = model.state_dict()
    missing = [
        k for k in expected if k not in sd and not k.endswith(OPTIONAL_KEY_SUFFIXES)
    ]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        raise CheckpointError(
            f"checkpoint {path}: does not match the GUM network: " + ", ".join(parts)
        )
    for key, tensor in expected.items():
        if key in sd and tuple(sd[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path}: {key} has shape {tuple(sd[key].shape)}, the GUM network "
                f"needs {tuple(tensor.shape)}"
            )
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path}: {key} contains NaN or inf values")
    model.load_state_dict(sd, strict=False)
    meta = raw.get("meta", {}) if isinstance(raw, dict) and isinstance(raw.get("meta"), dict) else {}
    return LoadedModel(model=model, spec=spec, sha256=file_sha256(path), path=str(path), meta=meta)


def save_checkpoint(
    model: torch.nn.Module, path: str | Path, spec: ModelSpec, meta: dict[str, Any] | None = None
) -> str:
    """Save in mmseg format (``{'meta': ..., 'state_dict': ...}``), atomically; returns sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "meta": {**(meta or {}), "gum_ray_spec": spec.as_dict()},
        "state_dict": state,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return file_sha256(path)


def randomize(
    model: torch.nn.Module, seed: int = 0, calibrate_on: np.ndarray | None = None
) -> torch.nn.Module:
    """Give every weight random values and calibrate the BN statistics (tests and benchmarks).

    Plain random weights make a network whose output is one constant class. Here the BN running
    statistics are measured on ``calibrate_on`` (preprocessed imagery, (C, H, W), at least 256 px a
    side) or, by default, on smooth random fields, so every layer is normalised and the prediction
    varies with the input: both classes appear, and near-ties are as rare as in a trained model.
    """
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bn.weight") or ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    c = int(model.backbone.encoder[0][0].convs[0].conv.in_channels)
    if calibrate_on is None:
        rng = np.random.default_rng(seed)
        coarse = rng.uniform(0.0, 1.0, (4, c, 16, 16)).astype(np.float32)
        batch = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(256, 256), mode="bilinear")
    else:
        img = torch.from_numpy(np.ascontiguousarray(calibrate_on, dtype=np.float32))
        h, w = img.shape[1] // 256 * 256, img.shape[2] // 256 * 256
        tiles = img[:, :h, :w].unfold(1, 256, 256).unfold(2, 256, 256)
        batch = tiles.permute(1, 2, 0, 3, 4).reshape(-1, c, 256, 256)[:8]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model.encode_decode(batch, [dict(img_shape=(256, 256))] * batch.shape[0])
    for m in bns:
        m.momentum = 0.1
    model.eval()
    with torch.no_grad():  # centre the classifier: about half the calibration pixels are urban
        logits = model.encode_decode(batch, [dict(img_shape=(256, 256))] * batch.shape[0])
        shift = float((logits[:, 1] - logits[:, 0]).median())
        model.decode_head.conv_seg.bias[1] -= shift / 2
        model.decode_head.conv_seg.bias[0] += shift / 2
    return model


def random_checkpoint(
    path: str | Path, spec: ModelSpec = GUM_10, seed: int = 0, calibrate_on=None
) -> str:
    """Write a checkpoint of the GUM network with random, non-trivial weights; returns sha256."""
    model = randomize(build_model(spec), seed, calibrate_on)
    return save_checkpoint(model, path, spec, meta={"note": f"random weights, seed {seed}"})


class Gum1:
    """GUM 1 (UNet + PSP head, 10 or 13 channels): an :class:`gum_ray.network.UrbanModel`.

    Preprocessing is the seed notebook's (:func:`gum_ray.bands.preprocess`, numpy or torch on any
    device, the same values); a pixel without Sentinel-2 is no data; ``forward`` is mmseg's
    ``encode_decode`` on whole crops.
    """

    family = "gum1"

    def __init__(self, module: torch.nn.Module, spec: ModelSpec, *, path: str | None = None,
                 sha256: str | None = None, meta: dict[str, Any] | None = None) -> None:
        self._module = module
        self.spec = spec
        self.path = path
        self.sha256 = sha256
        self.meta = dict(meta or {})

    @classmethod
    def load(cls, path: str | Path, *, raw: Any = None) -> "Gum1":
        """Load and validate a GUM 1 checkpoint (:func:`load_checkpoint`; ``raw``: its content, if
        already read)."""
        loaded = load_checkpoint(path, raw=raw)
        return cls(loaded.model, loaded.spec, path=loaded.path, sha256=loaded.sha256, meta=loaded.meta)

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "Gum1":
        """Wrap a GUM 1 network built by :func:`build_model` (its spec read from its weights)."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a GUM model or a GUM 1 network, got {type(module).__name__}")
        return cls(module, infer_spec(module.state_dict(), "network"))

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def required_bands(self) -> tuple[str, ...]:
        from gum_ray.bands import export_band_names

        return export_band_names(self.spec.with_products)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def encoder(self) -> torch.nn.Module:
        return self._module.backbone.encoder

    def preprocess(self, export: Any) -> Any:
        from gum_ray.bands import preprocess

        return preprocess(export, with_products=self.spec.with_products)

    def validity(self, export: Any) -> Any:
        from gum_ray.bands import validity_mask

        return validity_mask(export)

    def channel_sources(self) -> tuple[tuple[str, int], ...]:
        """Each input channel's compact (part, band): GUM 1's preprocessing is per band, so the
        engine may decode and preprocess compact integers by table lookup
        (:func:`gum_ray.bands.code_tables`); a pixel is valid where every ``s2`` band is present."""
        from gum_ray.bands import GUM1_CHANNEL_SOURCES

        return GUM1_CHANNEL_SOURCES[: self.in_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        metas = [dict(img_shape=(x.shape[2], x.shape[3]))] * x.shape[0]
        return self._module.encode_decode(x, metas)

    def provenance(self) -> dict[str, Any]:
        return {"family": self.family, "checkpoint": Path(self.path).name if self.path else None,
                "checkpoint_sha256": self.sha256, "spec": self.spec.as_dict()}

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> str:
        """Write the weights as an mmseg checkpoint (:func:`save_checkpoint`); returns its sha256."""
        return save_checkpoint(self._module, path, self.spec, meta)

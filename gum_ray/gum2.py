"""GUM 2.0: the GlobalUrbanMapper authors' multi-encoder successor model, as a model family.

The network (``UNetResMultiEnc``, ``../shared/GUM2_REFERENCE.md``) has three encoders, one per
modality (Sentinel-2: 4 channels, Sentinel-1: 4, terrain: 2), fused at every stage, a UNet decoder
and a PSP head. Each encoder is an ``initial_block`` (two 3 x 3 conv-BN-ReLU at full size; mmseg's
``BasicConvBlock``) and a ResNet-18 trunk cut after ``layer3`` whose module names are timm's
(``conv1 bn1 act1 maxpool layer1..3``, BasicBlocks with ``conv1 bn1 conv2 bn2 downsample.0/.1``),
written here in plain PyTorch (timm does not import beside this torch). Stage ``i`` of the three
encoders is fused by ``ffm[i]`` (a BatchNorm per modality, concatenation, 1 x 1 conv-BN-ReLU); the
decoder stages are mmseg ``UpConvBlock``s (``InterpConv`` upsampling, then two 3 x 3 convs); the head
is mmseg's ``PSPHead`` reading the last decoder output (those mmseg parts are :mod:`gum_ray.unet`'s
plain-torch rebuilds, op for op: no mmseg import). So the module names, and with them the
state-dict keys, are the authors' own: their ``GUM_2p0.pth`` loads as it is.

**Width.** The released network has base width 64 (stages 64, 64, 64, 128, 256) and a 16-channel
PSP head. :class:`Gum2Spec` lets the width (and the head's channels) be smaller for a demo model;
both are read from the checkpoint's weight shapes and recorded in provenance.

**Checkpoints** are the authors' layout, ``{"epoch", "state_dict", "lr"}`` (a bare state dict, a
``module.`` prefix and gum-ray's own ``{"meta", "state_dict"}`` are accepted too, as for GUM 1), read
without running code (:mod:`gum_ray.checkpoint_io`) and loaded **strictly**: every key of the network
present with its shape (``num_batches_tracked`` optional, as for GUM 1), the training-only auxiliary
head ``kw_decode_head.*`` recognised and dropped, anything else a :class:`CheckpointError` naming the
key. (The authors load with ``strict=False``, which would leave a misnamed layer silently random.)

**Preprocessing** (:func:`preprocess`) is the authors' mapping notebook's, in float32: NaN and
+-inf -> 0; S2 clipped to [0, 1]; each S1 band clipped to its [vmin, vmax] (:data:`S1_VMIN`,
:data:`S1_VMAX`, the 0.5/99.5 percentiles) and scaled to [0, 1]; slope / 90 and aspect / 360 clipped
to [0, 1]; elevation dropped: 10 channels ``[S2 x 4, S1 x 4, slope, aspect]``. One addition for
missing modalities: a pixel whose Sentinel-1 is wholly missing (no S1 band finite) gets the four
normalised S1 channels = 0, the value the network was trained with for "no S1" (the notebook's
NaN -> 0 dB would give about 0.92-1.0 instead). A pixel without Sentinel-2 needs nothing extra: NaN
-> 0 already is the training's "no S2". Every pixel with all bands finite is the notebook's, bit for
bit; with ``--seed-settings`` (:meth:`Gum2.as_notebook`) every pixel is, missing S1 included.

**Validity** (:func:`validity_mask`): a pixel is mapped when it has Sentinel-2 *or* Sentinel-1
(a modality counts as present when any of its bands is finite); the network was trained to map
without either one of them. A pixel with neither is no data (terrain alone says nothing about
buildings). Missing terrain is not a reason for no data: it becomes 0 (flat, north-facing), as in
the notebook. GUM 1 keeps its own rule (no Sentinel-2, no data).

GUM 2.0 has no "with products" variant (its terrain encoder takes exactly two channels).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gum_ray import bands
from gum_ray.checkpoint_io import file_sha256, read_checkpoint
from gum_ray.errors import CheckpointError, InputError
from gum_ray.unet import BasicConvBlock, PSPHead, UpConvBlock, uninitialised

log = logging.getLogger(__name__)

FAMILY = "gum2"
#: the key that says a checkpoint is GUM 2.0 (its Sentinel-2 encoder's first conv)
FIRST_CONV = "s2_encoder.initial_block.convs.0.conv.weight"
PSP_BOTTLENECK = "decode_head.bottleneck.conv.weight"
CLASSIFIER = "decode_head.conv_seg.weight"
#: prefix of the authors' training-only auxiliary head (dropped on load)
TRAINING_HEAD_PREFIX = "kw_decode_head."
OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)

# -- preprocessing constants (the mapping notebook's), float32, shaped to broadcast over (4, H, W)
#: Sentinel-1 dB clip range per band (VV_asc, VH_asc, VV_desc, VH_desc): 0.5 and 99.5 percentiles
S1_VMIN = np.array([-23.62251091003418, -37.2230110168457, -24.20653533935547, -37.36018753051758],
                   np.float32)[:, None, None]
S1_VMAX = np.array([2.138315200805664, 0.0, 2.071335747242074, 0.0], np.float32)[:, None, None]
SLOPE_DIVISOR = np.float32(90.0)
ASPECT_DIVISOR = np.float32(360.0)
#: the normalised value of a missing modality in training (``INPUT.MASK_VALUE``)
MASK_VALUE = np.float32(0.0)
IN_CHANNELS = 10
#: the model input's channels per encoder, in the input's order
MODALITY_SLICES = {"s2": slice(0, 4), "s1": slice(4, 8), "topo": slice(8, 10)}


# --------------------------------------------------------------------------------- preprocessing


def preprocess(export, *, mask_missing: bool = True):
    """GUM export (11 or 14 bands, H, W) -> GUM 2.0 input (10, H, W) float32, the notebook's way.

    ``mask_missing`` (default): a pixel without Sentinel-1 gets the training's mask value for it
    (normalised 0); False: the notebook to the bit (NaN -> 0 dB). Product bands of a 14-band export
    are ignored. ``export`` is a numpy array or a torch tensor on any device (the device path,
    :mod:`gum_ray.network`); the result is of the same kind and the values are identical either way
    (the same float32 operations, through :mod:`gum_ray.bands`' helpers).

    Raises:
        InputError: not a (bands, H, W) GUM export.
    """
    if export.ndim != 3:
        raise InputError(f"expected an array (bands, height, width), got shape {tuple(export.shape)}")
    bands.with_products_for_band_count(export.shape[0])
    raw = export[: len(bands.EXPORT_BANDS)]
    if isinstance(raw, np.ndarray):
        raw = raw.astype(np.float32, copy=False)
    x = bands.finite_or_zero(raw)
    out = bands.empty_float32(x, (IN_CHANNELS,) + tuple(x.shape[1:]))
    out[0:4] = x[bands.S2_SLICE].clip(0.0, 1.0)
    vmin, span = bands.constant(x, S1_VMIN), bands.constant(x, S1_VMAX - S1_VMIN)
    out[4:8] = (x[bands.S1_SLICE].clip(vmin, bands.constant(x, S1_VMAX)) - vmin) / span
    out[8] = bands.true_div(x[bands.SLOPE], float(SLOPE_DIVISOR)).clip(0.0, 1.0)
    out[9] = bands.true_div(x[bands.ASPECT], float(ASPECT_DIVISOR)).clip(0.0, 1.0)
    if mask_missing:
        no_s1 = ~bands.finite(raw[bands.S1_SLICE]).any(0)
        if no_s1.any():
            out[4:8, no_s1] = float(MASK_VALUE)
    return out


def modalities_present(export: np.ndarray) -> dict[str, np.ndarray]:
    """Per pixel, whether each modality is present (any of its bands finite): ``s2``, ``s1``,
    ``terrain`` (elevation, slope or aspect), bool (H, W) each."""
    return {
        "s2": np.isfinite(export[bands.S2_SLICE]).any(axis=0),
        "s1": np.isfinite(export[bands.S1_SLICE]).any(axis=0),
        "terrain": np.isfinite(export[bands.ELEVATION : bands.ASPECT + 1]).any(axis=0),
    }


def validity_mask(export):
    """True where GUM 2.0 maps the pixel: it has Sentinel-2 or Sentinel-1 (see the module docstring).
    A numpy array or a torch tensor in, the same kind out."""
    return bands.finite(export[bands.S2_SLICE]).any(0) | bands.finite(export[bands.S1_SLICE]).any(0)


# --------------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class Gum2Spec:
    """The architecture knobs of a GUM 2.0 network: base width and the PSP head's channels."""

    width: int = 64
    psp_channels: int = 16

    def __post_init__(self) -> None:
        if self.width < 1 or self.psp_channels < 1:
            raise InputError(f"GUM 2.0 width {self.width} and PSP channels {self.psp_channels} must be >= 1")

    @property
    def stage_channels(self) -> tuple[int, int, int, int, int]:
        """Channels of the five fused stages (full size, 1/2, 1/4, 1/8, 1/16)."""
        w = self.width
        return (w, w, w, 2 * w, 4 * w)

    @property
    def in_channels(self) -> int:
        return IN_CHANNELS

    def as_dict(self) -> dict[str, int]:
        return {"in_channels": IN_CHANNELS, **dataclasses.asdict(self)}


GUM2_RELEASED = Gum2Spec(64, 16)


class BasicBlock(nn.Module):
    """A ResNet basic block with timm's module names (conv1 bn1 act1 conv2 bn2 act2 downsample)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + shortcut)


class ResNetTrunk(nn.Module):
    """ResNet-18 features to ``layer3`` (timm ``features_only``, first conv ``width -> width``).

    Returns the features after ``act1`` (1/2), ``layer1`` (1/4), ``layer2`` (1/8), ``layer3`` (1/16).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(w, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2), BasicBlock(4 * w, 4 * w))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x0 = self.act1(self.bn1(self.conv1(x)))
        x1 = self.layer1(self.maxpool(x0))
        x2 = self.layer2(x1)
        return [x0, x1, x2, self.layer3(x2)]


class ModalityEncoder(nn.Module):
    """One modality's encoder: ``initial_block`` (2 x conv3x3-BN-ReLU, full size) and the trunk."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.initial_block = BasicConvBlock(in_channels, width, num_convs=2)
        self.encoder = ResNetTrunk(width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.initial_block(x)
        return [x, *self.encoder(x)]


class FusionBlock(nn.Module):
    """``ffm[i]``: a BatchNorm per modality, concatenated (s2, s1, topo), 1 x 1 conv-BN-ReLU to n."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        n = channels
        self.s2_scale = nn.BatchNorm2d(n)
        self.s1_scale = nn.BatchNorm2d(n)
        self.srtm_scale = nn.BatchNorm2d(n)
        self.out = nn.Sequential(nn.Conv2d(3 * n, n, 1, bias=False), nn.BatchNorm2d(n), nn.ReLU(inplace=True))

    def forward(self, s2: torch.Tensor, s1: torch.Tensor, topo: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.s2_scale(s2), self.s1_scale(s1), self.srtm_scale(topo)], dim=1))


class UNetResMultiEnc(nn.Module):
    """The GUM 2.0 network. ``forward(x)``: (B, 10, H, W) -> logits (B, 2, H, W); H, W multiples of 16.

    Args:
        spec: base width and PSP channels (:data:`GUM2_RELEASED` for the authors' weights).
    """

    def __init__(self, spec: Gum2Spec = GUM2_RELEASED) -> None:
        super().__init__()
        self.spec = spec
        w = spec.width
        self.s2_encoder = ModalityEncoder(4, w)
        self.s1_encoder = ModalityEncoder(4, w)
        self.topo_encoder = ModalityEncoder(2, w)
        n = spec.stage_channels
        self.ffm = nn.ModuleList(FusionBlock(c) for c in n)
        # decoder[k] upsamples stage k + 1 to stage k: (in, skip) = (n[k + 1], n[k])
        self.decoder = nn.ModuleList(UpConvBlock(n[k + 1], n[k], n[k], num_convs=2) for k in range(4))
        self.decode_head = PSPHead(w, spec.psp_channels, 2, in_index=4, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's outputs: [fused stage 4 (1/16), then each decoder stage up to full size]."""
        s2 = self.s2_encoder(x[:, MODALITY_SLICES["s2"]])
        s1 = self.s1_encoder(x[:, MODALITY_SLICES["s1"]])
        topo = self.topo_encoder(x[:, MODALITY_SLICES["topo"]])
        y = self.ffm[4](s2[4], s1[4], topo[4])
        outs = [y]
        for i in (3, 2, 1, 0):
            y = self.decoder[i](self.ffm[i](s2[i], s1[i], topo[i]), y)
            outs.append(y)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.features(x))


def build_network(spec: Gum2Spec = GUM2_RELEASED, *, initialise: bool = True) -> UNetResMultiEnc:
    """A freshly initialised GUM 2.0 network in eval mode, on the CPU (``initialise=False``: weights
    left unset, to be loaded: :func:`gum_ray.unet.uninitialised`)."""
    if not initialise:
        return uninitialised(lambda: UNetResMultiEnc(spec)).eval()
    return UNetResMultiEnc(spec).eval()


# --------------------------------------------------------------------------------- checkpoints


def is_gum2_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether a state dict is GUM 2.0's (it has ``s2_encoder.*`` keys)."""
    return any(k.startswith("s2_encoder.") for k in state_dict)


def infer_spec(state_dict: dict[str, torch.Tensor], path: str | Path = "checkpoint") -> Gum2Spec:
    """The :class:`Gum2Spec` a GUM 2.0 state dict was saved from (its weight shapes)."""
    for key in (FIRST_CONV, PSP_BOTTLENECK, CLASSIFIER):
        if key not in state_dict:
            raise CheckpointError(f"checkpoint {path}: is not a complete GUM 2.0 checkpoint: key {key!r} is missing")
    first = state_dict[FIRST_CONV]
    if first.ndim != 4 or first.shape[1] != 4:
        raise CheckpointError(f"checkpoint {path}: {FIRST_CONV} has shape {tuple(first.shape)}, GUM 2.0 "
                              "needs (width, 4, 3, 3)")
    if state_dict[CLASSIFIER].shape[0] != 2:
        raise CheckpointError(f"checkpoint {path}: predicts {state_dict[CLASSIFIER].shape[0]} classes; "
                              "GUM 2.0 has 2 (background, urban)")
    return Gum2Spec(width=int(first.shape[0]), psp_channels=int(state_dict[PSP_BOTTLENECK].shape[0]))


def check_state_dict(net: nn.Module, sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict check of ``sd`` (training head already dropped) against ``net``: one line naming a key."""
    expected = net.state_dict()
    spec = getattr(net, "spec", None)
    what = f"the GUM 2.0 network (width {spec.width})" if spec is not None else "the GUM 2.0 network"
    missing = [k for k in expected if k not in sd and not k.endswith(OPTIONAL_KEY_SUFFIXES)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path}: key {missing[0]!r} of {what} is missing{more}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint {path}: unexpected key {unexpected[0]!r}{more}: not part of {what}")
    for key, tensor in expected.items():
        if key in sd and tuple(sd[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint {path}: key {key!r} has shape {tuple(sd[key].shape)}, "
                                  f"{what} needs {tuple(tensor.shape)}")
    for key, tensor in sd.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint {path}: key {key!r} contains NaN or inf values")


def load_network(raw: Any, path: str | Path) -> tuple[UNetResMultiEnc, dict[str, Any], int]:
    """The network from a checkpoint's content (strictly checked), its meta, and the number of
    training-head tensors dropped."""
    from gum_ray.model import extract_state_dict

    sd = extract_state_dict(raw, path)
    head = [k for k in sd if k.startswith(TRAINING_HEAD_PREFIX)]
    for k in head:
        del sd[k]
    net = build_network(infer_spec(sd, path), initialise=False)  # every key but BN counters loaded below
    check_state_dict(net, sd, path)
    net.load_state_dict(sd, strict=False)
    meta: dict[str, Any] = {}
    if isinstance(raw, dict):
        if isinstance(raw.get("meta"), dict):
            meta.update(raw["meta"])
        for k in ("epoch", "lr"):  # the authors' layout: training state beside the weights
            if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool):
                meta.setdefault(k, raw[k])
    return net, meta, len(head)


def save_network(net: nn.Module, path: str | Path, spec: Gum2Spec, meta: dict[str, Any] | None = None) -> str:
    """Save in the authors' layout (``{"epoch", "state_dict", "lr"}``) plus gum-ray's ``meta``,
    atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    payload = {
        "epoch": int(meta.pop("epoch", 0)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "lr": float(meta.pop("lr", 0.0)),
        "meta": {**meta, "family": FAMILY, "gum_ray_spec": spec.as_dict()},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return file_sha256(path)


def _crops(img: np.ndarray, limit: int = 8) -> torch.Tensor:
    """Up to ``limit`` crops of 256 px (the last on each axis pulled back; the whole image if
    smaller) of a (10, H, W) image, at least two (BatchNorm after the PSP head's 1 x 1 pool)."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    ch, cw = min(256, t.shape[1]) // 16 * 16, min(256, t.shape[2]) // 16 * 16
    ys = sorted({min(y, t.shape[1] - ch) for y in range(0, t.shape[1], ch)})
    xs = sorted({min(x, t.shape[2] - cw) for x in range(0, t.shape[2], cw)})
    batch = torch.stack([t[:, y : y + ch, x : x + cw] for y in ys for x in xs])[:limit]
    return torch.cat([batch, batch.flip(-1)]) if batch.shape[0] == 1 else batch


def randomize(net: UNetResMultiEnc, seed: int = 0, calibrate_on: np.ndarray | None = None,
              size: int = 256, centre_on: np.ndarray | None = None) -> UNetResMultiEnc:
    """Random weights with calibrated BN statistics, so the prediction varies with the input (tests,
    benchmarks, the start of a demo model).

    BN running statistics are measured on ``calibrate_on`` (preprocessed imagery (10, H, W): up to
    eight of its 256 px crops, or the whole image if smaller) or on two smooth random fields of
    ``size`` px; the classifier's bias is then centred so that about half the pixels of
    ``centre_on`` (default: the calibration crops) are urban.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    if calibrate_on is None:
        rng = np.random.default_rng(seed)
        coarse = torch.from_numpy(rng.uniform(0.0, 1.0, (2, IN_CHANNELS, 16, 16)).astype(np.float32))
        batch = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    else:
        batch = _crops(calibrate_on)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        net(batch)
    for m in bns:
        m.momentum = 0.1
    net.eval()
    with torch.no_grad():
        logits = net(batch if centre_on is None else _crops(centre_on, 4))
        shift = float((logits[:, 1] - logits[:, 0]).median())
        net.decode_head.conv_seg.bias[1] -= shift / 2
        net.decode_head.conv_seg.bias[0] += shift / 2
    return net


# --------------------------------------------------------------------------------- the family


class Gum2:
    """GUM 2.0 (three encoders, 10 channels): an :class:`gum_ray.network.UrbanModel`.

    Build one with :meth:`load` (a checkpoint), :meth:`random` (random weights at a width, e.g. to
    train a demo model) or the constructor (a network you hold); :meth:`save` writes a checkpoint
    that :meth:`load` and :func:`gum_ray.network.load_model` read back.
    """

    family = FAMILY

    def __init__(self, module: UNetResMultiEnc, *, path: str | None = None, sha256: str | None = None,
                 meta: dict[str, Any] | None = None, notebook: bool = False) -> None:
        if not isinstance(module, UNetResMultiEnc):
            raise TypeError(f"expected a GUM 2.0 network (UNetResMultiEnc), got {type(module).__name__}")
        self._module = module
        self.spec: Gum2Spec = module.spec
        self.path = path
        self.sha256 = sha256
        self.meta = dict(meta or {})
        #: preprocess as the mapping notebook to the bit (a missing S1 is 0 dB, not the mask value 0)
        self.notebook = notebook

    def as_notebook(self) -> "Gum2":
        """The same model (shared weights) preprocessing exactly as the authors' mapping notebook:
        what :meth:`gum_ray.inference.InferenceSettings.seed` runs."""
        return Gum2(self._module, path=self.path, sha256=self.sha256, meta=self.meta, notebook=True)

    @classmethod
    def load(cls, path: str | Path, *, raw: Any = None) -> "Gum2":
        """Load and strictly validate a GUM 2.0 checkpoint (``raw``: its content, if already read).

        Raises:
            CheckpointError: the file is not a usable GUM 2.0 checkpoint (the message names the key).
        """
        path = Path(path)
        if raw is None:
            raw = read_checkpoint(path)
        net, meta, dropped = load_network(raw, path)
        if dropped:
            log.debug("%s: dropped %d tensors of the training-only head %s*", path, dropped, TRAINING_HEAD_PREFIX)
        return cls(net, path=str(path), sha256=file_sha256(path), meta=meta)

    @classmethod
    def random(cls, spec: Gum2Spec | int = GUM2_RELEASED, seed: int = 0,
               calibrate_on: np.ndarray | None = None, size: int = 256,
               centre_on: np.ndarray | None = None) -> "Gum2":
        """Random weights at ``spec`` (or a base width, PSP channels width / 4), BN statistics
        calibrated on ``calibrate_on`` or on random fields of ``size`` px, the classifier centred on
        ``centre_on`` (:func:`randomize`)."""
        if isinstance(spec, int):
            spec = Gum2Spec(spec, max(1, spec // 4))
        net = randomize(build_network(spec), seed, calibrate_on, size, centre_on)
        return cls(net, meta={"note": f"random weights, seed {seed}"})

    @property
    def in_channels(self) -> int:
        return IN_CHANNELS

    @property
    def required_bands(self) -> tuple[str, ...]:
        return bands.EXPORT_BANDS

    @property
    def module(self) -> UNetResMultiEnc:
        return self._module

    @property
    def encoder(self) -> nn.ModuleList:
        """The three encoders (what ``--freeze-encoder`` freezes)."""
        m = self._module
        return nn.ModuleList([m.s2_encoder, m.s1_encoder, m.topo_encoder])

    def preprocess(self, export):
        return preprocess(export, mask_missing=not self.notebook)

    def validity(self, export):
        return validity_mask(export)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)

    def provenance(self) -> dict[str, Any]:
        return {"family": self.family, "checkpoint": Path(self.path).name if self.path else None,
                "checkpoint_sha256": self.sha256, "spec": self.spec.as_dict()}

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> str:
        """Write the weights as a GUM 2.0 checkpoint (:func:`save_network`); returns its sha256."""
        return save_network(self._module, path, self.spec, meta)


__all__ = [
    "ASPECT_DIVISOR", "FAMILY", "GUM2_RELEASED", "Gum2", "Gum2Spec", "IN_CHANNELS", "MASK_VALUE", "S1_VMAX",
    "S1_VMIN", "SLOPE_DIVISOR", "UNetResMultiEnc", "build_network", "is_gum2_state_dict", "modalities_present",
    "preprocess", "validity_mask",
]

"""The model interface: what the inference engine, training and every command know of a model.

A model family (GUM 1, :class:`gum_ray.model.Gum1`; GUM 2.0, :class:`gum_ray.gum2.Gum2`:
``docs/design-notes.md``, "Layers") is one class that satisfies :class:`UrbanModel`:

======================  ==============================================================================
``family``              the family's name (``"gum1"``), recorded in provenance
``in_channels``         channels of the network's input (after preprocessing)
``required_bands``      the GUM export bands it reads (:mod:`gum_ray.bands` names)
``preprocess(export)``  GUM export (bands, H, W) float32, NaN = missing -> network input (C, H, W);
                        a numpy array or a torch tensor (any device) in, the same kind out
``validity(export)``    bool (H, W): the pixels the model maps (the rest is no data); numpy or torch
``forward(x)``          a batch of crops (B, C, 256, 256) -> logits (B, 2, 256, 256), class 1 = urban
``module``              the :class:`torch.nn.Module` holding the weights (device, dtype, training)
``encoder``             the part of ``module`` a fine-tune may freeze
``provenance()``        what identifies the weights (family, checkpoint file and sha256, architecture)
``meta``                what the checkpoint file says about itself (training history, notes)
``save(path, meta)``    write the weights as a checkpoint of the family; returns the file's sha256
======================  ==============================================================================

A family whose default preprocessing differs from its authors' notebook (GUM 2.0 masks a missing
modality as it was trained) also offers ``as_notebook()``: the same weights, preprocessing as the
notebook; the engine uses it under ``InferenceSettings.notebook_preprocessing`` (the seed settings).

**The device path** (DESIGN decision 13). The inference engine hands ``preprocess`` and
``validity`` torch tensors on its device: a cached cell's compact integers are uploaded once and
decoded there (:func:`gum_ray.bands.decode_compact` on tensors, in row blocks), then the family's own
preprocessing runs as tensor ops, so each family's arithmetic is written once and gives the same
values on the host (numpy) and on any device. To adopt it a family writes its preprocessing with
operations numpy arrays and tensors share (slicing, ``+ - *``, ``.clip(lo, hi)``, slice assignment)
and :mod:`gum_ray.bands`'s helpers for the rest: :func:`~gum_ray.bands.finite_or_zero` for
``np.nan_to_num``, :func:`~gum_ray.bands.empty_float32` for ``np.empty``,
:func:`~gum_ray.bands.constant` for per-band constant vectors (e.g. GUM 2.0's S1 ``vmin``/``vmax``)
and :func:`~gum_ray.bands.true_div` for a division by a Python number (CUDA multiplies by the
reciprocal there, 1 ulp off numpy). A test then asserts ``preprocess(torch.from_numpy(e))`` equals
``preprocess(e)`` bit for bit (``tests/test_device_path.py`` does it for GUM 1 and GUM 2.0). A family whose
``preprocess`` only takes numpy still runs: through :meth:`~gum_ray.inference.InferenceEngine.predict`
with a host-preprocessed input.

A family whose preprocessing makes each channel from one export band (GUM 1) may also offer
``channel_sources()``: per input channel, the compact part and band it comes from, e.g.
``("s1", 2)``, with validity meaning "every ``s2`` band present". The engine then decodes and
preprocesses compact integers by one table lookup per channel, tables made from the family's own
``preprocess`` (:func:`gum_ray.bands.code_tables`, which refuses a preprocessing that mixes bands).

The compatibility rule between a model and imagery lives here, once: the imagery must carry every
band the model requires (:func:`check_compatible`); extra bands are not an error (a 10-channel model
ignores the product bands of 14-band imagery). ``gum map``, ``gum patches``, ``gum predict``,
``gum finetune`` and the mapping stages all ask this function, so they give the same answer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


from gum_ray.bands import export_band_names
from gum_ray.errors import CheckpointError


@runtime_checkable
class UrbanModel(Protocol):
    """One model family behind one interface (see the module docstring)."""

    family: str
    meta: dict[str, Any]

    @property
    def in_channels(self) -> int: ...

    @property
    def required_bands(self) -> tuple[str, ...]: ...

    @property
    def module(self) -> Any: ...

    @property
    def encoder(self) -> Any: ...

    def preprocess(self, export: Any) -> Any: ...

    def validity(self, export: Any) -> Any: ...

    def forward(self, x: Any) -> Any: ...

    def provenance(self) -> dict[str, Any]: ...

    def save(self, path: Any, meta: dict[str, Any] | None = None) -> str: ...


def as_model(obj: Any) -> UrbanModel:
    """``obj`` as an :class:`UrbanModel`: itself, or a bare GUM 1 network (mmseg module) wrapped."""
    if isinstance(obj, UrbanModel):
        return obj
    from gum_ray.model import Gum1

    return Gum1.from_module(obj)


#: the model families :func:`load_model` knows, by the name ``--model`` takes
FAMILIES = {"gum1": "GUM 1", "gum2": "GUM 2.0"}


def detect_family(state_dict: dict[str, Any]) -> str:
    """The family a checkpoint's state dict belongs to: ``gum2`` if it has ``s2_encoder.*`` keys
    (with or without a ``module.`` prefix), else ``gum1``."""
    for key in state_dict:
        if isinstance(key, str) and key.removeprefix("module.").startswith("s2_encoder."):
            return "gum2"
    return "gum1"


def load_model(path: Any, family: str | None = None) -> UrbanModel:
    """Load and strictly validate a checkpoint of any model family.

    Args:
        path: the checkpoint (``.pth`` or ``.safetensors``).
        family: None (default) reads the family from the checkpoint's keys (``s2_encoder.*`` ->
            ``gum2``, else ``gum1``); ``"gum1"`` or ``"gum2"`` insists on that family, and a
            checkpoint of the other family is an error.

    Raises:
        CheckpointError: the file is not a usable checkpoint (or not of ``family``: ``param`` =
            ``family`` then); a missing file is also a :class:`FileNotFoundError`.
        InputError: an unknown ``family``.
    """
    from gum_ray.checkpoint_io import read_checkpoint
    from gum_ray.errors import InputError

    if family is not None and family not in FAMILIES:
        raise InputError(f"family {family!r}: unknown model family; use {' or '.join(FAMILIES)}", param="family")
    raw = read_checkpoint(path)
    sd = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else {}
    found = detect_family(sd if isinstance(sd, dict) else {})
    if family is not None and family != found:
        raise CheckpointError(
            f"checkpoint {path}: is a {FAMILIES[found]} checkpoint, not the {FAMILIES[family]} asked for "
            f"(family {family}); give a {FAMILIES[family]} checkpoint, or let the family be read from the "
            "checkpoint",
            param="family",
        )
    if found == "gum2":
        from gum_ray.gum2 import Gum2

        return Gum2.load(path, raw=raw)
    from gum_ray.model import Gum1

    return Gum1.load(path, raw=raw)


def needs_products(model: UrbanModel) -> bool:
    """Whether the model reads the three built-up product bands."""
    return bool(set(model.required_bands) - set(export_band_names(False)))


def check_compatible(model: UrbanModel, with_products: bool, *, what: str = "the imagery") -> None:
    """The one compatibility rule: imagery must carry every band ``model`` requires.

    Args:
        model: the model.
        with_products: whether the imagery carries the built-up product bands (14 bands, else 11).
        what: the imagery, for the message (``"the ee source"``, ``"exports/a.tif"``).

    Raises:
        CheckpointError: bands are missing (``param`` = ``with_products``).
    """
    have = export_band_names(with_products)
    missing = [b for b in model.required_bands if b not in have]
    if missing:
        prov = model.provenance()
        raise CheckpointError(
            f"checkpoint {prov.get('checkpoint') or model.family}: is a {model.in_channels}-channel model that "
            f"needs the bands {', '.join(missing)}, but {what} has {len(have)} bands without them; use "
            "imagery with the built-up products (with_products), or a checkpoint that does not need them",
            param="with_products",
        )


def flops_per_crop(model: Any) -> float:
    """Multiply-adds x 2 of one 256 x 256 crop through ``model`` (an :class:`UrbanModel` or a bare
    GUM 1 network), counted from its conv layers."""
    import math

    import torch

    from gum_ray.tiling import CROP

    model = as_model(model)
    total = 0.0
    hooks = []

    def conv_hook(mod, inp, out):
        nonlocal total
        k = math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)
        total += 2.0 * out.numel() * k

    for m in model.module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
    try:
        dev = next(model.module.parameters()).device
        with torch.inference_mode():
            model.forward(torch.zeros(1, model.in_channels, CROP, CROP, device=dev))
    finally:
        for h in hooks:
            h.remove()
    return total


__all__ = ["FAMILIES", "UrbanModel", "as_model", "check_compatible", "detect_family", "flops_per_crop", "load_model",
           "needs_products"]

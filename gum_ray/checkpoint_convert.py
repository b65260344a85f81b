"""``gum convert-checkpoint``: a checkpoint's GUM weights (GUM 1 or GUM 2.0) into a tensors-only
(safetensors) file.

The one place gum-ray may unpickle a file fully, and only with ``trust=True`` (the user vouches for
the file): every other read goes through :func:`gum_ray.checkpoint_io.read_checkpoint`. The output
is validated as a GUM checkpoint before it appears under its name and records the source's sha256.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from gum_ray.checkpoint_io import (
    SAFETENSORS_SUFFIX,
    UnsafeCheckpointError,
    file_sha256,
    load_trusted_pickle,
    read_checkpoint,
    write_tensors_only,
)
from gum_ray.errors import InputError
from gum_ray import gum2 as gum2_module
from gum_ray.gum2 import is_gum2_state_dict
from gum_ray.model import LoadedModel, extract_state_dict, infer_spec, load_checkpoint
from gum_ray.version import __version__


def _json_safe(meta: Any) -> dict[str, Any]:
    """The JSON-representable top-level entries of a source checkpoint's ``meta`` (others dropped)."""
    out: dict[str, Any] = {}
    if not isinstance(meta, dict):
        return out
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[str(k)] = v
    return out


def convert_checkpoint(src: str | Path, dst: str | Path, *, trust: bool = False,
                       overwrite: bool = False) -> tuple[str, Any]:
    """Write the GUM weights of ``src`` to a tensors-only ``dst`` (safetensors); returns
    ``(dst sha256, LoadedModel of dst)``.

    ``src`` is read safely; only if it is refused for its Python globals and ``trust`` is True is
    it unpickled fully (which runs whatever it names: the user vouches for the file). The result
    is validated as a GUM checkpoint before it appears under its name, and records the source's
    sha256 (``source_sha256``), its name, whether trust was needed, and the architecture.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != SAFETENSORS_SUFFIX:
        raise InputError(f"output {dst}: give a {SAFETENSORS_SUFFIX} file name for the tensors-only checkpoint")
    if dst.exists() and not overwrite:
        raise InputError(f"output {dst}: exists; give another name or --overwrite")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError(f"output {dst}: is the source checkpoint; write to a new file")
    trusted_load = False
    try:
        raw = read_checkpoint(src)
    except UnsafeCheckpointError as exc:
        if not trust:
            raise UnsafeCheckpointError(
                str(exc).split(" If you trust", 1)[0] + " Add --trust only if you trust the file "
                "and where it came from (converting runs it once, here)"
            ) from None
        raw = load_trusted_pickle(src)
        trusted_load = True
    sd = extract_state_dict(raw, src)
    gum2 = is_gum2_state_dict(sd)
    if gum2:  # the authors' training-only head is not part of the network
        sd = {k: v for k, v in sd.items() if not k.startswith(gum2_module.TRAINING_HEAD_PREFIX)}
    spec = gum2_module.infer_spec(sd, src) if gum2 else infer_spec(sd, src)
    meta = raw.get("meta") if isinstance(raw, dict) else None
    metadata = {
        "source": src.name,
        "source_sha256": file_sha256(src),
        "source_needed_trust": trusted_load,
        "gum_ray_spec": spec.as_dict(),
        "family": "gum2" if gum2 else "gum1",
        "converted_by": f"gum-ray {__version__}",
        "source_meta": _json_safe(meta),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=SAFETENSORS_SUFFIX, dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_tensors_only(sd, tmp, metadata)
        # keys, shapes, finite values: a checkpoint of the family or an error
        if gum2:
            model = gum2_module.Gum2.load(tmp)
            loaded = LoadedModel(model.module, spec, model.sha256, str(tmp), model.meta)
        else:
            loaded = load_checkpoint(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    loaded.path = str(dst)
    return file_sha256(dst), loaded

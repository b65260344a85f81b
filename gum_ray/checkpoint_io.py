"""Reading checkpoints without running code from them (DESIGN.md decision 15).

A ``.pth`` file is a pickle: loading it with plain ``torch.load`` can call any function the file
names (``os.system`` included). gum-ray never does that. Every checkpoint is read by
:func:`read_checkpoint`, in one of two ways:

* **tensors-only files** (``.safetensors``, as written by ``gum convert-checkpoint``): no pickle at
  all; the tensors and a small string metadata table (which records the source file's sha256).
* **PyTorch files** (``.pth``): ``torch.load(weights_only=True)``, torch's restricted unpickler,
  extended by an allow-list of the inert types that mmsegmentation/mmengine training checkpoints
  carry besides their tensors: numpy arrays, dtypes and scalars (rebuilt by numpy's own
  reconstructors, which only copy bytes), and mmengine's ``HistoryBuffer``/``MessageHub`` state,
  which is mapped onto :class:`InertState`, a class that only stores what the file holds and has no
  behaviour; the ``getattr(HistoryBuffer, 'mean')`` references a HistoryBuffer pickles resolve
  only on that stand-in, to the method's name (:func:`inert_attribute`; ``builtins.getattr`` itself
  is never called). No other callable named in the file is ever called.

A file that names anything else is refused with one line listing the offending globals (found by a
static walk over the pickle's opcodes, which runs nothing) and the way out: convert it once, on a
machine and for a file you trust, with ``gum convert-checkpoint --trust SRC DST.safetensors``. That
is the only place gum-ray unpickles fully, and only with ``--trust``; cluster workers and every
other command load through this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gum_ray.errors import CheckpointError, require_file

SAFETENSORS_SUFFIX = ".safetensors"
TENSORS_ONLY_FORMAT = "gum-ray tensors-only checkpoint v1"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that names Python globals outside the allow-list (it could run code)."""


class InertState:
    """Stand-in for an allow-listed Python object in a training checkpoint (mmengine's
    ``HistoryBuffer``, ``MessageHub``): keeps the pickled state as data, has no behaviour."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertState":
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        state = self.__dict__.get("state")
        return f"InertState({', '.join(map(str, state)) if isinstance(state, dict) else ''})"


def inert_attribute(owner: Any, name: Any) -> str:
    """Stand-in for ``builtins.getattr`` (never called): a ``HistoryBuffer`` pickles its
    ``statistics_methods`` as ``getattr(HistoryBuffer, 'mean')`` and the like. Resolved only on the
    inert stand-in class, to the method's name as a string; on anything else it refuses."""
    if owner is InertState and isinstance(name, str) and name.isidentifier():
        return f"<method {name}>"
    raise pickle.UnpicklingError(
        f"Unsupported global: GLOBAL builtins.getattr applied to {type(owner).__name__} (only the "
        "statistics methods of mmengine's HistoryBuffer are read, as names)"
    )


# Classes that mmengine pickles into training checkpoints; read as InertState, never imported.
INERT_CLASSES = (
    "mmengine.logging.history_buffer.HistoryBuffer",
    "mmengine.logging.message_hub.MessageHub",
)


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy's array/dtype/scalar reconstructors under the names numpy 1.x and 2.x pickle them."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[tuple[Any, str]] = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        out.append((multiarray.scalar, f"{mod}.scalar"))
    out.append((np.ndarray, "numpy.ndarray"))
    out.append((np.dtype, "numpy.dtype"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            cls = getattr(dtypes, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                out.append((cls, f"numpy.dtypes.{name}"))
    return out


def allowed_globals() -> list[tuple[Any, str]]:
    """(object, pickled name) pairs added to torch's own weights-only allow-list."""
    return (_numpy_globals() + [(InertState, name) for name in INERT_CLASSES]
            + [(inert_attribute, "builtins.getattr")])


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (a checkpoint's identity in provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_safetensors(path: str | Path) -> bool:
    """True if the file starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= n <= 100_000_000


def read_checkpoint(path: str | Path) -> Any:
    """The object a checkpoint holds, read without running code from the file.

    A tensors-only file gives ``{"state_dict": tensors, "meta": metadata}`` (JSON values decoded);
    a ``.pth`` gives what was pickled (a dict with ``state_dict``, or a bare state dict).

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, or names Python
            globals outside the allow-list (the message lists them and says how to convert).
    """
    path = Path(path)
    require_file(path, label=f"checkpoint {path}", expect="the .pth file", error=CheckpointError)
    if is_safetensors(path):
        return _read_safetensors(path)
    return _read_pickled(path)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"checkpoint {path}: not a readable safetensors file ({_short(exc)}); is it complete "
            "(not truncated)? Convert the source again with gum convert-checkpoint"
        ) from None
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except (ValueError, RecursionError):
            meta[k] = v
    return {"state_dict": tensors, "meta": meta}


def _read_pickled(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - examined below: refused globals or an unreadable file
        refused = offending_globals(path)
        if refused or _is_refusal(exc):
            names = ", ".join(sorted(refused)) if refused else _global_from_error(exc)
            raise UnsafeCheckpointError(
                f"checkpoint {path}: refused: it would run Python code named in the file ({names}); "
                "gum-ray loads only tensors and inert training state. If you trust the file and "
                f"where it came from, convert it once: gum convert-checkpoint --trust {path} "
                f"{path.with_suffix(SAFETENSORS_SUFFIX)}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint ({_short(exc)}); "
            "is the file complete (not truncated) and a .pth saved by mmsegmentation or gum-ray?"
        ) from None


def _is_refusal(exc: BaseException) -> bool:
    """Whether torch's weights-only unpickler refused a global (not: the file is damaged)."""
    text = str(exc)
    return any(s in text for s in ("GLOBAL ", "allowlisted", "unrecognized function", "Unsupported global"))


def _global_from_error(exc: BaseException) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return m.group(1) if m else "objects outside the allow-list"


def offending_globals(path: str | Path) -> set[str]:
    """Globals a ``.pth`` names that are outside the allow-list (static opcode walk; runs nothing).

    Empty if there are none or the file is not a readable torch zip archive.
    """
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    allowed.update(name for _, name in allowed_globals())
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                return set()
            data = zf.read(pkl[0])
    except (zipfile.BadZipFile, OSError, KeyError, EOFError):
        return set()
    return {g for g in pickle_globals(data) if g not in allowed}


def _normal_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 (and torch's unpickler) resolves a protocol-2 pickle's names."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` a pickle refers to (GLOBAL, STACK_GLOBAL, INST), read statically."""
    found: set[str] = set()
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                found.add(_normal_name(module, name))
            elif op.name == "STACK_GLOBAL":
                if len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                else:
                    found.add("(a dynamically named global)")
            elif isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING")):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a damaged pickle: report what was found before the damage
        pass
    return found


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def write_tensors_only(
    tensors: dict[str, torch.Tensor], dst: str | Path, metadata: dict[str, Any]
) -> str:
    """Write ``tensors`` as a safetensors file (atomically), metadata JSON-encoded; returns sha256."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": TENSORS_ONLY_FORMAT}
    meta.update({k: json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return file_sha256(dst)


def load_trusted_pickle(path: str | Path) -> Any:
    """FULL unpickling of a ``.pth`` (runs whatever the file names). Only for
    ``gum convert-checkpoint --trust``, which the user asks for explicitly, once per file."""
    path = Path(path)
    require_file(path, label=f"checkpoint {path}", expect="the .pth file", error=CheckpointError)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch checkpoint ({_short(exc)}); "
            "is the file complete (not truncated)?"
        ) from None

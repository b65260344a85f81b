"""What reaches the user's terminal: gum-ray's own lines, not third-party noise.

mmsegmentation, mmengine, rasterio, zarr and friends emit ``UserWarning``s and deprecation
warnings on import and on use (mmseg alone printed six lines on every ``gum map`` while it built the
network; mmseg is no longer imported there, but the rule stays for every library), and Ray relays
each worker's stderr to the driver. None of it is actionable for a user, and it buries gum-ray's
one-line errors. So:

- :func:`configure` (called first by the ``gum`` CLI and the Ray job entrypoints) hides Python
  warnings and sets logging to WARNING for everything, unless verbose;
- :func:`setup_worker` is Ray's ``worker_process_setup_hook``: every Ray worker process of a gum-ray
  job applies the same rule before it runs a task (see :func:`ray_runtime_env`);
- verbose (``gum --verbose``, ``-v``, or ``GUM_VERBOSE=1`` in the environment; Ray workers get
  the driver's choice through the job's runtime environment) shows every warning and debug log,
  driver and workers alike.

gum-ray's own user-facing messages never go through :mod:`warnings`; they are printed lines.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

VERBOSE_ENV = "GUM_VERBOSE"
_verbose: bool | None = None  # set by configure(); None = follow the environment


def is_verbose() -> bool:
    if _verbose is not None:
        return _verbose
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configure(verbose: bool | None = None) -> bool:
    """Apply the output rule in this process; returns whether verbose. ``None`` follows
    :data:`VERBOSE_ENV`; the answer is what :func:`ray_runtime_env` passes on to Ray workers."""
    global _verbose
    if verbose is not None:
        _verbose = bool(verbose)
    verbose = is_verbose()
    if verbose:
        warnings.simplefilter("default")
    else:
        warnings.simplefilter("ignore")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # libraries that configure loggers of their own (mmengine's print_log, Ray's start-up lines)
    for name in ("mmengine", "mmseg", "rasterio", "numexpr", "distributed", "fsspec", "gcsfs", "ray"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    return verbose


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for gum-ray jobs (runs in each worker before any task)."""
    configure(None)


def ray_logging_level() -> int:
    """``ray.init(logging_level=...)``: Ray's own start-up lines (local instance, token auth) only
    when verbose; its errors always."""
    return logging.INFO if is_verbose() else logging.ERROR


def ray_runtime_env(env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The runtime environment every gum-ray Ray job starts with: the quiet rule in every worker
    and the ``GUM_*`` variables of this process (settings, emulators, verbose) passed on."""
    passed = {k: v for k, v in os.environ.items() if k.startswith(("GUM_", "STORAGE_EMULATOR"))}
    passed.update(env_vars or {})
    passed[VERBOSE_ENV] = "1" if is_verbose() else "0"
    if not is_verbose():
        passed.setdefault("PYTHONWARNINGS", "ignore")
    return {"env_vars": passed, "worker_process_setup_hook": "gum_ray.quiet.setup_worker"}

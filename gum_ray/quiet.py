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
- a local Ray that gum-ray starts gets the same variables through its own environment instead
  (:func:`local_ray_env`), and its workers apply the rule as they first import gum_ray;
- verbose (``gum --verbose``, ``-v``, or ``GUM_VERBOSE=1`` in the environment; Ray workers get
  the driver's choice through the job's runtime environment, or a local Ray's own environment)
  shows every warning and debug log,
  driver and workers alike.

gum-ray's own user-facing messages never go through :mod:`warnings`; they are printed lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator

VERBOSE_ENV = "GUM_VERBOSE"
#: set in the environment of a local Ray's workers (:func:`local_ray_env`): they apply the rule as
#: they first import gum_ray, the setup hook's job where a job has a runtime env
WORKER_SETUP_ENV = "GUM_RAY_WORKER_SETUP"
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


@contextlib.contextmanager
def local_ray_env(env_vars: dict[str, str] | None = None) -> Iterator[None]:
    """While a local Ray starts (``ray.init(address="local")``, without a ``runtime_env``): the
    variables :func:`ray_runtime_env` would pass on are in this process's environment, so the Ray
    processes, and every worker, inherit them; the workers apply the output rule as they first
    import gum_ray (:data:`WORKER_SETUP_ENV`). The environment is restored afterwards.

    Why not a runtime env: Ray gives a job that has one none of the workers it prestarts as the
    driver connects, so the job's first actors and tasks each wait for a new worker process (2-3 s
    on a busy 2-core machine, before the first Earth Engine request of a `gum map` run:
    docs/performance.md); without one, they start on the prestarted workers at once."""
    passed = dict(ray_runtime_env(env_vars)["env_vars"], **{WORKER_SETUP_ENV: "1"})
    saved = {k: os.environ.get(k) for k in passed}
    os.environ.update(passed)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

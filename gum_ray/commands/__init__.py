"""The ``gum`` subcommands, one module each, and the names of their flags.

Library errors name the *parameter* they are about (:attr:`gum_ray.errors.GumError.param`);
:func:`flagify` turns it into the flag that sets it, for the one line the CLI prints.
"""

from __future__ import annotations

import re

#: library parameter -> the ``gum`` flag that sets it
FLAGS: dict[str, str] = {
    "with_products": "--products",
    "checkpoint": "--checkpoint",
    "family": "--model",
    "source": "--source",
    "source_options": "--source-option",
    "years": "--year",
    "year": "--year",
    "stride": "--stride",
    "batch_size": "--batch-size",
    "window": "--window",
    "merge": "--merge",
    "device": "--device",
    "precision": "--precision",
    "winograd": "--winograd",
    "halo_px": "--halo",
    "max_attempts": "--max-attempts",
    "max_cells": "--max-cells",
    "max_aoi_cells": "--max-aoi-cells",
    "fetch_concurrency": "--fetch-concurrency",
    "write_concurrency": "--write-concurrency",
    "cells_per_call": "--cells-per-call",
    "infer_actors": "--infer-actors",
    "threads_per_actor": "--actor-threads",
    "min_valid": "--min-valid",
    "init": "--init",
    "out": "--out",
    "labels": "--labels",
    "epochs": "--epochs",
    "lr": "--lr",
    "val_fraction": "--val-fraction",
    "keep": "--keep",
    "cell_deg": "--cell-deg",
    "chunk_px": "--chunk-px",
    "max_px": "--max-px",
    "level": "--level",
}


def flagify(exc: BaseException) -> str:
    """The error's message with its parameters' names (first mention of each) written as flags."""
    msg = str(exc)
    params = getattr(exc, "param", None) or ()
    for param in (params,) if isinstance(params, str) else params:
        flag = FLAGS.get(param)
        if flag:
            msg = re.sub(rf"(?<![\w-]){re.escape(param)}(?!\w)", flag, msg, count=1)
    return msg

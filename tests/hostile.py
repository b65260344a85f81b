"""Hostile and malformed inputs for the security tests (tests/test_hostile_*.py), made on the spot.

Each maker writes a file the way an attacker or a careless export would, with real tools (torch,
mmengine, rasterio), so the tests exercise the same bytes a user could receive.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.helpers import REPO


class RunsShell:
    """Unpickling this calls ``os.system(command)``: the classic code-running checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsEval:
    """Unpickling this calls ``builtins.eval(source)``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        import builtins

        return (builtins.eval, (self.source,))


def hostile_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], marker: Path, how: str = "system") -> Path:
    """A valid GUM checkpoint whose ``meta`` holds one object that, unpickled, creates ``marker``."""
    if how == "system":
        payload = RunsShell(f"touch {marker}")
    else:
        payload = RunsEval(f"open({str(marker)!r}, 'w').close()")
    torch.save({"meta": {"epoch": 1, "note": payload}, "state_dict": state_dict}, path)
    return path


def mmengine_training_checkpoint(path: Path, model: torch.nn.Module) -> Path:
    """A checkpoint laid out as mmengine's ``Runner.save_checkpoint`` writes it, with real mmengine
    objects: ``meta`` (numpy scalars, the config text, dataset meta), ``state_dict``, ``message_hub``
    (a real MessageHub's state: HistoryBuffers of numpy arrays), ``optimizer`` (AdamW state after a
    step) and ``param_schedulers`` (an mmengine PolyLR's state), saved by mmengine's own writer."""
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper, PolyLR
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    import uuid

    hub = MessageHub.get_instance(f"gum-test-{uuid.uuid4().hex}")  # a fresh hub (instances are global)
    for step in range(1, 4):
        hub.update_scalar("train/loss", np.float32(1.0 / step))
        hub.update_scalar("train/lr", 0.01 / step)
    hub.update_info("iter", 3)
    hub.update_info("epoch", np.int64(1))
    hub.update_info("dataset_meta", {"classes": ("background", "urban"), "palette": [[0, 0, 0], [255, 0, 0]]})
    hub.update_info_dict({"cfg": "model = dict(type='EncoderDecoder')\n", "seed": 42,
                          "experiment_name": "gum_stage2", "loop_stage": "train"})
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    x = torch.rand(2, 10, 64, 64)
    loss = model.encode_decode(x, [dict(img_shape=(64, 64))] * 2).mean()
    loss.backward()
    opt.step()
    model.eval()
    sched = PolyLR(opt, eta_min=1e-4, power=0.9, begin=0, end=100, by_epoch=False)
    meta = {
        "epoch": np.int64(1), "iter": 3, "seed": np.int64(42), "time": "20261201_120000",
        "mmengine_version": "0.10.7", "cfg": "model = dict(type='EncoderDecoder')\n",
        "experiment_name": "gum_stage2", "dataset_meta": {"classes": ("background", "urban")},
        "best_score": np.float64(0.8123), "histogram": np.arange(5, dtype=np.float32),
    }
    checkpoint = {
        "meta": meta,
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": hub.state_dict(),
        "optimizer": OptimWrapper(opt).state_dict(),
        "param_schedulers": [sched.state_dict()],
    }
    save_checkpoint(checkpoint, str(path))
    return path


def gum_cli(*args, timeout: int = 600, measure: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the ``gum`` console script in a fresh process, as a user would; with ``measure`` the
    child's peak resident memory (KiB, ``ru_maxrss``) is appended to stderr as ``MAXRSS_KIB=N``."""
    gum_bin = REPO / ".venv" / "bin" / "gum"
    cmd = [str(gum_bin)] if gum_bin.exists() else [sys.executable, "-m", "gum_ray.cli"]
    cmd += [str(a) for a in args]
    if measure:
        runner = (
            "import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:])\n"
            "print(f'MAXRSS_KIB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
            "sys.exit(r.returncode)\n"
        )
        cmd = [sys.executable, "-c", runner] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    """The lines a user sees on stderr (the memory-measure line left out)."""
    return [line for line in stderr.strip().splitlines() if line and not line.startswith("MAXRSS_KIB=")]

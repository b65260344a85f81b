#!/usr/bin/env python
"""Run the loopback Earth Engine emulator (gum_ray.sources.ee_emulator) from the command line.

    python tools/ee_emulator.py --port 8765 --rate-429 0.3 --latency 1 --max-seconds 600

then, in Python: ``ee.Initialize(credentials=None, project="gum-emulator", url="http://127.0.0.1:8765")``
or ``gum_ray.sources.get_source("ee", url="http://127.0.0.1:8765", project="gum-emulator",
credentials="anonymous")``. Importable too: ``from tools.ee_emulator import start_emulator``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gum_ray.sources.ee_emulator import (  # noqa: E402,F401  (re-exported)
    EEEmulator,
    EmulatorProcess,
    Faults,
    main,
    start_emulator,
    start_emulator_process,
)

if __name__ == "__main__":
    sys.exit(main())

"""Set-up and worker image: the pip steps of ``cluster/Dockerfile`` must be resolvable.

CI builds no Docker image (no engine on its machines), so an impossible pin there would only show
when someone builds the image. This test replays each ``pip install`` step of the Dockerfile as
``pip install --dry-run`` (pip resolves every requirement and its dependencies, installs nothing),
with the Dockerfile's ``ARG`` defaults substituted. The mmcv build path itself (metadata prepared in
its build environment) is checked by ``tools/setup.sh`` on every set-up, CI included.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

DOCKERFILE = REPO / "cluster" / "Dockerfile"


def dockerfile_pip_steps(text: str) -> list[list[str]]:
    """The requirement specifiers of each ``pip install`` in the Dockerfile's RUN steps, with the
    ``ARG`` defaults substituted; local paths (the image's own files) are left out."""
    text = re.sub(r"\\\n", " ", text)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    steps = []
    for line in re.findall(r"^RUN\s+(.*)$", text, flags=re.M):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands, words = [], []
        for tok in lexer:
            if tok in ("&&", ";", "||", "|"):
                commands.append(words)
                words = []
            else:
                words.append(tok)
        commands.append(words)
        for words in commands:
            if words[:2] != ["pip", "install"]:
                continue
            specs = []
            for w in words[2:]:
                w = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], w)
                if w.startswith("-") or w.startswith(("/", ".")):
                    continue
                specs.append(w)
            if specs:
                steps.append(specs)
    return steps


def dry_run(specs: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--disable-pip-version-check", *specs],
        capture_output=True, text=True, timeout=600,
    )


def test_dockerfile_pip_steps_resolve():
    steps = dockerfile_pip_steps(DOCKERFILE.read_text())
    assert steps, "no pip install step found in cluster/Dockerfile"
    assert any(any(s.startswith("torch==") for s in step) for step in steps)
    for specs in steps:
        res = dry_run(specs)
        assert res.returncode == 0, f"cluster/Dockerfile: `pip install {' '.join(specs)}` cannot resolve:\n{res.stderr[-2000:]}"


def test_the_check_catches_an_impossible_pin():
    # the pin the worker image had before: torch 2.13 requires setuptools >= 77
    res = dry_run(["torch==2.13.0", "setuptools<70"])
    assert res.returncode != 0
    assert "setuptools" in res.stderr and ("conflict" in res.stderr.lower() or "ResolutionImpossible" in res.stderr)


def test_dockerfile_builds_mmcv_with_the_shared_build_script():
    text = DOCKERFILE.read_text()
    assert "tools/build_mmcv.sh" in text and (REPO / "tools" / "build_mmcv.sh").exists()
    assert not re.search(r"pip install[^\n]*setuptools<70", text), "setuptools<70 beside torch cannot resolve"
    setup = (REPO / "tools" / "setup.sh").read_text()
    assert "build_mmcv.sh .venv/bin/python \"$WHEELHOUSE\" --check" in setup


@pytest.mark.parametrize("text,expected", [
    ('ARG V=1.0\nRUN pip install --no-cache-dir "a==${V}" b && pip install /opt/x\n', [["a==1.0", "b"]]),
    ("RUN apt-get install -y x \\\n    && pip install c\n", [["c"]]),
])
def test_pip_step_parser(text, expected):
    assert dockerfile_pip_steps(text) == expected

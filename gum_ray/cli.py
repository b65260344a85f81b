"""The ``gum`` command line.

Each subcommand lives in its own module under :mod:`gum_ray.commands` with two functions:
``add_parser(subparsers)`` and ``run(args) -> int``. A :class:`~gum_ray.errors.GumError` is printed
as one line (``gum: error: ...``, the parameter it names written as its flag, see
:func:`gum_ray.commands.flagify`) with a non-zero exit code; no traceback reaches the user, and no
third-party warning unless ``--verbose`` (:mod:`gum_ray.quiet`).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from gum_ray import quiet
from gum_ray.version import __version__
from gum_ray.errors import GumError

# subcommand name -> module under gum_ray.commands (imported lazily: `gum --help` stays fast)
COMMANDS = {
    "predict": "predict",
    "export": "export",
    "stats": "stats",
    "preview": "preview",
    "tiles": "tiles",
    "serve": "serve",
    "map": "map",
    "plan": "plan",
    "status": "status",
    "patches": "patches",
    "finetune": "finetune",
    "demo-model": "demo_model",
    "convert-checkpoint": "convert_checkpoint",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``gum`` parser; ``only``: just that subcommand's (its module alone is imported: the
    others' imports, odc-geo, pyproj, zarr, Ray's client, would cost every command a second)."""
    parser = argparse.ArgumentParser(
        prog="gum",
        description="gum-ray: urban areas at 10 m with the GlobalUrbanMapper model.",
    )
    parser.add_argument("--version", action="version", version=f"gum-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and third-party warnings (also GUM_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(f"gum_ray.commands.{module}")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # before any subcommand module is imported: third-party import-time warnings are hidden too
    quiet.configure(True if any(a in ("-v", "--verbose") for a in argv) else None)
    command = next((a for a in argv if not a.startswith("-")), None)  # global flags take no value
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except GumError as exc:
        from gum_ray.commands import flagify

        print(f"gum: error: {flagify(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gum: interrupted; finished outputs are kept, unfinished ones were not written", file=sys.stderr)
        return 130


def run() -> None:
    """The ``gum`` console script (and ``python -m gum_ray.cli``): :func:`main`, then exit with its code.

    What is still alive at the end is moved out of the cyclic garbage collector's reach
    (``gc.freeze``) first: the interpreter's last collections at shutdown would otherwise walk every
    object torch made at import, 0.6-0.7 s of every command's wall time (docs/performance.md), to
    free memory the OS takes back at exit anyway. Everything else about shutdown stays as it was:
    threads are joined, atexit handlers run, files are flushed and closed."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()

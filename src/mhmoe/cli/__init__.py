"""The ``mhmoe`` console script.

Every module in this package that defines ``register(subparsers)`` contributes one or more
subcommands; ``register`` adds a parser and sets ``func`` (called with the parsed namespace,
returning an exit code) as its default. Modules are discovered, so adding a subcommand never
touches this file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from mhmoe.runs.preemption import EXIT_PREEMPTED, Preempted


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhmoe",
        description="Multi-Head Mixture-of-Experts: layers, parity planner, training, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"mhmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as err:
        # Not a usage error: a full disk, an I/O failure, training that diverged
        # (mhmoe.runs.validation.NonFiniteError). One line, exit status 1; checkpoints stay intact.
        print(f"mhmoe {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Preempted as stopped:
        # SIGTERM/SIGINT during training: the step finished and a checkpoint was written.
        print(f"mhmoe {args.command}: {stopped}", file=sys.stderr)
        return EXIT_PREEMPTED
    except MemoryError as err:
        # An allocation larger than the machine (sizes are bounded where they are read, this
        # is the last line of defence): one line, exit 1 like any environment failure.
        print(f"mhmoe {args.command}: error: out of memory{f' ({err})' if str(err) else ''}; "
              "use a smaller model, batch or input", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mhmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

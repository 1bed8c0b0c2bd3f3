"""The ``tokencomp`` command line: ``plugins``, ``recipes``, ``validate``, ``demo``, ``run``, ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from .errors import RecipeError, TokencompError

INTERRUPTED = 130  # the shell's exit status for a process ended by SIGINT (128 + 2)


def _int_at_least(minimum: int, what: str):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    check.__name__ = "positive_int" if minimum == 1 else "nonnegative_int"  # argparse names it in errors
    return check


positive_int = _int_at_least(1, ">= 1")
"""``argparse`` type: an integer >= 1 (argparse reports ``argument --x: must be >= 1, got 0``)."""
nonnegative_int = _int_at_least(0, ">= 0")
"""``argparse`` type: an integer >= 0."""


def one_line(message: str) -> str:
    """``message`` on one line: library errors (transformers, PIL) often span several."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def debug_enabled(args=None) -> bool:
    """``--debug`` or ``TOKENCOMP_DEBUG=1``: show full tracebacks instead of one-line errors."""
    return bool(getattr(args, "debug", False)) or os.environ.get("TOKENCOMP_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _cmd_plugins(args) -> int:
    from .plugins import registry

    reg = registry()
    rows = [e.as_dict() for kind in reg.entries for e in reg.entries[kind].values()]
    rows.sort(key=lambda r: (r["kind"], r["name"]))
    errors = [str(e) for e in reg.errors]
    if args.json:
        print(json.dumps({"plugins": rows, "errors": errors}, indent=2))
    else:
        for kind in reg.entries:
            print(f"{kind.replace('_', ' ')}s:")
            for r in (r for r in rows if r["kind"] == kind):
                print(f"  {r['name']:<12} {r['distribution']} {r['version']}  ({r['plugin']})  {r['summary']}")
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
    return 1 if errors else 0


def _cmd_recipes(args) -> int:
    from .recipe import load_recipe, shipped_recipes

    for name in shipped_recipes():
        recipe = load_recipe(name)
        print(f"{name:<40} {recipe.description or ''}".rstrip())
    return 0


def _cmd_validate(args) -> int:
    from .recipe import load_recipe

    status = 0
    for item in args.recipes:
        try:
            recipe = load_recipe(item)
            if args.layers is not None:
                recipe.stages(args.layers)
        except RecipeError as exc:
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        print(f"{item}: ok")
        if args.layers is not None:
            print("  " + recipe.describe(args.layers).replace("\n", "\n  "))
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokencomp`` command (each subcommand has ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="tokencomp", description="Drop vision tokens inside VLM language models, by recipe."
    )
    parser.add_argument("--debug", action="store_true",
                        help="show full Python tracebacks instead of one-line errors (also: TOKENCOMP_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plugins", help="list scorers, selectors, schedules and model adapters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("validate", help="check recipes (files or shipped names); exit 2 on the first error kind")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--layers", type=positive_int, help="also resolve the stages for a decoder of this depth")
    p.set_defaults(func=_cmd_validate)

    from .runner import add_commands

    add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tokencomp`` command.

    Exit status: 0 success; 2 a usage error (bad argument, recipe, path, model or input: one
    ``error:`` line, or ``file:line: message`` for recipes); 130 interrupted (Ctrl-C); 1 a command
    that ran but reports failures (``plugins`` with broken plugins), or out of memory. ``--debug``
    or ``TOKENCOMP_DEBUG=1`` re-raises instead, with the full traceback. Other exceptions are bugs
    and keep their traceback.
    """
    import torch  # noqa: F401  (torch.OutOfMemoryError below; every command imports torch anyway)

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = debug_enabled(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    except RecipeError as exc:
        if debug:
            raise
        print(one_line(str(exc)), file=sys.stderr)
        return 2
    except (TokencompError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # OS errors that escape a command concern paths the user gave (recipes, images, outputs):
        # the commands check theirs up front, this is the safety net.
        if debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)) as exc:
        if debug:
            raise
        print(f"error: out of memory ({one_line(str(exc)) or type(exc).__name__}); try smaller inputs "
              "(bench: --batch, --vision-tokens), or --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

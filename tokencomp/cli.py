"""The ``tokencomp`` command line: ``plugins``, ``recipes``, ``validate``, ``demo``, ``run``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import RecipeError, TokencompError


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plugins", help="list scorers, selectors, schedules and model adapters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_cmd_recipes)

    p = sub.add_parser("validate", help="check recipes (files or shipped names); exit 2 on the first error kind")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--layers", type=int, help="also resolve the stages for a decoder of this depth")
    p.set_defaults(func=_cmd_validate)

    from .runner import add_commands

    add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tokencomp`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except TokencompError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

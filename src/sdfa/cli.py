"""The ``sdfa`` command line: one sub-command per job (``sdfa <command> --help`` explains each)."""

from __future__ import annotations

import argparse
import sys


def _rules(args) -> int:
    from .rules import RULES

    for name in sorted(RULES):
        rule = RULES[name]
        options = ", ".join(f"{k}={v!r}" for k, v in rule.options.items()) or "no options"
        print(f"{name:6s} {rule.__doc__.strip().splitlines()[0]}")
        print(f"       paper: {rule.paper}; options: {options}")
    return 0


def _models(args) -> int:
    from .models import MODELS

    for name in sorted(MODELS):
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdfa",
        description="Train neural networks without backpropagation: direct feedback alignment "
        "(dense, sparse, low rank) and the feedback-alignment family.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("rules", help="list the learning rules and their options").set_defaults(
        run=_rules
    )
    commands.add_parser("models", help="list the model presets").set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

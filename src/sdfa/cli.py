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


def _costs(args) -> int:
    from .costs import PAPER_RULES, report

    try:
        text = report(
            args.model, args.rule or PAPER_RULES, input_shape=args.input_shape,
            num_classes=args.num_classes, model_options=dict(args.model_option), seed=args.seed,
            markdown=args.markdown,
        )
    except ValueError as err:
        print(f"sdfa costs: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes such as 1,28,28; got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive; got {text!r}")
    return shape


def _key_value(text: str) -> tuple[str, object]:
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


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
    costs = commands.add_parser(
        "costs",
        help="multiply-accumulates and data movement per sample of one training step",
        description="Count the multiply-accumulates (forward, error, weight update) and the data "
        "movement (values each neuron reads to get its error) of one training step, per sample "
        "and per layer. Without --model: the architectures of Crafton et al. 2019 under "
        "bp, fa, dfa and dfa k=1, with ratios against bp. Definitions: docs/costs.md.",
    )
    costs.add_argument("--model", help="a model preset (see `sdfa models`)")
    costs.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                       help="shape of one input sample, e.g. 1,28,28 (required with --model)")
    costs.add_argument("--num-classes", type=int, default=10, help="model outputs (default 10)")
    costs.add_argument("--model-option", type=_key_value, action="append", default=[],
                       metavar="KEY=VALUE", help="option of the preset, e.g. hidden=[400]")
    costs.add_argument("--rule", action="append", metavar="SPEC",
                       help="rule with options, e.g. bp, fa, dfa:k=1, dfa:rank=4; repeat to "
                       "compare (default: bp fa dfa dfa:k=1)")
    costs.add_argument("--seed", type=int, default=0, help="seed of the feedback matrices")
    costs.add_argument("--markdown", action="store_true", help="print Markdown tables")
    costs.set_defaults(run=_costs)
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

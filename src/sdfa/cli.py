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


def _bench(args) -> int:
    from . import bench

    quick = args.quick
    report = bench.run(
        args.workloads,
        args.rules,
        rounds=args.rounds or (3 if quick else 15),
        warmup=args.warmup or (1 if quick else 3),
        round_time=args.round_time or (0.005 if quick else 0.3),
        threads=args.threads,
        device=args.device,
        clock=args.clock,
        seed=args.seed,
        profile=args.profile,
    )
    if args.json:
        bench.write_json(report, args.json)
        print(f"\nwrote {args.json}")
    return 0


def _add_bench(commands) -> None:
    from .bench import DEFAULT_CONTENDERS, GROUPS, WORKLOADS

    p = commands.add_parser(
        "bench",
        help="training-step throughput and peak memory of each rule vs plain autograd BP",
        description="Times forward + loss + backward + SGD step of plain PyTorch autograd, the "
        "sdfa rules and (when installed) biotorch, interleaved in one process; prints "
        "samples/s, the speed ratio to autograd, the MAC bound of that ratio, peak memory and "
        "the performance targets.",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["main"],
        metavar="NAME",
        help=f"workloads or groups (default: main). Workloads: {', '.join(WORKLOADS)}. "
        + "Groups: "
        + "; ".join(f"{g} = {' '.join(ws)}" for g, ws in GROUPS.items() if g != "all")
        + "; all = every group",
    )
    p.add_argument(
        "--rules",
        nargs="+",
        metavar="NAME",
        help=f"contenders (default: {' '.join(DEFAULT_CONTENDERS)}, plus biotorch-bp/fa/usf/dfa "
        "when biotorch is installed). Also: any rule name, dfa-k<K>, dfa-r<R>. "
        "autograd is always included as the reference",
    )
    p.add_argument("--rounds", type=int, help="timed rounds (default 15; 3 with --quick)")
    p.add_argument("--warmup", type=int, help="warm-up steps per contender (default 3)")
    p.add_argument(
        "--round-time",
        type=float,
        help="seconds of autograd steps per contender and round (default 0.3)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time (default); cpu: CPU time of the process, steadier on a busy "
        "machine (use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data and feedback")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="few short rounds: a smoke run")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler's top ops per contender"
    )
    p.set_defaults(run=_bench)


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
    _add_bench(commands)
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

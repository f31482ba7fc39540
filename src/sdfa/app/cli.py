"""The ``sdfa`` command line: one sub-command per job (``sdfa <command> --help`` explains each)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_EXAMPLES = """examples:
  sdfa train                                    # digits, MLP, dense DFA (seconds on a laptop)
  sdfa train --rule dfa --k 1                   # sparse DFA: one feedback entry per neuron
  sdfa train --dataset mnist --model crafton-mnist-fc --rule dfa --k 1 --epochs 50
  sdfa train --dataset cifar10 --model crafton-cifar-conv --transfer --rule dfa --k 1
  sdfa train --config run.toml --set lr=3e-4 --set model_options.hidden=[200,200]
  sdfa train --out runs/a --resume              # continue a run that was interrupted
  sdfa train --nproc 2 --parallel layer         # layer-parallel DFA on 2 processes
  torchrun --nproc-per-node 4 -m sdfa train --parallel data   # or started by torchrun
  sdfa train --privacy dp-dfa --epsilon 2 --delta 1e-5 --set privacy_options.max_input_norm=8

Every key of the configuration (see 'sdfa train --list-keys') can be set in a TOML file
(--config) or with --set KEY=VALUE; flags override the file and --set overrides both.
Data sets are read from --data-dir, else from $SDFA_DATA/<name> or ~/.cache/sdfa/<name>;
--download fetches missing official files there and checks their MD5.
"""


def _rules(args) -> int:
    from ..rules import RULES

    for name in sorted(RULES):
        rule = RULES[name]
        options = ", ".join(f"{k}={v!r}" for k, v in rule.options.items()) or "no options"
        print(f"{name:6s} {rule.__doc__.strip().splitlines()[0]}")
        print(f"       paper: {rule.paper}; options: {options}")
    return 0


def _models(args) -> int:
    from ..models import MODELS

    for name in sorted(MODELS):
        doc = (MODELS[name].__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def _costs(args) -> int:
    from ..costs import PAPER_RULES, report

    try:
        text = report(
            args.model, args.rule or PAPER_RULES, dataset=args.dataset,
            input_shape=args.input_shape, num_classes=args.num_classes,
            model_options=dict(args.model_option), seed=args.seed, markdown=args.markdown,
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


def _datasets(args) -> int:
    from ..data import DATASETS, dataset_dir, is_present

    for name, spec in DATASETS.items():
        if spec.format == "digits":
            where = "embedded in scikit-learn"
        elif spec.format == "folder":
            where = "--data-dir DIR"
        else:
            where = f"{dataset_dir(name)} ({'present' if is_present(name) else 'missing'})"
        print(f"{name:14s} {spec.description}\n{'':14s} {where}")
    return 0


def config_from_args(args) -> tuple[dict, object]:
    """(the values given, the TrainConfig): defaults < --config file < flags < --set; with
    --resume, the run's saved config with these values (which may not change what it computes)."""
    from .config import FIELDS, config_from_dict, load_toml, parse_override
    from .run import resume_config

    values = load_toml(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in FIELDS if hasattr(args, k)})
    values.update(parse_override(text) for text in args.set or ())
    if not args.resume:
        return values, config_from_dict(values)
    if "out" not in values:
        raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
    return values, resume_config(values["out"], values)


def _without_worker_traceback(error: Exception) -> str:
    """The message of an error raised in a DataLoader worker (``--set workers=N``): PyTorch
    re-raises it with the worker's traceback inside the text; keep the original message."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]  # "module.ErrorType: message"
        text = last.split(": ", 1)[-1]
    return text


def _train(args) -> int:
    from ..distributed import PeerFailure, ProcessFailure, is_main_process
    from ..training import TrainingDiverged
    from .config import FIELDS
    from .run import train

    if args.list_keys:
        from .config import TrainConfig

        defaults = TrainConfig()
        for name in FIELDS:
            print(f"{name:16s} {getattr(defaults, name)!r}")
        return 0
    values = {}
    try:
        values, config = config_from_args(args)
        summary = train(config, resume=args.resume)
    except ValueError as error:  # includes DataError: bad settings or bad data files
        print(f"sdfa train: error: {_without_worker_traceback(error)}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"sdfa train: stopped: {error}", file=sys.stderr)
        return 3
    except (ProcessFailure, PeerFailure) as error:  # a process died or failed; a lost peer
        print(f"sdfa train: failed: {error}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        out = values.get("out")
        hint = f": continue with 'sdfa train --out {out} --resume'" if out else ""
        print(f"sdfa train: interrupted{hint}", file=sys.stderr)
        return 130
    if not is_main_process():  # under torchrun: rank 0 reports
        return 0
    rule = summary["rule"] + "".join(
        f" {key}={summary[key]}" for key in ("k", "rank") if summary[key] is not None
    )
    print(
        f"{rule} on {summary['dataset']} ({summary['model']}): "
        f"test accuracy {summary['test_accuracy']:.2%}, test loss {summary['test_loss']:.4f} "
        f"after {summary['epochs']} epochs ({summary['train_seconds']:.1f} s of training)"
    )
    if "privacy" in summary:
        print(f"{summary['privacy']}: epsilon {summary['epsilon']:.3f} at delta "
              f"{summary['delta']:g} (noise multiplier {summary['noise_multiplier']:.3f})")
    print(f"run directory: {summary['run_dir']}")
    return 0


def _add_train(commands) -> None:
    from ..data import available_datasets

    p = commands.add_parser(
        "train",
        help="train a model with a learning rule (default: digits, MLP, DFA)",
        description="Train a model preset on a data set with a learning rule, logging every "
        "epoch to RUN_DIR/metrics.csv (and TensorBoard), checkpointing to RUN_DIR/last.pt and "
        "writing RUN_DIR/summary.json at the end.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", metavar="NAME",
                      help=f"one of {', '.join(available_datasets())} (default digits)")
    data.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                      help="folder holding the data set's files (default: the cache folder)")
    data.add_argument("--download", action="store_const", const=True,
                      help="download missing official files into the data folder (MD5-checked)")
    model = p.add_argument_group("model and learning rule")
    model.add_argument("--model", metavar="NAME",
                       help="a model preset, see 'sdfa models' (default mlp)")
    model.add_argument("--rule", metavar="NAME",
                       help="a learning rule, see 'sdfa rules' (default dfa)")
    model.add_argument("--k", type=int, metavar="K",
                       help="sparse DFA: feedback entries per neuron (1 in the paper)")
    model.add_argument("--rank", type=int, metavar="R", help="low-rank DFA: rank of the feedback")
    model.add_argument("--transfer", action="store_const", const=True,
                       help="transfer protocol: train with BP, then fix the conv layers and "
                       "train the fully connected ones from scratch with --rule")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--optimizer", metavar="NAME",
                     help="adam, adamw, sgd or rmsprop (default adam)")
    opt.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    opt.add_argument("--epochs", type=int, help="number of epochs (default 30)")
    opt.add_argument("--batch-size", dest="batch_size", type=int, help="batch size (default 32)")
    opt.add_argument("--seed", type=int, help="seeds weights, feedback and data order (default 0)")
    private = p.add_argument_group("differential privacy (needs Opacus; docs/privacy.md)")
    private.add_argument("--privacy", metavar="METHOD",
                         help="dp-sgd (with --rule bp), dp-dfa or dp-noisy-projection (--rule dfa)")
    private.add_argument("--epsilon", type=float,
                         help="privacy budget: the noise is set to spend it in --epochs")
    private.add_argument("--delta", type=float, help="privacy budget's delta (default 1e-5)")
    run = p.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", help="run directory (default runs/<name>-<time>)")
    run.add_argument("--config", metavar="FILE.toml", default=None,
                     help="read settings from a TOML file")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                     help="override any config key, e.g. --set lr_schedule=cosine (repeatable)")
    run.add_argument("--resume", action="store_true", default=False,
                     help="continue the interrupted run in --out from its last checkpoint")
    run.add_argument("--device", help="auto, cpu or cuda[:N] (default auto)")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train on N processes on this machine (gloo on CPU, NCCL on GPUs); "
                     "under torchrun, leave it out")
    run.add_argument("--parallel", metavar="MODE",
                     help="with several processes: data (each a share of every batch, default) "
                     "or layer (the layers split over the processes; with DFA no gradient "
                     "travels back between them)")
    run.add_argument("--quiet", dest="progress", action="store_const", const=False,
                     help="no progress bar and no per-epoch lines")
    run.add_argument("--log-alignment", dest="log_alignment", type=int, metavar="N",
                     help="every N steps, measure per layer how the rule's update aligns with "
                     "the true gradient, into RUN_DIR/alignment.csv (default 0: off)")
    run.add_argument("--list-keys", action="store_true", default=False,
                     help="list every config key with its default and exit")
    p.set_defaults(run=_train)


def _plot(args) -> int:
    from .plot import plot_runs

    default = Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else Path("curves.png")
    try:
        path = plot_runs(args.runs, args.output or default, title=args.title, x=args.x,
                         alignment=args.alignment)
    except ValueError as error:
        print(f"sdfa plot: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _reproduce(args) -> int:
    from .config import parse_override
    from .reproduce import describe_sets, reproduce

    if args.list or not args.name:
        print(describe_sets())
        return 0
    try:
        overrides = dict(parse_override(text) for text in args.set or ())
        if args.threads:
            overrides["threads"] = args.threads
        if args.download:
            overrides["download"] = True
        results = reproduce(
            args.name, out=args.out, quick=args.quick, data_root=args.data_root,
            seeds=args.seeds, overrides=overrides, progress=not args.quiet,
        )
    except ValueError as error:
        print(f"sdfa reproduce: error: {error}", file=sys.stderr)
        return 2
    print(results.read_text())
    print(f"written to {results}")
    return 0


def _add_plot_and_reproduce(commands) -> None:
    p = commands.add_parser(
        "plot", help="draw learning curves of runs into a PNG",
        description="Draw test accuracy and training loss per epoch (or against the training "
        "MACs) of one or several runs into one PNG, and, for runs trained with --log-alignment, "
        "the angle between each layer's update and the true gradient over the steps (or, with "
        "--alignment, their sign agreement or norm ratio). Runs with "
        "the same settings (seeds) are drawn as mean and min-max band.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (sdfa train --out)")
    p.add_argument("-o", "--output", metavar="FILE.png",
                   help="output file (default RUN_DIR/curves.png for one run, else ./curves.png)")
    p.add_argument("--title", help="figure title")
    p.add_argument("--x", choices=("epoch", "macs"), default="epoch",
                   help="x axis of accuracy and loss: the epoch (default) or the MACs spent "
                   "training (accuracy against compute)")
    p.add_argument("--alignment", choices=("angle", "sign", "norm_ratio"), default="angle",
                   help="for runs trained with --log-alignment, what the alignment row draws per "
                   "layer: the angle between the update and the true gradient (default; dashed: "
                   "W vs its feedback), the fraction of entries whose signs agree, or the ratio "
                   "of their norms")
    p.set_defaults(run=_plot)

    r = commands.add_parser(
        "reproduce", help="run a named experiment set and compare with the published numbers",
        description="Run a named experiment set and write OUT/results.md (our numbers next to "
        "the published ones) and OUT/curves-*.png. Finished runs are reused and interrupted ones "
        "resumed, so running the command again completes a set. Experiments whose data is "
        "absent are listed with the files to download and where to put them.",
    )
    r.add_argument("name", nargs="?",
                   help="crafton2019, moskovitz2018, biotorch-benchmark or lee2020")
    r.add_argument("--list", action="store_true", help="list the experiment sets")
    r.add_argument("--quick", action="store_true",
                   help="a reduced version (few epochs, data subsets) that runs in minutes")
    r.add_argument("--out", metavar="DIR", help="output folder (default reproduce/NAME[-quick])")
    r.add_argument("--data-root", metavar="DIR",
                   help="folder with one sub-folder per data set (default: the cache folder)")
    r.add_argument("--seeds", type=int, metavar="N",
                   help="seeds per experiment (default: the set's)")
    r.add_argument("--download", action="store_true",
                   help="download missing data sets (official files, MD5-checked)")
    r.add_argument("--threads", type=int, metavar="N", help="torch CPU threads per run")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key in every run, e.g. --set device=cuda")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(run=_reproduce)


def _add_costs(commands) -> None:
    costs = commands.add_parser(
        "costs",
        help="multiply-accumulates and data movement per sample of one training step",
        description="Count the multiply-accumulates (forward, error, weight update) and the data "
        "movement (values each neuron reads to get its error) of one training step, per sample "
        "and per layer. Without --model: the architectures of Crafton et al. 2019 under "
        "bp, fa, dfa and dfa k=1, with ratios against bp. Definitions: docs/costs.md.",
    )
    costs.add_argument("--model", help="a model preset (see `sdfa models`)")
    costs.add_argument("--dataset", metavar="NAME",
                       help="size the preset for this data set's images and classes, as "
                       "`sdfa train --dataset` does (the files are not needed)")
    costs.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                       help="shape of one input sample, e.g. 1,28,28 (instead of --dataset)")
    costs.add_argument("--num-classes", type=int,
                       help="model outputs (default: the data set's, else 10)")
    costs.add_argument("--model-option", type=_key_value, action="append", default=[],
                       metavar="KEY=VALUE", help="option of the preset, e.g. hidden=[400]")
    costs.add_argument("--rule", action="append", metavar="SPEC",
                       help="rule with options, e.g. bp, fa, dfa:k=1, dfa:rank=4; repeat to "
                       "compare (default: bp fa dfa dfa:k=1)")
    costs.add_argument("--seed", type=int, default=0, help="seed of the feedback matrices")
    costs.add_argument("--markdown", action="store_true", help="print Markdown tables")
    costs.set_defaults(run=_costs)


def _bench(args) -> int:
    from . import bench

    quick = args.quick

    def given(value, default, quick_default):  # 0 is a value (refused by run), not "unset"
        return value if value is not None else quick_default if quick else default

    try:
        report = bench.run(
            args.workloads,
            args.rules,
            rounds=given(args.rounds, 15, 3),
            warmup=given(args.warmup, 3, 1),
            round_time=given(args.round_time, 0.3, 0.005),
            threads=args.threads,
            device=args.device,
            clock=args.clock,
            seed=args.seed,
            profile=args.profile,
        )
    except ValueError as err:
        print(f"sdfa bench: error: {err}", file=sys.stderr)
        return 2
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
    commands.add_parser(
        "datasets", help="list the data sets and where they are read from"
    ).set_defaults(run=_datasets)
    _add_train(commands)
    _add_plot_and_reproduce(commands)
    _add_costs(commands)
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

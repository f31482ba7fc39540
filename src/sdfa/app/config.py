"""The configuration of a training run: one dataclass, read from TOML and ``--set`` overrides.

Every key of :class:`TrainConfig` can be given in a TOML file (``--config run.toml``), as a
command-line flag, or as ``--set key=value`` (the value is read as a TOML value, so
``--set lr=3e-4``, ``--set lr_milestones=[50,75]``, ``--set model_options.hidden=[200,200]``;
anything that is not valid TOML is taken as a string). Values are type-checked against the
field, so a typo fails before training starts. The run directory keeps the resolved
configuration as ``config.toml``; ``sdfa train --config RUN/config.toml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from ..specs import parse_rule_spec, parse_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
FLOAT32_MAX = 3.4028234663852886e38  # optimizers apply these numbers to float32 tensors
SCHEDULES = ("constant", "multistep", "cosine", "warmup")
PARALLEL = ("data", "layer")
SINGLE_PROCESS_ALIGNMENT = (
    "log_alignment needs a single process (the reference gradient runs the whole model on the "
    "whole batch): measure the alignment in a run without nproc / torchrun, or set "
    "log_alignment=0"
)


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (plus a few keys that only decide how).

    The defaults train the ``mlp`` preset on scikit-learn's digits with dense DFA in a few
    seconds. ``zero_init=None`` follows the DFA papers (Nokland 2016, Crafton et al. 2019):
    layers trained by DFA start from zero weights and biases when the network's activations are
    tanh or sigmoid; with ReLU (whose derivative is 0 at 0) they keep PyTorch's initialization.
    """

    # data
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    augment: bool | None = None  # None: the data set's usual augmentation (CIFAR: crop + flip)
    train_samples: int | None = None  # use only the first N training samples
    test_samples: int | None = None
    task: str | None = None  # None: the data set's task (sdfa.tasks.TASKS)
    dataset_options: dict = field(default_factory=dict)  # graph data sets: k, split, name, ...
    task_options: dict = field(default_factory=dict)  # e.g. node classification's loss, eg, nf
    seq_len: int = 128  # text: tokens per sample
    tokenizer: str = "char"  # text: char, byte, bpe or bpe:N
    # model and learning rule
    model: str = "mlp"
    model_options: dict = field(default_factory=dict)
    rule: str = "dfa"
    k: int | None = None
    rank: int | None = None
    rule_options: dict = field(default_factory=dict)
    feedback: str = "exact"  # dfa: exact, optical or crossbar (sdfa.hardware, docs/hardware.md)
    feedback_options: dict = field(default_factory=dict)  # the device's options
    zero_init: bool | None = None
    # optimization
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd
    weight_decay: float = 0.0
    eps: float = 1e-8  # adam / adamw / rmsprop
    batch_manhattan: bool = False  # step with sign(grad) (Xiao et al. 2018), any optimizer
    lr_schedule: str = "constant"
    lr_milestones: list[int] = field(default_factory=list)  # epochs (multistep)
    lr_gamma: float = 0.1
    warmup_epochs: int = 1  # warmup: lr rises linearly over these epochs, then stays
    epochs: int = 30
    batch_size: int = 32
    seed: int = 0
    # transfer protocol (Crafton et al.): BP first, then fixed features and a new classifier
    transfer: bool = False
    pretrain_epochs: int | None = None  # default: epochs
    pretrain_lr: float | None = None  # default: lr
    # differential privacy (sdfa.privacy, needs Opacus; see docs/privacy.md)
    privacy: str | None = None  # dp-sgd (rule bp), dp-dfa or dp-noisy-projection (rule dfa)
    epsilon: float | None = None  # target; without noise_multiplier, the noise that spends it
    delta: float = 1e-5
    noise_multiplier: float | None = None
    accountant: str = "rdp"
    privacy_options: dict = field(default_factory=dict)  # e.g. max_input_norm = 8.0
    privacy_noise: str = "secret"  # secret (OS entropy), secure (torchcsprng), seeded: NOT private
    # how to run (may change when a run is resumed)
    out: str | None = None
    device: str = "auto"
    threads: int | None = None  # None: 1 for small CPU steps (train.SMALL_STEP_MACS), else torch's
    workers: int = 0
    eval_batch_size: int = 1000
    progress: bool = True
    tensorboard: bool = True
    log_alignment: int = 0  # measure the alignment with the true gradient every N steps (0: off)
    # several processes (sdfa.distributed): checkpoints keep the single-process layout
    nproc: int = 1  # processes to start on this machine (leave 1 under torchrun)
    parallel: str = "data"  # data: DDP; layer: the layers split over the processes
    micro_batches: int = 4  # parallel = "layer": micro-batches in flight per batch
    peer_timeout: float = 60.0  # seconds a process waits for another before stopping with an error


# One line per key, for `sdfa train --list-keys` (a test checks that every key has one).
KEY_HELP = {
    "dataset": "data set name (sdfa datasets)",
    "data_dir": "folder with the data set's files (default: the cache, then system folders)",
    "download": "download missing official files (MD5-checked)",
    "image_size": "resize images to N x N at load time",
    "augment": "random crop + flip of training images (default: the data set's usual)",
    "train_samples": "use only the first N training samples",
    "test_samples": "use only the first N test samples",
    "task": "task (loss and metrics), e.g. spike-count (default: the data set's)",
    "dataset_options": "graph data sets: e.g. dataset_options.k=10, .split=random, .name=Cora",
    "task_options": "options of the task, e.g. task_options.loss=ce, task_options.eg=true",
    "seq_len": "text: tokens per sample (a window; its targets are the window shifted by one)",
    "tokenizer": "text: char, byte, bpe or bpe:N (a BPE of N tokens trained on the training text)",
    "model": "model preset (sdfa models)",
    "model_options": "preset options, e.g. model_options.hidden=[200,200] (sdfa models NAME)",
    "rule": "learning rule or rule spec, e.g. dfa, dfa:k=1, usf:scale=1.0 (sdfa rules)",
    "k": "sparse DFA: feedback connections per neuron",
    "rank": "low-rank DFA: rank of the feedback matrices",
    "rule_options": "other options of the rule, e.g. rule_options.init=\"sign\"",
    "feedback": "dfa: how e @ B is computed: exact, optical (OPU) or crossbar (RRAM)",
    "feedback_options": "device options, e.g. feedback_options.noise=0.05 (docs/hardware.md)",
    "zero_init": "start DFA layers from zero weights (default: when activations are tanh/sigmoid)",
    "optimizer": "adam, adamw, sgd or rmsprop",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay of the optimizer",
    "eps": "epsilon of adam / adamw / rmsprop",
    "batch_manhattan": "step with sign(grad) (Xiao et al. 2018)",
    "lr_schedule": "constant, multistep, cosine or warmup (stepped per epoch)",
    "lr_milestones": "epochs where multistep multiplies lr by lr_gamma",
    "lr_gamma": "multistep factor",
    "warmup_epochs": "warmup: lr * (epoch + 1) / (warmup_epochs + 1) until it reaches lr",
    "epochs": "number of epochs (a resumed run may extend it)",
    "batch_size": "training batch size",
    "seed": "seeds weights, feedback matrices and data order (0 <= seed < 2**63)",
    "transfer": "BP pretraining, then fixed features and a classifier trained by the rule",
    "pretrain_epochs": "epochs of the BP phase of transfer (default: epochs)",
    "pretrain_lr": "learning rate of the BP phase of transfer (default: lr)",
    "privacy": "dp-sgd (rule bp), dp-dfa or dp-noisy-projection (rule dfa)",
    "epsilon": "privacy budget: the noise is set to spend it in the epochs",
    "delta": "privacy budget's delta",
    "noise_multiplier": "noise std over the sensitivity (instead of epsilon)",
    "accountant": "privacy accountant: rdp, prv or gdp",
    "privacy_options": "options of the privacy method, e.g. privacy_options.max_input_norm=8.0",
    "privacy_noise": "secret (OS entropy, default), secure (torchcsprng) or seeded (NOT private)",
    "out": "run directory (default runs/<settings>-<time>)",
    "device": "auto, cpu or cuda[:N]",
    "threads": "torch CPU threads (default: 1 for small steps, else torch's)",
    "workers": "DataLoader worker processes",
    "eval_batch_size": "batch size of evaluation",
    "progress": "progress bars and per-epoch lines",
    "tensorboard": "also log to RUN_DIR/tensorboard when TensorBoard is installed",
    "log_alignment": "measure the alignment with the true gradient every N steps (0: off)",
    "nproc": "processes to start on this machine (leave 1 under torchrun)",
    "parallel": "with several processes: data (DDP) or layer (layers split over processes)",
    "micro_batches": "parallel=layer: micro-batches in flight per batch",
    "peer_timeout": "seconds a process waits for another before stopping with an error",
}

# Keys that do not change what is computed: they may differ when a run is resumed.
RUNTIME_KEYS = frozenset(
    {"data_dir", "download", "out", "device", "threads", "workers", "eval_batch_size",
     "progress", "tensorboard", "nproc", "parallel", "micro_batches", "peer_timeout",
     "log_alignment"}
)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` applied, type-checked and validated.

    Raises:
        ValueError: an unknown key (with the closest known one), a value of the wrong type, or
            a value out of range.
    """
    merged = dataclasses.asdict(base or TrainConfig())
    values = dict(values)
    if isinstance(values.get("rule"), str) and ":" in values["rule"]:
        values.update(_rule_spec_values(values["rule"], values))
    for key, value in values.items():
        head, _, rest = key.partition(".")
        _check_key(head)
        if rest:
            if _TYPES[head] is not dict:
                raise ValueError(f"{head!r} is not a table; '{key}' cannot set a sub-key of it")
            merged[head] = {**merged[head], rest: value}
        else:
            merged[head] = _coerce(head, value)
    config = TrainConfig(**merged)
    validate(config)
    return config


def _rule_spec_values(spec: str, values: dict) -> dict:
    """``rule = "dfa:k=1,init=sign"`` -> ``rule``, ``k`` / ``rank`` and ``rule_options`` keys."""
    name, options = parse_rule_spec(spec)
    out = {"rule": name}
    for key in ("k", "rank"):
        if key in options:
            value = options.pop(key)
            if values.get(key) is not None and values[key] != value:
                raise ValueError(f"rule {spec!r} sets {key}={value!r} but {key}={values[key]!r} "
                                 "is given too: give it once")
            out[key] = value
    if options:
        out["rule_options"] = {**values.get("rule_options", {}), **options}
    return out


def load_toml(path: str | Path) -> dict:
    """The key/value pairs of a TOML config file (tables stay nested dicts)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None


def parse_override(text: str) -> tuple[str, object]:
    """``"key=value"`` -> (key, value), the value read as TOML (a bare word stays a string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, e.g. --set lr=0.01; got {text!r}")
    return key, parse_value(raw)


def to_toml(config: TrainConfig) -> str:
    """The config as TOML that :func:`load_toml` reads back to an equal config (None is omitted:
    TOML has no null). Written by tomli-w."""
    return tomli_w.dumps({k: v for k, v in dataclasses.asdict(config).items() if v is not None})


def differences(a: TrainConfig, b: TrainConfig, ignore=RUNTIME_KEYS) -> dict[str, tuple]:
    """{key: (a's value, b's value)} for the keys that differ, except ``ignore``."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db[k]}


def validate(config: TrainConfig) -> None:
    """Raise ValueError for values out of range (names are checked where they are looked up)."""
    positive = ("epochs", "batch_size", "eval_batch_size", "lr", "nproc", "micro_batches",
                "peer_timeout", "seq_len")
    for key in positive:
        if not getattr(config, key) > 0:
            raise ValueError(f"{key} must be > 0; got {getattr(config, key)!r}")
    for key in ("image_size", "train_samples", "test_samples", "threads", "pretrain_epochs",
                "pretrain_lr", "k", "rank"):
        value = getattr(config, key)
        if value is not None and not value > 0:
            raise ValueError(f"{key} must be > 0 (or left unset); got {value!r}")
    if not 0 <= config.seed < 2**63:  # what torch's and the feedback's generators take
        raise ValueError(f"seed must be an integer in [0, 2**63); got {config.seed}")
    from ..data.text import parse_tokenizer

    parse_tokenizer(config.tokenizer)
    for key in ("workers", "log_alignment", "warmup_epochs"):
        if getattr(config, key) < 0:
            raise ValueError(f"{key} must be >= 0; got {getattr(config, key)}")
    for key in ("lr", "momentum", "weight_decay", "eps", "lr_gamma"):
        value = getattr(config, key)
        if not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
            raise ValueError(f"{key} must be a number in [0, {FLOAT32_MAX:.3g}]; got {value!r}")
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("parallel", config.parallel, PARALLEL)
    if not math.isfinite(config.peer_timeout):
        raise ValueError(f"peer_timeout must be a finite number of seconds; got "
                         f"{config.peer_timeout}")
    if config.log_alignment and config.nproc > 1:
        raise ValueError(SINGLE_PROCESS_ALIGNMENT)
    _choice("lr_schedule", config.lr_schedule, SCHEDULES)
    if config.lr_schedule == "multistep" and not config.lr_milestones:
        raise ValueError(
            "lr_schedule 'multistep' needs lr_milestones, e.g. --set lr_milestones=[50,75]"
        )
    if config.device not in ("auto", "cpu") and not config.device.startswith(("cuda", "mps")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {config.device!r}")
    if config.privacy is not None and (config.feedback != "exact" or config.feedback_options):
        raise ValueError(
            f"privacy with feedback={config.feedback!r} is not supported: the privacy mechanisms "
            "add calibrated noise to the summed update, and the device's own noise on e @ B is "
            "not accounted yet (docs/hardware.md, 'Noise as privacy'). Use feedback=\"exact\""
        )
    if config.privacy is not None:
        from ..privacy.training import check_config  # imports Opacus: only for private runs

        check_config(config)
    elif config.epsilon is not None or config.noise_multiplier is not None:
        raise ValueError("epsilon / noise_multiplier need a privacy method, e.g. --privacy dp-dfa")
    elif config.privacy_noise != "secret":
        raise ValueError("privacy_noise applies to private runs only (--privacy METHOD)")


def _choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_key(key: str) -> None:
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config key {key!r}{hint}. Known keys: {', '.join(FIELDS)}")


def _coerce(key: str, value):
    """``value`` checked against the type of field ``key`` (an int is accepted for a float)."""
    expected = _TYPES[key]
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, bool):
            continue
        if isinstance(value, origin):
            if origin is list:
                (item,) = typing.get_args(option)
                if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                    continue
            return value
    names = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"{key} must be {names}; got {value!r} ({type(value).__name__})")


def _type_name(option) -> str:
    if option is type(None):
        return "unset"
    if typing.get_origin(option) is list:
        return f"a list of {typing.get_args(option)[0].__name__}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false",
            dict: "a table"}.get(option, str(option))

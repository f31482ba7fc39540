"""What a :class:`~sdfa.app.config.TrainConfig` builds: data, task, model, optimizer, loaders,
callbacks and strategy. :mod:`sdfa.app.run` puts them together into a run.

This is the one place where the features meet the configuration: the training core imports
none of them, and a new feature adds its config keys and one line here.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from ..convert import convert, rules_of
from ..data import load_dataset
from ..models import build_model as build_preset
from ..optim import batch_manhattan
from ..tasks import build_task
from ..training import epoch_loader
from .config import TrainConfig


def load_data(config: TrainConfig):
    from ..graph.data import is_graph, load_graph

    if is_graph(config.dataset):
        return load_graph(config.dataset, config.data_dir, seed=config.seed,
                          **config.dataset_options)
    if config.dataset_options:
        raise ValueError(f"dataset_options apply to graph data sets; {config.dataset!r} takes none")
    return load_dataset(
        config.dataset, config.data_dir, download=config.download, image_size=config.image_size,
        train_samples=config.train_samples, test_samples=config.test_samples,
        seq_len=config.seq_len, tokenizer=config.tokenizer,
    )


def task_for(config: TrainConfig, data):
    if getattr(data, "task", None) == "node-classification":
        from ..graph.task import ERROR_OPTIONS

        # the pseudo-errors and the node filter (on by default for dfa-gnn) may come in the
        # rule spec, e.g. dfa-gnn:nf=false or bp:eg=true
        options = {"eg": config.rule == "dfa-gnn", "nf": config.rule == "dfa-gnn"}
        options.update({k: v for k, v in config.rule_options.items() if k in ERROR_OPTIONS})
        options.update(config.task_options)
        unknown = sorted(set(options) - {"loss", *ERROR_OPTIONS})
        if unknown:
            raise ValueError(f"node classification takes no task option {', '.join(unknown)}; "
                             f"its options: loss, {', '.join(ERROR_OPTIONS)}")
        return build_task(data, **options)
    if config.task_options:
        raise ValueError(
            f"task_options apply to node classification; {config.dataset!r} takes none"
        )
    return build_task(data, augment=config.augment, seed=config.seed, task=config.task)


def loaders(config: TrainConfig, data, device: torch.device):
    """(train loader, test loader) in (seed, epoch) order (a graph: the whole graph each)."""
    if hasattr(data, "loaders"):
        return data.loaders()
    common = dict(seed=config.seed, workers=config.workers, pin_memory=device.type == "cuda")
    return (
        epoch_loader(data.train, config.batch_size, shuffle=True, **common),
        epoch_loader(data.test, config.eval_batch_size, shuffle=False, **common),
    )


def optimizer_factory(config: TrainConfig):
    """``params -> optimizer`` as the config says (batch manhattan wraps any of them)."""

    def build(params) -> torch.optim.Optimizer:
        name, lr, wd = config.optimizer, config.lr, config.weight_decay
        if name == "adam":
            optimizer = torch.optim.Adam(params, lr=lr, eps=config.eps, weight_decay=wd)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, eps=config.eps, weight_decay=wd)
        elif name == "rmsprop":
            optimizer = torch.optim.RMSprop(params, lr=lr, eps=config.eps, weight_decay=wd)
        else:
            optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
        return batch_manhattan(optimizer) if config.batch_manhattan else optimizer

    return build


def scheduler_factory(config: TrainConfig):
    """``optimizer -> learning-rate schedule`` stepped once per epoch."""

    def build(optimizer):
        if config.lr_schedule == "multistep":
            milestones, gamma = config.lr_milestones, config.lr_gamma
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)
        if config.lr_schedule == "warmup":  # Launay et al.'s finding for DFA transformers
            warmup = config.warmup_epochs
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda epoch: min(1.0, (epoch + 1) / (warmup + 1))
            )
        if config.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)

    return build


def rule_options(config: TrainConfig) -> dict:
    from ..graph.data import is_graph
    from ..graph.task import ERROR_OPTIONS

    task_keys = ERROR_OPTIONS if is_graph(config.dataset) else ()  # the task's (task_for)
    options = {k: v for k, v in config.rule_options.items() if k not in task_keys}
    options.update({k: v for k, v in (("k", config.k), ("rank", config.rank)) if v is not None})
    if config.feedback != "exact" or config.feedback_options:
        options.update(feedback=config.feedback, feedback_options=dict(config.feedback_options))
    return options


def build_model(config: TrainConfig, data, features: dict | None = None) -> nn.Module:
    """The preset, converted to ``config.rule``. For the transfer protocol the ``features`` part
    stays fixed (with the weights ``features``, when given) while ``classifier`` learns."""
    model = build_preset(config.model, data.input_shape, data.num_classes, **config.model_options)
    rule = config.rule
    if config.transfer:
        _check_transferable(model, config.model)
        rule = {"features": "frozen", "classifier": config.rule}
    if features is not None:
        model.features.load_state_dict(features)
    model = convert(model, rule, seed=config.seed, inplace=True, **rule_options(config))
    zero_init = _saturating(model) if config.zero_init is None else config.zero_init
    if zero_init:
        _zero_dfa_layers(model)
    return model


def callbacks_for(config: TrainConfig) -> list:
    """The feature callbacks the config asks for."""
    callbacks = []
    if config.log_alignment:
        from ..alignment_log import AlignmentLog

        callbacks.append(AlignmentLog(config.log_alignment))
    if config.privacy is not None:
        from ..privacy.training import PrivacyCallback  # imports Opacus: only for private runs

        callbacks.append(PrivacyCallback(config))
    if config.rule == "ssa":
        from ..ssa import RankSchedule

        callbacks.append(RankSchedule())
    return callbacks


def strategy_for(config: TrainConfig, distributed: bool, example_input=None):
    """How a step runs: one process, or (``distributed``) ``config.parallel`` over several."""
    if not distributed:
        from ..training import Strategy

        return Strategy()
    from ..distributed.strategies import DataParallel, LayerParallelStrategy

    if config.parallel == "data":
        return DataParallel()
    return LayerParallelStrategy(micro_batches=config.micro_batches, example_input=example_input)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _check_transferable(model: nn.Module, name: str) -> None:
    children = dict(model.named_children())
    if "features" not in children or "classifier" not in children:
        raise ValueError(
            f"the transfer protocol needs a model made of 'features' and 'classifier' parts; "
            f"{name!r} has {', '.join(children) or 'no children'}. Use a convolutional preset "
            "such as crafton-cifar-conv."
        )


def _saturating(model: nn.Module) -> bool:
    """True when every activation module is tanh or sigmoid (so zero weights can learn)."""
    kinds = {type(m) for m in model.modules() if type(m).__module__ == nn.Tanh.__module__}
    return bool(kinds) and kinds <= {nn.Tanh, nn.Sigmoid}


def _zero_dfa_layers(model: nn.Module) -> None:
    """Zero the weights and biases of the layers trained by DFA (as Nokland and Crafton do)."""
    with torch.no_grad():
        for name, rule in rules_of(model).items():
            if rule == "dfa":
                for p in model.get_submodule(name).parameters(recurse=False):
                    p.zero_()

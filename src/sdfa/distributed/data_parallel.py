"""Data-parallel training of a converted model with torch's DistributedDataParallel."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def data_parallel(model: nn.Module, **options) -> DistributedDataParallel:
    """Wrap ``model`` (converted with any rule) so that its gradients are averaged over ranks.

    A rule only changes how each replica computes its gradients (DFA: from ``e @ B_l``), and DDP
    averages whatever lands in ``.grad``, so every rule works unchanged. DFA's feedback matrices
    are seeded buffers, identical on every rank by construction. With a mean loss on each rank's
    share of the global batch, a step equals a single-process step on the whole global batch.
    ``options`` go to DistributedDataParallel.
    """
    from ..dfa import dfa_config
    from ..fdfa import ForwardDirectFeedbackAlignment

    if isinstance(dfa_config(model), ForwardDirectFeedbackAlignment) or any(
        type(m).__name__ == "SFDFANetwork" for m in model.modules()
    ):
        raise ValueError(
            "rules 'fdfa' and 'sfdfa' learn B from each process's own batch, so data-parallel "
            "replicas would not equal one process on the global batch: train them in one "
            "process (no nproc / torchrun)"
        )
    device = next(model.parameters()).device
    if device.type == "cuda":
        options.setdefault("device_ids", [device])
    return DistributedDataParallel(model, **options)

"""Batch manhattan (Liao, Leibo, Poggio 2016): every step uses sign(grad) in place of grad.

Sign-concordant feedback delivers the right direction of the error but not its size; stepping with
the sign of each gradient entry makes the size irrelevant. Xiao et al. (2018) apply it before
weight decay and momentum, which is what hooking the step of a torch.optim optimizer gives:

    opt = sdfa.batch_manhattan(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))

The optimizer stays the same object (learning-rate schedulers, ``state_dict`` and closures keep
working); ``.grad`` holds the true gradients again after each step.
"""

from __future__ import annotations

import torch

_HANDLES = "_sdfa_batch_manhattan"


def batch_manhattan(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer`` step with the sign of every gradient; returns the same optimizer.

    Raises:
        ValueError: ``optimizer`` is not a torch.optim optimizer, or already batch manhattan.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"batch_manhattan wraps a torch.optim optimizer; got {type(optimizer).__name__}"
        )
    if hasattr(optimizer, _HANDLES):
        raise ValueError("this optimizer already uses batch manhattan steps")
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def to_signs():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    saved.append((p, p.grad))
                    p.grad = torch.sign(p.grad)

    def before_step(opt, args, kwargs):  # args[0] is the optimizer, args[1] a closure if any
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            to_signs()
            return None

        def signed_closure():
            with torch.enable_grad():
                loss = closure()
            saved.clear()  # the closure computed fresh gradients
            to_signs()
            return loss

        return args[:1], {**kwargs, "closure": signed_closure}

    def after_step(opt, args, kwargs):
        for p, grad in saved:
            p.grad = grad
        saved.clear()

    handles = (
        optimizer.register_step_pre_hook(before_step),
        optimizer.register_step_post_hook(after_step),
    )
    setattr(optimizer, _HANDLES, handles)
    return optimizer

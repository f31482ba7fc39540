"""Differentially private training: DP-SGD (Opacus), DP-DFA and noisy-projection DP-DFA.

Opacus-style: wrap the model, optimizer and data loader you already have::

    engine = sdfa.privacy.PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=sdfa.convert(model, "dfa"), optimizer=optimizer, data_loader=loader,
        method="dp-dfa", target_epsilon=2.0, target_delta=1e-5, epochs=30, max_input_norm=4.0)
    for x, y in loader:  # Poisson-sampled batches
        optimizer.zero_grad(); F.cross_entropy(model(x), y).backward(); optimizer.step()
    engine.get_epsilon(1e-5)

The noise and the Poisson sampling come from secret generators (OS entropy, never the seed)
unless ``noise_generator=`` is given; see :mod:`sdfa.privacy.randomness`. Needs the optional
dependency ``opacus`` (``pip install sdfa[privacy]``). See docs/privacy.md for the mechanisms,
the proofs of their sensitivity bounds and what the guarantee holds against.
"""

try:
    import opacus  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sdfa.privacy needs Opacus: pip install 'sdfa[privacy]' (or pip install opacus)"
    ) from error

from .engine import ACCOUNTANTS, METHODS, PrivacyBudgetExhausted, PrivacyEngine

__all__ = ["ACCOUNTANTS", "METHODS", "PrivacyBudgetExhausted", "PrivacyEngine"]

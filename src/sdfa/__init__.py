"""sdfa: train PyTorch models without backpropagation.

Direct feedback alignment with sparse feedback (Crafton et al. 2019) and the wider
feedback-alignment family, behind one call::

    model = sdfa.convert(model, "dfa", k=1, seed=0)
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()
"""

# registered on import: dfa-gnn and node classification (PyG loads lazily); the device backends
from . import graph, hardware  # noqa: F401
from ._version import __version__
from .alignment import capture_rng, measure_alignment
from .app.run import load_run
from .convert import convert, feedback_matrices, rules_of
from .costs import costs
from .fdfa import FDFA  # noqa: F401  (registers the rule 'fdfa')
from .layers import backprop, is_trainable, register_layer
from .optim import batch_manhattan
from .rules import RULES, Rule, available_rules, register_rule
from .ssa import to_dense

__all__ = [
    "__version__",
    "RULES",
    "Rule",
    "available_rules",
    "backprop",
    "batch_manhattan",
    "capture_rng",
    "convert",
    "costs",
    "feedback_matrices",
    "hardware",
    "is_trainable",
    "load_run",
    "measure_alignment",
    "register_layer",
    "register_rule",
    "rules_of",
    "to_dense",
]

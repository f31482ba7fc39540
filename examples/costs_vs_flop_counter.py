"""The cost model against FlopCounterMode on every model preset: counted = measured?

    PYTHONPATH=src python examples/costs_vs_flop_counter.py [RULE ...]

For each preset of ``sdfa models`` and each rule (default: bp fa dfa dfa:k=1), runs one real
training step (forward + backward, batch 2) of the converted model under
torch.utils.flop_counter.FlopCounterMode and compares the measured FLOPs / 2 with the matrix-product
MACs that ``sdfa.costs`` counts (sparse DFA's gathers are not matrix products; weight mirror's
per-step MACs are added). The ImageNet presets run on 64x64 images to stay quick on a CPU.
Exits with status 1 if any pair differs by more than 1%.
"""

import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sdfa
from sdfa.costs import parse_rule
from sdfa.models import MODELS, build_model

SHAPES = {  # preset -> (one input, classes); the others get a 3x32x32 image and 10 classes
    "mlp": ((1, 8, 8), 10),
    "crafton-mnist-fc": ((1, 28, 28), 10),
    "crafton-mnist-conv": ((1, 28, 28), 10),
    "crafton-alexnet-head": ((256, 6, 6), 1000),
    "crafton-vgg-head": ((512, 7, 7), 1000),
    "alexnet": ((3, 64, 64), 10),
    "resnet18": ((3, 64, 64), 10),
    "resnet50": ((3, 64, 64), 10),
}
BATCH = 2

torch.set_num_threads(1)
rules = sys.argv[1:] or ["bp", "fa", "dfa", "dfa:k=1"]
worst = 0.0
for preset in sorted(MODELS):
    shape, classes = SHAPES.get(preset, ((3, 32, 32), 10))
    for spec in rules:
        rule, options = parse_rule(spec)
        torch.manual_seed(0)
        model = build_model(preset, shape, classes)
        report = sdfa.costs(model, rule, shape, **options)
        converted = sdfa.convert(model, rule, **options)
        x, y = torch.randn(BATCH, *shape), torch.randint(0, classes, (BATCH,))
        converted(x)  # DFA creates its feedback matrices at the first forward pass
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(converted(x), y).backward()
        measured = counter.get_total_flops() / 2
        counted = BATCH * report.total.matmul_macs + report.total.feedback_macs_per_step
        error = measured / counted - 1
        worst = max(worst, abs(error))
        print(f"{preset:22s} {spec:10s} counted {counted:>15,} measured {measured:>15,.0f} "
              f"({error:+.3%})", flush=True)
print(f"largest difference: {worst:.3%}")
sys.exit(1 if worst > 0.01 else 0)

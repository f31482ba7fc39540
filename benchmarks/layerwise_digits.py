"""Layer-wise rules on scikit-learn's 8x8 digits: test accuracy and gradient alignment per rule.

Trains the ``lenet5`` preset (1x8x8 input) with each rule, then measures on the whole training set,
per layer, the angle between the rule's update (weight and bias gradient) and the true (backprop)
gradient of the same weights, with ``sdfa.measure_alignment``. The output layer's angle is 0 for
every layer-wise rule: its error is the true one.

    PYTHONPATH=src python benchmarks/layerwise_digits.py                 # every layer-wise rule
    PYTHONPATH=src python benchmarks/layerwise_digits.py --rules usf fa --epochs 30 --seeds 0 1 2
    PYTHONPATH=src python benchmarks/layerwise_digits.py --rules usf --optimizer sgd --lr 0.05
    PYTHONPATH=src python benchmarks/layerwise_digits.py --rules usf --optimizer sgd --lr 1e-3 \
        --batch-manhattan
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sdfa
from sdfa.models import build_model
from sdfa.optim import batch_manhattan

RULES = ["bp", "fa", "usf", "frsf", "brsf", "kp", "wm"]


def digits(seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 1x8x8 images in [0, 1], stratified 75/25."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(data.target)
    train, test = train_test_split(
        torch.arange(len(y)), test_size=0.25, stratify=y, random_state=seed
    )
    return x[train], y[train], x[test], y[test]


def train(rule, epochs=20, seed=0, lr=3e-3, batch_size=32, weight_decay=0.0, manhattan=False,
          optimizer="adam"):
    """Train lenet5 with ``rule``; return (model, test accuracy, training data).

    ``optimizer``: "adam" (AdamW, decoupled weight decay) or "sgd" (momentum 0.9).
    """
    x, y, x_test, y_test = digits(seed)
    torch.manual_seed(seed)
    model = sdfa.convert(build_model("lenet5", (1, 8, 8), 10).float(), rule, seed=seed)
    if optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if manhattan:
        batch_manhattan(opt)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=order).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    return model, accuracy, (x, y)


def alignment(model, x, y) -> dict[str, float]:
    """Degrees between the rule's update and the true gradient, per layer."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    metrics = sdfa.measure_alignment(model, F.cross_entropy, x, y)
    model.zero_grad()
    prefix = "align/angle/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=RULES, choices=sdfa.available_rules())
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--batch-manhattan", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for rule in args.rules:
        for seed in args.seeds:
            start = time.perf_counter()
            model, accuracy, (x, y) = train(
                rule, args.epochs, seed, args.lr, weight_decay=args.weight_decay,
                manhattan=args.batch_manhattan, optimizer=args.optimizer,
            )
            seconds = time.perf_counter() - start
            angles = alignment(model, x, y)
            if not results:
                print("angle (degrees) between each rule's gradient and the true gradient")
                print(f"{'rule':6s} {'seed':>4s} {'test acc':>8s} {'time':>6s}  "
                      + " ".join(f"{name:>6s}" for name in angles))
            print(f"{rule:6s} {seed:4d} {accuracy:8.4f} {seconds:5.1f}s  "
                  + " ".join(f"{a:6.1f}" for a in angles.values()), flush=True)
            results.setdefault(rule, []).append((accuracy, list(angles.values())))
    if len(args.seeds) > 1:
        print(f"\nmean over seeds {args.seeds}: test accuracy (min-max), mean angle per layer")
        for rule, runs in results.items():
            accuracies = [a for a, _ in runs]
            angles = [sum(col) / len(col) for col in zip(*(angles for _, angles in runs))]
            print(f"{rule:6s} {sum(accuracies) / len(accuracies):.3f} "
                  f"({min(accuracies):.3f}-{max(accuracies):.3f})  "
                  + " ".join(f"{a:6.1f}" for a in angles))


if __name__ == "__main__":
    main()

"""Alignment of fa / dfa / sparse dfa updates with the true gradient while learning digits.

    PYTHONPATH=src python examples/alignment_digits.py

Trains a 64-64-64-10 tanh MLP on scikit-learn's digits (Adam 1e-3, batch 32) and prints, per
epoch, the mean angle between each hidden layer's update and the backprop gradient, measured
every 10 steps with sdfa.measure_alignment (which leaves training unchanged), and the accuracy.
"""

import statistics

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import sdfa

torch.set_num_threads(1)
data = load_digits()
x_all = torch.tensor(data.data, dtype=torch.float32) / 16
y_all = torch.tensor(data.target)

for rule, options in [("fa", {}), ("dfa", {}), ("dfa", {"k": 1})]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 10))
    model = sdfa.convert(net, rule, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"{rule} {options}: epoch, angle layer 0, angle layer 2, sign agreement 0, accuracy")
    step = 0
    for epoch in range(8):
        measured = []
        order = torch.randperm(len(x_all))
        for start in range(0, len(x_all), 32):
            x, y = x_all[order[start:start + 32]], y_all[order[start:start + 32]]
            rng = sdfa.capture_rng()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step % 10 == 0:
                measured.append(sdfa.measure_alignment(model, F.cross_entropy, x, y, rng_state=rng))
            optimizer.step()
            step += 1
        accuracy = (model(x_all).argmax(1) == y_all).float().mean().item()
        means = [statistics.mean(m[key] for m in measured)
                 for key in ("align/angle/0", "align/angle/2", "align/sign/0")]
        print(f"  {epoch}  {means[0]:5.1f}  {means[1]:5.1f}  {means[2]:.2f}  {accuracy:.3f}")

"""DFA with every forward product on a simulated RRAM crossbar (in-memory compute), on digits.

The MLP preset (64-100-100-10 tanh) trained by DFA, its Linear layers swapped for CrossbarLinear
(sdfa.hardware.on_crossbar: N-bit cells, variation 0.1, read noise 0.01, 8-bit ADC; gradients
straight-through, the array re-written after every step), against the same model in software.
Scikit-learn's digits scaled to [0, 1], first 1,400 images for training, the other 397 for test,
10 epochs, Adam 1e-3, batch 32, weights from zero.

    python examples/forward_crossbar_digits.py
"""

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import sdfa
from sdfa.hardware import on_crossbar
from sdfa.models import build_model

d = load_digits()
x = torch.tensor(d.data / 16.0, dtype=torch.float32)
y = torch.tensor(d.target)
xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
for bits in (None, 8, 4, 2):
    torch.manual_seed(0)
    net = build_model("mlp", (64,), 10)
    if bits is not None:
        net = on_crossbar(net, bits=bits, variation=0.1, read_noise=0.01, seed=0)
    model = sdfa.convert(net, "dfa")
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.time()
    for _ in range(10):
        perm = torch.randperm(1400)
        for i in range(0, 1400, 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    print(
        f"forward on crossbar, bits={bits}: test accuracy {100 * acc:.2f}% "
        f"({time.time() - start:.1f} s)"
    )

"""Sequence presets: a causal transformer language model, an LSTM language model, and LSTM / GRU
sequence classifiers.

Each publishes its DFA feedback points as named boundary sets (``model.sdfa_boundaries``), so
``sdfa.convert(model, "dfa", boundaries="macro", per_position=True)`` (CLI: ``--rule
dfa:boundaries=macro,per_position=true``) places them as the papers do (docs/sequence.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class TransformerLM(nn.Module):
    """Token embedding + learned positions, N causal self-attention blocks, a vocabulary head.

    Blocks are ``nn.TransformerEncoderLayer`` (post-norm as in Launay et al.'s code, or pre-norm
    with a final LayerNorm ``norm``) with the activation as a module, so the FFN's activation
    can be a feedback point (``micro``).
    """

    def __init__(self, vocab, seq_len, d_model, layers, heads, ffn, norm, tied, dropout,
                 activation):
        super().__init__()
        pre = norm == "pre"
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, ffn, dropout, activation=_ACTIVATIONS[activation](),
                batch_first=True, norm_first=pre,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model) if pre else nn.Identity()
        self.head = nn.Linear(d_model, vocab)
        if tied:
            self.head.weight = self.embed.weight
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        # Launay et al.'s feedback points. The embedding learns from the first one (it is inside
        # the first block). macro: after each block's final residual + norm (pre-norm: the last
        # one is the final LayerNorm). micro: after attention + add + norm, after the FFN's first
        # linear + activation, and the block output.
        out = [f"blocks.{i}" for i in range(layers)]
        if pre:
            out[-1] = "norm"
        attn = ".norm2" if pre else ".norm1"  # pre-norm: norm2 reads attention + add
        micro = [p for i in range(layers) for p in (f"blocks.{i}{attn}", f"blocks.{i}.activation",
                                                     out[i])]
        self.sdfa_boundaries = {"macro": out, "micro": micro}

    def forward(self, ids):
        length = ids.shape[1]
        x = self.embed(ids) + self.pos[:, :length]
        mask = self.mask[:length, :length]
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


@register_model("transformer-lm")
def transformer_lm(input_shape, num_classes, d_model=128, layers=4, heads=4, ffn=None,
                   norm="post", tied=False, dropout=0.0, activation="gelu"):
    """Causal transformer language model for (seq_len,) token windows over ``num_classes``
    tokens; ``ffn`` defaults to 4 d_model; ``norm`` post (Launay et al.) or pre; ``tied``
    shares the embedding with the head."""
    (seq_len,) = _sequence_shape(input_shape, "transformer-lm")
    if norm not in ("post", "pre"):
        raise ValueError(f"norm must be 'post' or 'pre'; got {norm!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}; got {activation!r}")
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    return TransformerLM(num_classes, seq_len, d_model, layers, heads, ffn or 4 * d_model, norm,
                         tied, dropout, activation)


class Recurrent(nn.Module):
    """Stacked single-layer LSTM/GRU modules (each its own unit, so each can be a DFA block)."""

    def __init__(self, cell, inputs, hidden, layers):
        super().__init__()
        kind = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.layers = nn.ModuleList(
            kind(inputs if i == 0 else hidden, hidden, batch_first=True) for i in range(layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)[0]
        return x


class LSTMLM(nn.Module):
    """Embedding, stacked LSTM layers, vocabulary head: a next-token logit at every step."""

    def __init__(self, vocab, d_model, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.rnn = Recurrent("lstm", d_model, hidden, layers)
        self.head = nn.Linear(hidden, vocab)
        # layers: a feedback point after every LSTM layer (backprop through time inside each);
        # module: one after the whole stack (Han et al.'s module-wise DFA: BPTT and backprop
        # between the layers inside the module)
        self.sdfa_boundaries = {
            "layers": [f"rnn.layers.{i}" for i in range(layers)],
            "module": [f"rnn.layers.{layers - 1}"],
        }

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids)))


@register_model("lstm-lm")
def lstm_lm(input_shape, num_classes, d_model=128, hidden=256, layers=2):
    """LSTM language model for (seq_len,) token windows."""
    _sequence_shape(input_shape, "lstm-lm")
    return LSTMLM(num_classes, d_model, hidden, layers)


class SequenceClassifier(nn.Module):
    """Reads (C, H, W) samples row by row (H steps of C W features: the digits row by row, a
    BasicMotions series step by step), an LSTM/GRU stack, its last step through an FC layer."""

    def __init__(self, input_shape, num_classes, cell, hidden, layers, fc):
        super().__init__()
        channels, _, width = input_shape
        self.rnn = Recurrent(cell, channels * width, hidden, layers)
        self.fc = nn.Linear(hidden, fc)
        self.act = nn.Tanh()
        self.out = nn.Linear(fc, num_classes)
        last = f"rnn.layers.{layers - 1}"
        self.sdfa_boundaries = {
            "layers": [f"rnn.layers.{i}" for i in range(layers)] + ["act"],
            "module": [last, "act"],
        }

    def forward(self, x):
        steps = x.transpose(1, 2).flatten(2)  # (batch, H, C W)
        return self.out(self.act(self.fc(self.rnn(steps)[:, -1])))


def _classifier(cell):
    def build(input_shape, num_classes, hidden=128, layers=2, fc=128):
        if len(input_shape) != 3:
            raise ValueError(
                f"{cell}: expects (channels, steps, features) samples such as digits or "
                f"basicmotions; got input shape {tuple(input_shape)}"
            )
        return SequenceClassifier(tuple(input_shape), num_classes, cell, hidden, layers, fc)

    build.__doc__ = (f"{cell.upper()} classifier: rows as time steps, ``layers`` x ``hidden``, "
                     "the last step through a tanh FC layer of ``fc`` units.")
    return build


register_model("lstm")(_classifier("lstm"))
register_model("gru")(_classifier("gru"))


def _sequence_shape(input_shape, name):
    if len(input_shape) != 1 or not isinstance(input_shape[0], int):
        raise ValueError(
            f"{name}: expects (seq_len,) token windows (--dataset text); got input shape "
            f"{tuple(input_shape)}"
        )
    return tuple(input_shape)


__all__ = ["LSTMLM", "SequenceClassifier", "TransformerLM"]

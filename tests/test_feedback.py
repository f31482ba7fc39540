"""Feedback matrices: sparsity, balance, rank, scale, seeding, sparse application."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdfa import feedback as fb


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.data())
def test_balanced_classes_distinct_and_even(num_neurons, num_classes, data):
    k = data.draw(st.integers(1, num_classes))
    index = fb.balanced_classes(num_neurons, num_classes, k, torch.Generator().manual_seed(1))
    assert index.shape == (num_neurons, k)
    assert index.min() >= 0 and index.max() < num_classes
    # k distinct classes per neuron
    assert (index.sort(dim=1).values.diff(dim=1) > 0).all()
    # every class fed floor(Nk/C) or ceil(Nk/C) times
    loads = torch.bincount(index.flatten(), minlength=num_classes)
    assert loads.sum() == num_neurons * k
    assert loads.min() == (num_neurons * k) // num_classes
    assert loads.max() == -(-num_neurons * k // num_classes)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(1, 30), st.integers(0, 10**6))
def test_k1_one_connection_per_neuron(num_neurons, num_classes, seed):
    b = fb.make_feedback(num_classes, num_neurons, seed=seed, name="h", k=1).dense()
    assert b.shape == (num_classes, num_neurons)
    assert ((b != 0).sum(0) == 1).all()
    per_class = (b != 0).sum(1)
    assert per_class.min() == num_neurons // num_classes
    assert per_class.max() == -(-num_neurons // num_classes)


def test_sparse_is_stored_sparsely_and_projects_like_dense():
    for k in (1, 3, 10):
        f = fb.make_feedback(10, 500, seed=0, name="x", k=k, dtype=torch.float64)
        assert f.index.shape == (500, k) and f.value.shape == (500, k)
        assert all(b.numel() == 500 * k for b in f.buffers())
        e = torch.randn(7, 10, dtype=torch.float64)
        torch.testing.assert_close(f.project(e), e @ f.dense())


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_low_rank_has_rank_r(rank):
    f = fb.make_feedback(10, 64, seed=0, name="x", rank=rank, dtype=torch.float64)
    assert torch.linalg.matrix_rank(f.dense()) == rank
    e = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(f.project(e), e @ f.dense())
    # rescaled to the standard deviation of the dense uniform distribution, h / sqrt(3)
    h = fb.default_scale(64, 10, None)
    assert f.dense().std().item() == pytest.approx(h / math.sqrt(3), rel=0.05)


def test_scales_follow_crafton():
    n, c = 400, 10
    dense = fb.make_feedback(c, n, seed=0, name="a", dtype=torch.float64).dense()
    h = 1 / math.sqrt(n)
    assert dense.abs().max() <= h and dense.abs().max() > 0.9 * h
    sparse = fb.make_feedback(c, n, seed=0, name="a", k=1, dtype=torch.float64).dense()
    hs = 1 / math.sqrt(n / math.sqrt(c * 1))
    assert sparse.abs().max() <= hs and sparse.abs().max() > 0.9 * hs
    sign = fb.make_feedback(c, n, seed=0, name="a", init="sign", scale=0.5).dense()
    assert set(sign.unique().tolist()) == {-0.5, 0.5}
    gauss = fb.make_feedback(c, n, seed=0, name="a", init="gaussian", dtype=torch.float64).dense()
    assert gauss.std().item() == pytest.approx(h, rel=0.05)


def test_seeding_is_reproducible_and_layers_differ():
    def make(seed, name):
        return fb.make_feedback(10, 50, seed=seed, name=name, k=2).dense()

    assert torch.equal(make(3, "fc1"), make(3, "fc1"))
    assert not torch.equal(make(3, "fc1"), make(4, "fc1"))
    assert not torch.equal(make(3, "fc1"), make(3, "fc2"))


def test_known_values_do_not_drift():
    # Pins the generator: the same seed must give the same B on any machine and version.
    b = fb.make_feedback(3, 4, seed=0, name="0", dtype=torch.float64).dense()
    first_row = torch.tensor(
        [0.2705561053, 0.1525136034, 0.1158862386, -0.2628135507], dtype=torch.float64
    )
    torch.testing.assert_close(b[0], first_row, atol=1e-9, rtol=0)
    assert fb.generator(0, "0").initial_seed() == 4108050209


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0}, "1 <= k <= 10"),
        ({"k": 11}, "1 <= k <= 10"),
        ({"k": 1.5}, "integer"),
        ({"rank": 0}, "1 <= rank <= 10"),
        ({"rank": 11}, "1 <= rank <= 10"),
        ({"k": 1, "rank": 2}, "either"),
        ({"init": "laplace"}, "uniform, gaussian, sign"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fb.make_feedback(10, 20, seed=0, name="x", **kwargs)


def test_rank_larger_than_layer():
    with pytest.raises(ValueError, match="rank must be <= 3"):
        fb.make_feedback(10, 3, seed=0, name="x", rank=5)


def test_matrices_do_not_depend_on_the_default_dtype(float64):
    in_float64 = fb.make_feedback(10, 50, seed=0, name="x", k=2).dense()
    torch.set_default_dtype(torch.float32)
    assert torch.equal(in_float64, fb.make_feedback(10, 50, seed=0, name="x", k=2).dense())

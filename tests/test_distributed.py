"""sdfa.distributed: real processes on gloo (127.0.0.1) against single-process training.

The multi-process jobs run once per module (starting processes is the slow part) and save what
every rank saw; the tests compare that with single-process runs computed here, in float64.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sdfa
import sdfa.app.run
import sdfa.data
import sdfa.training
from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.distributed import (
    Comm,
    LayerParallel,
    PeerFailure,
    ProcessFailure,
    balanced,
    block_sizes,
    blocks_of,
    bytes_written,
    data_parallel,
    launched,
    pipeline_traffic,
    setup,
    spawn,
    stage_boundaries,
)
from sdfa.distributed.launch import free_port
from sdfa.training import load_checkpoint

SEED, STEPS, BATCH, LR = 3, 3, 10, 0.01
F64 = 8  # bytes per value


F64_LAYER = {"dtype": torch.float64}


def mlp():
    torch.manual_seed(0)
    a, b, c = (nn.Linear(i, o, **F64_LAYER) for i, o in ((6, 9), (9, 7), (7, 4)))
    return nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), c)


def conv_net():
    """Nested like the Crafton presets; the conv block's output has 3 x 2 x 2 = 12 values."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(1, 3, 3, **F64_LAYER), nn.ReLU(), nn.MaxPool2d(2))
    classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 5, **F64_LAYER), nn.Tanh(), nn.Linear(5, 4, **F64_LAYER)
    )
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


MODELS = {"mlp": (mlp, (6,)), "conv": (conv_net, (1, 6, 6))}

# name: model, rule, options, blocks per rank, micro-batches, values per sample at the boundary
PIPELINES = {
    "dfa-dense": ("mlp", "dfa", {}, None, 3, 7),
    "dfa-sparse-k1": ("conv", "dfa", {"k": 1}, [1, 2], 2, 12),
    "bp": ("mlp", "bp", {}, None, 3, 7),
    "fa": ("conv", "fa", {}, [1, 2], 2, 12),
    # transfer protocol: rank 0 holds only the frozen features
    "dfa-frozen-features": ("conv", {"features": "frozen", "classifier": "dfa"}, {}, [1, 2], 2, 12),
}
# every registered rule, and sparse DFA
# (fdfa and sfdfa learn B from each process's batch: refused, see test_fdfa.py; dfa-gnn needs
# graph layers)
DATA_PARALLEL = {**{rule: (rule, {}) for rule in sorted(sdfa.RULES)
                    if rule != "fdfa" and not sdfa.RULES[rule].model_specific},
                 "dfa-k1": ("dfa", {"k": 1})}


def batches(model_name, steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    shape = MODELS[model_name][1]
    return [
        (torch.randn(BATCH, *shape, generator=gen, dtype=torch.float64),
         torch.randint(0, 4, (BATCH,), generator=gen))
        for _ in range(steps)
    ]


def single_process(model_name, rule, options, steps=STEPS, optimizer=torch.optim.Adam, lr=LR):
    model = sdfa.convert(MODELS[model_name][0](), rule, seed=SEED, **options)
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for x, y in batches(model_name)[:steps]:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def layer_parallel(name, **overrides):
    model_name, rule, options, balance, micro, _ = PIPELINES[name]
    data = batches(model_name)
    kwargs = {"micro_batches": micro, "balance": balance, **overrides}
    example = data[0][0][:1]
    if isinstance(rule, str):  # LayerParallel converts it
        model = MODELS[model_name][0]()
        stage = LayerParallel(model, rule, example_input=example, seed=SEED, **options, **kwargs)
    else:
        model = sdfa.convert(MODELS[model_name][0](), rule, seed=SEED, **options)
        stage = LayerParallel(model, example_input=example, **kwargs)
    return stage, data


def optimizer_of(stage):
    params = list(stage.parameters())
    return torch.optim.Adam(params, lr=LR) if params else None


@pytest.fixture(autouse=True)
def default_dtype_of_a_fresh_process():
    """The spawned processes start with torch's default dtype, so the references computed here
    must too (another test module may have changed it): Adam's step counter and sparse feedback
    draws follow it."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(saved)


# -- the jobs (run in every spawned process) ------------------------------------------------------


def _pipelines_job(out_dir):
    torch.set_num_threads(1)
    rank, results = dist.get_rank(), {}
    for name in PIPELINES:
        stage, data = layer_parallel(name)
        opt = optimizer_of(stage)
        received, written, losses = [], [], []
        for x, y in data:
            stage.comm.reset()
            before = bytes_written()
            losses.append(stage.forward_backward(x, y))
            written.append(None if before is None else bytes_written() - before)
            received.append(dict(stage.comm.received))
            if opt:
                opt.step()
                opt.zero_grad()
        results[name] = {
            "received": received,
            "written": written,
            "losses": losses,
            "state": stage.state_dict(),
            "optimizer": stage.optimizer_state_dict(opt),
            "output": stage.eval().predict(data[0][0]),
        }

    # Resume: a single-process checkpoint after STEPS - 1 steps, continued layer-parallel.
    model, opt, _ = single_process("mlp", "dfa", {"k": 1}, steps=STEPS - 1)
    stage, data = layer_parallel("dfa-dense", k=1)
    stage_opt = torch.optim.Adam(stage.parameters(), lr=LR)
    stage.load_state_dict(model.state_dict())
    stage.load_optimizer_state_dict(stage_opt, opt.state_dict())
    stage_opt.zero_grad()
    stage.forward_backward(*data[-1])
    stage_opt.step()
    results["resumed"] = stage.state_dict()

    for name, (rule, options) in DATA_PARALLEL.items():
        model = data_parallel(sdfa.convert(mlp(), rule, seed=SEED, **options))
        opt = torch.optim.SGD(model.parameters(), lr=LR * 10)
        for x, y in batches("mlp"):
            opt.zero_grad()
            F.cross_entropy(model(x[rank::2]), y[rank::2]).backward()  # half the global batch
            opt.step()
        results[f"ddp-{name}"] = model.module.state_dict()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _fault_job(mode, out_dir):
    torch.set_num_threads(1)
    stage, data = layer_parallel("dfa-dense")
    opt = torch.optim.Adam(stage.parameters(), lr=LR)
    for step, (x, y) in enumerate(data * 2):
        if step == 2 and stage.rank == 1:
            if mode == "dies":
                os._exit(7)
            time.sleep(120)  # stuck
        start = time.monotonic()
        try:
            stage.forward_backward(x, y)
        except PeerFailure:
            (Path(out_dir) / "waited").write_text(str(time.monotonic() - start))
            raise
        opt.step()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    spawn(_pipelines_job, 2, (str(out),), backend="gloo", timeout=60)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_state(state, reference, key="state_dict"):
    """Tensors equal to float rounding; extra states (sparse feedback, noise generators) equal."""
    if isinstance(reference, torch.Tensor):
        torch.testing.assert_close(state, reference, rtol=1e-10, atol=1e-12, msg=key)
    elif isinstance(reference, dict):
        assert list(state) == list(reference), key
        for name, value in reference.items():
            assert_same_state(state[name], value, f"{key}[{name!r}]")
    else:
        assert state == reference, key


# -- layer parallel ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PIPELINES))
def test_layer_parallel_ends_with_single_process_weights(ranks, name):
    model_name, rule, options, *_ = PIPELINES[name]
    model, opt, losses = single_process(model_name, rule, options)
    result = ranks[0][name]
    assert_same_state(result["state"], model.state_dict())
    reference = opt.state_dict()
    assert result["optimizer"]["param_groups"] == reference["param_groups"]
    assert sorted(result["optimizer"]["state"]) == sorted(reference["state"])
    for i, moments in reference["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(result["optimizer"]["state"][i][key], value)
    # the loss and the output are known on the last rank only
    assert ranks[0][name]["losses"] == [None] * STEPS
    assert ranks[1][name]["losses"] == pytest.approx(losses, rel=1e-12)
    assert ranks[0][name]["output"] is None
    with torch.no_grad():
        expected = model.eval()(batches(model_name)[0][0])
    torch.testing.assert_close(ranks[1][name]["output"], expected)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_bytes_per_step_match_the_analytic_count(ranks, name):
    _, rule, _, _, micro, boundary = PIPELINES[name]
    dfa = "dfa" in str(rule)
    activations = BATCH * boundary * F64  # one boundary, forward
    if dfa:  # the output error (C = 4 values per sample) goes back once, to rank 0
        expected = [{"error": BATCH * 4 * F64}, {"activations": activations}]
    else:  # backprop-style: the boundary's gradient travels back
        expected = [{"gradients": activations}, {"activations": activations}]
    for rank in range(2):
        assert ranks[rank][name]["received"] == [expected[rank]] * STEPS
    counted = sum(expected[0].values()) + sum(expected[1].values())
    traffic = pipeline_traffic([boundary], 4, BATCH, bytes_per_value=F64)
    assert counted == (traffic.dfa if dfa else traffic.bp)
    # what the ranks wrote to their sockets: the counted bytes and a header per message
    written = [ranks[0][name]["written"][i] + ranks[1][name]["written"][i] for i in range(STEPS)]
    if None in written:
        pytest.skip("this system does not report the bytes a process writes (/proc/self/io)")
    messages = micro + 1 if dfa else 2 * micro  # forward sends, then the error or the gradients
    for total in written:
        assert counted < total <= counted + 256 * messages


def test_resume_from_a_single_process_checkpoint(ranks):
    model, _, _ = single_process("mlp", "dfa", {"k": 1})
    assert_same_state(ranks[0]["resumed"], model.state_dict())
    assert ranks[1]["resumed"] is None  # gathered on rank 0


# -- data parallel -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DATA_PARALLEL))
def test_data_parallel_equals_one_process_on_the_global_batch(ranks, name):
    rule, options = DATA_PARALLEL[name]
    model, _, _ = single_process("mlp", rule, options, optimizer=torch.optim.SGD, lr=LR * 10)
    for rank in range(2):
        assert_same_state(ranks[rank][f"ddp-{name}"], model.state_dict())
    learner = -1 if rule == "shallow" else 0  # shallow trains the output layer only
    assert not torch.equal(model[learner].weight, mlp()[learner].weight)  # it did train


# -- faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, exit_message", [
    ("dies", "rank 1: exited with code 7"),
    ("hangs", "rank 1: killed by signal SIGKILL"),
])
def test_a_lost_peer_stops_the_others_with_a_clear_error(tmp_path, mode, exit_message):
    timeout = 3.0
    with pytest.raises(RuntimeError) as failure:
        spawn(_fault_job, 2, (mode, str(tmp_path)), backend="gloo", timeout=timeout)
    message = str(failure.value)
    assert "2 of 2 processes failed" in message
    assert exit_message in message
    assert "rank 0: PeerFailure: rank 0 of 2:" in message
    assert "resume from the last checkpoint" in message
    waited = float((tmp_path / "waited").read_text())
    assert waited < timeout + 2.0


# -- one process: errors, splitting, traffic model -----------------------------------------------


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_trains_a_converted_model_like_single_process(world_of_one):
    model = sdfa.convert(conv_net(), "dfa", seed=SEED, k=1)
    data = batches("conv")
    stage = LayerParallel(model, example_input=data[0][0][:1], micro_batches=3)
    opt = torch.optim.Adam(stage.parameters(), lr=LR)
    for x, y in data:
        opt.zero_grad()
        stage.forward_backward(x, y)
        opt.step()
    model, _, _ = single_process("conv", "dfa", {"k": 1})
    assert_same_state(stage.state_dict(), model.state_dict())
    assert stage.comm.received == {}


@pytest.mark.parametrize("model, kwargs, message", [
    (nn.Linear(6, 4), {}, "splits an nn.Sequential"),
    (nn.Sequential(Wrapper()), {}, "holds trainable layer"),
    (nn.Sequential(nn.Linear(6, 4), nn.Softmax(1)), {}, "last module of the model"),
    (nn.Sequential(nn.Tanh()), {"rule": "bp"}, "no trainable"),
    (mlp(), {"balance": [1, 1]}, "balance must give"),
    (mlp(), {"micro_batches": 0}, "micro_batches must be"),
    (mlp(), {"output": "2"}, "do not apply"),
    (mlp(), {"rule": {"": "dfa"}}, "one rule name"),
    (mlp(), {"rule": None}, "pass rule="),
    (mlp(), {"rule": None, "k": 1}, "options k are for converting"),
    (sdfa.convert(mlp(), {"0": "bp", "": "dfa"}), {"rule": None}, "mixes bp, dfa"),
    (sdfa.convert(mlp(), "dfa", boundaries=["1", "3"]), {"rule": None}, "does not feed the block"),
    (sdfa.convert(mlp(), "dfa"), {}, "already converted"),
    (mlp(), {"k": 9}, "k must be an integer"),
])
def test_unsupported_input_is_a_value_error(world_of_one, model, kwargs, message):
    kwargs = {"rule": "dfa", **kwargs}
    with pytest.raises(ValueError, match=message):
        example = torch.zeros(1, 6, dtype=torch.float64)
        LayerParallel(model.double(), kwargs.pop("rule"), example_input=example, **kwargs)


def test_guard_names_the_failed_call_and_lets_model_errors_through(world_of_one):
    comm = Comm()
    with pytest.raises(PeerFailure, match=r"rank 0 of 1: the step failed \(.*Connection reset"):
        with comm.guard("the step"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Connection reset by peer")
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes") as failure:
        with comm.guard("the step", only_backend_errors=True):
            torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert not isinstance(failure.value, PeerFailure)


def test_blocks_start_at_trainable_layers():
    blocks = blocks_of(conv_net())
    assert [b.units for b in blocks] == [
        ["features.0", "features.1", "features.2", "classifier.0"],
        ["classifier.1", "classifier.2"],
        ["classifier.3"],
    ]
    assert [b.layer for b in blocks] == ["features.0", "classifier.1", "classifier.3"]
    assert [b.layer for b in blocks_of(mlp())] == ["0", "2", "4"]


def test_balanced_split():
    assert balanced(7, 3) == [3, 2, 2]
    assert balanced(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="at least one block per rank"):
        balanced(2, 3)


def test_traffic_model_by_hand():
    # 3 stages, boundaries of 100 and 50 values, C = 10, batch 8, float32
    t = pipeline_traffic([100, 50], 10, 8)
    assert t.forward == 8 * 150 * 4
    assert t.bp == 2 * 8 * 150 * 4
    assert t.dfa == 8 * 150 * 4 + 2 * 8 * 10 * 4
    assert (t.stages, t.dfa_rounds, t.bp_rounds) == (3, 2, 2)
    assert pipeline_traffic([7] * 63, 10, 1).dfa_rounds == 6


def test_stage_boundaries_from_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
        )
        sizes = block_sizes(model, torch.empty(1, 3, 32, 32))
    assert sizes == [2048, 64, 32, 10]
    assert stage_boundaries(sizes, 2) == [64]
    assert stage_boundaries(sizes, 3) == [64, 32]
    assert stage_boundaries(sizes, 512) == [2048, 64, 32]  # never more stages than blocks


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_peer_timeout_must_be_a_finite_positive_number(value):
    with pytest.raises(ValueError, match="peer_timeout must be"):
        config_from_dict({"peer_timeout": value})


def test_peer_timeout_reaches_the_process_group(monkeypatch, tmp_path):
    """--nproc: spawn's timeout; torchrun: setup's (both become the process group's timeout)."""
    from sdfa.distributed import strategies as training

    seen = {}

    def fake_spawn(fn, nproc, args, timeout):
        seen["spawn"] = timeout
        (tmp_path / "summary.json").write_text("{}")

    monkeypatch.setattr(training, "spawn", fake_spawn)
    monkeypatch.setattr(training, "launched", lambda: True)
    monkeypatch.setattr(training, "setup", lambda timeout: seen.setdefault("setup", timeout))
    config = config_from_dict({"nproc": 2, "peer_timeout": 7.5, "out": str(tmp_path)})
    training.launch(None, config, resume=False)
    training.join(config.peer_timeout)
    assert seen == {"spawn": 7.5, "setup": 7.5}


def test_setup_outside_a_launcher_explains_how_to_start(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not launched()
    with pytest.raises(RuntimeError, match="torchrun"):
        setup()
    with pytest.raises(RuntimeError, match="not initialized"):
        Comm()
    with pytest.raises(ValueError, match="nproc"):
        spawn(print, 0)


@pytest.fixture
def rendezvous_at(monkeypatch):
    """``use(rank)``: the environment of rank ``rank`` of 2 meeting at a free local port."""
    port = free_port()

    def use(rank):
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)),
                            ("WORLD_SIZE", "2"), ("RANK", str(rank))):
            monkeypatch.setenv(name, value)
        return f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT)"

    return use


def test_rendezvous_port_in_use_is_one_line_naming_it(rendezvous_at, tmp_path, capsys):
    address = rendezvous_at(0)
    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as other:  # another program listens on MASTER_PORT
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(ValueError, match=re.escape(f"host the rendezvous at {address}: "
                                                       "the port is in use")):
            setup(timeout=5)
        assert main(["train", "--quiet", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdfa train: error: rank 0 cannot host the rendezvous at {address}")
    assert "--master-port" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_rendezvous_peer_that_never_joins_is_one_line(rendezvous_at, tmp_path, capsys):
    address = rendezvous_at(0)
    with pytest.raises(PeerFailure, match=re.escape(
            f"rank 0 of 2: only 1 of 2 processes joined the rendezvous at {address} within 1 s")):
        setup(timeout=1)
    assert main(["train", "--quiet", "--out", str(tmp_path / "run"),
                 "--set", "peer_timeout=1"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("sdfa train: failed: rank 0 of 2: only 1 of 2 processes joined")
    assert "peer_timeout" in err and len(err.strip().splitlines()) == 1


def test_rendezvous_rank_0_unreachable_is_one_line(rendezvous_at):
    address = rendezvous_at(1)  # nobody hosts the rendezvous
    with pytest.raises(PeerFailure, match=re.escape(
            f"rank 1 of 2: cannot reach the rendezvous at {address} within 1 s. Start rank 0")):
        setup(timeout=1)


@pytest.mark.parametrize("name, value, message", [
    ("MASTER_PORT", "http", "MASTER_PORT must be an integer from 0 to 65535; got 'http'"),
    ("MASTER_PORT", "99999", "MASTER_PORT must be an integer from 0 to 65535; got '99999'"),
    ("RANK", "2", "RANK 2 is out of range for WORLD_SIZE 2"),
    ("WORLD_SIZE", "two", "WORLD_SIZE must be an integer >= 1; got 'two'"),
])
def test_bad_launch_environment_names_the_variable(rendezvous_at, monkeypatch, name, value,
                                                   message):
    rendezvous_at(0)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        setup(timeout=1)


def test_the_same_bad_input_on_every_rank_is_raised_once(tmp_path):
    """--nproc 2 with files that are not there: the data error itself (exit 2 in the CLI), not
    a process failure with a resume hint for a run that never started."""
    with pytest.raises(ValueError, match="data set 'mnist' was not found") as info:
        spawn(_load_mnist, 2, (str(tmp_path),), backend="gloo")
    assert not isinstance(info.value, ProcessFailure)


def _load_mnist(directory):
    sdfa.data.load_dataset("mnist", directory)


def test_a_rank_that_lost_its_peer_does_not_hide_the_cause():
    # Rank 0 hosts the rendezvous: when it stops on bad input at once, rank 1 may fail to finish
    # joining (connection reset) -- a consequence, not a second error.
    from sdfa.distributed.launch import _failure

    bad = ValueError("data set 'mnist' was not found")
    peer = ("PeerFailure: rank 1 of 2: cannot reach the rendezvous", None, True)
    assert _failure(2, [(0, 1), (1, 1)], {0: ("ValueError: ...", bad, False), 1: peer}) is bad
    assert _failure(2, [(0, 1), (1, 1)], {0: ("ValueError: ...", bad, False),
                                          1: ("ValueError: ...", bad, False)}) is bad
    for reports in ({0: ("ValueError: ...", bad, False)},  # rank 1 killed: no report
                    {0: ("ValueError: ...", bad, False),
                     1: ("ValueError: other", ValueError("other"), False)},
                    {0: peer, 1: peer}):
        failure = _failure(2, [(0, 1), (1, -9)], reports)
        assert isinstance(failure, ProcessFailure) and "2 of 2 processes failed" in str(failure)
    assert _failure(2, [], {}) is None


# -- the training tool: sdfa train --nproc 2 ------------------------------------------------------

RUN = {"epochs": 2, "train_samples": 256, "threads": 1, "progress": False, "tensorboard": False}


class DiesOnRank1(sdfa.training.Callback):
    """Kills rank 1 in the middle of the second epoch (after the first checkpoint)."""

    def on_step_end(self, trainer, inputs, labels, loss):
        if trainer.strategy.comm.rank == 1 and trainer.global_step == 11:
            os._exit(9)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    sdfa.app.run.train(config_from_dict({**RUN, "out": str(out)}))
    return out


def assert_same_run(run, reference):
    final, expected = (torch.load(d / "final.pt") for d in (run, reference))
    assert list(final) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-6, msg=key)
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert set(summary) == set(expected)
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "epochs"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-5), key


def test_cli_data_parallel_run_equals_the_single_process_run(tmp_path, single_run):
    out = tmp_path / "run"
    args = ["--nproc", "2", "--parallel", "data", "--epochs", "2", "--quiet", "--out", str(out),
            "--set", "train_samples=256", "--set", "threads=1", "--set", "tensorboard=false"]
    assert main(["train", *args]) == 0
    assert_same_run(out, single_run)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single_run.iterdir())


def test_layer_parallel_run_stops_when_a_rank_dies_and_resumes(tmp_path, single_run):
    config = config_from_dict({**RUN, "out": str(tmp_path / "run"), "nproc": 2,
                               "parallel": "layer", "micro_batches": 3, "peer_timeout": 20})
    with pytest.raises(ProcessFailure) as failure:
        sdfa.app.run.train(config, callbacks=[DiesOnRank1()])
    message = str(failure.value)
    assert "rank 1: exited with code 9" in message and "rank 0: PeerFailure" in message
    assert f"sdfa train --out {config.out} --resume" in message
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["epoch"] == 1
    sdfa.app.run.train(config, resume=True)
    assert_same_run(tmp_path / "run", single_run)


# -- the launcher's death ---------------------------------------------------------------------

SRC = Path(sdfa.__file__).resolve().parents[1]


def _live_processes() -> dict[int, int]:
    """{pid: parent pid} of every process that is not a zombie (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state != "Z":
            parents[int(stat.parent.name)] = int(ppid)
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, todo = _live_processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found.update(children)
        todo += children
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_workers_stop_when_the_launcher_is_killed(tmp_path):
    """SIGKILL the parent of a real 2-process run: every process it started is gone at once
    (10 s at most), and nothing in the run directory changes after the kill."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "sdfa", "train", "--nproc", "2", "--epochs", "100000",
               "--quiet", "--out", str(out), "--set", "train_samples=64",
               "--set", "threads=1", "--set", "tensorboard=false"]
    launcher = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    started = set()
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():  # training is under way: workers write each epoch
            assert launcher.poll() is None, launcher.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        started = _descendants(launcher.pid)
        assert len(started) >= 2  # the workers (and the fork server)
        launcher.kill()
        launcher.wait()
        dead_at = time.time()  # the launcher is gone: its end of the lifeline is closed
        while started & set(_live_processes()) and time.time() < dead_at + 10:
            time.sleep(0.01)
        survivors = started & set(_live_processes())
        assert not survivors, f"{len(survivors)} processes still alive 10 s after the kill"
        last_write = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file())
        # An epoch takes about 40 ms here (each writes last.pt and metrics.csv): a worker that
        # went on for 0.1 s after the launcher died would have written.
        assert last_write < dead_at + 0.1, f"written {last_write - dead_at:.3f} s after"
        assert load_checkpoint(out / "last.pt", "cpu")["epoch"] >= 1  # intact
    finally:
        for pid in started & set(_live_processes()):
            os.kill(pid, signal.SIGKILL)

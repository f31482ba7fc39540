"""Checkpoints that cannot lie or attack, run directories that cannot collide, divergence that is
not NaN: each bad case gives one line (exit 2, or 3 for divergence), never a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import same_state

from sdfa.app.cli import main
from sdfa.app.rundir import claim

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
FAST = ["--quiet", "--set", "train_samples=256", "--set", "threads=1", "--set", "tensorboard=false"]


def run(tmp_path, name="run", *args):
    return main(["train", "--out", str(tmp_path / name), "--epochs", "2", *FAST, *args])


@pytest.fixture
def finished(tmp_path):
    assert run(tmp_path) == 0
    return tmp_path / "run"


def resume_fails(out: Path, capsys, epochs=3) -> str:
    assert main(["train", "--out", str(out), "--resume", "--epochs", str(epochs), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_corrupted_checkpoint_is_refused_not_resumed(finished, capsys):
    path = finished / "last.pt"
    with zipfile.ZipFile(path) as archive:  # flip 40 bytes inside the largest tensor record
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])
    path.write_bytes(bytes(data))
    err = resume_fails(finished, capsys)
    assert f"{path} is damaged" in err and "CRC" in err


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["last.pt", "final.pt"])
def test_a_hostile_checkpoint_never_runs(finished, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "model": Hostile(marker)}, finished / name)
    if name == "last.pt":
        err = resume_fails(finished, capsys)
    else:
        assert main(["eval", str(finished)]) == 2
        err = capsys.readouterr().err
    assert "refused unread (it may be hostile)" in err
    assert not marker.exists()
    torch.load(finished / name, weights_only=False)  # the file really is an attack:
    assert marker.exists()  # loading it unchecked runs it


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a checkpoint written by torch.save"),
    ("empty", "is empty (0 bytes)"),
    ("directory", "is a directory, not a file"),
])
def test_a_broken_last_pt_is_one_line(finished, capsys, damage, message):
    path = finished / "last.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
        path.mkdir()
    assert message in resume_fails(finished, capsys)


def test_a_locked_run_directory_is_refused_and_a_stale_lock_is_not(finished, capsys):
    with claim(finished, fresh=False):  # another run holds it (as a running run does)
        err = resume_fails(finished, capsys)
        assert f"{finished} is in use by another sdfa run (process {os.getpid()}" in err
    # the lock file stays behind, as after a SIGKILL: it blocks nothing
    assert (finished / ".lock").exists()
    assert main(["train", "--out", str(finished), "--resume", "--epochs", "3", "--quiet"]) == 0


def test_two_runs_into_one_directory_exactly_one_proceeds(tmp_path):
    out = tmp_path / "shared"
    command = [sys.executable, "-m", "sdfa", "train", "--out", str(out), "--epochs", "3", *FAST]
    procs = [subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    codes, errors = zip(*((p.wait(), p.stderr.read()) for p in procs))
    assert sorted(codes) == [0, 2], errors
    loser = errors[codes.index(2)]
    assert "in use by another sdfa run" in loser or "already exists and is not empty" in loser


def test_default_run_names_do_not_collide(tmp_path):
    command = [sys.executable, "-m", "sdfa", "train", "--epochs", "1", *FAST]
    procs = [subprocess.Popen(command, env=ENV, cwd=tmp_path, stderr=subprocess.PIPE)
             for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)


def test_out_naming_a_file_and_leftovers_of_a_killed_start(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tmp_path, "file") == 2
    assert f"--out {tmp_path / 'file'} is a file, not a directory" in capsys.readouterr().err
    leftover = tmp_path / "started"
    leftover.mkdir()
    (leftover / ".config.toml.123.tmp").write_text("half")
    (leftover / ".lock").write_text("123\n")
    assert run(tmp_path, "started") == 0  # a start killed while writing config.toml: reusable
    assert not (leftover / ".config.toml.123.tmp").exists()


def test_a_loss_that_explodes_without_nan_stops_the_run(tmp_path, capsys):
    args = ["--rule", "bp", "--optimizer", "sgd", "--lr", "1e3"]
    assert run(tmp_path, "run", *args) == 3
    err = capsys.readouterr().err
    assert "the loss grew to" in err and "1000x its value at the first step" in err
    assert "no epoch had completed" in err or "last good checkpoint" in err


CHILD = """
import os, signal, sys
import sdfa.training.checkpoint as checkpoint
from sdfa.app.cli import main
when, real_save, real_replace = sys.argv[1], checkpoint.torch.save, os.replace
saves = [0]
def save(obj, f):
    saves[0] += 1
    if when == "during" and saves[0] == 3:  # half of epoch 3's last.pt, then death
        real_save({"half": 1}, f); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
def replace(src, dst):
    real_replace(src, dst)
    if when == "after" and str(dst).endswith("last.pt") and saves[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.torch.save, checkpoint.os.replace = save, replace
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("when, epochs_kept", [("during", 2), ("after", 3)])
def test_sigkill_during_and_right_after_a_checkpoint_write_resumes_identically(
        tmp_path, when, epochs_kept):
    args = ["--epochs", "5", "--rule", "dfa:k=1", *FAST]
    assert main(["train", "--out", str(tmp_path / "reference"), *args]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", CHILD, when, "train", "--out", str(killed),
                           *args], env=ENV, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == epochs_kept
    if when == "during":
        assert list(killed.glob(".last.pt.*.tmp"))  # what the kill left behind
    time.sleep(0.01)
    assert main(["train", "--out", str(killed), "--resume", "--quiet"]) == 0
    expected, resumed = (torch.load(tmp_path / d / "final.pt", weights_only=True)
                         for d in ("reference", "killed"))
    assert same_state(expected, resumed)

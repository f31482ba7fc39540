"""Bad settings outside the data files are one clear line: seeds out of range, a plot into a
folder that does not exist."""

from __future__ import annotations

import pytest

from sdfa.app.cli import main
from sdfa.app.config import config_from_dict
from sdfa.app.run import train


@pytest.mark.parametrize("seed", [2**70, 2**63, -1])
def test_seed_out_of_range_names_the_setting(tmp_path, capsys, seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 2\*\*63\); got {seed}"):
        config_from_dict({"seed": seed})
    assert main(["train", "--seed", str(seed), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"sdfa train: error: seed must be an integer in [0, 2**63); got {seed}\n"
    assert not (tmp_path / "run").exists()


def test_largest_seed_trains(tmp_path):
    """The seed is also the root of derived seeds (the data order of each epoch): none
    overflows."""
    config = config_from_dict({"seed": 2**63 - 1, "epochs": 2, "train_samples": 64,
                               "out": str(tmp_path / "run"), "progress": False,
                               "tensorboard": False, "threads": 1})
    assert train(config)["seed"] == 2**63 - 1


def test_plot_into_a_missing_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train(config_from_dict({"epochs": 1, "train_samples": 64, "out": str(run),
                            "progress": False, "tensorboard": False, "threads": 1}))
    target = tmp_path / "no" / "such" / "x.png"
    assert main(["plot", str(run), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == (f"sdfa plot: error: cannot write {target}: the folder {target.parent} "
                   "does not exist\n")
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("")  # a file where the folder should be
    assert main(["plot", str(run), "-o", str(tmp_path / "file" / "x.png")]) == 2
    assert main(["plot", str(run), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").stat().st_size > 0

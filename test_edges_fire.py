"""train_fire's edges: resume without W&B, resume with other settings, preemption of the whole process group,
data that does not fit (val/ classes, CSV duplicates and missing files, very large images, DDP ranks with
other classes), and a newcomer's first run (default folders, the closing line, --help)."""
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_fire
import train_flow
import wbflow
from test_guard import _help_blocks, refused
from test_training import sigterm_after
from test_wbflow import fire_args, write_pattern_folders

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted 2-epoch train_fire run without W&B (10 steps an epoch): (data, out dir, argv, stdout)."""
    root = tmp_path_factory.mktemp("fire")
    data = write_pattern_folders(root / "data", per_class=20)
    argv = fire_args(data, root / "whole", "--epochs", "2", "--no-wandb")
    printed, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread sets for each test, which runs after this fixture
    try:
        with contextlib.redirect_stdout(printed):
            train_fire.main(argv)
    finally:
        torch.set_num_threads(threads)
    return data, root / "whole", argv, printed.getvalue()


# ----------------------------------------------------------------------------- resume without W&B

def test_train_fire_without_wandb_stopped_by_sigterm_resumes_to_the_uninterrupted_runs_end(
        whole_run, tmp_path, monkeypatch, capsys):
    data, whole, _, _ = whole_run
    argv = fire_args(data, tmp_path / "split", "--epochs", "2", "--no-wandb")
    real_loss = wbflow.classification_loss
    monkeypatch.setattr(wbflow, "classification_loss", lambda criterion: sigterm_after(16)(real_loss(criterion)))
    with pytest.raises(SystemExit) as stopped:
        train_fire.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert wbflow.load_checkpoint(tmp_path / "split" / "last.pth")["train_state"]["batches"] == 3

    monkeypatch.setattr(wbflow, "classification_loss", real_loss)
    capsys.readouterr()
    train_fire.main(argv + ["--resume", str(tmp_path / "split" / "last.pth")])
    assert "resuming epoch 1 at batch 3, step 13" in capsys.readouterr().out
    end = {run: wbflow.load_checkpoint(folder / "last.pth") for run, folder in
           (("whole", whole), ("split", tmp_path / "split"))}
    assert end["split"]["step"] == end["whole"]["step"] == 20 and end["split"]["train_state"] is None
    assert end["split"]["best_val_acc"] == end["whole"]["best_val_acc"]
    for name, tensor in end["whole"]["model"].items():
        torch.testing.assert_close(end["split"]["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_train_fire_without_wandb_resumed_after_its_last_epoch_only_reports(whole_run, capsys):
    data, whole, argv, _ = whole_run
    before = (whole / "last.pth").read_bytes()
    best_acc = train_fire.main(argv + ["--resume", str(whole / "last.pth")])
    printed = capsys.readouterr().out
    assert "resuming epoch 2 at batch 0, step 20" in printed and "W&B: off" in printed
    assert best_acc == wbflow.load_checkpoint(whole / "best_model.pth")["val_acc"]
    assert (whole / "last.pth").read_bytes() == before

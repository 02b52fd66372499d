"""Edges of the out-dir, checkpoint files and the W&B record (issue 15): --overwrite deletes the earlier run
only once every check has passed, one run per out-dir at a time, a real full disk, a record that keeps what
a run killed with SIGKILL logged."""
import errno
import glob
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch

import train_fire
import train_flow
import wbflow
from conftest import RunLog, run_logs
from test_guard import FLOW_SMOKE, refused
from test_wbflow import fire_args, write_pattern_folders

HERE = Path(__file__).resolve().parent
EARLIER_RUN = {"best_model.pth": b"the earlier run's best model", "last.pt": b"the earlier run's last.pt",
               "checkpoint_epoch_7.pt": b"the earlier run's epoch 7"}


def earlier_run_in(out):
    out.mkdir()
    for name, content in EARLIER_RUN.items():
        (out / name).write_bytes(content)


def checkpoints_in(out):
    return {path.name: path.read_bytes() for path in out.iterdir() if path.is_file() and not path.name.startswith(".")}


_HANGS_IN_ITS_UPLOAD = """
import sys, time
sys.path.insert(0, {here!r})
import train_flow, wbflow
def upload_that_hangs(*args, **kwargs):  # the epoch's checkpoints are written; its upload never ends
    print("uploading", flush=True)
    time.sleep(300)
wbflow.log_artifact = upload_that_hangs
train_flow.main({argv!r})
"""


@pytest.fixture(scope="module")
def run_killed_in_its_upload(tmp_path_factory):
    """A 2-epoch train_flow run (offline W&B) that hung in its first epoch's artifact upload, right after the
    epoch's checkpoints, and was then killed with SIGKILL. While it lived, a second run on its out-dir was
    tried. {"argv", "pid", "refusal": the second run's message, "last": its last.pt, "record": its run-*.wandb}"""
    root = tmp_path_factory.mktemp("killed")
    argv = FLOW_SMOKE + ["--epochs", "2", "--out-dir", str(root / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(root),
           "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    process = subprocess.Popen([sys.executable, "-c", _HANGS_IN_ITS_UPLOAD.format(here=str(HERE), argv=argv)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "uploading\n" in iter(process.stdout.readline, ""), "the run ended before its upload"
        refusal = refused(train_flow.main, argv + ["--overwrite"], "in use")
    finally:
        process.kill()
        process.wait()
    last = wbflow.load_checkpoint(root / "out" / "last.pt")
    [record] = glob.glob(str(root / "wandb" / f"offline-run-*-{last['wandb_run_id']}" / "*.wandb"))
    return {"argv": argv, "pid": process.pid, "refusal": refusal, "last": last, "record": record}


# ----------------------------------------------------------------------------- --overwrite

def test_train_flow_overwrite_deletes_the_earlier_run_only_once_every_check_has_passed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    earlier_run_in(out)
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    argv = FLOW_SMOKE + ["--no-wandb", "--overwrite", "--out-dir", str(out)]
    refused(train_flow.main, argv + ["--data-dir", str(tmp_path / "typo")], "cifar-10-python.tar.gz", seconds=60)
    refused(train_flow.main, argv + ["--resume", str(tmp_path / "typo.pt")], "typo.pt", seconds=60)
    assert checkpoints_in(out) == EARLIER_RUN
    train_flow.main(argv)
    assert sorted(checkpoints_in(out)) == ["checkpoint_epoch_1.pt", "last.pt"]
    assert wbflow.load_checkpoint(out / "last.pt")["epoch"] == 1


def test_train_fire_overwrite_deletes_the_earlier_run_only_once_every_check_has_passed(tmp_path):
    out = tmp_path / "out"
    earlier_run_in(out)
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    flags = ("--overwrite", "true", "--no-wandb", "true", "--epochs", "1")
    refused(train_fire.main, fire_args(tmp_path / "typo", out, *flags), "typo", seconds=60)
    refused(train_fire.main, fire_args(data, out, *flags, "--resume", str(tmp_path / "typo.pth")), "typo.pth",
            seconds=60)
    assert checkpoints_in(out) == EARLIER_RUN
    train_fire.main(fire_args(data, out, *flags))
    after = checkpoints_in(out)
    assert sorted(after) == ["best_model.pth", "checkpoint_epoch_7.pt", "last.pt", "last.pth"]
    assert after["best_model.pth"] != EARLIER_RUN["best_model.pth"]
    assert after["last.pt"] == EARLIER_RUN["last.pt"]  # train_flow's files are not train_fire's to delete
    assert wbflow.load_checkpoint(out / "best_model.pth")["class_names"] == ["a", "b"]


# ----------------------------------------------------------------------------- one run per out-dir

def test_a_second_run_on_a_busy_out_dir_is_refused_and_a_resume_works_after_a_kill(offline_wandb,
                                                                                   run_killed_in_its_upload):
    killed = run_killed_in_its_upload
    out = Path(killed["argv"][-1])
    assert re.fullmatch(rf"train_flow\.py: --out-dir {re.escape(str(out))} is in use by another run "
                        rf"\(process {killed['pid']}\): .*", killed["refusal"])
    assert killed["last"]["epoch"] == 1  # --overwrite deleted nothing
    train_flow.main(killed["argv"] + ["--resume", str(out / "last.pt")])  # the killed run's lock is gone with it
    assert wbflow.load_checkpoint(out / "last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs at tmp_path/disk, unmounted afterwards; skips only where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({result.stderr.strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_file(small_disk):
    path = wbflow.save_checkpoint({"w": torch.ones(1000)}, small_disk / "last.pt")
    saved = path.read_bytes()
    with pytest.raises(SystemExit) as exit_info, wbflow.exit_on_error("train.py"):
        wbflow.save_checkpoint({"w": torch.ones(1_000_000)}, path)  # 4 MB on a 1 MiB disk
    message = str(exit_info.value.code)
    assert "\n" not in message and re.fullmatch(r"train\.py: no space left .*last\.pt; .* unchanged", message)
    assert path.read_bytes() == saved and os.listdir(small_disk) == ["last.pt"]  # no temporary file left
    with pytest.raises(OSError) as error:
        wbflow.save_checkpoint({"w": torch.ones(1_000_000)}, path)
    assert error.value.errno == errno.ENOSPC and error.value.__suppress_context__  # one traceback, not two


@pytest.mark.parametrize("driver", ["train_flow", "train_fire"])
def test_a_driver_on_a_full_disk_ends_in_one_line_without_a_traceback(small_disk, tmp_path, driver):
    out = small_disk / "out"
    if driver == "train_flow":
        argv = FLOW_SMOKE + ["--no-wandb", "--out-dir", str(out)]
    else:
        argv = fire_args(write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"]), out,
                         "--no-wandb", "true", "--epochs", "1")
    result = subprocess.run([sys.executable, str(HERE / f"{driver}.py"), *argv], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(rf"{driver}(\.py)?: no space left on the device while saving {re.escape(str(out))}/\S+; "
                        r"the previous file there is unchanged", result.stderr.strip().splitlines()[-1])
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ----------------------------------------------------------------------------- the record of a killed run

def test_flush_run_puts_the_pending_row_on_disk_while_the_run_goes_on(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        # wandb_run's experimental setting, without which wandb-core writes the record every 15 s
        assert run.settings.x_transaction_log_flush_interval == 0.1
        run.log({"train/loss": 0.5}, step=3)
        wbflow.flush_run(run)
        [record] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "*.wandb"))
        assert RunLog(record).values("train/loss") == [0.5]
        run.log({"train/loss": 0.25}, step=4)  # the run goes on after it
    [log] = run_logs(offline_wandb)
    assert log.values("train/loss") == [0.5, 0.25]


def test_a_run_killed_during_its_upload_keeps_what_the_epoch_logged(run_killed_in_its_upload):
    checkpoint = run_killed_in_its_upload["last"]  # right after the epoch's checkpoint, which a resume starts after
    log = RunLog(run_killed_in_its_upload["record"])
    assert log.exit_code is None  # killed: W&B never finished it
    windows = log.rows_with("train/loss")
    assert windows and windows[-1]["_step"] == checkpoint["global_step"]
    [epoch_loss] = log.rows_with("train/epoch_loss")
    assert epoch_loss["train/epoch_loss"] == checkpoint["epoch_loss"] and epoch_loss["train/epoch"] == 1
    assert log.rows_with("eval/generated_samples")

"""wbflow's files: load_checkpoint's refusals, save_best, atomic checkpoint writes on full disks, permissions,
stale temporary files, the out-dir policy, checkpoint rotation and --overwrite."""
import errno
import math
import os
import pickle
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import train_fire
import train_flow
import wbflow
from conftest import FLOW_SMOKE, SMALL_FLOW, _Hostile, fire_args, refused, run_logs, write_pattern_folders

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- load_checkpoint and save_best

def test_load_checkpoint_round_trips_tensors_and_plain_values(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "name": "x", "rng": torch.get_rng_state()}
    wbflow.save_checkpoint(state, tmp_path / "sub" / "c.pt")
    loaded = wbflow.load_checkpoint(tmp_path / "sub" / "c.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.pt"]


def test_load_checkpoint_refuses_a_pickle_that_carries_code(tmp_path):
    created = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Hostile(str(created))}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        wbflow.load_checkpoint(path)
    assert not created.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Hostile(str(created))))
    with pytest.raises(ValueError, match="raw.pkl"):
        wbflow.load_checkpoint(raw)
    assert not created.exists()


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=600) | st.sampled_from([b"", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00."[:-1]]))
def test_load_checkpoint_names_the_file_that_is_not_a_checkpoint(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("bad") / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.pt"):
        wbflow.load_checkpoint(path)


def test_load_checkpoint_of_a_truncated_real_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pt"
    wbflow.save_checkpoint({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cut.pt"):
        wbflow.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        wbflow.load_checkpoint(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "whole.pt"
    return wbflow.save_checkpoint({"model": {"w": torch.randn(3000, generator=torch.Generator().manual_seed(0))},
                                   "step": 7}, path)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(min_value=0, max_value=13_000))
def test_load_checkpoint_of_a_real_checkpoint_cut_anywhere_is_one_line_naming_it(real_checkpoint, tmp_path_factory,
                                                                                 length):
    data = real_checkpoint.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "cut.pt"
    path.write_bytes(data[:min(length, len(data) - 1)])
    with pytest.raises(ValueError, match="cut.pt is not a loadable checkpoint") as caught:
        wbflow.load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_load_checkpoint_refuses_a_fifo_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "pipe.pt")  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match="pipe.pt is not a regular file"):
        wbflow.load_checkpoint(tmp_path / "pipe.pt")


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.ENOSPC])
def test_load_checkpoint_leaves_an_error_of_the_disk_as_it_is(real_checkpoint, monkeypatch, code):
    def failing_load(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(OSError) as caught:
        wbflow.load_checkpoint(real_checkpoint)
    assert caught.value.errno == code


def test_save_best_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    best, _ = wbflow.save_best({"acc": torch.tensor(0.5)}, 0.5, None, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(10)}, f)
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        wbflow.save_best({"acc": torch.tensor(0.9)}, 0.9, best, path)
    monkeypatch.undo()
    assert wbflow.load_checkpoint(path)["acc"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


@settings(max_examples=60, deadline=None)
@given(metrics=st.lists(st.floats(allow_nan=True, allow_infinity=False, width=32), min_size=1, max_size=12),
       mode=st.sampled_from(["max", "min"]))
def test_save_best_keeps_the_running_extreme_and_saves_only_on_strict_improvement(metrics, mode, tmp_path_factory):
    path = tmp_path_factory.mktemp("best") / "best.pt"
    best, saves = None, 0
    for index, metric in enumerate(metrics):
        best, improved = wbflow.save_best({"index": index}, metric, best, path, mode=mode)
        saves += improved
    finite = [m for m in metrics if not math.isnan(m)]
    if not finite:
        assert best is None and not path.exists()
        return
    pick = max if mode == "max" else min
    assert best == pick(finite)
    records, current = 0, None
    for metric in finite:
        if current is None or (metric > current if mode == "max" else metric < current):
            records, current = records + 1, metric
    assert saves == records
    assert metrics[wbflow.load_checkpoint(path)["index"]] == best


def test_save_best_records_summary_and_uploads_best_and_latest(offline_wandb, tmp_path):
    path = tmp_path / "checkpoints" / "best_model.pth"
    with wbflow.wandb_run(project="test") as run:
        best, improved = wbflow.save_best({"w": torch.ones(1)}, 71.5, 60.0, path, run=run,
                                          metadata={"epoch": 4})
        assert (best, improved) == (71.5, True)
        assert wbflow.save_best({"w": torch.zeros(1)}, 70.0, best, path, run=run) == (71.5, False)
    log = run_logs(offline_wandb)[0]
    assert log.summary["best_val_acc"] == 71.5
    [artifact] = log.artifacts
    assert artifact["name"] == f"model-{log.run_id}" and set(artifact["aliases"]) == {"best", "latest"}
    assert artifact["metadata"] == {"val_acc": 71.5, "epoch": 4}


def test_load_checked_maps_a_checkpoint_saved_on_cuda_to_the_cpu(tmp_path):
    """A model trained on a GPU predicts (or teaches a reflow) on a machine without one: the storages that a CUDA run
    saved are tagged cuda:0, and load_checked maps them to the CPU unless told another device."""
    import struct
    import zipfile
    saved = wbflow.save_checkpoint({"model": {"w": torch.ones(2)}, "driver": "train"}, tmp_path / "cpu.pt")
    on_cuda = tmp_path / "cuda.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(on_cuda, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("data.pkl"):  # the pickled location string "cpu" -> "cuda:0"
                data = data.replace(b"X" + struct.pack("<I", 3) + b"cpu", b"X" + struct.pack("<I", 6) + b"cuda:0")
            target.writestr(item, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really says CUDA
            torch.load(on_cuda, weights_only=True)
    _, state = wbflow.load_checked(str(on_cuda), program="p", flag="--checkpoint", driver="train")
    assert state["model"]["w"].device.type == "cpu" and state["model"]["w"].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- checkpoint files: permissions, full disks, temp files

def test_checkpoint_files_get_the_users_umask_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        path = wbflow.save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.pt")
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_full_disk_during_save_is_one_clear_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = wbflow.save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    real_save = torch.save

    def disk_full(state, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"no space left .*last\.pt.*unchanged") as error:
        wbflow.save_checkpoint({"epoch": 2}, path)
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert wbflow.load_checkpoint(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


def test_full_disk_in_a_driver_is_one_line_without_traceback(tmp_path, monkeypatch):
    def disk_full(state, path):
        raise OSError(errno.ENOSPC, f"no space left on the device while saving {path}; the previous file there "
                                    f"is unchanged")

    monkeypatch.setattr(wbflow, "save_checkpoint", disk_full)
    refused(train_flow.main, SMALL_FLOW + ["--no-wandb", "--epochs", "1", "--out-dir", str(tmp_path / "out")],
            r"no space left .*last\.pt")


def test_stale_temp_files_of_a_killed_save_are_removed_at_start(tmp_path):
    (tmp_path / ".last.pt.123.abcd.tmp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("mine")
    wbflow.prepare_out_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "keep.txt"]


def test_both_drivers_clear_stale_temp_files_before_refusing_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint_epoch_3.pt.1.ff.tmp").write_bytes(b"half")
    refused(train_flow.main, ["--epochs", "0", "--out-dir", str(out)], "training.epochs")  # settings come first
    assert (out / ".checkpoint_epoch_3.pt.1.ff.tmp").exists()
    data = write_pattern_folders(tmp_path / "data", per_class=1, classes=["a"])
    refused(train_fire.main, fire_args(data, out), "at least two classes")
    assert [p.name for p in out.iterdir()] == [".lock"]


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


# ----------------------------------------------------------------------------- out-dir policy

@pytest.mark.parametrize("earlier", ["best_model.pth", "last.pth", "last.pt", "checkpoint_epoch_7.pt"])
def test_a_new_run_refuses_an_out_dir_holding_an_earlier_runs_checkpoints(tmp_path, earlier):
    out = tmp_path / "out"
    out.mkdir()
    (out / earlier).write_bytes(b"an earlier, better result")
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    if earlier in train_fire.OUT_FILES:  # train_fire guards the files it writes
        refused(train_fire.main, fire_args(data, out), f"holds an earlier run's checkpoints.*{earlier}.*another --out-dir")
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(out)], f"{earlier}.*--overwrite")
    assert (out / earlier).read_bytes() == b"an earlier, better result"


def test_resume_into_the_folder_or_overwrite_lets_the_run_start(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_epoch_1.pt").write_bytes(b"x")
    (out / "best_model.pth").write_bytes(b"y")
    assert wbflow.prepare_out_dir(out, resume=out / "checkpoint_epoch_1.pt") == (out, [])
    assert (out / "best_model.pth").exists()
    elsewhere = tmp_path / "other.pt"
    elsewhere.write_bytes(b"z")
    with pytest.raises(ValueError, match="earlier run"):
        wbflow.prepare_out_dir(out, resume=elsewhere)
    earlier = [out / "best_model.pth", out / "checkpoint_epoch_1.pt"]
    assert wbflow.prepare_out_dir(out, overwrite=True) == (out, earlier)
    assert all(path.exists() for path in earlier)  # the driver deletes them once every check has passed


@pytest.mark.parametrize("driver", ["flow", "fire"])
def test_an_out_dir_that_is_a_file_or_unwritable_is_refused(tmp_path, driver):
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    main, base = ((train_flow.main, FLOW_SMOKE) if driver == "flow" else (train_fire.main, fire_args(data, "x")))
    a_file = tmp_path / "file"
    a_file.write_text("")
    refused(main, base + ["--out-dir", str(a_file)], r"--out-dir .*file is a file")
    if os.geteuid() == 0:
        return  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(main, base + ["--out-dir", str(locked)], r"--out-dir .*locked is not writable")


# ----------------------------------------------------------------------------- rotation

@settings(max_examples=60, deadline=None)
@given(losses=st.lists(st.floats(0.1, 10) | st.just(float("nan")), min_size=1, max_size=9), keep=st.integers(1, 4))
def test_rotation_keeps_the_newest_k_and_the_lowest_loss(tmp_path_factory, losses, keep):
    folder = tmp_path_factory.mktemp("rotation")
    for epoch, loss in enumerate(losses, start=1):
        wbflow.save_checkpoint({"epoch": epoch, "epoch_loss": loss}, folder / f"checkpoint_epoch_{epoch}.pt")
        wbflow.rotate_checkpoints(folder, keep=keep)
    kept = sorted(int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("checkpoint_epoch_*.pt"))
    finite = [(loss, epoch) for epoch, loss in enumerate(losses, start=1) if not np.isnan(loss)]
    newest = list(range(max(1, len(losses) - keep + 1), len(losses) + 1))
    best = [min(finite)[1]] if finite else []
    assert kept == sorted(set(newest + best))


def test_flow_run_keeps_the_last_k_checkpoints_plus_the_best(tmp_path, monkeypatch):
    losses = iter([0.5, 0.1, 0.4])  # epoch 2 is the best and is rotated out of the last 1
    real_train_epoch = wbflow.train_epoch

    def scripted_loss(*args, **kwargs):
        return {**real_train_epoch(*args, **kwargs), "loss": next(losses)}

    monkeypatch.setattr(wbflow, "train_epoch", scripted_loss)
    out = tmp_path / "out"
    train_flow.main(SMALL_FLOW + ["--no-wandb", "--epochs", "3", "--out-dir", str(out), "--set",
                                  "training.keep_checkpoints=1", "--set", "logging.log_images_interval=100",
                                  "--set", "training.sample_interval=100"])
    assert sorted(p.name for p in out.glob("checkpoint_epoch_*.pt")) == ["checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt"]
    assert wbflow.load_checkpoint(out / "checkpoint_epoch_2.pt")["epoch_loss"] == 0.1


EARLIER_RUN = {"best_model.pth": b"the earlier run's best model", "last.pt": b"the earlier run's last.pt",
               "checkpoint_epoch_7.pt": b"the earlier run's epoch 7"}


def earlier_run_in(out):
    out.mkdir()
    for name, content in EARLIER_RUN.items():
        (out / name).write_bytes(content)


def checkpoints_in(out):
    return {path.name: path.read_bytes() for path in out.iterdir() if path.is_file() and not path.name.startswith(".")}


# ----------------------------------------------------------------------------- --overwrite

def test_train_flow_overwrite_deletes_the_earlier_run_only_once_every_check_has_passed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    earlier_run_in(out)
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    argv = SMALL_FLOW + ["--no-wandb", "--overwrite", "--out-dir", str(out)]
    refused(train_flow.main, argv + ["--data-dir", str(tmp_path / "typo")], "cifar-10-python.tar.gz")
    refused(train_flow.main, argv + ["--resume", str(tmp_path / "typo.pt")], "typo.pt")
    assert checkpoints_in(out) == EARLIER_RUN
    train_flow.main(argv)
    assert sorted(checkpoints_in(out)) == ["checkpoint_epoch_1.pt", "last.pt"]
    assert wbflow.load_checkpoint(out / "last.pt")["epoch"] == 1


def test_train_fire_overwrite_deletes_the_earlier_run_only_once_every_check_has_passed(tmp_path):
    out = tmp_path / "out"
    earlier_run_in(out)
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    flags = ("--overwrite", "true", "--no-wandb", "true", "--epochs", "1")
    refused(train_fire.main, fire_args(tmp_path / "typo", out, *flags), "typo")
    refused(train_fire.main, fire_args(data, out, *flags, "--resume", str(tmp_path / "typo.pth")), "typo.pth")
    assert checkpoints_in(out) == EARLIER_RUN
    train_fire.main(fire_args(data, out, *flags))
    after = checkpoints_in(out)
    assert sorted(after) == ["best_model.pth", "checkpoint_epoch_7.pt", "last.pt", "last.pth"]
    assert after["best_model.pth"] != EARLIER_RUN["best_model.pth"]
    assert after["last.pt"] == EARLIER_RUN["last.pt"]  # train_flow's files are not train_fire's to delete
    assert wbflow.load_checkpoint(out / "best_model.pth")["class_names"] == ["a", "b"]


# ----------------------------------------------------------------------------- resume_from


def _saved_run(path, **config):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = wbflow.checkpoint_state({"model": model, "step": 7}, config=config, driver="train",
                                    wandb_run_id="abc", wandb_last_act=False)
    return model, wbflow.save_checkpoint(state, path)


def test_resume_from_restores_state_and_rng_and_plans_a_new_run_after_a_checkpoint_that_was_not_the_last_act(tmp_path):
    model, path = _saved_run(tmp_path / "last.pt", lr=0.1)
    drawn = torch.rand(1)  # the RNG as it was when the checkpoint was taken
    state = {"model": nn.Linear(2, 1), "step": 0}
    saved, (run_id, resumed_from, plan) = wbflow.resume_from(str(path), state, program="train.py", driver="train",
                                                             expected={"lr": 0.1})
    assert state["step"] == 7 and torch.equal(state["model"].weight, model.weight)
    assert torch.equal(torch.rand(1), drawn) and saved["wandb_run_id"] == "abc"
    assert run_id is None and resumed_from == {"run_id": "abc", "step": 7, "checkpoint": str(path)} and "new run" in plan


def test_resume_from_refuses_another_config_before_touching_the_state(tmp_path):
    _, path = _saved_run(tmp_path / "last.pt", lr=0.1)
    state = {"model": nn.Linear(2, 1), "step": 0}
    weight = state["model"].weight.detach().clone()
    with pytest.raises(SystemExit, match=r"^train\.py: --resume .*last\.pt: trained with lr 0\.1, this run has 0\.2 "
                                         r"\(keep it\)$"):
        wbflow.resume_from(str(path), state, program="train.py", driver="train", expected={"lr": 0.2},
                           hints={"lr": " (keep it)"})
    assert state["step"] == 0 and torch.equal(state["model"].weight, weight)


def test_resume_from_names_a_missing_key_with_its_own_hint_apart_from_a_changed_setting(tmp_path):
    _, path = _saved_run(tmp_path / "best.pt", optimizer="adam")
    state = {"model": nn.Linear(2, 1), "optimizer": None, "step": 0}
    with pytest.raises(SystemExit, match=r"lacks optimizer \(weights only\)$"):
        wbflow.resume_from(str(path), state, program="p", driver="train", expected={"optimizer": "adam"},
                           hints={"optimizer": " (same optimizer)"}, missing_hints={"optimizer": " (weights only)"})

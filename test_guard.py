"""Nothing lost, nothing half-done: out-dir policy, checkpoint rotation and files, settings refused before
training, --resume that must fit, 16-bit images, DDP data checks, --help defaults and the copy rule."""
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_fire
import train_flow
import wbflow
from conftest import run_logs
from test_wbflow import fire_args, write_cifar_batches, write_pattern_folders

HERE = Path(__file__).resolve().parent
FLOW_SMOKE = ["--smoke", "--set", "data.max_images=64", "--set", "sampling.table_nfes=[1]",
              "--set", "sampling.table_solvers=[euler]"]


def refused(main, argv, match, seconds=10):
    """main(argv) exits with one line matching `match`, quickly."""
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert "\n" not in message.strip(), message
    assert re.search(match, message), message
    assert time.monotonic() - start < seconds
    return message


# ----------------------------------------------------------------------------- checkpoint files

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
    refused(train_flow.main, FLOW_SMOKE + ["--no-wandb", "--epochs", "1", "--out-dir", str(tmp_path / "out")],
            r"no space left .*last\.pt", seconds=120)


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
    train_flow.main(FLOW_SMOKE + ["--no-wandb", "--epochs", "3", "--out-dir", str(out), "--set",
                                  "training.keep_checkpoints=1", "--set", "logging.log_images_interval=100",
                                  "--set", "training.sample_interval=100"])
    assert sorted(p.name for p in out.glob("checkpoint_epoch_*.pt")) == ["checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt"]
    assert wbflow.load_checkpoint(out / "checkpoint_epoch_2.pt")["epoch_loss"] == 0.1


# ----------------------------------------------------------------------------- bad settings, refused in seconds

@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], r"training\.epochs must be positive, not 0"),
    (["--epochs", "-3"], r"training\.epochs must be positive, not -3"),
    (["--batch-size", "0"], r"training\.batch_size must be positive, not 0"),
    (["--eval", "--checkpoint", "c.pt", "--num-samples", "0"], r"--num-samples must be positive, not 0"),
    (["--set", "training.no_such_key=1"], r"'training\.no_such_key' is not a key"),
    (["--set", "training.epochs=1.5"], r"training\.epochs=1\.5: expected int"),
    (["--set", "training.compile=yes please"], r"training\.compile=yes please: expected bool"),
    (["--set", "training.epochs=null"], r"training\.epochs=null: expected int"),
    (["--set", "sampling.solver=midpoint"], r"unknown solver 'midpoint'"),
    (["--set", "sampling.table_solvers=[euler, rk4]"], r"unknown solver 'rk4'"),
    (["--config", "missing.yaml"], r"missing\.yaml"),
])
def test_train_flow_refuses_a_bad_setting_in_one_line(argv, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


def test_train_flow_refuses_an_unknown_solver_flag_and_a_batch_smaller_than_the_ranks(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        train_flow.parse_args(["--solver", "midpoint"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    refused(train_flow.main, FLOW_SMOKE + ["--batch-size", "2"], r"batch_size 2 is smaller than the 4 ranks")


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], r"--epochs must be positive, not 0"),
    (["--batch-size", "0"], r"--batch-size must be positive, not 0"),
    (["--image-size", "0"], r"--image-size must be positive, not 0"),
    (["--num-workers", "-1"], r"--num-workers must not be negative, not -1"),
    (["--val-split", "1.5"], r"--val-split must be .* not 1\.5"),
    (["--learning-rate", "0"], r"--learning-rate must be positive"),
])
def test_train_fire_refuses_a_bad_setting_in_one_line(argv, match, tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    refused(train_fire.main, fire_args(data, tmp_path / "out") + argv, match)
    assert not (tmp_path / "out").exists()


def test_a_data_folder_with_one_class_is_refused(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=3, classes=["高风险"])
    refused(train_fire.main, fire_args(data, tmp_path / "out"), r"at least two classes; .* has 1: 高风险")


# one case per kind (a --set, a --config file, train_fire's flags): the in-process refusals check every message
@pytest.mark.parametrize("script, argv", [
    ("train_flow.py", ["--smoke", "--set", "training.nope=1"]),
    ("train_flow.py", ["--smoke", "--config", "broken.yaml"]),
    ("train_fire.py", ["--epochs", "-1"]),
])
def test_a_bad_setting_prints_no_traceback(tmp_path, script, argv):
    (tmp_path / "broken.yaml").write_text("data: {unclosed\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(HERE / script), *argv, "--out-dir", str(tmp_path / "o")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------- --eval checks before sampling

def _flow_like_checkpoint(path):
    return wbflow.save_checkpoint({"ema": {}, "config": {"model": {}}, "epoch": 1, "global_step": 1}, path)


def test_eval_without_fid_weights_stops_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    checkpoint = _flow_like_checkpoint(tmp_path / "c.pt")
    refused(train_flow.main, ["--eval", "--smoke", "--checkpoint", str(checkpoint)], r"absent\.pth.*does not exist")


def test_eval_without_cifar10_or_cached_statistics_stops_before_sampling(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "weights.pth").write_bytes(b"any file: only its hash names the cache")
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "weights.pth"))
    checkpoint = _flow_like_checkpoint(tmp_path / "c.pt")
    argv = ["--eval", "--smoke", "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "nodata")]
    refused(train_flow.main, argv, r"CIFAR-10 is not in .*nodata")
    def reached_the_model(*args, **kwargs):
        raise RuntimeError("checks passed")

    monkeypatch.setattr(wbflow, "make_ema", reached_the_model)
    with pytest.raises(RuntimeError, match="checks passed"):  # --metric is needs no CIFAR-10
        train_flow.main(argv + ["--metric", "is"])


def test_eval_refuses_to_write_its_sample_grid_over_the_checkpoint_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    checkpoint = _flow_like_checkpoint(tmp_path / "out" / "samples" / "eval_epoch_0001.png")  # its epoch is 1
    before = checkpoint.read_bytes()
    refused(train_flow.main, ["--eval", "--smoke", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "out")],
            r"the sample grid \S*/eval_epoch_0001\.png would overwrite an input of this command \(--checkpoint ")
    assert checkpoint.read_bytes() == before


def test_a_reflow_run_refuses_an_out_dir_whose_checkpoints_it_would_replace_include_the_teacher(tmp_path):
    teacher = _flow_like_checkpoint(tmp_path / "out" / "last.pt")
    before = teacher.read_bytes()
    refused(train_flow.main, FLOW_SMOKE + ["--no-wandb", "--reflow", str(teacher), "--out-dir", str(tmp_path / "out"),
                                           "--overwrite"],
            r"--out-dir \S*/out/last\.pt would overwrite an input of this command \(--reflow \S*/out/last\.pt\)$")
    assert teacher.read_bytes() == before


def test_eval_of_a_checkpoint_that_is_not_train_flows_is_refused(tmp_path):
    path = wbflow.save_checkpoint({"model": {}, "config": {"model": "resnet18"}}, tmp_path / "last.pth")
    refused(train_flow.main, ["--eval", "--smoke", "--checkpoint", str(path)], "not a train_flow checkpoint")


# ----------------------------------------------------------------------------- --resume must fit

@pytest.fixture(scope="module")
def fire_run(tmp_path_factory):
    """A finished 1-epoch train_fire run on two classes: (data, out dir, argv)."""
    root = tmp_path_factory.mktemp("fire")
    data = write_pattern_folders(root / "data", per_class=4, classes=["a", "b"])
    argv = fire_args(data, root / "out", "--epochs", "2", "--no-wandb")
    train_fire.main(argv)
    return data, root / "out", argv


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "out"
    train_flow.main(FLOW_SMOKE + ["--no-wandb", "--epochs", "1", "--out-dir", str(out)])
    return out / "checkpoint_epoch_1.pt"


def _resume_targets(tmp_path, fire_run, flow_checkpoint):
    data, out, _ = fire_run
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((out / "last.pth").read_bytes()[:3000])
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Hostile(str(tmp_path / "pwned"))}, evil)
    return {"missing": (tmp_path / "nope.pth", r"not found: .*nope\.pth"),
            "missing, no suffix": (tmp_path / "last", r"checkpoint not found: .*last$"),  # a file, not a W&B lookup
            "directory": (tmp_path, r"is a folder, not a checkpoint file"),
            "truncated": (truncated, r"cut\.pth is not a loadable checkpoint"),
            "pickled code": (evil, r"evil\.pth is not a loadable checkpoint"),
            "other driver": (flow_checkpoint, r"not a train_fire checkpoint"),
            "best model": (out / "best_model.pth", r"lacks optimizer, scheduler, step.*last\.pth")}


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


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


@pytest.mark.parametrize("case", ["missing", "missing, no suffix", "directory", "truncated", "pickled code",
                                  "other driver", "best model"])
def test_train_fire_resume_refuses_a_file_that_does_not_fit(tmp_path, fire_run, flow_checkpoint, case):
    data, out, argv = fire_run
    path, match = _resume_targets(tmp_path, fire_run, flow_checkpoint)[case]
    refused(train_fire.main, fire_args(data, tmp_path / "new") + ["--epochs", "2", "--resume", str(path)], match)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change, match", [
    (["--model", "resnet34"], r"trained with model resnet18, this run has resnet34"),
    (["--class-names", "b,a"], r"classes \['a', 'b'\], this run has \['b', 'a'\].*--class-names"),
    (["--image-size", "48"], r"image_size 32, this run has 48"),
    (["--epochs", "4"], r"epochs 2, this run has 4 .*climb back up"),
])
def test_train_fire_resume_refuses_another_model_class_order_image_size_or_epochs(fire_run, change, match):
    data, out, argv = fire_run
    refused(train_fire.main, argv + ["--resume", str(out / "last.pth")] + change, match)


@pytest.mark.parametrize("change, match", [
    (lambda state: state.pop("train_state"), r"lacks train_state"),  # a last.pth written before exact resume
    (lambda state: state["config"].update(world_size=2), r"world_size 2, this run has 1 processes"),
])
def test_train_fire_resume_refuses_an_older_format_or_another_number_of_ranks(fire_run, change, match):
    data, out, argv = fire_run
    state = wbflow.load_checkpoint(out / "last.pth")
    change(state)
    path = wbflow.save_checkpoint(state, out / "changed.pth")
    try:
        refused(train_fire.main, argv + ["--resume", str(path)], match)
    finally:
        path.unlink()


@pytest.mark.parametrize("change, match", [
    (lambda state: state.pop("rng"), r"lacks rng"),
    (lambda state: state["config"].update(world_size=2), r"world_size 2, this run has 1 processes"),
])
def test_train_flow_resume_refuses_an_older_format_or_another_number_of_ranks(tmp_path, flow_checkpoint, change, match):
    state = wbflow.load_checkpoint(flow_checkpoint)
    change(state)
    path = wbflow.save_checkpoint(state, tmp_path / "changed.pt")
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "new"), "--resume", str(path)], match)


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "pickled code", "fire checkpoint",
                                  "another model"])
def test_train_flow_resume_refuses_a_file_that_does_not_fit(tmp_path, fire_run, flow_checkpoint, case):
    targets = _resume_targets(tmp_path, fire_run, flow_checkpoint)
    path, match = {**{key: targets[key] for key in ("missing", "directory", "truncated", "pickled code")},
                   "fire checkpoint": (fire_run[1] / "last.pth", "not a train_flow checkpoint"),
                   "another model": (flow_checkpoint, r"holds another model \(base_channels 16 there, 8 here")}[case]
    if case == "missing":
        path = tmp_path / "nope.pt"
        match = r"not found: .*nope\.pt"
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "new"), "--resume", str(path),
                                           "--set", f"model.base_channels={8 if case == 'another model' else 16}"],
            match)


def test_train_flow_resumed_with_more_epochs_follows_the_longer_runs_learning_rate(offline_wandb, tmp_path):
    flags = FLOW_SMOKE + ["--set", "training.log_interval=1", "--set", "training.warmup_steps=3"]
    train_flow.main(flags + ["--epochs", "3", "--out-dir", str(tmp_path / "whole")])
    train_flow.main(flags + ["--epochs", "2", "--out-dir", str(tmp_path / "short")])
    train_flow.main(flags + ["--epochs", "3", "--out-dir", str(tmp_path / "short"),
                             "--resume", str(tmp_path / "short" / "checkpoint_epoch_2.pt")])
    whole, short, resumed = run_logs(offline_wandb)
    rates = short.values("train/learning_rate") + resumed.values("train/learning_rate")
    assert rates == pytest.approx(whole.values("train/learning_rate"))
    after_warmup = rates[3:]
    assert after_warmup and all(later <= earlier for earlier, later in zip(after_warmup, after_warmup[1:]))


# ----------------------------------------------------------------------------- images

def test_a_16_bit_grayscale_png_keeps_its_contrast(tmp_path):
    from PIL import Image
    gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image, _ = wbflow.ImageSamples([(str(tmp_path / "g16.png"), 0)])[0]
    pixels = np.asarray(image)
    assert pixels.shape == (16, 16, 3)
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    np.testing.assert_allclose(pixels[0, :, 0], np.round(gradient[0] / 257), atol=1)


# ----------------------------------------------------------------------------- DDP and workers

def test_torchrun_ranks_with_different_data_stop_at_start(tmp_path):
    # rank 1 reads a partial copy: its CIFAR-10 is cut short by data.max_images set through its environment
    write_cifar_batches(tmp_path / "data")
    script = tmp_path / "partial_copy.py"
    script.write_text(
        "import os, sys, wbflow\n"
        "real = wbflow.load_cifar10\n"
        "def partial(*a, **k):\n"
        "    images, labels = real(*a, **k)\n"
        "    return (images[:150], labels[:150]) if os.environ['RANK'] == '1' else (images, labels)\n"
        "wbflow.load_cifar10 = partial\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import train_flow\n"
        "train_flow.main()\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), "--smoke", "--data-dir", str(tmp_path / "data"), "--out-dir",
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "rank 0: 200 training images; rank 1: 150 training images" in result.stderr + result.stdout
    assert time.monotonic() - start < 90


@pytest.mark.parametrize("cores, local_ranks, expected", [(16, 1, 4), (2, 1, 2), (1, 1, 1), (4, 2, 2), (2, 4, 0)])
def test_default_num_workers_never_exceeds_the_available_cores(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert train_fire.parse_args([]).num_workers == expected


# ----------------------------------------------------------------------------- --help and W&B config

def _help_blocks(main):
    """{option: its help text} from `main(["--help"])`."""
    import contextlib
    import io
    import re
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        main(["--help"])
    blocks, current = {}, None
    for line in text.getvalue().splitlines():
        match = re.match(r"\s{2}(-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {option: re.sub(r"\s+", " ", block) for option, block in blocks.items()}


@pytest.mark.parametrize("module", [train_flow, train_fire])
def test_help_shows_every_default(module, monkeypatch):
    blocks = _help_blocks(module.main)
    parser_defaults = vars(module.parse_args([]))
    assert len(blocks) >= 10
    for option, block in blocks.items():
        if option == "-h":
            continue
        assert "default" in block, block
        dest = option.lstrip("-").replace("-", "_")
        value = parser_defaults.get(dest)
        if value not in (None, False, []):
            assert f"default:{value}".replace(" ", "") in block.replace(" ", ""), block  # wrapped lines
    if module is train_flow:
        assert "default: training.epochs, 1025" in blocks["--epochs"]


# ----------------------------------------------------------------------------- config and the copy rule

@pytest.mark.parametrize("override, value", [
    ("training.gradient_clip=1", 1.0), ("training.learning_rate=1e-3", 1e-3), ("logging.notes=123", "123"),
    ("logging.entity=me", "me"), ("data.max_images=100", 100), ("training.compile=true", True)])
def test_load_yaml_config_accepts_values_of_the_files_type(override, value):
    config = wbflow.load_yaml_config(train_flow.DEFAULT_CONFIG, [override])
    section, key = override.split("=")[0].split(".")
    assert config[section][key] == value and type(config[section][key]) is type(value)

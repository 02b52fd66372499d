"""train_epoch's windows, stop and resume, the private-API guards; both drivers' exact resume, read back from the
W&B record logs: train_flow's stops and kills anywhere (mid-epoch, in an epoch's end) against one uninterrupted run."""
import glob
import math
import os
import shlex
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import train_fire
import train_flow
import wbflow
from conftest import RunLog, kill_when_marked, run_logs, run_offline
from test_wbflow import (CE_LOSS, _table_data, fire_args, linear_batches, linear_classifier, write_cifar_batches,
                        write_pattern_folders)

HERE = Path(__file__).resolve().parent


def collect(windows):
    return lambda step, window: windows.append((step, window))


# ----------------------------------------------------------------------------- every step in one window

@settings(max_examples=40, deadline=None)
@given(n_batches=st.integers(1, 23), log_every=st.integers(1, 9), start_step=st.integers(0, 30))
def test_every_optimiser_step_lands_in_exactly_one_window(n_batches, log_every, start_step):
    model = linear_classifier()
    windows = []
    stats = wbflow.train_epoch(model, linear_batches(n_batches, batch_size=2), torch.optim.SGD(model.parameters(), lr=0.1),
                               CE_LOSS, step=start_step, epoch=2, log_every=log_every, on_log=collect(windows),
                               progress=False)
    assert sum(window["steps"] for _, window in windows) == n_batches == stats["steps"]
    steps = [step for step, _ in windows]
    assert steps == sorted(set(steps)) and steps[-1] == start_step + n_batches  # the partial window at the end
    assert all(step % log_every == 0 for step in steps[:-1])
    assert all(1 <= window["steps"] <= log_every for _, window in windows)
    assert [window["batch"] for _, window in windows] == [step - start_step - 1 for step in steps]
    assert all(window["epoch"] == 2 and 0 <= window["accuracy"] <= 100 for _, window in windows)
    assert all(type(value) in (int, float) for _, window in windows for value in window.values())  # plain floats


def test_logged_learning_rate_is_the_one_the_windows_last_step_used():
    model = linear_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))  # changes every step
    used = []

    def loss_fn(model, batch):
        used.append(optimizer.param_groups[0]["lr"])  # the rate this step's optimizer.step() will use
        return CE_LOSS(model, batch)

    windows = []
    wbflow.train_epoch(model, linear_batches(7), optimizer, loss_fn, scheduler=scheduler, log_every=3,
                       on_log=collect(windows), progress=False)
    assert [step for step, _ in windows] == [3, 6, 7]
    assert [window["learning_rate"] for _, window in windows] == [used[2], used[5], used[6]] == [1 / 3, 1 / 6, 1 / 7]


def test_windows_count_skipped_steps_and_the_epoch_total_adds_up():
    model = linear_classifier()
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss, n_correct, n = CE_LOSS(model, batch)
        return (loss * math.nan if len(calls) in (2, 3, 6) else loss), n_correct, n

    windows = []
    stats = wbflow.train_epoch(model, linear_batches(7), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                               log_every=4, on_log=collect(windows), progress=False)
    assert [(window["steps"], window["skipped"]) for _, window in windows] == [(4, 2), (3, 1)]
    assert stats["skipped"] == 3 and all(math.isfinite(window["loss"]) for _, window in windows)


# ----------------------------------------------------------------------------- stop and exact continuation

class _DropoutNet(nn.Module):
    """Draws from torch's global RNG every step (dropout), so a resume must restore it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _run_epoch(stop_after, tmp_path, n_batches=11, log_every=4):
    """One epoch, stopped after `stop_after` steps (None: never), its state saved and loaded back."""
    model = _DropoutNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    batches, windows, done = linear_batches(n_batches), [], []

    def counting_loss(model, batch):
        done.append(1)
        return CE_LOSS(model, batch)

    stop = (lambda: len(done) >= stop_after) if stop_after is not None else None
    stats = wbflow.train_epoch(model, batches, optimizer, counting_loss, scheduler=scheduler, step=20, epoch=1,
                               log_every=log_every, on_log=collect(windows), stop=stop, progress=False)
    if stats["stopped"]:
        path = wbflow.save_checkpoint({"train_state": stats["state"], "rng": wbflow.capture_rng_state()},
                                      tmp_path / f"stop{stop_after}.pt")
        torch.manual_seed(12345)  # what a fresh process would do
        saved = wbflow.load_checkpoint(path)
        wbflow.restore_rng_state(saved["rng"])
        state = saved["train_state"]
        stats = wbflow.train_epoch(model, batches[state["batches"]:], optimizer, counting_loss, scheduler=scheduler,
                                   step=stats["step"], epoch=1, log_every=log_every, on_log=collect(windows),
                                   resume=state, progress=False)
    return windows, stats


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 6, 10, 11])
def test_an_epoch_stopped_and_resumed_logs_the_same_windows_and_means_as_one_unsplit(stop_after, tmp_path):
    whole_windows, whole = _run_epoch(None, tmp_path)
    windows, split = _run_epoch(stop_after, tmp_path)
    assert [step for step, _ in windows] == [step for step, _ in whole_windows] == [24, 28, 31]
    for (_, window), (_, expected) in zip(windows, whole_windows):
        assert window.keys() == expected.keys()
        for key in expected:
            assert window[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    for key in ("loss", "accuracy", "grad_norm", "skipped", "samples", "step"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6), key
    assert split["state"] is None and not split["stopped"]


def test_a_set_event_stops_after_the_current_step():
    model = linear_classifier()
    stop = threading.Event()
    calls = []

    def loss_fn(model, batch):
        if len(calls) == 2:
            stop.set()
        calls.append(1)
        return CE_LOSS(model, batch)

    stats = wbflow.train_epoch(model, linear_batches(6), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                               stop=stop, log_every=1000, progress=False)
    assert stats["stopped"] and stats["steps"] == 3 and stats["state"]["batches"] == 3
    assert set(stats["state"]) == {"totals", "logged", "batches", "has_accuracy", "learning_rate", "seconds"}


def test_stop_on_signals_turns_sigterm_into_a_stop_request_and_a_second_signal_into_keyboard_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with wbflow.stop_on_signals() as stop:
        assert not stop.is_set() and stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.is_set() and stop.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


def test_fused_optimizer_still_reads_found_inf_from_its_attributes():
    """train_epoch skips a non-finite step of a fused Adam/AdamW without a host sync by setting the
    optimiser's grad_scale / found_inf attributes, as GradScaler does. If this fails, torch changed
    that private contract: update the one commented place in train_epoch."""
    for found_inf, moves in ((1.0, False), (0.0, True)):
        parameter = nn.Parameter(torch.ones(3))
        optimizer = torch.optim.Adam([parameter], lr=0.1, fused=True)
        assert getattr(optimizer, "_step_supports_amp_scaling", False), "fused Adam lost _step_supports_amp_scaling"
        parameter.grad = torch.ones(3)
        optimizer.grad_scale, optimizer.found_inf = None, torch.tensor(found_inf)
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
        assert (not torch.equal(parameter.detach(), torch.ones(3))) == moves, \
            f"fused Adam ignored found_inf={found_inf}: torch changed how fused optimisers skip a step"
        assert optimizer.state[parameter]["step"].item() == (1.0 if moves else 0.0)


def test_the_ema_fast_path_updates_as_averaged_model_does_parameters_and_buffers():
    """make_ema's update runs swa_utils' EMA once per (device, dtype) group, without AveragedModel's host sync;
    if this fails, it no longer equals torch's own AveragedModel.update_parameters: mend _EMAModel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))  # float and int64 buffers
    fast = wbflow.make_ema(model, decay=0.9)
    reference = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=True)
    reference.update_parameters(model)  # the first update copies, as make_ema's does
    for _ in range(3):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            model.train()(torch.randn(16, 4))  # moves the running statistics and num_batches_tracked
        fast.update_parameters(model)
        reference.update_parameters(model)
    expected = reference.state_dict()
    assert fast.state_dict().keys() == expected.keys() and int(fast.n_averaged) == 4
    for name, tensor in fast.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(fast.module[1].running_mean, model[1].running_mean)  # an average, not a copy


# ----------------------------------------------------------------------------- loaders resume where they stopped

def test_device_loader_skip_batches_yields_the_rest_of_the_same_epoch():
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(40, size=8), 8, seed=3)
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, skip_batches=3)
    rest = list(loader)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))
    loader.set_epoch(3)
    assert len(list(loader)) == 5


def test_image_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=4)
    samples = [(str(path), 0) for path in sorted(data.rglob("*.png"))]
    dataset = wbflow.ImageSamples(samples, wbflow.image_transforms(16, train=True))
    torch.manual_seed(0)
    first = dataset[(5, 0, 1)][0]
    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    assert torch.equal(dataset[(5, 0, 1)][0], first)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is left as it was
    assert not torch.equal(dataset[(5, 0, 2)][0], first)  # another epoch, another crop

    train_loader, _ = wbflow.classifier_loaders(dataset, dataset, 4, seed=0)
    train_loader.sampler.set_epoch(1)
    whole = [images for images, _ in train_loader]
    train_loader.sampler.set_epoch(1, skip_batches=2)
    rest = [images for images, _ in train_loader]
    assert len(rest) == len(whole) - 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:]))


# ----------------------------------------------------------------------------- exact resume: history compared

COMPARED = ("train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/skipped_steps",
            "train/epoch_loss", "epoch", "batch", "train_loss", "train_acc", "learning_rate", "val_loss", "val_acc",
            "best_val_acc")


def scalar_rows(*logs):
    """(step, {compared key: value}) of every history row holding one of the compared keys."""
    rows = [(row["_step"], {key: row[key] for key in COMPARED if key in row}) for log in logs for row in log.history]
    return [(step, values) for step, values in rows if values]


def assert_same_history(rows, expected):
    assert [step for step, _ in rows] == [step for step, _ in expected]
    for (step, values), (_, expected_values) in zip(rows, expected):
        assert values.keys() == expected_values.keys(), step
        for key, value in expected_values.items():
            assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def sigterm_after(steps):
    """A loss_fn wrapper that sends this process SIGTERM after `steps` calls, as a scheduler would."""
    calls = []

    def wrap(loss_fn):
        def counted(model, batch):
            calls.append(1)
            if len(calls) == steps:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(model, batch)
        return counted
    return wrap


def signal_on_call(function, on_call, signal_number=signal.SIGTERM):
    """`function` wrapped to send this process `signal_number` (a real signal) during its `on_call`-th call,
    with the calls counted in wrapper.calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == on_call:
            os.kill(os.getpid(), signal_number)
        return function(*args, **kwargs)
    wrapper.calls = 0
    return wrapper


def read_run(wandb_dir, run_id, ready, timeout=30):
    """The RunLog of run `run_id` under wandb_dir, once ready(log) holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        [path] = glob.glob(str(Path(wandb_dir) / "wandb" / f"*run-*{run_id}" / "*.wandb"))
        log = RunLog(path)
        if (log.run_id == run_id and ready(log)) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)



def test_train_fire_stopped_by_sigterm_mid_epoch_resumes_the_same_run_with_the_same_history(
        offline_wandb, tmp_path, monkeypatch, capsys):
    data = write_pattern_folders(tmp_path / "data", per_class=10)  # 40 training images: 5 steps an epoch
    train_fire.main(fire_args(data, tmp_path / "whole", "--epochs", "2"))
    argv = fire_args(data, tmp_path / "split", "--epochs", "2")
    real_loss = wbflow.classification_loss
    wraps = iter([sigterm_after(7)])  # the training loss_fn, the only one train_fire builds: 5 + 2 steps
    monkeypatch.setattr(wbflow, "classification_loss", lambda criterion: next(wraps, lambda fn: fn)(real_loss(criterion)))
    with pytest.raises(SystemExit) as stopped:
        train_fire.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"--resume {tmp_path / 'split' / 'last.pth'}" in capsys.readouterr().out
    saved = wbflow.load_checkpoint(tmp_path / "split" / "last.pth")
    assert saved["epoch"] == 1 and saved["step"] == 7 and saved["train_state"]["batches"] == 2  # mid-window

    monkeypatch.setattr(wbflow, "classification_loss", real_loss)
    train_fire.main(argv + ["--resume", str(tmp_path / "split" / "last.pth")])
    printed = capsys.readouterr().out
    assert "resuming epoch 1 at batch 2, step 7" in printed and "W&B: continuing run" in printed
    whole, first, second = run_logs(offline_wandb)
    assert first.exit_code == 1 and second.exit_code == 0 and first.run_id == second.run_id
    assert [step for step, _ in scalar_rows(whole)] == [5, 10]
    assert_same_history(scalar_rows(first, second), scalar_rows(whole))
    end = {run: wbflow.load_checkpoint(tmp_path / run / "last.pth") for run in ("whole", "split")}
    assert end["split"]["step"] == end["whole"]["step"] == 10 and end["split"]["train_state"] is None
    assert end["split"]["best"] == end["whole"]["best"]
    for name, tensor in end["whole"]["model"].items():
        torch.testing.assert_close(end["split"]["model"][name], tensor, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- train_flow against one uninterrupted run

# 48 images of CIFAR-10 files, batch 16: 3 steps an epoch, 9 in all, windows at steps 2, 3 | 4, 6 | 8, 9 (the
# epochs' ends); every epoch has a grid, 4 table rows (Euler NFE 1 and 2, Heun 2, RK45) and a checkpoint
FLOW = ["--smoke", "--epochs", "3", "--set", "data.max_images=48", "--set", "training.batch_size=16",
        "--set", "training.log_interval=2", "--set", "training.warmup_steps=4", "--set", "model.base_channels=8",
        "--set", "model.channel_mults=[1, 2]", "--set", "model.head_channels=8", "--set", "sampling.num_images=4",
        "--set", "sampling.table_nfes=[1, 2]", "--set", "sampling.rk45_tolerance=0.01"]


def uninterrupted_flow_run(root, argv):
    """train_flow.main(argv + --out-dir root/out) on one thread, W&B offline in root (staging in root/staging): argv,
    out dir, RunLog, the W&B folder and what it printed, for a module's tests to read."""
    printed = run_offline(train_flow.main, argv + ["--out-dir", str(root / "out")], root,
                          WANDB_DATA_DIR=str(root / "staging"))[1]
    [log] = run_logs(root)
    return SimpleNamespace(argv=argv, out=root / "out", log=log, root=root, printed=printed)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run (uninterrupted_flow_run) on CIFAR-10 files. Tests only read it."""
    root = tmp_path_factory.mktemp("whole")
    write_cifar_batches(root / "data", per_batch=10, test_images=2)
    return uninterrupted_flow_run(root, FLOW + ["--data-dir", str(root / "data")])


def table_keys(checkpoint):
    return [(row["epoch"], row["solver"], row["nfe"], row["samples"]) for row in checkpoint["table_rows"]]


def assert_same_end(out, whole):
    """out's last.pt, checkpoints and sample PNGs are the uninterrupted run's: every table row and grid once."""
    end, expected = wbflow.load_checkpoint(out / "last.pt"), wbflow.load_checkpoint(whole.out / "last.pt")
    assert end["global_step"] == 9 and end["ended"] and table_keys(end) == table_keys(expected)
    for folder in (".", "samples"):
        assert sorted(path.name for path in (out / folder).glob("*.p*")) == sorted(
            path.name for path in (whole.out / folder).glob("*.p*"))
    for key in ("model", "ema"):
        for name, tensor in expected[key].items():
            torch.testing.assert_close(end[key][name], tensor, rtol=1e-5, atol=1e-6)


def stopped(argv, capsys):
    """What train_flow.main(argv) printed before a SIGTERM stopped it, with exit code 143."""
    with pytest.raises(SystemExit) as stop:
        train_flow.main(argv)
    assert stop.value.code == 128 + signal.SIGTERM
    return capsys.readouterr().out


def test_a_run_logs_every_seed_key_table_image_and_artifact(whole):
    log, out = whole.log, whole.out
    assert "CIFAR-10: 48 training images" in whole.printed and log.exit_code == 0
    windows = log.rows_with("train/loss")
    assert [row["_step"] for row in windows] == [2, 3, 4, 6, 8, 9]
    assert [row["train/epoch"] for row in windows] == [1, 1, 2, 2, 3, 3]
    assert all({"train/learning_rate", "train/grad_norm", "train/skipped_steps"} <= set(row) for row in windows)
    epoch_rows = log.rows_with("train/epoch_loss")  # each epoch's last window, loss, speed and grid: one row
    assert [row["_step"] for row in epoch_rows] == [3, 6, 9] and all(
        "train/loss" in row and row["train/images_per_second"] > 0 and math.isfinite(row["train/epoch_loss"])
        and row["eval/generated_samples"]["_type"] == "image-file" for row in epoch_rows)
    assert log.summary["train/epoch_loss"] == {"min": min(log.values("train/epoch_loss"))}
    assert log.summary["train/loss"] == {"min": min(log.values("train/loss"))}
    step_metrics = {(metric.name or metric.glob_name): metric.step_metric for metric in log.metrics}
    assert step_metrics == {"train/loss": "", "train/epoch": "", **dict.fromkeys(
        ["train/epoch_loss", "train/images_per_second", "eval/fid_score", "eval/inception_score_*",
         "eval/straightness"], "train/epoch")}
    assert sorted(path.name for path in (out / "samples").glob("epoch_000?.png")) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]

    [table_row] = log.rows_with("eval/samples_table")  # with the last epoch's row
    assert table_row["_step"] == 9 and table_row["eval/samples_table"]["nrows"] == 12
    columns, data = _table_data(whole.root)
    assert columns == ["epoch", "solver", "nfe", "seconds", "straightness", "samples"]
    straightness = {row["train/epoch"]: row["eval/straightness"] for row in log.rows_with("eval/straightness")}
    assert all(row[4] == pytest.approx(straightness[row[0]]) and row[4] > 0 for row in data)
    assert [(row[0], row[1], row[2]) for row in data if row[1] != "rk45"] == [
        (epoch, solver, nfe) for epoch in (1, 2, 3) for solver, nfe in [("euler", 1), ("euler", 2), ("heun", 2)]]
    assert [row[0] for row in data if row[1] == "rk45"] == [1, 2, 3]
    [table_artifact] = [artifact for artifact in log.artifacts if artifact["type"] == "run_table"]
    assert sorted(Path(name).name for name in table_artifact["files"] if name.endswith(".png")) == sorted(
        f"epoch_{row[0]:04d}_{row[1]}_nfe{row[2]:03d}.png" for row in data)

    models = [artifact for artifact in log.artifacts if artifact["type"] == "model"]  # one collection, 3 versions
    losses = log.values("train/epoch_loss")
    assert [model["name"] for model in models] == [f"model-{log.run_id}"] * 3
    for epoch, model in enumerate(models, 1):
        best = losses[epoch - 1] == min(losses[:epoch])
        assert set(model["aliases"]) == {"latest", f"epoch-{epoch}"} | ({"best"} if best else set())
        assert model["metadata"]["epoch"] == epoch and model["metadata"]["global_step"] == 3 * epoch
        assert model["files"] == [f"checkpoint_epoch_{epoch}.pt"]
    assert models[2]["metadata"]["config"]["training"]["gradient_clip"] == 1.0
    staged = {wbflow.file_sha256(path) for path in (whole.root / "staging").rglob("*") if path.is_file()}
    assert staged and not staged & {wbflow.file_sha256(path) for path in out.glob("*.pt")}  # no checkpoint copies
    assert {"data", "model", "training", "logging", "sampling", "eval"} <= set(log.config)
    assert wbflow.load_checkpoint(out / "checkpoint_epoch_3.pt")["wandb_run_id"] == log.run_id
    assert sorted(path.name for path in out.glob("*.pt")) == [
        "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt", "last.pt"]


def test_stops_mid_epoch_before_the_grid_and_between_table_rows_resume_the_same_run_to_the_same_record(
        whole, offline_wandb, tmp_path, monkeypatch, capsys):
    argv = whole.argv + ["--out-dir", str(tmp_path / "split")]
    last = tmp_path / "split" / "last.pt"
    resume = argv + ["--resume", str(last)]
    real_loss, real_save, real_sample = wbflow.rectified_flow_loss, wbflow.save_checkpoint, wbflow.sample_flow
    monkeypatch.setattr(wbflow, "rectified_flow_loss", signal_on_call(real_loss, 5))  # epoch 2, mid-window
    printed = stopped(argv, capsys)
    assert "stopped at step 5 (epoch 2); continue with:" in printed
    assert shlex.join(["python", "train_flow.py", *resume]) in printed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    assert wbflow.load_checkpoint(last)["train_state"]["batches"] == 2

    def signal_after_epoch_2s_training(state, path):
        saved = real_save(state, path)
        if state["epoch"] == 2 and not state["ended"] and not state["wandb_last_act"]:  # not the stop's own last.pt
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    monkeypatch.setattr(wbflow, "save_checkpoint", signal_after_epoch_2s_training)
    monkeypatch.setattr(wbflow, "sample_flow", lambda *args, **kwargs: pytest.fail("drew the grid"))
    assert "stopped at step 6 (epoch 2), in its end" in stopped(resume, capsys)
    monkeypatch.setattr(wbflow, "save_checkpoint", real_save)
    sample = signal_on_call(real_sample, 3)  # the grid, table rows 1 and 2: row 3 never starts
    monkeypatch.setattr(wbflow, "sample_flow", sample)
    printed = stopped(resume, capsys)
    assert "W&B: continuing run" in printed and "stopped at step 6 (epoch 2), in its end" in printed
    assert sample.calls == 3 and [row["epoch"] for row in wbflow.load_checkpoint(last)["table_rows"]] == [1] * 4
    monkeypatch.setattr(wbflow, "sample_flow", real_sample)
    train_flow.main(resume)

    logs = run_logs(offline_wandb)
    assert [log.exit_code for log in logs] == [1, 1, 1, 0] and len({log.run_id for log in logs}) == 1
    assert_same_history(scalar_rows(*logs), scalar_rows(whole.log))
    assert [row["_step"] for log in logs for row in log.rows_with("eval/generated_samples")] == [3, 6, 9]
    assert_same_end(tmp_path / "split", whole)


_HANG = """
import sys, time
sys.path.insert(0, {here!r})
import train_flow, wbflow
def hang_at(function, call):
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == call:
            open({marker!r}, "w").close()
            time.sleep(120)
        return function(*args, **kwargs)
    wrapper.calls = 0
    return wrapper
{patch}
train_flow.main({argv!r})
"""


def test_kills_mid_epoch_and_in_an_epochs_end_resume_in_new_runs_that_lose_and_repeat_nothing(
        whole, offline_wandb, tmp_path, capsys):
    argv = whole.argv + ["--out-dir", str(tmp_path / "killed")]
    last = tmp_path / "killed" / "last.pt"
    resume = argv + ["--resume", str(last)]
    # step 6 (epoch 2), past epoch 1's checkpoint; then, resumed, inside epoch 3's solver table
    kill_when_marked(_HANG.format(here=str(HERE), marker=str(tmp_path / "in_epoch_2"), argv=argv,
                                  patch="wbflow.rectified_flow_loss = hang_at(wbflow.rectified_flow_loss, 6)"),
                     tmp_path / "in_epoch_2")
    first_id = wbflow.load_checkpoint(last)["wandb_run_id"]
    kill_when_marked(_HANG.format(here=str(HERE), marker=str(tmp_path / "in_the_end"), argv=resume,
                                  patch="wbflow.compare_solvers = hang_at(wbflow.compare_solvers, 2)"),
                     tmp_path / "in_the_end")
    state = wbflow.load_checkpoint(last)  # right after epoch 3's training: none of it is lost
    assert (state["epoch"], state["global_step"], state["ended"], state["train_state"]) == (3, 9, False, None)
    assert not state["wandb_last_act"] and [row["epoch"] for row in state["table_rows"]] == [1] * 4 + [2] * 4
    second_id = state["wandb_run_id"]
    train_flow.main(resume)
    assert "W&B: a new run" in capsys.readouterr().out

    # the killed runs have no exit record; W&B's orphaned service may still be writing them
    first = read_run(offline_wandb, first_id, lambda log: log.rows_with("train/epoch_loss"))
    second = read_run(offline_wandb, second_id, lambda log: len(log.rows_with("train/loss")) >= 3)
    [third_id] = {path.name.rsplit("-", 1)[1] for path in (offline_wandb / "wandb").glob("offline-run-*")} - {
        first_id, second_id}
    third = read_run(offline_wandb, third_id, lambda log: log.exit_code is not None)
    assert second.config["resumed_from"] == {"run_id": first_id, "step": 3, "checkpoint": str(last)}
    assert third.config["resumed_from"] == {"run_id": second_id, "step": 9, "checkpoint": str(last)}
    assert [row["_step"] for row in second.rows_with("train/loss")] == [4, 6, 8]  # all it trained is on disk
    kept = [(step, values) for step, values in scalar_rows(first) if step <= 3] + scalar_rows(second, third)
    assert_same_history(kept, scalar_rows(whole.log))
    assert [row["_step"] for log in (first, second, third) for row in log.rows_with("eval/generated_samples")] == [
        3, 6, 9]
    assert_same_end(tmp_path / "killed", whole)
    assert sorted(row[0] for row in _table_data(offline_wandb, third_id)[1]) == [1] * 4 + [2] * 4 + [3] * 4


def test_a_crash_in_an_epochs_end_resumes_from_a_moved_out_dir_in_a_new_run(whole, offline_wandb, tmp_path,
                                                                            monkeypatch, capsys):
    real_save = wbflow.save_checkpoint

    def save_then_crash(state, path):
        saved = real_save(state, path)
        if state["epoch"] == 2 and not state["ended"]:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(wbflow, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_flow.main(whole.argv + ["--out-dir", str(tmp_path / "first")])
    monkeypatch.setattr(wbflow, "save_checkpoint", real_save)
    shutil.move(tmp_path / "first", tmp_path / "moved")  # another machine, or another --out-dir
    last = tmp_path / "moved" / "last.pt"
    train_flow.main(whole.argv + ["--out-dir", str(tmp_path / "moved"), "--resume", str(last)])
    assert "W&B: a new run" in capsys.readouterr().out
    crashed, resumed = run_logs(offline_wandb)
    assert crashed.exit_code == 1 and resumed.exit_code == 0
    assert resumed.config["resumed_from"] == {"run_id": crashed.run_id, "step": 6, "checkpoint": str(last)}
    assert_same_history(scalar_rows(crashed, resumed), scalar_rows(whole.log))
    assert_same_end(tmp_path / "moved", whole)  # the table's rows name their PNGs relative to the out dir
    assert sorted(row[0] for row in _table_data(offline_wandb, resumed.run_id)[1]) == [1] * 4 + [2] * 4 + [3] * 4


def test_without_wandb_a_stopped_and_a_finished_run_resume_to_the_uninterrupted_weights(whole, tmp_path,
                                                                                       monkeypatch, capsys):
    argv = whole.argv + ["--no-wandb", "--out-dir", str(tmp_path / "split")]
    last = tmp_path / "split" / "last.pt"
    real_loss = wbflow.rectified_flow_loss
    monkeypatch.setattr(wbflow, "rectified_flow_loss", signal_on_call(real_loss, 4))  # epoch 2, first step
    stopped(argv + ["--epochs", "2"], capsys)
    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    train_flow.main(argv + ["--epochs", "2", "--resume", str(last)])  # after a stop
    train_flow.main(argv + ["--epochs", "3", "--resume", str(last)])  # after a finished run
    printed = capsys.readouterr().out
    assert printed.count("resumed from") == 2 and "W&B" not in printed
    assert_same_end(tmp_path / "split", whole)

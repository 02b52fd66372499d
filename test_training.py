"""train_epoch's windows, stop and resume; exact resume of both drivers, read back from the W&B record logs;
the copy rule for the device & data, models, losses, training and sampling sections."""
import math
import glob
import os
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import train_fire
import train_flow
import wbflow
from conftest import RunLog, kill_when_marked, run_logs
from test_wbflow import CE_LOSS, fire_args, linear_batches, linear_classifier, write_pattern_folders

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
                               CE_LOSS, step=start_step, log_every=log_every, on_log=collect(windows), progress=False)
    assert sum(window["steps"] for _, window in windows) == n_batches == stats["steps"]
    steps = [step for step, _ in windows]
    assert steps == sorted(set(steps)) and steps[-1] == start_step + n_batches  # the partial window at the end
    assert all(step % log_every == 0 for step in steps[:-1])
    assert all(1 <= window["steps"] <= log_every for _, window in windows)
    assert [window["batch"] for _, window in windows] == [step - start_step - 1 for step in steps]


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


def test_a_set_event_stops_after_the_current_step_without_host_syncs(monkeypatch):
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


def test_train_epoch_with_a_stop_event_makes_no_host_sync_per_step(monkeypatch):
    from test_wbflow import _SYNC_METHODS
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ema_model = wbflow.make_ema(model, 0.9)
    calls = []
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _original=original, _name=name, **k: (calls.append(_name), _original(self, *a, **k))[1])
    syncs = []
    for steps in (30, 60):
        calls.clear()
        stats = wbflow.train_epoch(model, linear_batches(steps), optimizer, CE_LOSS, stop=threading.Event(),
                                   ema_model=ema_model, log_every=1000, progress=False)
        assert stats["steps"] == steps
        syncs.append(list(calls))
    monkeypatch.undo()
    assert syncs[0] == syncs[1] and len(syncs[0]) <= 2, syncs  # the epoch's end reads, never one per step


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


# ----------------------------------------------------------------------------- exact resume of the drivers

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


FLOW_FLAGS = ["--smoke", "--epochs", "2", "--set", "data.max_images=128", "--set", "training.log_interval=3",
              "--set", "sampling.table_nfes=[1]", "--set", "training.warmup_steps=4"]


def test_train_flow_stopped_by_sigterm_mid_epoch_resumes_the_same_run_with_the_same_history(
        offline_wandb, tmp_path, monkeypatch, capsys):
    train_flow.main(FLOW_FLAGS + ["--out-dir", str(tmp_path / "whole")])
    argv = FLOW_FLAGS + ["--out-dir", str(tmp_path / "split")]
    real_loss = wbflow.rectified_flow_loss
    monkeypatch.setattr(wbflow, "rectified_flow_loss", sigterm_after(5)(real_loss))  # step 5: epoch 2, mid-window
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    command = shlex.join(["python", "train_flow.py", *argv, "--resume", str(tmp_path / "split" / "last.pt")])
    assert "stopped at step 5 (epoch 2)" in printed and command in printed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run

    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    train_flow.main(argv + ["--resume", str(tmp_path / "split" / "last.pt")])
    assert "W&B: continuing run" in capsys.readouterr().out
    whole, first, second = run_logs(offline_wandb)
    assert first.exit_code == 1 and second.exit_code == 0 and first.run_id == second.run_id
    assert [row["_step"] for row in first.rows_with("train/loss")] == [3, 4]
    assert scalar_rows(whole)[-1][0] == 8
    assert_same_history(scalar_rows(first, second), scalar_rows(whole))
    end = {run: wbflow.load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "split")}
    assert end["split"]["wandb_last_act"] and end["split"]["train_state"] is None and end["split"]["global_step"] == 8
    for key in ("model", "ema"):
        for name, tensor in end["whole"][key].items():
            torch.testing.assert_close(end["split"][key][name], tensor, rtol=1e-5, atol=1e-6)


def test_train_fire_stopped_by_sigterm_mid_epoch_resumes_the_same_run_with_the_same_history(
        offline_wandb, tmp_path, monkeypatch, capsys):
    data = write_pattern_folders(tmp_path / "data", per_class=10)  # 40 training images: 5 steps an epoch
    train_fire.main(fire_args(data, tmp_path / "whole", "--epochs", "2"))
    argv = fire_args(data, tmp_path / "split", "--epochs", "2")
    real_loss = wbflow.classification_loss
    monkeypatch.setattr(wbflow, "classification_loss", lambda criterion: sigterm_after(9)(real_loss(criterion)))  # 5 train + 2 val + 2
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
    assert end["split"]["best_val_acc"] == end["whole"]["best_val_acc"]
    for name, tensor in end["whole"]["model"].items():
        torch.testing.assert_close(end["split"]["model"][name], tensor, rtol=1e-5, atol=1e-6)


def read_run(wandb_dir, run_id, ready, timeout=30):
    """The RunLog of run `run_id` under wandb_dir, once ready(log) holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        [path] = glob.glob(str(Path(wandb_dir) / "wandb" / f"*run-*{run_id}" / "*.wandb"))
        log = RunLog(path)
        if (log.run_id == run_id and ready(log)) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


_KILLED_FLOW = """
import os, sys, time
sys.path.insert(0, {here!r})
import train_flow, wbflow
real_loss, calls = wbflow.rectified_flow_loss, []
def loss_then_hang(model, batch):
    calls.append(1)
    if len(calls) == 7:  # epoch 2 has logged a window past the epoch-1 checkpoint: wait to be killed
        open({marker!r}, "w").close()
        time.sleep(120)
    return real_loss(model, batch)
wbflow.rectified_flow_loss = loss_then_hang
train_flow.main({argv!r})
"""


def test_train_flow_killed_with_sigkill_resumes_in_a_new_run_that_records_its_origin(offline_wandb, tmp_path, capsys):
    train_flow.main(FLOW_FLAGS + ["--out-dir", str(tmp_path / "whole")])
    [whole] = run_logs(offline_wandb)
    argv = FLOW_FLAGS + ["--out-dir", str(tmp_path / "killed")]
    marker = tmp_path / "hanging"
    # settle: let W&B write what the run logged past the checkpoint
    kill_when_marked(_KILLED_FLOW.format(here=str(HERE), marker=str(marker), argv=argv), marker, settle=1.0)
    last = tmp_path / "killed" / "last.pt"
    checkpoint = wbflow.load_checkpoint(last)
    assert checkpoint["global_step"] == 4 and not checkpoint["wandb_last_act"]

    train_flow.main(argv + ["--resume", str(last)])
    assert "W&B: a new run" in capsys.readouterr().out
    killed_id = checkpoint["wandb_run_id"]
    [resumed_id] = {path.name.rsplit("-", 1)[1] for path in (offline_wandb / "wandb").glob("offline-run-*")} - {
        whole.run_id, killed_id}
    resumed = read_run(offline_wandb, resumed_id, lambda log: log.exit_code is not None)
    # the killed run has no exit record; W&B's orphaned service may still be writing it
    killed = read_run(offline_wandb, killed_id, lambda log: log.rows_with("train/loss"))
    assert resumed.config["resumed_from"] == {"run_id": killed.run_id, "step": 4, "checkpoint": str(last)}
    assert resumed.run_id not in (killed.run_id, whole.run_id) and resumed.exit_code == 0
    before_checkpoint = [(step, values) for step, values in scalar_rows(killed) if step <= 4]
    assert_same_history(before_checkpoint + scalar_rows(resumed), scalar_rows(whole))

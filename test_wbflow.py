"""Tests for wbflow. W&B runs for real in offline mode; assertions read the run's record log back."""
import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import re
import pickle
import random
import signal
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import yaml
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import train_fire
import train_flow
import wbflow
from conftest import run_logs

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- small fixtures

def linear_batches(n_batches=6, batch_size=8, features=4, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, features, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(n_batches)]


def linear_classifier(features=4, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(features, classes)


CE_LOSS = wbflow.classification_loss(nn.CrossEntropyLoss())


def within(seconds, function, *args, fifo=None):
    """function(*args), failing the test when it runs longer than `seconds` (a regression that hangs fails
    rather than hanging the suite); a reader blocked on `fifo` is then released by a writer's open and close."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{function.__name__} still ran after {seconds} s (reading a FIFO waits for a writer)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# ----------------------------------------------------------------------------- train_epoch

def test_train_epoch_logs_loss_lr_grad_norm_epoch_at_global_steps(offline_wandb):
    model = linear_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with wbflow.wandb_run({"lr": 0.1}, project="test") as run:
        def on_log(step, window):
            run.log({"train/loss": window["loss"], "train/learning_rate": window["learning_rate"],
                     "train/grad_norm": window["grad_norm"], "train/epoch": window["epoch"]}, step=step)

        stats = wbflow.train_epoch(model, linear_batches(25), optimizer, CE_LOSS, step=5, epoch=3,
                                   log_every=10, on_log=on_log, progress=False)
    assert stats["step"] == 30 and stats["steps"] == 25 and stats["samples"] == 200
    log = run_logs(offline_wandb)[0]
    rows = log.rows_with("train/loss")
    assert [row["_step"] for row in rows] == [10, 20, 30]
    for row in rows:
        assert row["train/learning_rate"] == pytest.approx(0.1)
        assert row["train/epoch"] == 3
        assert row["train/grad_norm"] > 0 and math.isfinite(row["train/loss"])
    assert log.config["lr"] == 0.1 and log.exit_code == 0


def test_train_epoch_logged_loss_is_the_mean_since_the_last_log():
    losses = [float(i) for i in range(1, 9)]
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss_fn(model, batch):
        return model(batch[0]).sum() * 0 + batch[1][0]

    batches = [(torch.ones(1, 1), torch.tensor([value])) for value in losses]
    windows = []
    stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, log_every=4, progress=False,
                               on_log=lambda step, window: windows.append(window))
    assert [window["loss"] for window in windows] == [2.5, 6.5] and "accuracy" not in windows[0]
    assert stats["loss"] == pytest.approx(4.5) and stats["accuracy"] is None


def test_train_epoch_accuracy_counts_correct_predictions():
    model = linear_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: predictions stay put
    batches = linear_batches(4)
    expected = sum((model(x).argmax(1) == y).sum().item() for x, y in batches) / 32 * 100
    stats = wbflow.train_epoch(model, batches, optimizer, CE_LOSS, progress=False)
    assert stats["accuracy"] == pytest.approx(expected)


_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_train_epoch_makes_no_host_sync_per_step(monkeypatch):
    """Only the end-of-epoch reads touch the host when log_every exceeds the epoch: as many for 60 steps as for 30,
    with the EMA, clipping, a scheduler, a fused optimiser and a stop event checked after every step."""
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    ema_model = wbflow.make_ema(model, decay=0.9)
    calls = []
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _original=original, _name=name, **k: (calls.append(_name), _original(self, *a, **k))[1])
    syncs = []
    for steps in (30, 60):
        calls.clear()
        stats = wbflow.train_epoch(model, linear_batches(steps), optimizer, CE_LOSS, scheduler=scheduler,
                                   ema_model=ema_model, grad_clip=1.0, log_every=1000, stop=threading.Event(),
                                   progress=False)
        assert stats["steps"] == steps
        syncs.append(list(calls))
    monkeypatch.undo()
    assert syncs[0] == syncs[1] and set(syncs[0]) == {"tolist"} and len(syncs[0]) <= 2, syncs


def test_grad_norm_is_pre_clip_norm_and_clipping_scales_the_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    weight_before = model.weight.detach().clone()
    x, target = torch.randn(5, 3), torch.randn(5, 1)
    # d/dw mean((x w - t)^2) = 2/n * x^T (x w - t)
    hand_grad = (2 / 5 * (x @ weight_before.T - target).T @ x)
    hand_norm = hand_grad.norm().item()
    clip = hand_norm / 4

    def loss_fn(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    stats = wbflow.train_epoch(model, [(x, target)], torch.optim.SGD(model.parameters(), lr=0.5), loss_fn,
                               grad_clip=clip, progress=False)
    assert stats["grad_norm"] == pytest.approx(hand_norm, rel=1e-5)
    expected_weight = weight_before - 0.5 * hand_grad * (clip / (hand_norm + 1e-6))
    torch.testing.assert_close(model.weight.detach(), expected_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.1, fused=True),
], ids=["sgd-host-skip", "fused-adam-device-skip"])
def test_non_finite_loss_skips_the_step_and_counts_it(make_optimizer):
    model = linear_classifier()
    optimizer = make_optimizer(model.parameters())
    batches = linear_batches(4)
    snapshots = []

    def loss_fn(model, batch):
        snapshots.append(model.weight.detach().clone())
        loss, n_correct, n = CE_LOSS(model, batch)
        return (loss * math.nan if len(snapshots) == 3 else loss), n_correct, n

    windows, ema_model = [], wbflow.make_ema(model, 0.9)
    stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, log_every=4, progress=False, ema_model=ema_model,
                               on_log=lambda step, window: windows.append(window))
    after_bad_step = model.weight.detach()
    assert stats["skipped"] == 1 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert not torch.equal(snapshots[1], snapshots[2])  # good steps moved the weights
    # The bad step (third) changed nothing: the fourth step starts where the third did.
    torch.testing.assert_close(snapshots[3], snapshots[2], rtol=0, atol=0)
    assert torch.isfinite(after_bad_step).all()
    assert [(window["steps"], window["skipped"]) for window in windows] == [(4, 1)]
    assert all(torch.isfinite(p).all() for p in ema_model.parameters())
    if "step" in optimizer.state[model.weight]:  # Adam counts the 3 good steps, SGD keeps no count
        assert int(optimizer.state[model.weight]["step"]) == 3


def test_train_epoch_updates_ema_after_each_step():
    model = linear_classifier()
    ema_model = wbflow.make_ema(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = model.weight.detach().clone()

    def loss_fn(model, batch):
        return CE_LOSS(model, batch)

    for batch in linear_batches(3):
        wbflow.train_epoch(model, [batch], optimizer, loss_fn, ema_model=ema_model, progress=False)
        expected = 0.5 * expected + 0.5 * model.weight.detach()
    torch.testing.assert_close(ema_model.module.weight.detach(), expected)
    assert int(ema_model.n_averaged) == 4


def test_amp_on_cpu_autocasts_to_bfloat16_when_asked():
    seen = []

    def loss_fn(model, batch):
        logits = model(batch[0])
        seen.append(logits.dtype)
        return nn.functional.cross_entropy(logits.float(), batch[1])

    model, amp_dtype = linear_classifier(), wbflow.autocast_dtype("cpu", amp=True)
    wbflow.train_epoch(model, linear_batches(1), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                       amp_dtype=amp_dtype, progress=False)
    wbflow.train_epoch(model, linear_batches(1), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                       progress=False)
    wbflow.validate(model, linear_batches(1), loss_fn, amp_dtype=amp_dtype)
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert wbflow.autocast_dtype("cpu") is None and not wbflow.make_scaler("cpu").is_enabled()


# ----------------------------------------------------------------------------- validate

def test_validate_returns_per_sample_mean_loss_and_accuracy_and_restores_mode():
    model = linear_classifier()
    model.train()
    batches = linear_batches(3, batch_size=8) + linear_batches(1, batch_size=3, seed=1)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    metrics = wbflow.validate(model, batches, CE_LOSS)
    with torch.no_grad():
        logits = model(x)
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item() * 100)
    assert metrics["samples"] == 27 and model.training


def _validate_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    batches = linear_batches(4, batch_size=6)
    metrics = wbflow.validate(linear_classifier(), batches[rank::world_size], CE_LOSS)
    torch.save(metrics, f"{result_file}.{rank}")
    model = linear_classifier()
    train = wbflow.train_epoch(model, batches[rank::world_size], torch.optim.SGD(model.parameters(), lr=0.0),
                               CE_LOSS, progress=False)
    torch.save(train, f"{result_file}.train.{rank}")
    best = wbflow.save_best({"rank": rank}, 50.0, None, f"{result_file}.best")
    torch.save(best, f"{result_file}.best-return.{rank}")
    dist.destroy_process_group()


def test_train_epoch_and_validate_all_reduce_and_only_rank_0_saves_best(tmp_path):
    import torch.multiprocessing as mp
    result_file = tmp_path / "metrics"
    mp.spawn(_validate_worker, args=(2, tmp_path / "init", result_file), nprocs=2)
    whole = wbflow.validate(linear_classifier(), linear_batches(4, batch_size=6), CE_LOSS)
    model = linear_classifier()
    whole_train = wbflow.train_epoch(model, linear_batches(4, batch_size=6), torch.optim.SGD(model.parameters(), lr=0.0),
                                     CE_LOSS, progress=False)
    for rank in range(2):
        metrics = torch.load(f"{result_file}.{rank}", weights_only=True)
        assert metrics["samples"] == 24
        assert metrics["loss"] == pytest.approx(whole["loss"]) and metrics["accuracy"] == pytest.approx(whole["accuracy"])
        assert torch.load(f"{result_file}.best-return.{rank}", weights_only=True) == (50.0, True)
        train = torch.load(f"{result_file}.train.{rank}", weights_only=True)
        assert train["samples"] == 24 and train["steps"] == 2
        assert train["loss"] == pytest.approx(whole_train["loss"]) and train["accuracy"] == pytest.approx(whole_train["accuracy"])
    assert wbflow.load_checkpoint(f"{result_file}.best") == {"rank": 0}


def small_conv_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))


def indexed_images(count=7):
    """(image, its index): row i of a prediction must be sample i."""
    return torch.utils.data.TensorDataset(torch.randn(count, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                                          torch.arange(count))


def test_predict_logits_is_the_eval_forward_under_autocast_in_dataset_order_and_restores_the_mode():
    model, dataset = small_conv_classifier().train(), indexed_images()
    logits, labels = wbflow.predict_logits(model, dataset, batch_size=3)
    bf16_logits, _ = wbflow.predict_logits(model, dataset, batch_size=3, amp_dtype=torch.bfloat16)
    assert model.training and labels.tolist() == list(range(7)) and bf16_logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(dataset.tensors[0]))  # BatchNorm's running statistics
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(bf16_logits, model(dataset.tensors[0]).float())


def _predict_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model, images_seen = small_conv_classifier(), []
    model.register_forward_hook(lambda module, inputs, output: images_seen.append(len(inputs[0])))
    logits, labels = wbflow.predict_logits(model, indexed_images(), batch_size=2, tta=True)
    torch.save({"logits": logits, "labels": labels, "images_seen": sum(images_seen)}, f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_predict_logits_on_two_ranks_predicts_a_share_on_each_and_gives_every_rank_all_rows_in_order(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_predict_worker, args=(2, tmp_path / "init", tmp_path / "logits"), nprocs=2)
    whole, _ = wbflow.predict_logits(small_conv_classifier(), indexed_images(), batch_size=2, tta=True)
    results = [torch.load(f"{tmp_path / 'logits'}.{rank}", weights_only=True) for rank in range(2)]
    assert [result["images_seen"] for result in results] == [2 * 4, 2 * 3]  # samples 0, 2, 4, 6 and 1, 3, 5; mirrored
    for result in results:
        assert result["labels"].tolist() == list(range(7))
        torch.testing.assert_close(result["logits"], whole)


# ----------------------------------------------------------------------------- W&B run helper

def test_wandb_run_without_wandb_installed_warns_once_and_trains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with wbflow.wandb_run({"a": 1}) as run:
        model = torch.nn.Linear(2, 1)
        stats = wbflow.train_epoch(model, [torch.randn(4, 2)], torch.optim.SGD(model.parameters(), lr=0.1),
                                   lambda m, b: m(b).pow(2).mean(), log_every=1, progress=False)
        run.log({"x": 1})
        run.summary["best"] = 1.0
    assert not run and stats["steps"] == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and "not installed" in warnings[0]


@pytest.mark.parametrize("enabled, mode", [(False, "offline"), (True, "disabled")])
def test_wandb_run_is_none_when_switched_off(enabled, mode, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with wbflow.wandb_run(project="test", enabled=enabled) as run:
        assert not run
        run.log({"x": 1})
        run.summary["best"] = 1.0
        assert wbflow.log_artifact(run, __file__, "nothing") is None
    assert not list(tmp_path.glob("wandb/*run-*"))


def test_wandb_run_finishes_with_exit_code_1_when_training_raises(offline_wandb):
    with pytest.raises(KeyboardInterrupt):
        with wbflow.wandb_run(project="test") as run:
            run.log({"x": 1.0}, step=1)
            raise KeyboardInterrupt
    log = run_logs(offline_wandb)[0]
    assert log.exit_code == 1 and log.values("x") == [1.0]


def test_wandb_run_resumes_the_same_run_id_and_steps_keep_increasing(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        run_id = run.id
        run.log({"train/loss": 1.0}, step=10)
    with wbflow.wandb_run(project="test", run_id=run_id) as run:
        assert run.id == run_id
        run.log({"train/loss": 0.5}, step=11)
    logs = run_logs(offline_wandb)
    assert [log.run_id for log in logs] == [run_id, run_id]
    assert [row["_step"] for log in logs for row in log.rows_with("train/loss")] == [10, 11]


def test_define_metric_through_the_guard_puts_epoch_metrics_on_the_epoch_axis(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        run.define_metric("epoch")
        for name in ["val/*", "train/epoch_loss"]:
            run.define_metric(name, step_metric="epoch")
    metrics = {(m.name or m.glob_name): m.step_metric for m in run_logs(offline_wandb)[0].metrics}
    assert metrics["val/*"] == "epoch" and metrics["train/epoch_loss"] == "epoch"


def test_watch_model_refuses_log_freq_below_100_and_logs_histograms(offline_wandb):
    model = linear_classifier()
    with pytest.raises(ValueError, match="log_freq"):
        wbflow.watch_model(None, model, log_freq=10)
    with wbflow.wandb_run(project="test") as run:
        wbflow.watch_model(run, model, log="all", log_freq=100)
        wbflow.train_epoch(model, linear_batches(100, batch_size=2), torch.optim.SGD(model.parameters(), lr=0.01),
                           CE_LOSS, log_every=50, progress=False,
                           on_log=lambda step, window: run.log({"train/loss": window["loss"]}, step=step))
    # wandb names the histograms of the n-th model watched in a process gradients/graph_<n>weight
    keys = {re.sub(r"/graph_\d+", "/", key) for key in set().union(*run_logs(offline_wandb)[0].history)}
    assert {"gradients/weight", "gradients/bias", "parameters/weight"} <= keys
    [gradients] = [key for key in set().union(*run_logs(offline_wandb)[0].history)
                   if key.startswith("gradients/") and key.endswith("weight")]
    assert run_logs(offline_wandb)[0].values(gradients)[0]["_type"] == "histogram"


# ----------------------------------------------------------------------------- checkpoints

def test_load_checkpoint_round_trips_tensors_and_plain_values(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "name": "x", "rng": torch.get_rng_state()}
    wbflow.save_checkpoint(state, tmp_path / "sub" / "c.pt")
    loaded = wbflow.load_checkpoint(tmp_path / "sub" / "c.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["c.pt"]


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


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


# ============================================================================= FID and Inception Score (parity with pytorch-fid / torch-fidelity)

FEATURE_TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def tensorflow_outputs(inception, images_uint8):
    return wbflow.inception_features(images_uint8, inception, resize="tensorflow")


def test_state_dict_keys_are_pytorch_fids(weights_path, monkeypatch):
    import pytorch_fid.inception as pytorch_fid_inception
    state_dict = torch.load(weights_path, weights_only=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda *args, **kwargs: state_dict)
    reference = pytorch_fid_inception.fid_inception_v3()
    assert set(reference.state_dict()) == set(wbflow.FIDInceptionV3().state_dict())


def test_features_differ_between_images(tensorflow_outputs):
    features, _ = tensorflow_outputs
    assert features.shape == (10, 2048)
    assert features.std(dim=0).mean() > 1000 * FEATURE_TOLERANCE


def _torch_fidelity_extractor(weights_path):
    import torch_fidelity.feature_extractor_inceptionv3 as extractor_module
    return extractor_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"],
        feature_extractor_weights_path=weights_path)


def test_unfused_model_gives_the_same_features(weights_path, images_uint8, tensorflow_outputs):
    unfused = wbflow.load_fid_inception(weights_path, fuse=False)
    features, _ = wbflow.inception_features(images_uint8, unfused)
    assert (features - tensorflow_outputs[0]).abs().max() < FEATURE_TOLERANCE


def test_inception_score_matches_torch_fidelity_isc(weights_path, inception, images_uint8,
                                                     tensorflow_outputs):
    import torch_fidelity.metric_isc as metric_isc
    _, logits = tensorflow_outputs
    with torch.no_grad():
        _, reference_logits = _torch_fidelity_extractor(weights_path)(images_uint8)
    expected = metric_isc.isc_features_to_metric(reference_logits, splits=5)
    mean, std = wbflow.inception_score(images_uint8, splits=5, inception=inception)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-5)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-3, abs=1e-6)
    assert wbflow.inception_score(logits, splits=5) == pytest.approx((mean, std), rel=1e-5, abs=1e-8)


def test_inception_score_of_logits_equals_torch_fidelity_exactly():
    import torch_fidelity.metric_isc as metric_isc
    logits = torch.randn(200, 1008, generator=torch.Generator().manual_seed(3)) * 3
    expected = metric_isc.isc_features_to_metric(logits)
    assert wbflow.inception_score(logits) == pytest.approx(
        (expected["inception_score_mean"], expected["inception_score_std"]), rel=1e-12)


def _random_statistics(dims, samples, seed):
    features = np.random.default_rng(seed).standard_normal((samples, dims)) @ np.diag(
        np.linspace(0.5, 2, dims))
    return wbflow.feature_statistics(torch.from_numpy(features + seed))


def test_singular_covariances_give_real_distance_equal_to_full_precision_value():
    real, fake = _random_statistics(64, 10, 1), _random_statistics(64, 12, 2)
    distance = wbflow.frechet_distance(*real, *fake)
    import scipy.linalg  # reference: sqrtm of the product, real part, in float64
    covariance_mean = scipy.linalg.sqrtm(real[1] @ fake[1]).real
    expected = (np.sum((real[0] - fake[0]) ** 2) + np.trace(real[1]) + np.trace(fake[1])
                - 2 * np.trace(covariance_mean))
    assert isinstance(distance, float) and np.isfinite(distance)
    assert distance == pytest.approx(expected, rel=1e-6)


feature_sets = arrays(np.float64, st.tuples(st.integers(3, 12), st.integers(2, 6)),
                      elements=st.floats(-10, 10, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(features=feature_sets)
@example(features=np.array([[0., -2, -2, -2, -2, -2], [-2, -2, -2, -2, -2, -2], [-2, -2, -2, -2, 1, -2],
                            [-2, -2, 2, -2, -2, -2], [-2, -2, -2, -2, -2, 0], [0, -2, -2, -2, -2, -2],
                            [-2, 2, -2, -2, -2, -2]]))  # a constant feature: its covariance's 0 rounds to -7e-15
def test_fid_of_a_set_with_itself_is_zero(features):
    features = torch.from_numpy(features)
    scale = 1 + features.square().sum().item()
    assert wbflow.fid(features, features) == pytest.approx(0, abs=1e-6 * scale)


@settings(max_examples=40, deadline=None)
@given(real=feature_sets, seed=st.integers(0, 1000))
def test_fid_is_symmetric_and_non_negative(real, seed):
    real = torch.from_numpy(real)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    fake = real * 0.5 + noise
    forward, backward = wbflow.fid(real, fake), wbflow.fid(fake, real)
    scale = 1 + real.square().sum().item() + fake.square().sum().item()
    assert forward == pytest.approx(backward, abs=1e-8 * scale)
    assert forward >= -1e-8 * scale


@settings(max_examples=40, deadline=None)
@given(real=feature_sets, seed=st.integers(0, 1000))
def test_frechet_distance_is_invariant_to_a_common_rotation(real, seed):
    real = torch.from_numpy(real)
    generator = torch.Generator().manual_seed(seed)
    fake = torch.randn(real.shape, generator=generator, dtype=torch.float64) * 2
    rotation, _ = torch.linalg.qr(torch.randn(real.shape[1], real.shape[1], generator=generator,
                                              dtype=torch.float64))
    scale = 1 + real.square().sum().item() + fake.square().sum().item()
    assert wbflow.fid(real @ rotation, fake @ rotation) == pytest.approx(
        wbflow.fid(real, fake), abs=1e-8 * scale)


def test_num_images_caps_each_side(inception, images_uint8):
    batches = torch.utils.data.DataLoader(images_uint8, batch_size=3)
    features, logits = wbflow.inception_features(batches, inception, num_images=4)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008)


def test_save_statistics_writes_pytorch_fid_npz_with_the_umask_and_reuses_it(weights_path, inception, images_uint8,
                                                                             tmp_path, monkeypatch):
    old_umask = os.umask(0o022)
    try:
        path = wbflow.save_statistics(images_uint8[:3], tmp_path, "toy", weights_path=weights_path)
    finally:
        os.umask(old_umask)
    assert os.path.basename(path) == f"toy-tensorflow-{wbflow.file_sha256(weights_path)[:12]}.npz"
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == [os.path.basename(path)]
    mu, sigma = wbflow.feature_statistics(wbflow.inception_features(images_uint8[:3], inception)[0])
    with np.load(path) as stored:
        assert np.array_equal(stored["mu"], mu) and np.array_equal(stored["sigma"], sigma)
    monkeypatch.setattr(wbflow, "inception_features", lambda *a, **k: pytest.fail("recomputed"))
    assert wbflow.save_statistics(images_uint8[:3], tmp_path, "toy", weights_path=weights_path) == path


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        wbflow.load_fid_inception(tmp_path / "absent.pth")


def test_weights_path_comes_from_the_argument_then_the_environment_then_the_hub_cache(weights_path, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    assert wbflow.fid_weights_path() == weights_path
    (tmp_path / "other.pth").write_bytes(b"")
    assert wbflow.fid_weights_path(tmp_path / "other.pth") == str(tmp_path / "other.pth")  # the argument wins
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "from_env.pth"))
    with pytest.raises(FileNotFoundError, match="from_env.pth"):
        wbflow.fid_weights_path()
    monkeypatch.delenv("WBFLOW_FID_WEIGHTS")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    downloaded = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *args, **kwargs: downloaded.append(url))
    hub_path = os.path.join(str(tmp_path), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    assert wbflow.fid_weights_path() == hub_path
    assert downloaded == ["https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                          "pt_inception-2015-12-05-6726825d.pth"]


def test_fid_refuses_images_outside_zero_one_and_wrong_shapes(inception):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wbflow.inception_features(torch.rand(2, 3, 8, 8) * 2 - 1, inception)
    with pytest.raises(ValueError, match="shape"):
        wbflow.inception_features(torch.rand(2, 8, 8), inception)


def test_offline_without_weights_says_which_file_to_put_where(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.delenv(wbflow.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected_path = os.path.join(str(tmp_path), "checkpoints", wbflow.FID_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError) as error:
        wbflow.fid_weights_path()
    assert expected_path in str(error.value) and wbflow.FID_WEIGHTS_URL in str(error.value)
    checkpoint = tmp_path / "flow.pt"
    wbflow.save_checkpoint({"config": {"model": {"base_channels": 8, "channel_mults": (1,), "num_res_blocks": 1,
                                                  "attention_resolutions": (), "head_channels": 8}},
                            "ema": wbflow.make_ema(wbflow.FlowUNet(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                                                                   attention_resolutions=(), head_channels=8)).state_dict(),
                            "epoch": 1, "global_step": 2}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:  # the driver ends with the message, not a traceback
        train_flow.main(["--eval", "--smoke", "--checkpoint", str(checkpoint), "--num-samples", "4", "--nfe", "1",
                         "--data-dir", str(tmp_path)])
    assert expected_path in str(exit_info.value.code)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "hostile.pth"
    with open(path, "wb") as file:
        pickle.dump({"fc.weight": _RunsCodeWhenUnpickled()}, file)
    with pytest.raises(ValueError, match="weights_only"):
        wbflow.load_fid_inception(path)


def test_weights_file_with_other_keys_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="keys"):
        wbflow.load_fid_inception(path)


# ============================================================================= rectified flow: data, model, samplers, train_flow.py

TINY_UNET = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, head_channels=16, dropout=0.0)


def write_cifar_batches(data_dir, per_batch=40, test_images=20, seed=0):
    """CIFAR-10's python layout (data_batch_1..5, test_batch, batches.meta) with small learnable images."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = wbflow.synthetic_images(5 * per_batch + test_images, seed=seed).numpy().reshape(-1, 3072)
    labels = np.random.RandomState(seed).randint(0, 10, len(images)).tolist()
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        rows = slice(index * per_batch, index * per_batch + (per_batch if index < 5 else test_images))
        with open(folder / name, "wb") as file:
            pickle.dump({"batch_label": name, "data": images[rows], "labels": labels[rows],
                         "filenames": [f"{i}.png" for i in range(len(images[rows]))]}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch}, file)
    return images.reshape(-1, 3, 32, 32), labels


@pytest.fixture
def cifar_dir(tmp_path):
    write_cifar_batches(tmp_path / "data")
    return tmp_path / "data"


def test_load_cifar10_reads_the_pickle_batches_as_one_uint8_tensor(tmp_path):
    images, labels = write_cifar_batches(tmp_path)
    train_images, train_labels = wbflow.load_cifar10(tmp_path, download=False)
    test_images, _ = wbflow.load_cifar10(tmp_path, train=False, download=False)
    assert train_images.dtype == torch.uint8 and train_images.shape == (200, 3, 32, 32)
    assert torch.equal(train_images, torch.from_numpy(images[:200]))
    assert train_labels.tolist() == labels[:200] and test_images.shape == (20, 3, 32, 32)


def test_load_cifar10_refuses_a_batch_file_that_carries_code(tmp_path):
    write_cifar_batches(tmp_path)
    created = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as file:
        pickle.dump({"data": _Hostile(str(created)), "labels": []}, file)
    with pytest.raises(ValueError, match="data_batch_3"):
        wbflow.load_cifar10(tmp_path, download=False)
    assert not created.exists()


def test_load_cifar10_offline_says_which_archive_to_put_where(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(FileNotFoundError) as error:
        wbflow.load_cifar10(tmp_path / "data")
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "data") in message
    assert wbflow.CIFAR10_URL in message


@pytest.mark.parametrize("rank", [0, 1])
def test_load_cifar10_under_ddp_downloads_on_rank_0_while_the_other_ranks_wait(tmp_path, rank, monkeypatch):
    events = []

    def download(*args, **kwargs):  # what torchvision's download leaves in the folder
        events.append("download")
        write_cifar_batches(tmp_path)

    def barrier():  # rank 1 waits here while rank 0 downloads
        events.append("barrier")
        if rank == 1:
            download()
    monkeypatch.setattr(wbflow, "rank_and_world_size", lambda: (rank, 2))
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10", download)
    monkeypatch.setattr(wbflow.dist, "barrier", barrier)
    images, _ = wbflow.load_cifar10(tmp_path)
    assert events == (["download", "barrier"] if rank == 0 else ["barrier", "download"])  # rank 1 never downloads
    assert images.shape == (200, 3, 32, 32)


def test_driver_without_data_offline_exits_with_the_message_and_no_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(SystemExit) as exit_info:
        train_flow.main(["--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out"), "--no-wandb",
                         "--set", "eval.fid_interval=0"])  # FID's missing weights would be named first
    assert "cifar-10-python.tar.gz" in str(exit_info.value.code)


def _ids_loader(count=100, batch_size=16, **kwargs):
    """Images whose pixel (0, 0, 0) is the index and whose left half is 0, right half 255 (flip visible)."""
    images = torch.zeros(count, 3, 4, 4, dtype=torch.uint8)
    images[:, :, :, 2:] = 255
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    images[:, 0, 0, 3] = torch.arange(count, dtype=torch.uint8)
    return wbflow.DeviceImageLoader(images, batch_size, **kwargs)


def _ids(batch):
    uint8 = ((batch + 1) * 127.5).round().long()
    return uint8[:, 0, 0, 0].tolist(), (uint8[:, 1, 0, 0] == 255).tolist()


def test_device_loader_yields_a_seeded_permutation_in_minus_one_to_one_with_random_flips():
    loader = _ids_loader(seed=3)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(b.shape == (16, 3, 4, 4) for b in batches)
    assert all(b.dtype == torch.float32 and b.min() >= -1 and b.max() <= 1 for b in batches)
    ids, flipped = zip(*[_ids(b) for b in batches])
    ids, flipped = sum(ids, []), sum(flipped, [])
    assert len(set(ids)) == 96 and ids != sorted(ids)  # no repeats, shuffled, last partial batch dropped
    assert 25 < sum(flipped) < 71  # about half flipped
    loader.set_epoch(1)
    assert sum([_ids(b)[0] for b in loader], []) == ids  # the order is a function of (seed, epoch)
    loader.set_epoch(2)
    assert sum([_ids(b)[0] for b in loader], []) != ids


def test_device_loader_shards_one_permutation_across_ranks():
    shards = []
    for rank in range(2):
        loader = _ids_loader(count=64, batch_size=8, seed=0, rank=rank, world_size=2, drop_last=False)
        loader.set_epoch(5)
        shards.append(sum([_ids(b)[0] for b in loader], []))
    assert len(shards[0]) == len(shards[1]) == 32 and sorted(shards[0] + shards[1]) == list(range(64))


@pytest.mark.parametrize("count, batch_size, drop_last", [(255, 64, True), (17, 4, False), (9, 2, True)])
def test_device_loader_gives_every_rank_the_same_number_of_batches(count, batch_size, drop_last):
    """Unequal batch counts would leave DDP ranks waiting for each other forever."""
    lengths = []
    for rank in range(2):
        loader = _ids_loader(count=count, batch_size=batch_size, seed=0, rank=rank, world_size=2, drop_last=drop_last)
        lengths.append((len(loader), len(list(loader))))
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] > 0


def test_rectified_flow_loss_regresses_the_straight_line_velocity():
    seen = {}

    def model(x, t, labels=None):
        seen["x"], seen["t"], seen["labels"] = x, t, labels
        return torch.zeros_like(x)

    data, labels = torch.randn(8, 3, 4, 4), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    loss = wbflow.rectified_flow_loss(model, (data, labels))
    torch.manual_seed(0)
    noise, t = torch.randn_like(data), torch.rand(8)
    torch.testing.assert_close(seen["t"], t)
    assert seen["labels"] is labels  # an (x1, labels) batch trains a class-conditional model
    torch.testing.assert_close(seen["x"], t.view(-1, 1, 1, 1) * data + (1 - t.view(-1, 1, 1, 1)) * noise)
    torch.testing.assert_close(loss, ((data - noise) ** 2).mean())


def test_default_flow_unet_is_torchcfms_cifar10_recipe_with_35_7m_parameters():
    model = wbflow.FlowUNet()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {32}
    attention_channels = [m.qkv.in_channels for m in model.modules() if isinstance(m, wbflow._FlowAttention)]
    assert attention_channels == [256] * 6  # 2 down + 3 up blocks at 16x16, 1 in the middle


@pytest.mark.parametrize("base_channels", [8, 16, 32, 64])
def test_flow_unet_output_depends_on_x_and_t_at_every_width(base_channels):
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**{**TINY_UNET, "base_channels": base_channels})
    for module in model.modules():  # undo only the zero initialisation, so the output is not zero
        if isinstance(module, nn.Conv2d) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([0.1, 0.1]))
        changed_t = model(x, torch.tensor([0.9, 0.9]))
        changed_x = model(x.flip(3), torch.tensor([0.1, 0.1]))
    assert out.shape == x.shape
    scale = out.abs().max()
    # a time-blind block (one channel per GroupNorm group) moved the output by ~1e-6 of its scale
    assert (out - changed_t).abs().max() > 1e-3 * scale
    assert (out - changed_x).abs().max() > 1e-3 * scale


# FlowUNet's state_dict as checkpoints hold it (the recipe's model and --smoke's), frozen as the count and sha256 of
# its "key shape" lines: a model built for the time t alone keeps exactly these, so every checkpoint still loads
FLOW_UNET_STATE_DICTS = {
    "default": ({}, 304, "0a02e89f4bd0bf0b6e135a703609bea22cf42d6cd8daa6cf52bf4c21f32d9385"),
    "smoke": (dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, head_channels=16, dropout=0.0), 128,
              "0f8441b803c4cc1c55bad500010374792c8efb0c21b60356a1cd2935663324ba")}


@pytest.mark.parametrize("name", FLOW_UNET_STATE_DICTS)
def test_flow_unet_keeps_the_state_dict_keys_and_shapes_its_checkpoints_were_written_with(name):
    model_config, count, sha256 = FLOW_UNET_STATE_DICTS[name]
    with torch.device("meta"):  # shapes without the weights
        state = wbflow.FlowUNet(**model_config).state_dict()
    lines = "".join(f"{key} {tuple(value.shape)}\n" for key, value in state.items())
    assert (len(state), hashlib.sha256(lines.encode()).hexdigest()) == (count, sha256)


def test_a_saved_flow_unet_loads_strictly_and_gives_the_same_velocity_with_r_and_labels_none(tmp_path):
    torch.manual_seed(0)
    saved = wbflow.FlowUNet(**TINY_UNET)
    for parameter in saved.parameters():
        nn.init.normal_(parameter, std=0.05)
    torch.save(saved.state_dict(), tmp_path / "flow_unet.pt")
    loaded = wbflow.FlowUNet(**TINY_UNET)
    loaded.load_state_dict(torch.load(tmp_path / "flow_unet.pt", weights_only=True))  # strict: every key, no other
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        expected = saved.eval()(x, t)
        assert torch.equal(loaded.eval()(x, t), expected)
        assert torch.equal(loaded(x, t, r=None, labels=None), expected)


def test_flow_unet_embeds_t_alone_as_guided_diffusions_sinusoidal_features_through_time_embed():
    model, t = wbflow.FlowUNet(**TINY_UNET), torch.tensor([0.0, 0.25, 1.0])
    frequencies = torch.exp(-math.log(10000) * torch.arange(8) / 8)  # base_channels 16: 8 of each
    features = torch.cat([torch.cos(t[:, None] * frequencies), torch.sin(t[:, None] * frequencies)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(t), model.time_embed(features), rtol=0, atol=0)


@pytest.mark.parametrize("extra", ["r", "labels"])
def test_a_flow_unet_built_for_t_alone_refuses_r_or_labels_with_a_value_error(extra):
    model = wbflow.FlowUNet(**TINY_UNET)
    given = {"r": torch.ones(2), "labels": torch.zeros(2, dtype=torch.long)}[extra]
    with pytest.raises(ValueError, match=rf"^FlowUNet: {extra} given, but this model was built for the time t alone$"):
        model(torch.randn(2, 3, 32, 32), torch.rand(2), **{extra: given})


def test_channels_last_and_bf16_autocast_paths_match_the_float32_contiguous_ones():
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(8), 4, channels_last=True)
    images = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)
    t = torch.rand(4)
    with torch.no_grad():
        expected = model(images.contiguous(), t)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(images, t), expected,
                                   rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wbflow.rectified_flow_loss(model, images)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    noise = torch.randn(4, 3, 32, 32)
    samples = wbflow.euler_sample(model, noise, 4, amp_dtype=torch.bfloat16)
    assert samples.dtype == torch.float32
    assert (samples - wbflow.euler_sample(model, noise, 4)).abs().max() < 0.1


class _LinearField(nn.Module):
    """v(x, t) = a * x, so x(1) = x(0) * exp(a); counts evaluations and records (inference mode, training mode)
    of each."""

    def __init__(self, a=1.0):
        super().__init__()
        self.a, self.calls, self.modes = a, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.modes.append((torch.is_inference_mode_enabled(), self.training))
        return self.a * x


def test_euler_and_heun_converge_at_first_and_second_order_with_steps_and_2x_steps_evaluations():
    noise = torch.randn(4, 3, 8, 8)
    exact = noise * math.e
    errors = {}
    for name, evaluations in [("euler", 1), ("heun", 2)]:
        for steps in (10, 20):
            field = _LinearField().train()  # the caller's mode: the sampler leaves it as it is
            samples = wbflow.euler_sample(field, noise, steps, heun=name == "heun")
            assert field.calls == evaluations * steps and set(field.modes) == {(True, True)} and field.training
            errors[name, steps] = (samples - exact).abs().max().item()
    assert 1.8 < errors["euler", 10] / errors["euler", 20] < 2.2
    assert 3.6 < errors["heun", 10] / errors["heun", 20] < 4.4
    assert errors["heun", 10] < errors["euler", 20] / 10


def test_rk45_is_accurate_and_reports_the_evaluations_it_used():
    noise = torch.randn(2, 3, 4, 4)
    field = _LinearField()
    samples, nfe = wbflow.rk45_sample(field, noise, tolerance=1e-6)
    torch.testing.assert_close(samples, noise * math.e, rtol=1e-5, atol=1e-5)
    assert nfe == field.calls and 6 <= nfe < 200


def test_compare_solvers_gives_one_row_per_solver_and_budget():
    rows = wbflow.compare_solvers(_LinearField(), torch.randn(2, 3, 4, 4), nfes=(1, 2, 4), tolerance=1e-3)
    assert [(row["solver"], row["nfe"]) for row in rows[:5]] == [
        ("euler", 1), ("euler", 2), ("euler", 4), ("heun", 2), ("heun", 4)]
    assert rows[5]["solver"] == "rk45" and rows[5]["nfe"] > 0 and len(rows) == 6


def test_euler_and_heun_sample_a_model_bit_for_bit_as_a_hand_written_loop_does_in_the_callers_mode():
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**{**TINY_UNET, "dropout": 0.3}).eval()  # the caller's eval mode: no dropout
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    noise, steps = torch.randn(2, 3, 32, 32), 3
    times = torch.linspace(0.0, 1.0, steps + 1).tolist()
    euler, heun = noise.clone(), noise.clone()
    with torch.inference_mode():
        for t_now, t_next in zip(times[:-1], times[1:]):
            dt, now, after = t_next - t_now, torch.full((2,), t_now), torch.full((2,), t_next)
            euler.add_(model(euler, now), alpha=dt)
            velocity = model(heun, now)
            heun.add_((velocity + model(heun + dt * velocity, after)) / 2, alpha=dt)
    assert torch.equal(wbflow.euler_sample(model, noise, steps), euler)
    assert torch.equal(wbflow.sample_flow(model, noise, "heun", 2 * steps)[0], heun)
    assert not torch.equal(wbflow.euler_sample(model.train(), noise, steps), euler)  # dropout on: the mode is as given


def test_every_sampler_takes_a_plain_velocity_function_and_runs_it_in_inference_mode_under_amp_dtype():
    calls = []

    def velocity(x, t):  # v = 1 + 2t: x(1) = x(0) + 2
        calls.append((t.shape, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")
                      and torch.get_autocast_dtype("cpu")))
        return (1 + 2 * t)[:, None].expand_as(x)

    noise = torch.randn(3, 2)
    torch.testing.assert_close(wbflow.euler_sample(velocity, noise, 4, heun=True, amp_dtype=torch.bfloat16), noise + 2)
    assert set(calls) == {((3,), True, torch.bfloat16)} and len(calls) == 8
    calls.clear()
    samples, nfe = wbflow.rk45_sample(velocity, noise, tolerance=1e-6)
    torch.testing.assert_close(samples, noise + 2)
    assert len(calls) == nfe and set(calls) == {((3,), True, False)}
    rows = wbflow.compare_solvers(velocity, noise, nfes=(1, 2), amp_dtype=torch.bfloat16)
    assert [(row["solver"], row["nfe"]) for row in rows][:3] == [("euler", 1), ("euler", 2), ("heun", 2)]
    torch.testing.assert_close(rows[2]["images"], noise + 2)  # Heun: exact for v linear in t
    # the velocities at t = 0, 1/4, 2/4, 3/4: 1 + 2t has variance 4 * 5/64 over them
    assert wbflow.straightness(velocity, noise, steps=4, amp_dtype=torch.bfloat16) == pytest.approx(20 / 64)
    images_uint8, nfe = wbflow.sample_images(velocity, 3, device="cpu", shape=(2,), solver="heun", nfe=2, seed=5)
    generator = torch.Generator().manual_seed(5)
    assert nfe == 2 and torch.equal(images_uint8, wbflow.images_to_uint8(torch.randn(3, 2, generator=generator) + 2))


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 64), a=st.floats(-4, 4), b=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_euler_is_exact_for_a_constant_velocity_and_heun_for_one_linear_in_t(steps, a, b, seed):
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed))

    def linear(x, t):
        return (a + b * t)[:, None].expand_as(x)

    def close(samples, expected):  # float32 steps of values up to about 16
        torch.testing.assert_close(samples, expected, rtol=0, atol=1e-4)

    close(wbflow.euler_sample(lambda x, t: torch.full_like(x, a), noise, steps), noise + a)
    close(wbflow.euler_sample(linear, noise, steps, heun=True), noise + a + b / 2)
    close(wbflow.euler_sample(linear, noise, steps), noise + a + b / 2 - b / (2 * steps))  # Euler: a left Riemann sum


def _mixture_of_gaussians(count, generator, modes=8, radius=4.0, std=0.3):
    angles = 2 * math.pi * torch.randint(0, modes, (count,), generator=generator) / modes
    centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres + std * torch.randn(count, 2, generator=generator)


class _TimeMLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.expand(x.shape[0])[:, None]], dim=1))


def test_objective_and_sampler_learn_a_2d_mixture_of_gaussians():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = _TimeMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches = [_mixture_of_gaussians(256, generator) for _ in range(1500)]
    wbflow.train_epoch(model, batches, optimizer, wbflow.rectified_flow_loss, progress=False, log_every=10**6,
                       scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1 / 100, total_iters=99), grad_clip=1.0)
    data, noise = _mixture_of_gaussians(4000, generator), torch.randn(4000, 2, generator=generator)
    samples = wbflow.euler_sample(model, noise, 50)

    def frechet(points):
        return wbflow.frechet_distance(*wbflow.feature_statistics(points), *wbflow.feature_statistics(data))

    assert frechet(noise) > 5.0 and frechet(samples) < frechet(noise) / 20
    centres = 4.0 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1)
    nearest = torch.cdist(samples, centres).min(dim=1)
    assert (nearest.values < 1.0).float().mean() > 0.8  # mass on the modes, not just matching moments
    assert nearest.indices.bincount(minlength=8).min() > 4000 / 8 / 3  # and every mode covered


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    wbflow.save_checkpoint({"rng": wbflow.capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.randn(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    wbflow.restore_rng_state(wbflow.load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_linear_lr_warmup_rises_linearly_then_stays_constant_and_resumes(tmp_path):
    """train_flow's warm-up: LinearLR(1 / warmup_steps, total_iters=warmup_steps - 1) is lr * (step + 1) / warmup_steps."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / 4, total_iters=3)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    wbflow.save_checkpoint({"scheduler": scheduler.state_dict()}, tmp_path / "s.pt")
    fresh_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    fresh = torch.optim.lr_scheduler.LinearLR(fresh_optimizer, 1 / 4, total_iters=3)
    fresh.load_state_dict(wbflow.load_checkpoint(tmp_path / "s.pt")["scheduler"])
    assert fresh.last_epoch == 6 and fresh.get_last_lr() == pytest.approx([0.1])


def test_load_yaml_config_applies_typed_overrides_and_rejects_unknown_keys():
    path = HERE / "configs" / "cifar10_rectified_flow.yaml"
    config = wbflow.load_yaml_config(path, ["training.gradient_clip=0.5", "model.channel_mults=[1, 2]",
                                               "logging.entity=null", "training.learning_rate=1e-3"])
    assert config["training"]["gradient_clip"] == 0.5 and config["model"]["channel_mults"] == [1, 2]
    assert config["logging"]["entity"] is None and config["training"]["learning_rate"] == 1e-3
    seed_keys = {"use_wandb", "project_name", "entity", "run_name", "tags", "notes", "log_images_interval",
                 "log_model_interval"}
    assert seed_keys <= set(config["logging"])
    assert {"log_interval", "save_interval", "sample_interval", "gradient_clip"} <= set(config["training"])
    with pytest.raises(KeyError, match="training.gradient_clp"):
        wbflow.load_yaml_config(path, ["training.gradient_clp=0.5"])


def test_fetch_checkpoint_downloads_the_model_artifact(tmp_path, monkeypatch):
    import wandb
    asked = {}

    class FakeArtifact:
        def download(self, root=None):
            folder = tmp_path / "artifact"
            folder.mkdir()
            wbflow.save_checkpoint({"epoch": 10}, folder / "checkpoint_epoch_10.pt")
            return str(folder)

    class FakeApi:
        default_entity = "me"

        def artifact(self, name, type=None):
            asked["name"], asked["type"] = name, type
            return FakeArtifact()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    path = wbflow.fetch_checkpoint("model-epoch-10", project="flow")
    assert asked == {"name": "me/flow/model-epoch-10:latest", "type": "model"}
    assert wbflow.load_checkpoint(path)["epoch"] == 10
    assert wbflow.fetch_checkpoint(path) == path
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        wbflow.fetch_checkpoint(str(tmp_path / "missing.pt"))


def test_driver_accepts_the_seed_spelling_of_the_eval_flags_and_plain_training_flags():
    args = train_flow.parse_args(["--eval", "--checkpoint", "c.pt", "--num_samples", "10000", "--metric", "both",
                                  "--use_wandb", "--wandb_project", "flow_matching_cifar10_eval"])
    assert args.num_samples == 10000 and args.use_wandb and args.wandb_project == "flow_matching_cifar10_eval"
    config = train_flow.load_config(train_flow.parse_args(
        ["--data-dir", "/d", "--out-dir", "/o", "--epochs", "3", "--batch-size", "64", "--no-wandb",
         "--set", "training.gradient_clip=0.5", "--set", "logging.tags=[a, b]"]))
    assert (config["data"]["data_dir"], config["data"]["out_dir"]) == ("/d", "/o")
    assert (config["training"]["epochs"], config["training"]["batch_size"]) == (3, 64)
    assert config["training"]["gradient_clip"] == 0.5 and config["logging"]["tags"] == ["a", "b"]
    assert config["logging"]["use_wandb"] is False


SMALL = ["--set", "data.max_images=64", "--set", "training.log_interval=1"]


def _table_data(wandb_dir, run_id=""):
    """Columns and rows of the eval/samples_table a run under wandb_dir wrote (the one with run_id)."""
    [path] = glob.glob(str(Path(wandb_dir) / "wandb" / f"*run-*{run_id}" / "files" / "media" / "table" / "eval" /
                           "samples_table_*.table.json"))
    table = json.loads(Path(path).read_text())
    return table["columns"], table["data"]


def tiny_flow_checkpoint(path):
    """A train_flow checkpoint of an untrained 8-channel FlowUNet, all --eval reads."""
    model_config = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                    "head_channels": 8, "dropout": 0.0}
    ema = wbflow.make_ema(wbflow.FlowUNet(**model_config))
    return wbflow.save_checkpoint({"ema": ema.state_dict(), "config": {"model": model_config}, "epoch": 1,
                                   "global_step": 2, "driver": "train_flow"}, path)


def test_eval_samples_the_checkpoints_ema_model_in_eval_mode_on_its_device(tmp_path, monkeypatch, weights_path):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    checkpoint = tiny_flow_checkpoint(tmp_path / "checkpoint_epoch_1.pt")
    seen = []

    def sample_images(velocity, count, **options):  # what --eval hands the sampler; then a stop, as Ctrl-C's
        seen.append((velocity.training, options["device"], count))
        return None, None

    monkeypatch.setattr(wbflow, "sample_images", sample_images)
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(["--smoke", "--eval", "--checkpoint", str(checkpoint), "--metric", "is", "--num-samples", "3",
                         "--out-dir", str(tmp_path / "out")])
    assert stopped.value.code == 128 + signal.SIGINT and seen == [(False, torch.device("cpu"), 3)]


def test_eval_logs_fid_and_inception_score_against_cached_training_statistics(offline_wandb, cifar_dir, tmp_path,
                                                                               monkeypatch, weights_path):
    out_dir = tmp_path / "out"
    checkpoint = tiny_flow_checkpoint(tmp_path / "checkpoint_epoch_1.pt")
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    flags = ["--smoke", "--eval", "--checkpoint", str(checkpoint), "--num-samples", "10",
             "--metric", "both", "--solver", "heun", "--nfe", "4", "--data-dir", str(cifar_dir),
             "--out-dir", str(out_dir), "--set", "eval.num_real_images=20"]
    metrics = train_flow.main(flags + ["--use-wandb", "--wandb-project", "flow_eval"])
    [log] = run_logs(offline_wandb)
    for key in ("eval/fid_score", "eval/inception_score_mean", "eval/inception_score_std"):
        assert log.summary[key] == pytest.approx(metrics[key]) and math.isfinite(metrics[key])
    assert metrics["eval/fid_score"] >= 0 and metrics["eval/inception_score_mean"] >= 1
    assert log.values("eval/sample_images")[0]["_type"] == "image-file"
    assert log.config["solver"] == "heun" and log.config["nfe"] == 4
    [statistics] = (out_dir / "fid_stats").glob("cifar10-train-20-*-tensorflow-*.npz")  # never in the data folder
    assert not (cifar_dir / "fid_stats").exists()
    assert np.load(statistics)["num_images"] == 20  # eval.num_real_images: the first 20 of the 200

    cached = statistics.stat()  # reused, not written again (os.replace would give a new inode)
    again = train_flow.main(flags + ["--metric", "fid"])  # W&B off without --use-wandb
    assert again["eval/fid_score"] == pytest.approx(metrics["eval/fid_score"], rel=1e-6)
    assert len(run_logs(offline_wandb)) == 1 and (statistics.stat().st_ino, statistics.stat().st_mtime_ns) == (
        cached.st_ino, cached.st_mtime_ns)


# ============================================================================= fire-safety classifier: data, losses, train_fire.py

SEED_CLASSES = ["高风险", "中风险", "低风险", "无风险", "非楼道"]


def pattern_image(label, rng, size=32):
    """A noisy black-and-white pattern whose class is its shape, not its colour: horizontal stripes,
    vertical stripes, a checkerboard, diagonal stripes, or blank."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    shift_y, shift_x = rng.integers(0, 8, 2)
    rows, cols = (y + shift_y) // 4 % 2, (x + shift_x) // 4 % 2
    on = [rows, cols, rows ^ cols, (x + y + shift_x) // 4 % 2, np.zeros_like(x)][label % 5]
    pixels = np.where(on[..., None] == 1, 220, 35) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_pattern_folders(root, per_class, classes=SEED_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pattern_image(label, rng).save(root / name / f"{index}.png")
    return root


def fire_args(data_dir, out_dir, *extra):
    """A tiny train_fire run's flags; best_model.pth follows val_acc, as the tests of its keys expect (the default,
    val_score for the competition's classes, has tests of its own in test_competition.py)."""
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--model", "resnet18", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--learning-rate", "0.001", "--num-workers", "0",
            "--project", "test", "--best-metric", "val_acc", *extra]


def logged_media(row, key):
    """A media value in a history row: a dict under `key`, or flattened into `key/...` items."""
    if key in row:
        return row[key]
    return {name[len(key) + 1:]: value for name, value in row.items() if name.startswith(key + "/")}


def custom_chart(config, key):
    """The panel wandb.plot.* registers for `key` in the run config (nested or flattened)."""
    return config.get("_wandb", {}).get("visualize", {}).get(key) or config.get(f"_wandb/visualize/{key}")


def table_json(wandb_dir, key):
    [path] = glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", "files", "media", "table", f"{key}_*.table.json"))
    return json.loads(Path(path).read_text())


def test_train_fire_learns_patterns_and_logs_the_seed_workflow(offline_wandb, tmp_path, monkeypatch):
    data = write_pattern_folders(tmp_path / "data", per_class=15)  # 12 train, 3 val a class: 7 steps an epoch
    (data / "高风险" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "checkpoints"
    watched, real_watch_model = [], wbflow.watch_model
    monkeypatch.setattr(wbflow, "watch_model", lambda *a, **k: watched.append(k) or real_watch_model(*a, **k))
    argv = fire_args(data, out, "--epochs", "4", "--watch", "--num-predictions", "10")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        best_acc = train_fire.main(argv)
    assert best_acc >= 90.0
    # wandb.watch(model, log="all", log_freq=100); test_watch_model_... shows its histograms
    assert watched == [{"log": "all", "log_freq": 100, "log_graph": False}]

    [log] = run_logs(offline_wandb)
    assert log.exit_code == 0
    for key, value in vars(train_fire.parse_args(argv)).items():  # every setting as given
        if key not in ("resume", "optimizer", "amp", "score_weights"):
            assert log.config[key] == value, key
    for key, value in {"optimizer": "Adam", "loss_function": "CrossEntropyLoss", "scheduler": "CosineAnnealingLR",
                       "amp": "off", "device": "cpu", "world_size": 1, "train_images": 60, "val_images": 15,
                       "steps_per_epoch": 7, "classes": sorted(SEED_CLASSES),  # and what they became
                       "score_weights": [1.5, 1.0, 1.0, 1.0, 2.0]}.items():  # the competition's, in the classes' order
        assert log.config[key] == value, key

    # every 10 batches (train_epoch's global step) and the rest of each 7-step epoch at its end
    batch_rows = log.rows_with("batch")
    assert [row["_step"] for row in batch_rows] == [7, 10, 14, 20, 21, 28]
    for row in batch_rows:
        assert {"epoch", "batch", "train_loss", "train_acc", "learning_rate"} <= set(row)
    learning_rates = [row["learning_rate"] for row in batch_rows]
    assert learning_rates == sorted(learning_rates, reverse=True) and learning_rates[0] < 0.001

    epoch_rows = log.rows_with("val_acc")
    assert [(row["epoch"], row["_step"]) for row in epoch_rows] == [(0, 7), (1, 14), (2, 21), (3, 28)]
    for row in epoch_rows:  # an epoch ends on a window's step: the row keeps both, under their own keys
        assert {"epoch/train_loss", "epoch/train_acc", "val_loss", "val_acc", "train_loss", "train_acc"} <= set(row)
    assert epoch_rows[0]["train_loss"] == pytest.approx(epoch_rows[0]["epoch/train_loss"])  # its window: the epoch
    step_metrics = {(m.name or m.glob_name): m.step_metric for m in log.metrics}
    for key in ("epoch/train_loss", "epoch/train_acc", "val_loss", "val_acc", "best_val_acc"):
        assert step_metrics[key] == "epoch"
    assert log.summary["val_acc"] == {"max": max(log.values("val_acc"))}
    assert log.summary["epoch/train_loss"] == {"min": min(log.values("epoch/train_loss"))}
    best_so_far = np.maximum.accumulate(log.values("val_acc"))
    improved = [i for i in range(4) if i == 0 or best_so_far[i] > best_so_far[i - 1]]
    assert [row["epoch"] for row in log.rows_with("best_val_acc")] == improved
    assert log.values("best_val_acc") == [best_so_far[i] for i in improved]
    assert log.summary["best_val_acc"] == best_acc == max(log.values("val_acc"))

    # the best model: one artifact version per improvement, aliases best + latest + epoch-N, the seed's metadata
    models = [artifact for artifact in log.artifacts if artifact["type"] == "model"]
    assert [artifact["metadata"]["epoch"] for artifact in models] == improved
    assert [artifact["metadata"]["global_step"] for artifact in models] == [7 * (epoch + 1) for epoch in improved]
    for artifact in models:
        assert artifact["name"] == f"model-{log.run_id}" and artifact["files"] == ["best_model.pth"]
        assert set(artifact["aliases"]) == {"best", "latest", f"epoch-{artifact['metadata']['epoch']}"}
        assert artifact["metadata"]["config"]["model"] == "resnet18"
    best = wbflow.load_checkpoint(out / "best_model.pth")
    assert best["val_acc"] == best_acc and best["epoch"] == improved[-1]

    # after training: predictions table, confusion matrix, per-class precision and recall
    [report] = [row for row in log.history if logged_media(row, "predictions")]
    assert report["_step"] == 29
    for key in ("predictions", "confusion_matrix_table", "per_class_metrics"):
        assert logged_media(report, key)["_type"] == "table-file"
    assert custom_chart(log.config, "confusion_matrix")["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"
    confusion = table_json(offline_wandb, "confusion_matrix_table")
    assert confusion["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert sum(row[2] for row in confusion["data"]) == 15
    predictions = table_json(offline_wandb, "predictions")
    assert predictions["columns"] == ["image", "true", "predicted", "confidence"]
    assert len(predictions["data"]) == 10  # --num-predictions, spread over the classes
    assert {row[1] for row in predictions["data"]} == set(SEED_CLASSES)
    assert all(0 < row[3] <= 1 for row in predictions["data"])
    # the run's table artifact holds the table with its 10 images
    [table_artifact] = [a for a in log.artifacts if a["type"] == "run_table" and a["name"].endswith("-predictions")]
    assert sum(path.startswith("media/images/") for path in table_artifact["files"]) == 10
    per_class = table_json(offline_wandb, "per_class_metrics")
    assert per_class["columns"] == ["class", "precision", "recall", "support"]
    assert sorted(row[0] for row in per_class["data"]) == sorted(SEED_CLASSES)
    for name in SEED_CLASSES:
        assert 0 <= log.summary[f"precision/{name}"] <= 1 and 0 <= log.summary[f"recall/{name}"] <= 1


def test_crashed_run_resumes_in_a_new_wandb_run_for_the_remaining_epochs_and_keeps_the_best_file(
        offline_wandb, tmp_path, monkeypatch):
    data = write_pattern_folders(tmp_path / "data", per_class=8)
    out = tmp_path / "checkpoints"
    argv = fire_args(data, out, "--epochs", "3", "--loss", "focal", "--optimizer", "adamw",
                     "--class-weights", "balanced")
    real_train_epoch, real_predict_logits = wbflow.train_epoch, wbflow.predict_logits
    val_accs = iter([50.0, 80.0, 60.0])  # epoch 2, after the resume, must not replace epoch 1's best

    def killed_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    def scripted_predictions(*args, **kwargs):  # that share of the validation images right; then the report's
        logits, labels = real_predict_logits(*args, **kwargs)
        accuracy = next(val_accs, None)
        if accuracy is None:
            return logits, labels
        right = torch.arange(len(labels)) < round(accuracy * len(labels) / 100)
        return F.one_hot(torch.where(right, labels, (labels + 1) % 5), 5).float(), labels

    monkeypatch.setattr(wbflow, "predict_logits", scripted_predictions)
    monkeypatch.setattr(wbflow, "train_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_fire.main(argv)
    best_file_after_kill = (out / "best_model.pth").read_bytes()
    assert wbflow.load_checkpoint(out / "last.pth")["epoch"] == 1

    monkeypatch.setattr(wbflow, "train_epoch", real_train_epoch)
    train_fire.main(argv + ["--resume", str(out / "last.pth")])

    killed, resumed = run_logs(offline_wandb)
    assert killed.exit_code == 1 and resumed.exit_code == 0
    assert resumed.run_id != killed.run_id and resumed.config["resumed_from"]["run_id"] == killed.run_id
    assert resumed.config["loss_function"] == "FocalLoss" and resumed.config["optimizer"] == "AdamW"
    assert [row["epoch"] for row in killed.rows_with("val_acc")] == [0, 1]
    assert [row["epoch"] for row in resumed.rows_with("val_acc")] == [2]
    assert min(row["_step"] for row in resumed.history) > max(row["_step"] for row in killed.history)

    assert killed.values("val_acc") + resumed.values("val_acc") == [50.0, 80.0, 60.0]
    assert (out / "best_model.pth").read_bytes() == best_file_after_kill
    best = wbflow.load_checkpoint(out / "best_model.pth")
    assert best["epoch"] == 1 and best["val_acc"] == 80.0
    assert killed.values("best_val_acc") == [50.0, 80.0] and not resumed.rows_with("best_val_acc")
    assert [a["metadata"]["epoch"] for a in resumed.artifacts if a["type"] == "model"] == []
    last = wbflow.load_checkpoint(out / "last.pth")
    steps_per_epoch = 30 // 8  # 6 of each class's 8 images train, the last batch of 6 is dropped
    assert last["epoch"] == 2 and last["step"] == 3 * steps_per_epoch
    assert last["scheduler"]["last_epoch"] == 3 * steps_per_epoch and last["wandb_run_id"] == resumed.run_id
    assert last["best"] == 80.0


def test_torchrun_with_two_processes_logs_one_run_and_saves_one_best_file(offline_wandb, tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=7)
    out = tmp_path / "checkpoints"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "train_fire.py"), *fire_args(data, out, "--epochs", "2")]
    env = {**os.environ, "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU host
    result = subprocess.run(command, cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Epoch: 0 |") == 1 and result.stdout.count("Epoch: 1 |") == 1

    [log] = run_logs(offline_wandb)
    assert log.exit_code == 0 and log.config["world_size"] == 2
    assert [row["epoch"] for row in log.rows_with("val_acc")] == [0, 1]
    n_val = log.config["val_images"]
    for val_acc in log.values("val_acc"):  # all-reduced over both shards: a count out of every val image
        assert val_acc * n_val / 100 == pytest.approx(round(val_acc * n_val / 100))
    assert sorted(path.name for path in out.iterdir()) == [".lock", "best_model.pth", "last.pth"]
    models = [artifact for artifact in log.artifacts if artifact["type"] == "model"]
    assert len(models) == len(log.rows_with("best_val_acc")) >= 1
    assert [row for row in log.history if logged_media(row, "predictions")]
    confusion = table_json(offline_wandb, "confusion_matrix_table")  # the report: both ranks' shares, gathered
    assert sum(row[2] for row in confusion["data"]) == n_val


def test_unavailable_imagenet_weights_end_with_a_message_naming_the_file_and_folder(tmp_path, monkeypatch):
    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    data = write_pattern_folders(tmp_path / "data", per_class=3)
    argv = fire_args(data, tmp_path / "out", "--no-wandb") + ["--weights", "imagenet"]
    with pytest.raises(SystemExit) as exit_info:
        train_fire.main(argv)
    message = str(exit_info.value)
    assert "resnet18-f37072fd.pth" in message and "--weights none" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_build_classifier_uses_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    cached = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = wbflow.build_classifier("resnet18", num_classes=5, weights="imagenet")
    assert torch.equal(model.conv1.weight, cached["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, cached["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 5


def test_a_damaged_cached_imagenet_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"cut short by a full disk")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth is not a loadable checkpoint") as error:
        wbflow.build_classifier("resnet18", num_classes=5, weights="imagenet")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "squeezenet1_1"])
def test_build_classifier_replaces_the_head_for_the_class_count(name):
    # heads of each kind: fc, classifier[-1], classifier[3] before nothing, SqueezeNet's 1x1 convolution
    model = wbflow.build_classifier(name, num_classes=5, weights="none").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert not [layer for layer in model.modules() if getattr(layer, "out_features", None) == 1000]


def test_bad_data_folder_ends_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="data not found"):
        train_fire.main(fire_args(tmp_path / "missing", tmp_path / "out", "--no-wandb"))


def test_train_and_val_folders_give_both_splits_with_folder_class_names(tmp_path):
    write_pattern_folders(tmp_path / "train", per_class=3)
    write_pattern_folders(tmp_path / "val", per_class=2)
    train, val, class_names = wbflow.find_image_samples(tmp_path)
    assert class_names == sorted(SEED_CLASSES)
    assert len(train) == 15 and len(val) == 10
    assert all(Path(path).parent.name == class_names[label] for path, label in train + val)
    assert all("/val/" in path for path, _ in val)


def test_class_folders_are_split_stratified_and_seeded_with_the_given_class_order(tmp_path):
    write_pattern_folders(tmp_path, per_class=10)
    train, val, class_names = wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES,
                                                           val_split=0.2, seed=3)
    assert class_names == SEED_CLASSES
    assert np.bincount([label for _, label in val]).tolist() == [2] * 5
    assert np.bincount([label for _, label in train]).tolist() == [8] * 5
    assert not set(train) & set(val)
    assert wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES, val_split=0.2, seed=3)[1] == val
    assert wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES, val_split=0.2, seed=4)[1] != val


def test_csv_of_path_and_label_is_read_relative_to_its_folder(tmp_path):
    write_pattern_folders(tmp_path / "images", per_class=4, classes=SEED_CLASSES[:2])
    rows = ["path,label"] + [f"images/{name}/{i}.png,{name}" for name in SEED_CLASSES[:2] for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    train, val, class_names = wbflow.find_image_samples(tmp_path / "labels.csv", val_split=0.25,
                                                           class_names=SEED_CLASSES[:2])
    assert class_names == SEED_CLASSES[:2]
    assert len(train) == 6 and len(val) == 2 and sorted(label for _, label in val) == [0, 1]
    assert all(os.path.isfile(path) for path, _ in train + val)


def test_unreadable_images_are_skipped_with_one_warning_that_counts_them(tmp_path):
    write_pattern_folders(tmp_path, per_class=3, classes=["a", "b"])
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "garbage.png").write_bytes(os.urandom(300))
    pattern_image(0, np.random.default_rng(0), size=64).save(tmp_path / "b" / "whole.jpg")
    data = (tmp_path / "b" / "whole.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "a" / "notes.txt").write_text("not an image, not counted")
    with pytest.warns(UserWarning, match="skipped 3 unreadable image") as caught:
        train, val, _ = wbflow.find_image_samples(tmp_path, val_split=0.25)
    assert len(caught) == 1
    names = sorted(Path(path).name for path, _ in train + val)
    assert len(names) == 7 and "whole.jpg" in names
    assert not {"empty.jpg", "garbage.png", "truncated.jpg", "notes.txt"} & set(names)


def test_a_fifo_among_the_images_is_skipped_as_unreadable_without_being_opened(tmp_path):
    write_pattern_folders(tmp_path, per_class=1, classes=["a"])
    os.mkfifo(tmp_path / "a" / "pipe.png")
    samples = [(str(tmp_path / "a" / "0.png"), 0), (str(tmp_path / "a" / "pipe.png"), 0)]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*pipe\.png$"):
        kept = within(30, wbflow.drop_unreadable_images, samples, fifo=tmp_path / "a" / "pipe.png")
    assert kept == samples[:1]
    dataset = wbflow.ImageSamples(samples[::-1], wbflow.image_transforms(32, train=False))
    with pytest.warns(UserWarning, match="pipe.png"):
        image, label = within(30, dataset.__getitem__, 0, fifo=tmp_path / "a" / "pipe.png")
    assert image.shape == (3, 32, 32) and label == 0


def test_an_image_that_breaks_mid_epoch_is_replaced_not_fatal(tmp_path):
    write_pattern_folders(tmp_path, per_class=2, classes=["a"])
    dataset = wbflow.ImageSamples([(str(tmp_path / "a" / "0.png"), 0), (str(tmp_path / "a" / "1.png"), 0)],
                                     wbflow.image_transforms(32, train=False))
    (tmp_path / "a" / "0.png").write_bytes(b"gone bad")
    with pytest.warns(UserWarning, match="0.png"):
        image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


@pytest.mark.parametrize("make, match", [
    (lambda root: ((root / "a").mkdir(parents=True), (root / "b").mkdir()), "no readable images"),
    (lambda root: (write_pattern_folders(root, 2, ["a"]), (root / "b").mkdir()), "no readable images in .*: b"),
    (lambda root: root.mkdir(), "at least two classes; .* has 0"),
    (lambda root: write_pattern_folders(root, 2, ["a"]), "at least two classes; .* has 1: a"),
])
def test_empty_data_is_a_clear_error(tmp_path, make, match):
    make(tmp_path / "data")
    with pytest.raises(ValueError, match=match):
        wbflow.find_image_samples(tmp_path / "data")


def test_a_named_class_without_a_folder_is_a_clear_error(tmp_path):
    write_pattern_folders(tmp_path, per_class=2, classes=["a"])
    with pytest.raises(FileNotFoundError, match="class folder.*not found.*高风险"):
        wbflow.find_image_samples(tmp_path, class_names=["a", "高风险"])


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), fraction=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**16))
def test_stratified_split_keeps_every_class_on_both_sides_in_proportion(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    train_index, val_index = wbflow.stratified_split(labels, fraction, seed=seed)
    assert sorted(train_index + val_index) == list(range(len(labels)))
    for label, count in enumerate(counts):
        n_val = int(np.sum(labels[val_index] == label))
        assert abs(n_val - fraction * count) <= 1
        assert 1 <= n_val <= count - 1 if count >= 2 else n_val == 0
    assert wbflow.stratified_split(labels, fraction, seed=seed) == (train_index, val_index)


def test_loaders_shard_validation_without_padding_and_shuffle_training_by_epoch():
    train_set = torch.utils.data.TensorDataset(torch.arange(20.0), torch.zeros(20, dtype=torch.long))
    val_set = torch.utils.data.TensorDataset(torch.arange(7.0), torch.zeros(7, dtype=torch.long))
    shards = [wbflow.classifier_loaders(train_set, val_set, 4, rank=rank, world_size=2) for rank in (0, 1)]
    seen = sorted(x.item() for _, val_loader in shards for x, _ in val_loader.dataset)
    assert seen == list(range(7))
    train_loader = shards[0][0]
    orders = []
    for epoch in (0, 1):
        train_loader.sampler.set_epoch(epoch)
        orders.append([x.tolist() for x, _ in train_loader])
    assert orders[0] != orders[1] and len(orders[0]) == 2  # 10 per rank, batch 4, last 2 dropped


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 16), classes=st.integers(2, 6), seed=st.integers(0, 2**16),
       weighted=st.booleans())
def test_focal_loss_with_gamma_0_is_weighted_cross_entropy(batch, classes, seed, weighted):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=generator) * 3
    targets = torch.randint(0, classes, (batch,), generator=generator)
    alpha = torch.rand(classes, generator=generator) + 0.1 if weighted else None
    expected = F.cross_entropy(logits, targets, weight=alpha)
    assert torch.allclose(wbflow.focal_loss(logits, targets, gamma=0.0, alpha=alpha), expected, atol=1e-6)


def test_focal_loss_down_weights_confident_correct_predictions():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    targets = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = wbflow.focal_loss(logits, targets, gamma=2.0, reduction="none")
    assert torch.all(focal < ce)
    assert focal[0] / ce[0] < focal[1] / ce[1]


def test_class_balanced_weights_give_rare_classes_more_weight():
    weights = wbflow.class_balanced_weights([0, 0, 0, 1, 2, 2], num_classes=4)
    assert weights.tolist() == pytest.approx([6 / 12, 6 / 4, 6 / 8, 0.0])


def test_per_class_precision_and_recall():
    precision, recall, support = wbflow.per_class_precision_recall([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert precision == pytest.approx([0.5, 2 / 3, 0.0])
    assert recall == pytest.approx([0.5, 1.0, 0.0])
    assert support == [2, 2, 1]


@pytest.mark.parametrize("argv", [
    ["--batch-size", "16", "--learning-rate", "0.01", "--watch", "--no-wandb=true"],
    ["--batch_size=16", "--learning_rate=0.01", "--watch=True", "--no_wandb=1"],
])
def test_flags_take_dash_and_underscore_forms_and_sweep_booleans(argv):
    args = train_fire.parse_args(argv)
    assert (args.batch_size, args.learning_rate, args.watch, args.no_wandb) == (16, 0.01, True, True)


@pytest.mark.parametrize("text, value", [("False", False), ("false", False), ("0", False), ("no", False),
                                         ("True", True), ("1", True), ("yes", True)])
def test_str2bool_reads_what_the_sweep_agent_writes(text, value):
    assert train_fire.parse_args([f"--watch={text}"]).watch is value
    assert wbflow.str2bool(text) is value


def test_str2bool_refuses_other_words():
    with pytest.raises(SystemExit):
        train_fire.parse_args(["--watch=maybe"])


def test_sweep_yaml_is_a_bayes_search_whose_agent_command_parses():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args
    sweep = yaml.safe_load((HERE / "sweep.yaml").read_text())
    assert sweep["method"] == "bayes" and sweep["metric"] == {"name": "best_val_score", "goal": "maximize"}
    assert set(sweep["parameters"]) == {"learning_rate", "batch_size", "model"}
    assert set(sweep["parameters"]["model"]["values"]) <= set(torchvision.models.list_models(module=torchvision.models))
    assert sweep["program"] == "train_fire.py"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    # what wandb agent runs, built as wandb_agent.Agent._command_run does
    params = {"learning_rate": {"value": 0.001}, "batch_size": {"value": 32}, "model": {"value": "resnet18"},
              "watch": {"value": False}}
    macros = {**create_sweep_command_args({"args": params}), "env": ["/usr/bin/env"],
              "interpreter": ["python"], "program": [sweep["program"]]}
    command = [part for chunk in sweep["command"] for part in macros[chunk[2:-1]]]
    assert command[:3] == ["/usr/bin/env", "python", "train_fire.py"]
    assert "--learning_rate=0.001" in command and "--watch=False" in command
    args = train_fire.parse_args(command[3:])
    assert (args.learning_rate, args.batch_size, args.model, args.watch) == (0.001, 32, "resnet18", False)

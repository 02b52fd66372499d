"""wbflow's training loop: train_epoch, validate and predict_logits, every step in one logging window, stops
and exact continuation, the EMA, loaders that resume where they stopped, warm-up and RNG states."""
import math
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import wbflow
from conftest import CE_LOSS, linear_batches, linear_classifier, run_logs, write_pattern_folders

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


# ----------------------------------------------------------------------------- learning rate, RNG states, mixed batches

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


# ----------------------------------------------------------------------------- every step in one window

def collect(windows):
    return lambda step, window: windows.append((step, window))


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


def test_accuracy_on_mixed_batches_counts_the_larger_share():
    loss_fn = wbflow.classification_loss(torch.nn.CrossEntropyLoss())
    model = torch.nn.Flatten()  # logits: the two inputs
    soft = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    _, correct, count = loss_fn(model, (torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 1.0]]), soft))
    assert (int(correct), count) == (1, 3)


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


# ----------------------------------------------------------------------------- exit_when_stopped
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_exit_when_stopped_ends_in_one_line_with_128_plus_the_signal(capsys, number):
    with pytest.raises(SystemExit) as stopped:
        with wbflow.exit_when_stopped("eval.py", "--eval") as stop:
            signal.raise_signal(number)  # the handler sets the stop; the block goes on to its end
            assert stop.is_set()
    assert stopped.value.code == 128 + number
    assert capsys.readouterr().err == f"eval.py: --eval stopped by {signal.Signals(number).name}; nothing was saved\n"


def test_exit_when_stopped_turns_a_second_signal_into_the_same_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        with wbflow.exit_when_stopped("eval.py", "pair generation", "run it again") as stop:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a stop that will not wait: KeyboardInterrupt
            raise AssertionError("not reached")
    assert stopped.value.code == 128 + signal.SIGTERM and stop.signal == signal.SIGTERM
    assert capsys.readouterr().err == "eval.py: pair generation stopped by SIGTERM; run it again\n"


def test_exit_when_stopped_lets_work_that_was_not_stopped_finish():
    with wbflow.exit_when_stopped("eval.py", "--eval") as stop:
        result = 3
    assert result == 3 and not stop.is_set()

"""Tests for wbflow. W&B runs for real in offline mode; assertions read the run's record log back."""
import glob
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import wbflow

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- reading a run back

def read_records(wandb_file):
    """Parse a run-*.wandb file: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = Path(wandb_file).read_bytes()
    position, pieces, records = 7, b"", []
    while position + 7 <= len(data):
        space_left = 32768 - position % 32768
        if space_left < 7:
            position += space_left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            records.append(pieces + chunk)
    return [wandb_internal_pb2.Record.FromString(record) for record in records]


def _items_to_dict(items):
    """History/summary/config items as a dict; nested keys (e.g. a logged image's fields) nest."""
    result = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        target = result
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return result


class RunLog:
    """What one offline run logged: history rows, the final summary, artifacts, config, exit code."""

    def __init__(self, wandb_file):
        self.history, self.summary, self.artifacts, self.config = [], {}, [], {}
        self.metrics, self.exit_code, self.run_id = [], None, None
        for record in read_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items_to_dict(record.history.item))
            elif kind == "summary":
                self.summary.update(_items_to_dict(record.summary.update))
            elif kind == "artifact":
                artifact = record.artifact
                self.artifacts.append({"name": artifact.name, "type": artifact.type,
                                       "aliases": list(artifact.aliases),
                                       "metadata": json.loads(artifact.metadata or "{}"),
                                       "files": [entry.path for entry in artifact.manifest.contents]})
            elif kind == "config":
                self.config.update(_items_to_dict(record.config.update))
            elif kind == "metric":
                self.metrics.append(record.metric)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code
            elif kind == "run":
                self.run_id = record.run.run_id
                self.config.update(_items_to_dict(record.run.config.update))

    def rows_with(self, key):
        return [row for row in self.history if key in row]

    def values(self, key):
        return [row[key] for row in self.rows_with(key)]


def run_logs(wandb_dir, timeout=60):
    """RunLog of every run written under WANDB_DIR, oldest first, once each holds its exit record.

    wandb's service writes the file after run.finish() returns, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", "run-*.wandb")), key=os.path.getmtime)
        logs = [RunLog(path) for path in files]
        if all(log.exit_code is not None for log in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.1)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent W&B writing under a temp WANDB_DIR; yields that folder."""
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return wandb_dir


# ----------------------------------------------------------------------------- small fixtures

def linear_batches(n_batches=6, batch_size=8, features=4, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, features, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(n_batches)]


def linear_classifier(features=4, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(features, classes)


CE_LOSS = wbflow.classification_loss(nn.CrossEntropyLoss())


# ----------------------------------------------------------------------------- train_epoch

def test_train_epoch_logs_loss_lr_grad_norm_epoch_at_global_steps(offline_wandb):
    model = linear_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with wbflow.wandb_run({"lr": 0.1}, project="test") as run:
        stats = wbflow.train_epoch(model, linear_batches(25), optimizer, CE_LOSS, run=run, step=5,
                                   epoch=3, log_every=10, progress=False)
    assert stats["step"] == 30 and stats["steps"] == 25 and stats["samples"] == 200
    log = run_logs(offline_wandb)[0]
    rows = log.rows_with("train/loss")
    assert [row["_step"] for row in rows] == [10, 20, 30]
    for row in rows:
        assert row["train/learning_rate"] == pytest.approx(0.1)
        assert row["train/epoch"] == 3
        assert row["train/grad_norm"] > 0 and math.isfinite(row["train/loss"])
    assert log.config["lr"] == 0.1 and log.exit_code == 0


def test_train_epoch_logged_loss_is_the_mean_since_the_last_log(offline_wandb):
    losses = [float(i) for i in range(1, 9)]
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss_fn(model, batch):
        return model(batch[0]).sum() * 0 + batch[1][0]

    batches = [(torch.ones(1, 1), torch.tensor([value])) for value in losses]
    with wbflow.wandb_run(project="test") as run:
        stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, run=run, log_every=4, progress=False)
    assert run_logs(offline_wandb)[0].values("train/loss") == [2.5, 6.5]
    assert stats["loss"] == pytest.approx(4.5) and stats["accuracy"] is None


def test_train_epoch_custom_log_keys_with_accuracy_and_batch(offline_wandb):
    keys = {"loss": "train_loss", "accuracy": "train_acc", "learning_rate": "learning_rate",
            "epoch": "epoch", "batch": "batch"}
    model = linear_classifier()
    with wbflow.wandb_run(project="test") as run:
        stats = wbflow.train_epoch(model, linear_batches(20), torch.optim.SGD(model.parameters(), lr=0.1),
                                   CE_LOSS, run=run, epoch=2, log_every=10, log_keys=keys, progress=False)
    rows = run_logs(offline_wandb)[0].rows_with("train_loss")
    assert [row["batch"] for row in rows] == [9, 19]
    assert all(set(keys.values()) <= set(row) and 0 <= row["train_acc"] <= 100 for row in rows)
    assert "train/loss" not in run_logs(offline_wandb)[0].summary
    assert 0 <= stats["accuracy"] <= 100


def test_train_epoch_accuracy_counts_correct_predictions():
    model = linear_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: predictions stay put
    batches = linear_batches(4)
    expected = sum((model(x).argmax(1) == y).sum().item() for x, y in batches) / 32 * 100
    stats = wbflow.train_epoch(model, batches, optimizer, CE_LOSS, progress=False)
    assert stats["accuracy"] == pytest.approx(expected)


_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_train_epoch_makes_no_host_sync_per_step(monkeypatch):
    """Only the end-of-epoch read touches the host when log_every exceeds the epoch."""
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    ema_model = wbflow.make_ema(model, decay=0.9)
    calls = []
    for name in _SYNC_METHODS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _original=original, _name=name, **k: (calls.append(_name), _original(self, *a, **k))[1])
    stats = wbflow.train_epoch(model, linear_batches(30), optimizer, CE_LOSS, scheduler=scheduler,
                               ema_model=ema_model, grad_clip=1.0, log_every=1000, progress=False)
    monkeypatch.undo()
    assert stats["steps"] == 30
    assert calls == ["tolist"], calls


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
def test_non_finite_loss_skips_the_step_and_counts_it(make_optimizer, offline_wandb):
    model = linear_classifier()
    optimizer = make_optimizer(model.parameters())
    batches = linear_batches(4)
    snapshots = []

    def loss_fn(model, batch):
        snapshots.append(model.weight.detach().clone())
        loss, n_correct, n = CE_LOSS(model, batch)
        return (loss * math.nan if len(snapshots) == 3 else loss), n_correct, n

    with wbflow.wandb_run(project="test") as run:
        stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, run=run, log_every=4, progress=False,
                                   log_keys={"loss": "train/loss", "skipped_steps": "train/skipped_steps"})
    after_bad_step = model.weight.detach()
    assert stats["skipped"] == 1 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert not torch.equal(snapshots[1], snapshots[2])  # good steps moved the weights
    # The bad step (third) changed nothing: the fourth step starts where the third did.
    torch.testing.assert_close(snapshots[3], snapshots[2], rtol=0, atol=0)
    assert torch.isfinite(after_bad_step).all()
    assert run_logs(offline_wandb)[0].values("train/skipped_steps") == [1]


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

    model = linear_classifier()
    wbflow.train_epoch(model, linear_batches(1), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                       amp=True, progress=False)
    wbflow.train_epoch(model, linear_batches(1), torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                       progress=False)
    assert seen == [torch.bfloat16, torch.float32]
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


# ----------------------------------------------------------------------------- W&B run helper

def _run_clean_python(code, tmp_path, extra_env=None):
    """Run `code` in a fresh interpreter with no W&B variables, no credentials and no stdin."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update({"HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"), "WANDB_DIR": str(tmp_path),
                "PYTHONPATH": str(HERE), **(extra_env or {})})
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180)


def test_wandb_run_without_wandb_installed_warns_once_and_trains(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None\n"
            "import torch, wbflow\n"
            "with wbflow.wandb_run({'a': 1}) as run:\n"
            "    model = torch.nn.Linear(2, 1)\n"
            "    stats = wbflow.train_epoch(model, [torch.randn(4, 2)], torch.optim.SGD(model.parameters(), lr=0.1),\n"
            "        lambda m, b: m(b).pow(2).mean(), run=run, log_every=1, progress=False)\n"
            "    wbflow.log_metrics(run, {'x': 1}); print('run', run, 'steps', stats['steps'])\n")
    result = _run_clean_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "run None steps 1" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and "not installed" in warnings[0]


def test_wandb_run_without_credentials_falls_back_to_offline_without_prompting(tmp_path):
    code = ("import wbflow\n"
            "with wbflow.wandb_run({'a': 1}, project='p') as run:\n"
            "    run.log({'x': 1.0})\n"
            "    print('offline', run.settings.mode)\n")
    result = _run_clean_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "offline offline" in result.stdout
    assert "wandb sync" in result.stderr
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))


@pytest.mark.parametrize("enabled, mode", [(False, "offline"), (True, "disabled")])
def test_wandb_run_is_none_when_switched_off(enabled, mode, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with wbflow.wandb_run(project="test", enabled=enabled) as run:
        assert run is None
        wbflow.log_metrics(run, {"x": 1})
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


def test_define_epoch_metrics_puts_epoch_metrics_on_the_epoch_axis(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        wbflow.define_epoch_metrics(run, ["val/*", "train/epoch_loss"], epoch_key="epoch")
    metrics = {(m.name or m.glob_name): m.step_metric for m in run_logs(offline_wandb)[0].metrics}
    assert metrics["val/*"] == "epoch" and metrics["train/epoch_loss"] == "epoch"


def test_watch_model_refuses_log_freq_below_100_and_logs_histograms(offline_wandb):
    model = linear_classifier()
    with pytest.raises(ValueError, match="log_freq"):
        wbflow.watch_model(None, model, log_freq=10)
    with wbflow.wandb_run(project="test") as run:
        wbflow.watch_model(run, model, log="all", log_freq=100)
        wbflow.train_epoch(model, linear_batches(100, batch_size=2), torch.optim.SGD(model.parameters(), lr=0.01),
                           CE_LOSS, run=run, log_every=50, progress=False)
    keys = set().union(*run_logs(offline_wandb)[0].history)
    assert {"gradients/weight", "gradients/bias", "parameters/weight"} <= keys
    assert run_logs(offline_wandb)[0].values("gradients/weight")[0]["_type"] == "histogram"


def test_log_artifact_records_name_type_aliases_and_metadata(offline_wandb, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with wbflow.wandb_run(project="test") as run:
        wbflow.log_artifact(run, path, "model-epoch-3", aliases=("latest", "best"),
                            metadata={"epoch": 3, "global_step": 120})
    [artifact] = run_logs(offline_wandb)[0].artifacts
    assert artifact["name"] == "model-epoch-3" and artifact["type"] == "model"
    assert set(artifact["aliases"]) == {"latest", "best"}
    assert artifact["metadata"] == {"epoch": 3, "global_step": 120}
    assert artifact["files"] == ["weights.pt"]


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
    assert artifact["name"] == "best_model" and set(artifact["aliases"]) == {"best", "latest"}
    assert artifact["metadata"] == {"val_acc": 71.5, "epoch": 4}

"""Issue 15's edges on train_flow's side: last.pt before the epoch's samples, stops honoured inside evaluation,
resumes that must keep the run's settings, resumes without W&B, bad settings in one line (the config's shape,
`python wbflow.py fid`, kid), and a newcomer's first run (the FID weights, default folders, progress, headline)."""
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_fire
import train_flow
import wbflow
from conftest import kill_when_marked, run_logs
from test_guard import FLOW_SMOKE, refused
from test_training import assert_same_history, read_run, scalar_rows
from test_wbflow import _table_data

HERE = Path(__file__).resolve().parent
# 64 synthetic images, batch 32: two steps an epoch; every epoch has samples, a one-row table and a checkpoint
FLOW = FLOW_SMOKE + ["--set", "training.log_interval=1"]


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


def table_keys(rows):
    return [(row["epoch"], row["solver"], row["nfe"], row["samples"]) for row in rows]


# ----------------------------------------------------------------------------- 1. last.pt before the epoch's end

_HANG_IN_TABLE = """
import sys, time
sys.path.insert(0, {here!r})
import train_flow
real_rows = train_flow.solver_rows
def rows_then_hang(model, noise, epoch, *args, **kwargs):
    if epoch == 2:  # epoch 2 has trained and drawn its grid: wait to be killed inside its solver table
        open({marker!r}, "w").close()
        time.sleep(120)
    return real_rows(model, noise, epoch, *args, **kwargs)
train_flow.solver_rows = rows_then_hang
train_flow.main({argv!r})
"""


def test_a_kill_during_the_epochs_solver_table_keeps_its_training_and_the_resume_does_its_end_once(
        offline_wandb, tmp_path, capsys):
    argv = FLOW + ["--epochs", "3"]
    train_flow.main(argv + ["--out-dir", str(tmp_path / "whole")])
    [whole] = run_logs(offline_wandb)
    killed = argv + ["--out-dir", str(tmp_path / "killed")]
    marker = tmp_path / "hanging"
    kill_when_marked(_HANG_IN_TABLE.format(here=str(HERE), marker=str(marker), argv=killed), marker)
    last = wbflow.load_checkpoint(tmp_path / "killed" / "last.pt")
    assert last["epoch"] == 2 and last["global_step"] == 4 and last["train_state"] is None
    assert last["pending"] == ["samples", "table", "checkpoint"] and not last["wandb_last_act"]
    assert [row["epoch"] for row in last["table_rows"]] == [1]

    train_flow.main(killed + ["--resume", str(tmp_path / "killed" / "last.pt")])
    printed = capsys.readouterr().out
    assert "before its samples, table, checkpoint, step 4" in printed and "W&B: a new run" in printed
    end = {name: wbflow.load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "killed")}
    assert table_keys(end["killed"]["table_rows"]) == table_keys(end["whole"]["table_rows"])
    assert [row["epoch"] for row in end["killed"]["table_rows"]] == [1, 2, 3]
    for name in ("whole", "killed"):
        assert sorted(path.name for path in (tmp_path / name).glob("checkpoint_epoch_*.pt")) == [
            "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt"]
    pngs = {name: sorted(path.name for path in (tmp_path / name / "samples").iterdir()) for name in ("whole", "killed")}
    assert pngs["killed"] == pngs["whole"] and len(pngs["whole"]) == 6  # a grid and a table row per epoch
    for key in ("model", "ema"):
        for name, tensor in end["whole"][key].items():
            torch.testing.assert_close(end["killed"][key][name], tensor, rtol=1e-5, atol=1e-6)
    [resumed_id] = {path.name.rsplit("-", 1)[1] for path in (offline_wandb / "wandb").glob("offline-run-*")} - {
        whole.run_id, last["wandb_run_id"]}
    resumed = read_run(offline_wandb, resumed_id, lambda log: log.exit_code is not None)
    assert resumed.config["resumed_from"] == {"run_id": last["wandb_run_id"], "step": 4,
                                              "checkpoint": str(tmp_path / "killed" / "last.pt")}
    assert [row["_step"] for row in resumed.rows_with("eval/generated_samples")] == [4, 6]  # epochs 2 and 3
    columns, rows = _table_data(offline_wandb, resumed.run_id)
    assert sorted(row[columns.index("epoch")] for row in rows) == [1, 2, 3]


def test_last_pt_is_written_right_after_the_epochs_training(tmp_path, monkeypatch):
    seen = []

    def grid_reads_last_pt(*args, **kwargs):
        seen.append(wbflow.load_checkpoint(tmp_path / "out" / "last.pt"))
        raise RuntimeError("killed while sampling")

    monkeypatch.setattr(train_flow, "sample", grid_reads_last_pt)
    with pytest.raises(RuntimeError, match="killed while sampling"):
        train_flow.main(FLOW + ["--no-wandb", "--out-dir", str(tmp_path / "out")])
    [last] = seen
    assert last["epoch"] == 1 and last["global_step"] == 2 and last["pending"] == ["samples", "table", "checkpoint"]
    assert last["table_rows"] == [] and last["epoch_loss"] == last["best_loss"] and last["best_epoch"] == 1


# ----------------------------------------------------------------------------- 2. stops inside the epoch's end

def test_sigterm_during_fid_sampling_stops_between_batches_and_the_resume_logs_the_fid_once(
        offline_wandb, weights_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    argv = FLOW + ["--epochs", "1", "--set", "eval.fid_interval=1", "--set", "eval.fid_num_samples=6",
                   "--set", "eval.sample_batch_size=2", "--set", "eval.inception_batch_size=32",
                   "--out-dir", str(tmp_path / "out")]
    real_sample = train_flow.sample
    sampled = signal_on_call(real_sample, 1)  # the first FID batch of three
    monkeypatch.setattr(train_flow, "sample", sampled)
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM and sampled.calls == 1
    printed = capsys.readouterr().out
    last_pt = tmp_path / "out" / "last.pt"
    command = shlex.join(["python", "train_flow.py", *argv, "--resume", str(last_pt)])
    assert "stopped at step 2 (epoch 1), before its fid, samples, table, checkpoint; continue with:" in printed
    assert command in printed
    last = wbflow.load_checkpoint(last_pt)
    assert last["pending"] == ["fid", "samples", "table", "checkpoint"] and last["wandb_last_act"]
    assert last["last_fid"] is None and last["global_step"] == 2

    monkeypatch.setattr(train_flow, "sample", real_sample)
    train_flow.main(argv + ["--resume", str(last_pt)])
    printed = capsys.readouterr().out
    assert "W&B: a new run" in printed and "has finished step 2, where epoch 1's fid and samples belong" in printed
    first, second = run_logs(offline_wandb)
    assert first.exit_code == 1 and second.exit_code == 0 and second.config["resumed_from"]["run_id"] == first.run_id
    assert first.rows_with("eval/fid_score") == [] and first.rows_with("eval/generated_samples") == []
    [fid_row] = second.rows_with("eval/fid_score")
    assert fid_row["_step"] == 2 and fid_row["train/epoch"] == 1 and np.isfinite(fid_row["eval/fid_score"])
    assert [row["_step"] for row in second.rows_with("eval/generated_samples")] == [2]
    assert wbflow.load_checkpoint(last_pt)["last_fid"]["fid"] == pytest.approx(fid_row["eval/fid_score"])


def test_sigterm_during_the_solver_table_stops_before_the_next_row_and_the_same_run_takes_the_rows(
        offline_wandb, tmp_path, monkeypatch, capsys):
    argv = FLOW + ["--epochs", "2", "--set", "sampling.table_nfes=[1, 2]"]
    train_flow.main(argv + ["--out-dir", str(tmp_path / "whole")])
    argv += ["--out-dir", str(tmp_path / "split")]
    # epoch 1: grid, row 1, row 2; epoch 2: grid, then row 1 sends SIGTERM
    real_euler = wbflow.euler_sample
    euler = signal_on_call(real_euler, 5)
    monkeypatch.setattr(wbflow, "euler_sample", euler)
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM and euler.calls == 5  # row 2 never sampled
    assert "stopped at step 4 (epoch 2), before its table, checkpoint" in capsys.readouterr().out
    last = wbflow.load_checkpoint(tmp_path / "split" / "last.pt")
    assert last["pending"] == ["table", "checkpoint"] and [row["epoch"] for row in last["table_rows"]] == [1, 1]
    assert not (tmp_path / "split" / "checkpoint_epoch_2.pt").exists()

    monkeypatch.setattr(wbflow, "euler_sample", real_euler)
    train_flow.main(argv + ["--resume", str(tmp_path / "split" / "last.pt")])
    assert "W&B: continuing run" in capsys.readouterr().out
    whole, first, second = run_logs(offline_wandb)
    assert first.run_id == second.run_id and first.exit_code == 1 and second.exit_code == 0
    assert_same_history(scalar_rows(first, second), scalar_rows(whole))
    assert [row["_step"] for row in first.rows_with("eval/generated_samples")] == [2, 4]
    assert second.rows_with("eval/generated_samples") == []
    end = {name: wbflow.load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "split")}
    assert table_keys(end["split"]["table_rows"]) == table_keys(end["whole"]["table_rows"])
    assert (tmp_path / "split" / "checkpoint_epoch_2.pt").exists()


def test_sigterm_during_the_sample_grid_stops_before_the_table(tmp_path, monkeypatch, capsys):
    argv = FLOW + ["--no-wandb", "--epochs", "1", "--out-dir", str(tmp_path / "out")]
    monkeypatch.setattr(train_flow, "sample", signal_on_call(train_flow.sample, 1))
    monkeypatch.setattr(train_flow, "solver_rows", lambda *args, **kwargs: pytest.fail("built the table"))
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "before its table, checkpoint; continue with" in capsys.readouterr().out
    assert wbflow.load_checkpoint(tmp_path / "out" / "last.pt")["pending"] == ["table", "checkpoint"]
    assert (tmp_path / "out" / "samples" / "epoch_0001.png").exists()


def _eval_checkpoint(tmp_path):
    model_config = {"base_channels": 8, "channel_mults": [1], "num_res_blocks": 1, "attention_resolutions": [],
                    "head_channels": 8, "dropout": 0.0}
    ema = wbflow.make_ema(wbflow.FlowUNet(**model_config))
    return wbflow.save_checkpoint({"ema": ema.state_dict(), "config": {"model": model_config}, "epoch": 1,
                                   "global_step": 2, "driver": "train_flow"}, tmp_path / "c.pt")


_EVAL_SIGNALLED = """
import os, signal, sys
sys.path.insert(0, {here!r})
import train_flow
real_sample, calls = train_flow.sample, []
def sample_then_signal(*args, **kwargs):
    calls.append(1)
    print("batch", len(calls), flush=True)
    if len(calls) == 1:
        os.kill(os.getpid(), {number})
    return real_sample(*args, **kwargs)
train_flow.sample = sample_then_signal
train_flow.main({argv!r})
"""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_by_a_signal_ends_between_batches_in_one_line(tmp_path, number):
    (tmp_path / "weights.pth").write_bytes(b"any file: sampling comes before the network")
    argv = ["--eval", "--smoke", "--checkpoint", str(_eval_checkpoint(tmp_path)), "--metric", "is",
            "--num-samples", "6", "--set", "eval.sample_batch_size=2", "--nfe", "1",
            "--set", f"eval.fid_weights={tmp_path / 'weights.pth'}", "--out-dir", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, "-c", _EVAL_SIGNALLED.format(here=str(HERE), number=int(number),
                                                                         argv=argv)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 128 + number, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert re.findall(r"batch \d", result.stdout) == ["batch 1"]  # the second batch never started
    lines = [line for line in re.split(r"[\r\n]", result.stderr) if line.strip() and "sampling" not in line]
    assert lines == [f"train_flow.py: --eval stopped by {signal.Signals(number).name}; nothing was saved"]


def test_eval_shows_progress_bars_for_sampling_and_the_inception_pass(weights_path, tmp_path):  # noqa: F811
    argv = ["--eval", "--smoke", "--checkpoint", str(_eval_checkpoint(tmp_path)), "--metric", "is",
            "--num-samples", "4", "--set", "eval.sample_batch_size=2", "--set", "eval.inception_batch_size=2",
            "--nfe", "1", "--set", f"eval.fid_weights={weights_path}", "--out-dir", str(tmp_path / "out")]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        train_flow.main(argv)
    assert re.search(r"sampling: .*\| \d/2 \[", errors.getvalue()), errors.getvalue()  # tqdm: batches done / all
    assert re.search(r"Inception: .*\| \d/2 \[", errors.getvalue()), errors.getvalue()


# ----------------------------------------------------------------------------- 3. a resume keeps the run's settings

@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A finished 1-epoch train_flow run without W&B: its out dir."""
    out = tmp_path_factory.mktemp("flow") / "out"
    train_flow.main(FLOW + ["--no-wandb", "--epochs", "1", "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("change, match", [
    (["--batch-size", "16"], r"holds another training \(batch_size 32 there, 16 here\)"),
    (["--set", "training.learning_rate=1e-3"], r"holds another training \(learning_rate 0\.0002 there, 0\.001 here\)"),
    (["--set", "training.ema_decay=0.99"], r"ema_decay 0\.9 there, 0\.99 here"),
    (["--set", "training.warmup_steps=5"], r"warmup_steps 10 there, 5 here"),
    (["--set", "training.gradient_clip=0.5"], r"gradient_clip 1\.0 there, 0\.5 here"),
    (["--set", "training.seed=7"], r"seed 42 there, 7 here"),
    (["--set", "data.max_images=32"], r"holds another data \(max_images 64 there, 32 here\)"),
    (["--set", "sampling.seed=3"], r"holds another sampling \(seed 0 there, 3 here\)"),
])
def test_a_resume_with_other_training_settings_is_refused_naming_the_checkpoints_value(flow_run, change, match):
    message = refused(train_flow.main, FLOW + ["--out-dir", str(flow_run), "--epochs", "2",
                                               "--resume", str(flow_run / "last.pt"), *change], match)
    assert "keeps the settings it trained with" in message


# ----------------------------------------------------------------------------- 4. resume with W&B off

def test_train_flow_resumes_without_wandb_after_a_stop_and_after_a_finished_run(tmp_path, monkeypatch, capsys):
    train_flow.main(FLOW + ["--no-wandb", "--epochs", "2", "--out-dir", str(tmp_path / "whole")])
    argv = FLOW + ["--no-wandb", "--out-dir", str(tmp_path / "split")]
    real_loss = wbflow.rectified_flow_loss
    monkeypatch.setattr(wbflow, "rectified_flow_loss", signal_on_call(real_loss, 3))  # epoch 2, first step
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv + ["--epochs", "2"])
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    last = tmp_path / "split" / "last.pt"
    train_flow.main(argv + ["--epochs", "2", "--resume", str(last)])  # after a stop
    train_flow.main(argv + ["--epochs", "3", "--resume", str(last)])  # after a finished run
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "W&B" not in printed
    assert wbflow.load_checkpoint(last)["global_step"] == 6
    end = {name: wbflow.load_checkpoint(tmp_path / name / "checkpoint_epoch_2.pt") for name in ("whole", "split")}
    for name, tensor in end["whole"]["ema"].items():
        torch.testing.assert_close(end["split"]["ema"][name], tensor, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 5. every bad setting in one line

def _config_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _default_config(change):
    """The default config's text after change(config)."""
    import yaml
    config = wbflow.load_yaml_config(train_flow.DEFAULT_CONFIG)
    change(config)
    return yaml.safe_dump(config)


@pytest.mark.parametrize("argv, match", [
    (["--set", "model.channel_mults=[1, two]"],
     r"model\.channel_mults=\[1, two\]: expected a list of int like the config's \[1, 2\], got list \[1, 'two'\]"),
    (["--set", "model.channel_mults=[1, 2"], r"model\.channel_mults=\[1, 2: not a YAML value"),
    (["--set", "training.learning_rate=-1"], r"training\.learning_rate must be positive, not -1\.0"),
    (["--set", "training.learning_rate=.nan"], r"training\.learning_rate must be positive, not nan"),
    (["--set", "training.ema_decay=1"], r"training\.ema_decay must be in \[0, 1\), not 1\.0"),
    (["--set", "training.ema_decay=-0.1"], r"training\.ema_decay must be in \[0, 1\), not -0\.1"),
    (["--set", "training.gradient_clip=-1"], r"training\.gradient_clip must not be negative, not -1\.0"),
    (["--set", "eval.num_real_images=many"], r"eval\.num_real_images must be positive, not 'many'"),  # null: any type
    (["--set", "sampling.rk45_tolerance=0"], r"sampling\.rk45_tolerance must be positive, not 0\.0"),
    (["--set", "eval.fid_interval=1", "--set", "eval.fid_num_samples=1"],
     r"eval\.fid_num_samples is 1: FID needs at least two samples"),
    (["--eval", "--checkpoint", "c.pt", "--num-samples", "1"], r"--num-samples is 1: FID needs at least two samples"),
])
def test_train_flow_refuses_a_bad_value_in_one_line(argv, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, match", [
    ("- data\n- model\n", r"config\.yaml is a YAML list, not a mapping of settings"),
    ("", r"config\.yaml is empty, not a mapping of settings"),
    ("# only a comment\n", r"config\.yaml is empty"),
    ("data: [unclosed\n", r"config\.yaml is not valid YAML \(.* at line 2, column 1\)"),
    ("data:\n  data_dir: data\n   out_dir: x\n", r"config\.yaml is not valid YAML \(mapping values are not allowed"),
    (_default_config(lambda config: config.pop("sampling")), r"config\.yaml lacks sampling \(every section and key"),
    (_default_config(lambda config: config["training"].pop("ema_decay")), r"config\.yaml lacks training\.ema_decay"),
    (_default_config(lambda config: config["training"].update(sead=1)), r"training\.sead in .*config\.yaml is not a key"),
    (_default_config(lambda config: config["training"].update(epochs="many")),
     r"training\.epochs: 'many' in .*config\.yaml: expected int"),
    (_default_config(lambda config: config.update(model=3)), r"model in .*config\.yaml is 3, not a section"),
])
def test_a_config_file_of_another_shape_is_refused_in_one_line(text, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out"), "--config", _config_file(tmp_path, text)],
            match)
    assert not (tmp_path / "out").exists()


def test_a_config_with_every_key_of_the_default_is_accepted(tmp_path):
    text = train_flow.DEFAULT_CONFIG.read_text().replace("learning_rate: 2.0e-4", "learning_rate: 1e-3")
    config = train_flow.load_config(train_flow.parse_args(["--config", _config_file(tmp_path, text)]))
    assert config["training"]["learning_rate"] == 1e-3  # YAML 1.1 reads "1e-3" as a string: a float here


def _fid_command(*argv):
    """(exit message, printed) of `python wbflow.py fid ARGV`, run in this process."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        wbflow._command_line(["fid", *argv])
    return str(exit_info.value.code), printed.getvalue()


def _image_folder(folder, count):
    from PIL import Image
    folder.mkdir()
    for index in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    return str(folder)


def test_fid_command_refuses_statistics_files_that_are_not_statistics_in_one_line(tmp_path, weights_path):  # noqa: F811
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 4)))
    (tmp_path / "pickle.npz").write_bytes(b"not a zip archive at all")
    np.savez(tmp_path / "good.npz", mu=np.zeros(4), sigma=np.eye(4))
    for name, match in (("other.npz", r"other\.npz holds features, not the FID statistics mu and sigma"),
                        ("pickle.npz", r"pickle\.npz is not an \.npz file \(no zip archive\)")):
        message, _ = _fid_command(str(tmp_path / name), str(tmp_path / "good.npz"), "--weights", weights_path)
        assert re.fullmatch(rf"wbflow\.py fid: .*{match}.*", message), message
        with pytest.raises(ValueError, match=match):
            wbflow.fid(str(tmp_path / name), str(tmp_path / "good.npz"))


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], r"--batch-size must be positive, not 0"),
    (["--device", "cuda:99"], r"--device cuda:99: this machine has \d+ CUDA devices?; pass --device cpu"),
    (["--device", "gpu"], r"--device gpu is no torch device"),
])
def test_fid_command_refuses_a_bad_flag_before_any_work(tmp_path, monkeypatch, argv, match):
    monkeypatch.setattr(wbflow, "load_fid_inception", lambda *args, **kwargs: pytest.fail("loaded the Inception"))
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, *argv)
    assert re.fullmatch(rf"wbflow\.py fid: {match}.*", message), message


def test_fid_command_says_cuda_is_missing_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, "--device", "cuda")
    assert message == "wbflow.py fid: --device cuda: this machine has 0 CUDA devices; pass --device cpu"


def test_fid_of_one_image_says_it_needs_two_per_side(tmp_path, weights_path):  # noqa: F811
    one, two = _image_folder(tmp_path / "one", 1), _image_folder(tmp_path / "two", 2)
    message, _ = _fid_command(one, two, "--weights", weights_path, "--device", "cpu")
    assert message == "wbflow.py fid: FID needs at least two images per side to estimate a covariance, got 1"
    with pytest.raises(ValueError, match="FID needs at least two images per side"):
        wbflow.fid(torch.randn(5, 8), torch.randn(1, 8))


def test_save_stats_writes_the_npz_it_names_and_refuses_an_existing_one(tmp_path, weights_path):  # noqa: F811
    folder = _image_folder(tmp_path / "images", 3)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert wbflow._command_line(["fid", folder, str(tmp_path / "stats"), "--save-stats", "--weights", weights_path,
                                     "--device", "cpu"]) is None
    assert printed.getvalue() == f"saved the statistics of 3 images to {tmp_path / 'stats.npz'}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "stats.npz"]
    assert wbflow.fid(str(tmp_path / "stats.npz"), str(tmp_path / "stats.npz")) == pytest.approx(0, abs=1e-6)
    before = (tmp_path / "stats.npz").read_bytes()
    for name in ("stats", "stats.npz"):
        message, _ = _fid_command(folder, str(tmp_path / name), "--save-stats", "--weights", weights_path)
        assert message == f"wbflow.py fid: {tmp_path / 'stats.npz'} exists already: choose another name or delete it"
    assert (tmp_path / "stats.npz").read_bytes() == before


@pytest.mark.parametrize("settings", [dict(subset_size=1), dict(subset_size=0), dict(subsets=0, subset_size=4)])
def test_kid_refuses_subsets_it_cannot_average(settings):
    features = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError, match=r"KID needs subsets >= 1 of subset_size >= 2 images"):
        wbflow.kid(features, features, **settings)


# ----------------------------------------------------------------------------- 6. a newcomer's first run

def test_the_readmes_first_command_says_how_to_get_the_fid_weights_before_data_or_wandb(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv(wbflow.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for name in ("load_cifar10", "synthetic_images", "wandb_run", "setup_distributed"):
        monkeypatch.setattr(wbflow, name, lambda *args, name=name, **kwargs: pytest.fail(f"{name} before the check"))
    message = refused(train_flow.main, ["--out-dir", str(tmp_path / "out")], "FID every 50 epochs")
    hub_path = tmp_path / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE
    assert f"download {wbflow.FID_WEIGHTS_URL} to {hub_path}" in message
    assert "--set eval.fid_weights=PATH" in message and "--set eval.fid_interval=0" in message
    assert "weights_path" not in message and not (tmp_path / "out").exists()


def test_train_flow_has_its_own_default_folders(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    flow = train_flow.load_config(train_flow.parse_args([]))["data"]
    smoke = train_flow.load_config(train_flow.parse_args(["--smoke"]))["data"]
    assert flow["out_dir"] == "runs/flow" and smoke["out_dir"] == "runs/flow-smoke" and flow["data_dir"] == "data"
    assert train_fire.parse_args([]).out_dir not in (flow["out_dir"], smoke["out_dir"])
    assert "`runs/flow`" in (HERE / "README.md").read_text()


def test_the_end_of_a_run_prints_the_best_loss_the_last_fid_and_where_the_checkpoints_are(
        weights_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    out = tmp_path / "out"
    train_flow.main(FLOW + ["--no-wandb", "--epochs", "2", "--set", "eval.fid_interval=2",
                            "--set", "eval.fid_num_samples=4", "--set", "eval.inception_batch_size=32",
                            "--set", "training.keep_checkpoints=1", "--out-dir", str(out)])
    printed = capsys.readouterr().out.splitlines()
    last = wbflow.load_checkpoint(out / "last.pt")
    epoch_losses = {epoch: wbflow.load_checkpoint(out / f"checkpoint_epoch_{epoch}.pt")["epoch_loss"]
                    for epoch in (1, 2) if (out / f"checkpoint_epoch_{epoch}.pt").exists()}
    best_epoch = min(epoch_losses, key=epoch_losses.get)
    assert last["best_epoch"] == best_epoch and last["last_fid"]["epoch"] == 2
    assert printed[-2] == (f"done at step 4: best epoch loss {last['best_loss']:.4f} (epoch {best_epoch}), "
                           f"last FID {last['last_fid']['fid']:.2f} (epoch 2, 4 samples)")
    assert printed[-1] == (f"  last checkpoint: {out / 'last.pt'}; the lowest-loss checkpoint: "
                           f"{out / f'checkpoint_epoch_{best_epoch}.pt'} (epoch {best_epoch})")


def _help_text(call):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        call()
    return re.sub(r"\s+", " ", text.getvalue())


def test_help_has_no_doubled_defaults_and_every_fid_option_explained():
    for text in (_help_text(lambda: wbflow._command_line(["fid", "--help"])),
                 _help_text(lambda: train_flow.main(["--help"]))):
        assert "(default: None)" not in text and not re.search(r"\(default:[^)]*\) \(default:", text), text
    fid_help = _help_text(lambda: wbflow._command_line(["fid", "--help"]))
    options = fid_help.split("options:")[1]
    for option in ("--device DEVICE", "--batch-size BATCH_SIZE", "--weights WEIGHTS", "--resize", "--save-stats"):
        after = options.split(option, 1)[1].lstrip()
        assert not after.startswith("--"), f"{option} has no help"
    assert "--batch-size BATCH_SIZE images per Inception batch (default: 50)" in fid_help

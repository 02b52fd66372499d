"""train_flow.py stopped, killed and resumed: every stop and kill (mid-epoch, in the epoch's end, during FID
sampling or an upload) resumes to the record and weights of one uninterrupted run."""
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_flow
import wbflow
from conftest import (RunLog, SMALL_FLOW, _HANG, _table_data, assert_same_history, kill_when_marked,
                      read_run, refused, run_logs, scalar_rows, signal_on_call)

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- stops and kills against one uninterrupted run

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


def test_stops_mid_epoch_before_the_grid_and_between_table_rows_resume_the_same_run_to_the_same_record(
        finished_flow_run, offline_wandb, tmp_path, monkeypatch, capsys):
    argv = finished_flow_run.argv + ["--out-dir", str(tmp_path / "split")]
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
    assert_same_history(scalar_rows(*logs), scalar_rows(finished_flow_run.log))
    assert [row["_step"] for log in logs for row in log.rows_with("eval/generated_samples")] == [3, 6, 9]
    assert_same_end(tmp_path / "split", finished_flow_run)


def test_kills_mid_epoch_and_in_an_epochs_end_resume_in_new_runs_that_lose_and_repeat_nothing(
        finished_flow_run, offline_wandb, tmp_path, capsys):
    argv = finished_flow_run.argv + ["--out-dir", str(tmp_path / "killed")]
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
    assert_same_history(kept, scalar_rows(finished_flow_run.log))
    assert [row["_step"] for log in (first, second, third) for row in log.rows_with("eval/generated_samples")] == [
        3, 6, 9]
    assert_same_end(tmp_path / "killed", finished_flow_run)
    assert sorted(row[0] for row in _table_data(offline_wandb, third_id)[1]) == [1] * 4 + [2] * 4 + [3] * 4


def test_a_crash_in_an_epochs_end_resumes_from_a_moved_out_dir_in_a_new_run(finished_flow_run, offline_wandb, tmp_path,
                                                                            monkeypatch, capsys):
    real_save = wbflow.save_checkpoint

    def save_then_crash(state, path):
        saved = real_save(state, path)
        if state["epoch"] == 2 and not state["ended"]:
            raise KeyboardInterrupt
        return saved

    monkeypatch.setattr(wbflow, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_flow.main(finished_flow_run.argv + ["--out-dir", str(tmp_path / "first")])
    monkeypatch.setattr(wbflow, "save_checkpoint", real_save)
    shutil.move(tmp_path / "first", tmp_path / "moved")  # another machine, or another --out-dir
    last = tmp_path / "moved" / "last.pt"
    train_flow.main(finished_flow_run.argv + ["--out-dir", str(tmp_path / "moved"), "--resume", str(last)])
    assert "W&B: a new run" in capsys.readouterr().out
    crashed, resumed = run_logs(offline_wandb)
    assert crashed.exit_code == 1 and resumed.exit_code == 0
    assert resumed.config["resumed_from"] == {"run_id": crashed.run_id, "step": 6, "checkpoint": str(last)}
    assert_same_history(scalar_rows(crashed, resumed), scalar_rows(finished_flow_run.log))
    assert_same_end(tmp_path / "moved", finished_flow_run)  # the table's rows name their PNGs relative to the out dir
    assert sorted(row[0] for row in _table_data(offline_wandb, resumed.run_id)[1]) == [1] * 4 + [2] * 4 + [3] * 4


def test_without_wandb_a_stopped_and_a_finished_run_resume_to_the_uninterrupted_weights(finished_flow_run, tmp_path,
                                                                                       monkeypatch, capsys):
    argv = finished_flow_run.argv + ["--no-wandb", "--out-dir", str(tmp_path / "split")]
    last = tmp_path / "split" / "last.pt"
    real_loss = wbflow.rectified_flow_loss
    monkeypatch.setattr(wbflow, "rectified_flow_loss", signal_on_call(real_loss, 4))  # epoch 2, first step
    stopped(argv + ["--epochs", "2"], capsys)
    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    train_flow.main(argv + ["--epochs", "2", "--resume", str(last)])  # after a stop
    train_flow.main(argv + ["--epochs", "3", "--resume", str(last)])  # after a finished run
    printed = capsys.readouterr().out
    assert printed.count("resumed from") == 2 and "W&B" not in printed
    assert_same_end(tmp_path / "split", finished_flow_run)


# ----------------------------------------------------------------------------- a resume with more epochs

def test_train_flow_resumed_with_more_epochs_follows_the_longer_runs_learning_rate(offline_wandb, tmp_path):
    flags = SMALL_FLOW + ["--set", "training.warmup_steps=3"]
    train_flow.main(flags + ["--epochs", "3", "--out-dir", str(tmp_path / "whole")])
    train_flow.main(flags + ["--epochs", "2", "--out-dir", str(tmp_path / "short")])
    train_flow.main(flags + ["--epochs", "3", "--out-dir", str(tmp_path / "short"),
                             "--resume", str(tmp_path / "short" / "checkpoint_epoch_2.pt")])
    whole, short, resumed = run_logs(offline_wandb)
    rates = short.values("train/learning_rate") + resumed.values("train/learning_rate")
    assert rates == pytest.approx(whole.values("train/learning_rate"))
    after_warmup = rates[3:]
    assert after_warmup and all(later <= earlier for earlier, later in zip(after_warmup, after_warmup[1:]))


# ----------------------------------------------------------------------------- last.pt before the epoch's end

def test_last_pt_is_written_right_after_the_epochs_training(tmp_path, monkeypatch):
    seen = []

    def grid_reads_last_pt(*args, **kwargs):
        seen.append(wbflow.load_checkpoint(tmp_path / "out" / "last.pt"))
        raise RuntimeError("killed while sampling")

    monkeypatch.setattr(wbflow, "sample_flow", grid_reads_last_pt)
    with pytest.raises(RuntimeError, match="killed while sampling"):
        train_flow.main(SMALL_FLOW + ["--no-wandb", "--out-dir", str(tmp_path / "out")])
    [last] = seen
    assert (last["epoch"], last["global_step"], last["ended"], last["train_state"]) == (1, 2, False, None)
    assert last["table_rows"] == [] and last["epoch_loss"] == last["best_loss"] and last["best_epoch"] == 1
    assert set(last["last_window"]) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch",
                                        "train/skipped_steps"} and last["images_per_second"] > 0  # the epoch's row


# ----------------------------------------------------------------------------- stops inside the epoch's end

def test_sigterm_during_fid_sampling_stops_between_batches_and_the_resume_logs_the_fid_once(
        offline_wandb, weights_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    out = tmp_path / "out"
    argv = SMALL_FLOW + ["--epochs", "2", "--set", "data.max_images=16", "--set", "training.batch_size=8",
                         "--set", "eval.fid_interval=2", "--set", "eval.fid_num_samples=3",
                         "--set", "eval.sample_batch_size=1", "--set", "eval.inception_batch_size=32",
                         "--set", "training.keep_checkpoints=1", "--out-dir", str(out)]
    real_sample = wbflow.sample_flow
    sampled = signal_on_call(real_sample, 3)  # epoch 1: grid, table row; epoch 2: the first FID batch of three
    monkeypatch.setattr(wbflow, "sample_flow", sampled)
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM and sampled.calls == 3
    printed = capsys.readouterr().out
    command = shlex.join(["python", "train_flow.py", *argv, "--resume", str(out / "last.pt")])
    assert f"stopped at step 4 (epoch 2), in its end; continue with:\n  {command}" in printed
    last = wbflow.load_checkpoint(out / "last.pt")
    assert (last["ended"], last["wandb_last_act"], last["last_fid"], last["global_step"]) == (False, True, None, 4)

    monkeypatch.setattr(wbflow, "sample_flow", real_sample)
    train_flow.main(argv + ["--resume", str(out / "last.pt")])
    printed = capsys.readouterr().out.splitlines()
    assert "W&B: continuing run" in "\n".join(printed)
    first, second = run_logs(offline_wandb)
    assert first.run_id == second.run_id and (first.exit_code, second.exit_code) == (1, 0)
    assert first.rows_with("eval/fid_score") == [] and [row["_step"] for row in first.rows_with("train/loss")] == [
        1, 2, 3]  # epoch 2's last row waits for its end
    [fid_row] = second.rows_with("eval/fid_score")  # the epoch's row, whole: last window, loss, FID, grid
    assert fid_row["_step"] == 4 and fid_row["train/epoch"] == 2 and np.isfinite(fid_row["eval/fid_score"])
    assert {"train/loss", "train/epoch_loss", "eval/inception_score_mean", "eval/generated_samples"} <= set(fid_row)
    last = wbflow.load_checkpoint(out / "last.pt")
    assert last["last_fid"] == {"epoch": 2, "fid": pytest.approx(fid_row["eval/fid_score"]), "samples": 3}
    # the run's headline: the best epoch loss, the last FID, and the checkpoints kept (1 plus the lowest loss)
    best_epoch = last["best_epoch"]
    assert printed[-2] == (f"done at step 4: best epoch loss {last['best_loss']:.4f} (epoch {best_epoch}), "
                           f"last FID {last['last_fid']['fid']:.2f} (epoch 2, 3 samples)")
    assert printed[-1] == (f"  last checkpoint: {out / 'last.pt'}; the lowest-loss checkpoint: "
                           f"{out / f'checkpoint_epoch_{best_epoch}.pt'} (epoch {best_epoch})")
    assert (out / f"checkpoint_epoch_{best_epoch}.pt").exists() and (out / "checkpoint_epoch_2.pt").exists()


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
    argv = SMALL_FLOW + ["--epochs", "2", "--out-dir", str(root / "out")]
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


# ----------------------------------------------------------------------------- kills: a busy out-dir, a killed run's record

def test_a_second_run_on_a_busy_out_dir_is_refused_and_a_resume_works_after_a_kill(offline_wandb,
                                                                                   run_killed_in_its_upload):
    killed = run_killed_in_its_upload
    out = Path(killed["argv"][-1])
    assert re.fullmatch(rf"train_flow\.py: --out-dir {re.escape(str(out))} is in use by another run "
                        rf"\(process {killed['pid']}\): .*", killed["refusal"])
    assert killed["last"]["epoch"] == 1  # --overwrite deleted nothing
    train_flow.main(killed["argv"] + ["--resume", str(out / "last.pt")])  # the killed run's lock is gone with it
    assert wbflow.load_checkpoint(out / "last.pt")["epoch"] == 2


def test_a_run_killed_during_its_upload_keeps_what_the_epoch_logged(run_killed_in_its_upload):
    checkpoint = run_killed_in_its_upload["last"]  # right after the epoch's checkpoint, which a resume starts after
    log = RunLog(run_killed_in_its_upload["record"])
    assert log.exit_code is None  # killed: W&B never finished it
    windows = log.rows_with("train/loss")
    assert windows and windows[-1]["_step"] == checkpoint["global_step"]
    [epoch_loss] = log.rows_with("train/epoch_loss")
    assert epoch_loss["train/epoch_loss"] == checkpoint["epoch_loss"] and epoch_loss["train/epoch"] == 1
    assert log.rows_with("eval/generated_samples")

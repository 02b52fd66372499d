"""train_fire.py as a user runs it: the seed workflow, torchrun, the flags, stop and exact resume, preemption of
the process group, data that does not fit and a newcomer's first run."""
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image

import flow_config
import train_fire
import wbflow
from conftest import (SEED_CLASSES, _help_blocks, assert_same_history, fire_args, refused, run_logs, scalar_rows,
                      sigterm_after, table_json, write_pattern_folders)

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the seed workflow, torchrun, the flags

def logged_media(row, key):
    """A media value in a history row: a dict under `key`, or flattened into `key/...` items."""
    if key in row:
        return row[key]
    return {name[len(key) + 1:]: value for name, value in row.items() if name.startswith(key + "/")}


def custom_chart(config, key):
    """The panel wandb.plot.* registers for `key` in the run config (nested or flattened)."""
    return config.get("_wandb", {}).get("visualize", {}).get(key) or config.get(f"_wandb/visualize/{key}")


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


# ----------------------------------------------------------------------------- stop and resume

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


def headline(out_dir):
    """The last line a finished train_fire run prints, from its best_model.pth."""
    best = wbflow.load_checkpoint(out_dir / "best_model.pth")
    return f"best val_acc {best['val_acc']:.2f}% (epoch {best['epoch']}), model: {out_dir / 'best_model.pth'}"


def test_train_fire_without_wandb_resumed_after_its_last_epoch_only_reports(finished_fire_run, capsys):
    data, whole, argv, _ = finished_fire_run
    before = (whole / "last.pth").read_bytes()
    best_acc = train_fire.main(argv + ["--resume", str(whole / "last.pth")])
    printed = capsys.readouterr().out
    assert "resuming epoch 2 at batch 0, step 2" in printed and "W&B: off" in printed
    assert best_acc == wbflow.load_checkpoint(whole / "best_model.pth")["val_acc"]
    assert printed.splitlines()[-1] == headline(whole)
    assert (whole / "last.pth").read_bytes() == before


# ----------------------------------------------------------------------------- preemption of the process group

# At step 2 a process outside the group signals the whole group, as SLURM, timeout and Ctrl-C do: the loader
# workers too. (A signal from the main process itself would not show it: torch's workers exit quietly on a
# SIGTERM that their parent sends.)
GROUP_SIGTERM = """\
import os, signal, subprocess, sys
sys.path.insert(0, {here!r})
import train_fire, wbflow
real = wbflow.classification_loss
def signal_the_group_at_step_2(criterion):
    loss_fn, calls = real(criterion), []
    def counted(model, batch):
        calls.append(1)
        if len(calls) == 2:
            subprocess.run([sys.executable, "-c", f"import os; os.killpg({{os.getpgid(0)}}, {{signal.SIGTERM}})"],
                           start_new_session=True, check=True)
        return loss_fn(model, batch)
    return counted
wbflow.classification_loss = signal_the_group_at_step_2
train_fire.main()
"""


def test_train_fire_with_loader_workers_stops_cleanly_on_a_sigterm_to_its_process_group(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=8, classes=["a", "b", "c", "d", "e"])
    script = tmp_path / "group_sigterm.py"
    script.write_text(GROUP_SIGTERM.format(here=str(HERE)))
    argv = fire_args(data, tmp_path / "out", "--epochs", "1", "--no-wandb", "--num-workers", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(HERE)}
    stopped = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
                             timeout=180, start_new_session=True)  # its own group: the test is not signalled
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert wbflow.load_checkpoint(tmp_path / "out" / "last.pth")["train_state"]["batches"] == 2
    [command] = [line.strip() for line in stopped.stdout.splitlines() if "--resume" in line]
    assert command == shlex.join(["python", "train_fire.py", *argv, "--resume", str(tmp_path / "out" / "last.pth")])

    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=HERE, env=env, capture_output=True,
                             text=True, timeout=180, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end = wbflow.load_checkpoint(tmp_path / "out" / "last.pth")
    assert end["train_state"] is None and end["step"] == 3 and end["epoch"] == 0  # 30 training images


# ----------------------------------------------------------------------------- data that does not fit

def test_a_val_class_folder_missing_from_train_or_the_other_way_round_is_refused(tmp_path):
    layouts = {"extra_val": {"train": ["a", "b"], "val": ["a", "b", "c"]},
               "extra_train": {"train": ["a", "b", "c"], "val": ["b", "c"]}}
    for name, splits in layouts.items():
        for split, classes in splits.items():
            write_pattern_folders(tmp_path / name / split, per_class=2, classes=classes)
    with pytest.raises(ValueError, match=r"class folder\(s\) in .*extra_val/val that .*extra_val/train lacks: c$"):
        wbflow.find_image_samples(tmp_path / "extra_val")
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) not found in .*extra_train/val: a$"):
        wbflow.find_image_samples(tmp_path / "extra_train")
    train, val, names = wbflow.find_image_samples(tmp_path / "extra_val", class_names=["b", "a"])
    assert names == ["b", "a"] and len(train) == len(val) == 4  # named classes pick folders, in both


def _csv_folder(root, rows, images=("0.png", "1.png", "2.png", "3.png", "4.png", "5.png")):
    root.mkdir()
    for name in images:
        Image.new("RGB", (8, 8)).save(root / name)
    (root / "data.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return root / "data.csv"


def test_a_csv_row_repeating_an_earlier_one_is_dropped_with_a_warning_that_counts_them(tmp_path):
    rows = ["0.png,a", "1.png,a", "2.png,a", "3.png,b", "4.png,b", "5.png,b", "0.png,a", "./0.png,a", "3.png,b"]
    with pytest.warns(UserWarning, match=r"data\.csv: dropped 3 row\(s\) repeating an earlier one"):
        train, val, _ = wbflow.find_image_samples(_csv_folder(tmp_path / "csv", rows), val_split=0.34)
    paths = [Path(path).name for path, _ in train + val]
    assert sorted(paths) == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png"]


def test_a_csv_listing_one_file_with_two_labels_is_refused(tmp_path):
    rows = ["0.png,a", "1.png,a", "2.png,b", "3.png,b", "1.png,b"]
    with pytest.raises(ValueError, match=r"data\.csv: 1 file\(s\) listed with two labels: .*1\.png \(a and b\)$"):
        wbflow.find_image_samples(_csv_folder(tmp_path / "csv", rows))


def test_csv_rows_without_a_label_or_with_an_unnamed_label_are_refused_with_their_count_and_the_first_few(tmp_path):
    rows = ["0.png,a", "1.png,b", "2.png", "3.png", "4.png", "5.png"]
    with pytest.raises(ValueError, match=r"data\.csv: 4 row\(s\) that are not path,label: 2\.png, 3\.png, 4\.png, \.\.\.$"):
        wbflow.find_image_samples(_csv_folder(tmp_path / "short", rows))
    rows = ["0.png,a", "1.png,b", "2.png,c", "3.png,d"]
    with pytest.raises(ValueError, match=r"data\.csv: 2 label\(s\) not in the class names: c, d$"):
        wbflow.find_image_samples(_csv_folder(tmp_path / "named", rows), class_names=["a", "b"])


def test_csv_rows_naming_files_that_do_not_exist_are_refused_in_one_line_before_training(tmp_path):
    rows = ["0.png,a", "1.png,a", "2.png,b", "3.png,b"] + [f"gone{index}.png,a" for index in range(5)]
    csv_path = _csv_folder(tmp_path / "csv", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "unreadable": refused
        message = refused(train_fire.main, fire_args(csv_path, tmp_path / "out", "--no-wandb"),
                          r"data\.csv: 5 listed file\(s\) do not exist: .*gone0\.png, .*gone1\.png, .*gone2\.png, \.\.\.$")
    assert "gone3" not in message and not (tmp_path / "out" / "last.pth").exists()


def test_a_196_megapixel_image_is_kept_and_read_and_a_broken_one_still_skipped(tmp_path):
    for name in ("a", "b"):
        write_pattern_folders(tmp_path / "data", per_class=2, classes=[name])
    big = Image.new("1", (14000, 14000))  # 196 megapixels, 1 bit each: cheap to write, decoded in full
    big.paste(1, (0, 0, 7000, 7000))
    big.save(tmp_path / "data" / "a" / "big.png")
    broken = (tmp_path / "data" / "a" / "big.png").read_bytes()
    (tmp_path / "data" / "b" / "broken.png").write_bytes(broken[:len(broken) // 2])
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*broken\.png$") as caught:
        train, val, _ = wbflow.find_image_samples(tmp_path / "data", val_split=0.34)
    assert len(caught) == 1
    assert str(tmp_path / "data" / "a" / "big.png") in [path for path, _ in train + val]
    assert wbflow.drop_unreadable_images([(str(tmp_path / "data" / "a" / "big.png"), 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "could not read ...; using the next image" would be a warning
        image, label = wbflow.ImageSamples([(str(tmp_path / "data" / "a" / "big.png"), 0)])[0]
    assert image.size == (14000, 14000) and image.getpixel((0, 0)) == (255, 255, 255) and label == 0
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's limit is lifted only while reading


def test_torchrun_ranks_with_the_same_counts_but_other_class_names_stop_at_start(tmp_path):
    write_pattern_folders(tmp_path / "data0", per_class=4, classes=["a", "b"])
    write_pattern_folders(tmp_path / "data1", per_class=4, classes=["a", "c"])
    script = tmp_path / "other_classes.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(HERE)!r})\nimport train_fire\n"
                      "train_fire.main(sys.argv[2:] + ['--data-dir', sys.argv[1].replace('RANK', os.environ['RANK'])])\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": ""}
    argv = [str(tmp_path / "dataRANK"), *fire_args(tmp_path / "unused", tmp_path / "out", "--no-wandb")[2:]]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *argv], env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode != 0
    assert ("the ranks see different data: rank 0: 6 training images, 2 validation images, classes a b; "
            "rank 1: 6 training images, 2 validation images, classes a c") in result.stderr + result.stdout
    assert not (tmp_path / "out" / "last.pth").exists() and time.monotonic() - start < 120


# ----------------------------------------------------------------------------- a newcomer's first run

def test_train_fire_run_after_train_flow_in_the_same_folder_uses_its_own_default_folders(tmp_path, monkeypatch):
    flow_defaults = wbflow.load_yaml_config(flow_config.DEFAULT_CONFIG)["data"]
    fire_defaults = train_fire.parse_args([])
    assert fire_defaults.out_dir != flow_defaults["out_dir"] and fire_defaults.data_dir != flow_defaults["data_dir"]
    monkeypatch.chdir(tmp_path)
    for name in ("last.pt", "checkpoint_epoch_1.pt"):  # what train_flow leaves in its --out-dir
        wbflow.save_checkpoint({"driver": "train_flow"}, Path(flow_defaults["out_dir"]) / name)
    write_pattern_folders(Path(fire_defaults.data_dir), per_class=4, classes=["a", "b"])
    train_fire.main(fire_args("unused", "unused", "--epochs", "1", "--no-wandb")[4:])  # default folders
    assert (Path(fire_defaults.out_dir) / "best_model.pth").is_file()
    assert (Path(flow_defaults["out_dir"]) / "last.pt").is_file()


def test_the_out_dir_refusal_names_only_train_fires_resumable_file(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b"])
    wbflow.save_checkpoint({"driver": "train_fire"}, tmp_path / "out" / "last.pth")
    os.utime(tmp_path / "out" / "last.pth", (1, 1))
    wbflow.save_checkpoint({"driver": "train_flow"}, tmp_path / "out" / "last.pt")  # newer
    message = refused(train_fire.main, fire_args(data, tmp_path / "out"),
                      rf"holds an earlier run's checkpoints \(last\.pth\): pass --resume {tmp_path / 'out' / 'last.pth'} ")
    assert "last.pt " not in message and "last.pt)" not in message


def test_an_empty_out_dir_is_refused_before_anything_is_written_into_the_current_folder(tmp_path, monkeypatch):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b"])
    monkeypatch.chdir(tmp_path)
    for argv in (fire_args(data, ""), ["--predict", str(data / "a"), "--out-dir", ""]):
        refused(train_fire.main, argv, r"^train_fire: --out-dir is empty: name a folder$")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


def test_a_training_run_refuses_to_write_its_checkpoints_over_its_data_list(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b"])
    (tmp_path / "out").mkdir()
    listed = "".join(f"{path},{path.parent.name}\n" for path in sorted(data.rglob("*.png")))
    (tmp_path / "out" / "last.pth").write_text(listed)  # a list where the run writes last.pth
    refused(train_fire.main, fire_args(tmp_path / "out" / "last.pth", tmp_path / "out", "--overwrite", "--no-wandb"),
            r"--out-dir's last\.pth \S*/out/last\.pth would overwrite an input of this command \(--data-dir ")
    assert (tmp_path / "out" / "last.pth").read_text() == listed


def test_a_sweep_agents_runs_each_get_their_own_default_out_dir(monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    assert train_fire.parse_args([]).out_dir == "runs/fire/run7"


def test_a_finished_run_ends_with_the_best_val_acc_its_epoch_and_the_model_file(finished_fire_run):
    data, whole, argv, printed = finished_fire_run
    # each class quoted, so that a name with a space reads as one
    assert "classes: '中风险', '低风险', '无风险', '非楼道', '高风险'\n" in printed
    best = wbflow.load_checkpoint(whole / "best_model.pth")
    assert best["epoch"] in (0, 1) and printed.splitlines()[-1] == headline(whole)
    assert f"Val Acc: {best['val_acc']:.2f}%" in printed


def test_train_fire_help_says_each_default_once_and_what_resume_needs_of_epochs():
    blocks = _help_blocks(train_fire.main)
    for option, block in blocks.items():
        if option != "-h":
            assert block.count("default") == 1 and "(None" not in block, block
    assert "--resume needs the run's own" in blocks["--epochs"] and "keeps its own" not in blocks["--epochs"]
    assert "default: on for CUDA only" in blocks["--amp"]

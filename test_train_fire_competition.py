"""train_fire.py on the competition: its download's layout, --predict and the submission, the score, --smoke,
k-fold runs, --cv and ensembles, and torchvision's recipe (augmentation, MixUp/CutMix, EMA, any backbone)."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_fire
import wbflow
from conftest import (MIX, SEED_CLASSES, fire_args, read_records, refused, run_logs, sigterm_after, table_json,
                      within, write_download, write_pattern_folders)

# ----------------------------------------------------------------------------- the competition's download

HERE = Path(__file__).resolve().parent
SEED_ORDER = ",".join(SEED_CLASSES)  # 高风险,中风险,低风险,无风险,非楼道: the seed's label indices


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run on the download (28 training, 7 validation images) with W&B offline, balanced batches,
    label smoothing and the best model by macro-F1: (root, out dir, argv, {name: label}, A's names, its RunLog,
    whose `warned` holds the messages of the warnings the run gave)."""
    root = tmp_path_factory.mktemp("tianchi")
    labelled, test_names = write_download(root / "data")
    argv = fire_args(root / "data", root / "out", "--epochs", "2", "--class-names", SEED_ORDER, "--sampler",
                     "balanced", "--label-smoothing", "0.1", "--best-metric", "val_macro_f1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread sets for each test, which runs after this fixture
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
                           "WANDB_CONSOLE": "off"}.items():
            patch.setenv(key, value)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_fire.main(argv)
        finally:
            torch.set_num_threads(threads)
        [log] = run_logs(root)
    log.warned = [str(warning.message) for warning in caught]
    return root / "data", root / "out", argv, labelled, test_names, log


def test_the_download_as_it_is_trains_and_logs_macro_f1_and_each_class_f1_every_epoch(trained):
    data, out, argv, labelled, _, log = trained
    assert log.exit_code == 0
    assert log.config["classes"] == SEED_CLASSES and (log.config["train_images"], log.config["val_images"]) == (28, 7)
    assert log.config["class_counts"] == [1, 4, 6, 16, 1]  # the training split of MIX, in the seed's order
    # 高风险 has no validation image: said once, and it neither scores 0 nor caps val_macro_f1
    assert [message for message in log.warned if "no image of class" in message] == [
        "the validation set has no image of class(es) '高风险': val_macro_f1 is the mean over the classes that occur "
        "in its labels or predictions, and a class in neither has no F1"]
    epochs = log.rows_with("val_acc")
    assert [row["epoch"] for row in epochs] == [0, 1]
    for row in epochs:
        per_class = [row[f"val_f1/{name}"] for name in SEED_CLASSES if f"val_f1/{name}" in row]
        assert set(SEED_CLASSES[1:]) <= {key[len("val_f1/"):] for key in row if key.startswith("val_f1/")}
        assert all(0 <= f1 <= 1 for f1 in per_class) and row["val_macro_f1"] == pytest.approx(np.mean(per_class))
    assert log.summary["val_macro_f1"] == {"max": max(log.values("val_macro_f1"))}
    for name in SEED_CLASSES[1:]:
        assert log.summary[f"val_f1/{name}"] == {"max": max(log.values(f"val_f1/{name}"))}

    # the best model follows --best-metric val_macro_f1, and its F1 is the validation set's, recomputed here
    best = wbflow.load_checkpoint(out / "best_model.pth")
    assert log.summary["best_val_macro_f1"] == best["val_macro_f1"] == max(log.values("val_macro_f1"))
    assert "best_val_acc" not in log.summary
    [best_row] = [row for row in epochs if row["epoch"] == best["epoch"]]
    _, val_samples, _ = wbflow.find_image_samples(data, class_names=SEED_CLASSES, val_split=0.2, seed=0)
    model = wbflow.build_classifier("resnet18", 5)
    model.load_state_dict(best["model"])
    logits, labels = wbflow.predict_logits(model, wbflow.ImageSamples(
        val_samples, wbflow.image_transforms(32, train=False)))
    f1, macro_f1 = wbflow.f1_scores(labels.tolist(), logits.argmax(1).tolist(), 5)
    assert {name: best_row[f"val_f1/{name}"] for name in SEED_CLASSES if f"val_f1/{name}" in best_row} == (
        pytest.approx({name: f for name, f in zip(SEED_CLASSES, f1) if f == f}))
    from torchmetrics.classification import MulticlassF1Score
    assert best_row["val_macro_f1"] == pytest.approx(float(MulticlassF1Score(5, average="macro")(logits.argmax(1), labels)))
    assert [a["metadata"]["val_macro_f1"] for a in log.artifacts if a["type"] == "model"][-1] == best["val_macro_f1"]


def test_the_data_dir_may_name_the_list_or_its_folder_and_a_tab_list_reads_names_in_the_folder_named_like_it(trained):
    data, _, _, labelled, _, _ = trained
    assert wbflow.find_image_samples(data) == wbflow.find_image_samples(data / "train.txt")
    rows, class_names = wbflow.list_images(data / "train.txt")
    assert class_names == sorted(MIX) and {name: class_names[label] for name, _, label in rows} == labelled
    assert all(path == str(data / "train" / name) for name, path, _ in rows)


# the competition's classes, imbalanced as its download is: 25 training images, 6 to predict
CLASS_COUNTS = {"高风险": 3, "中风险": 4, "低风险": 5, "无风险": 10, "非楼道": 3}


FOLDS_RECIPE = ["--augment", "trivialaugment", "--random-erase", "0.25", "--mixup", "0.2", "--cutmix", "1.0",
          "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """`--folds 2` on the competition's layout, one epoch a fold, with torchvision's recipe (TrivialAugment, random
    erasing, MixUp and CutMix, an EMA) and W&B offline: two fold runs, then --cv. (root, experiment folder, argv,
    {training image: class}, [fold 0's RunLog, fold 1's, the cv run's], what it printed)."""
    root = tmp_path_factory.mktemp("folds")
    labelled, _ = wbflow.write_pattern_dataset(root / "data", CLASS_COUNTS, test_images=6, seed=0)
    argv = fire_args(root / "data", root / "cv", "--folds", "2", "--epochs", "1", "--best-metric", "val_score",
                     *FOLDS_RECIPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread sets for each test, which runs after this fixture
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
                           "WANDB_CONSOLE": "off"}.items():
            patch.setenv(key, value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a fold's validation set may lack a class: that warning is tested
                train_fire.main(argv)
        finally:
            torch.set_num_threads(threads)
    labelled = {str(root / "data" / "train" / name): label for name, label in labelled.items()}
    return root, root / "cv", argv, labelled, run_logs(root), printed.getvalue()


RECIPE = ["--augment", "randaugment", "--random-erase", "0.5", "--mixup", "0.2", "--cutmix", "1.0",
          "--ema-decay", "0.8", "--warmup-epochs", "1"]


def _last(out):
    return wbflow.load_checkpoint(out / "last.pth")


def test_the_recipe_stopped_mid_epoch_and_resumed_trains_exactly_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    # 15 training images, batches of 4: 3 steps an epoch, a warm-up epoch and a cosine one; the stop at step 4
    data = write_pattern_folders(tmp_path / "data", per_class=6, classes=["a", "b", "c"])
    flags = ["--epochs", "2", "--batch-size", "4", "--no-wandb", *RECIPE]
    train_fire.main(fire_args(data, tmp_path / "whole", *flags))
    argv = fire_args(data, tmp_path / "split", *flags)
    real_loss, wraps = wbflow.classification_loss, iter([sigterm_after(4)])
    monkeypatch.setattr(wbflow, "classification_loss", lambda criterion: next(wraps)(real_loss(criterion)))
    with pytest.raises(SystemExit) as stopped:
        train_fire.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _last(tmp_path / "split")["train_state"]["batches"] == 1 and _last(tmp_path / "split")["ema"]
    monkeypatch.setattr(wbflow, "classification_loss", real_loss)
    refused(train_fire.main, [*argv, "--resume", str(tmp_path / "split" / "last.pth"), "--mixup", "0.3"],
            r"trained with mixup 0\.2, this run has 0\.3")
    train_fire.main([*argv, "--resume", str(tmp_path / "split" / "last.pth")])
    assert "resuming epoch 1 at batch 1, step 4" in capsys.readouterr().out
    whole, split = _last(tmp_path / "whole"), _last(tmp_path / "split")
    assert split["step"] == whole["step"] == 6 and split["config"]["scheduler"] == "SequentialLR"
    for key in ("model", "ema"):  # the weights and their EMA, as if never stopped
        for name, tensor in whole[key].items():
            torch.testing.assert_close(split[key][name], tensor, rtol=1e-5, atol=1e-6)
    assert split["best"] == whole["best"]


def test_a_convnext_trains_and_predicts_with_the_preprocessing_its_checkpoint_keeps(tmp_path, monkeypatch):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b", "c"])
    train_fire.main(fire_args(data, tmp_path / "out", "--model", "convnext_tiny", "--epochs", "1", "--image-size",
                              "40", "--no-wandb"))
    best = wbflow.load_checkpoint(tmp_path / "out" / "best_model.pth")
    assert best["config"]["model"] == "convnext_tiny" and best["model"]["classifier.2.weight"].shape == (3, 768)
    assert (best["config"]["image_size"], best["config"]["mean_std"]) == (40, wbflow.IMAGENET_MEAN_STD)
    used, real = [], wbflow.image_transforms
    monkeypatch.setattr(wbflow, "image_transforms", lambda *args, **kwargs: used.append((args, kwargs)) or real(
        *args, **kwargs))
    train_fire.main(["--predict", str(data / "a"), "--checkpoint", str(tmp_path / "out" / "best_model.pth"),
                     "--num-workers", "0", "--no-wandb"])
    assert used == [((40,), {"train": False, "mean_std": wbflow.IMAGENET_MEAN_STD})]
    assert len((tmp_path / "out" / "submission.txt").read_text().splitlines()) == 4


def _argv(data, *extra):
    return ["--data-dir", str(data), "--num-workers", "0", *extra]


def test_the_competitions_classes_select_on_its_score_by_default_and_others_on_val_acc(tmp_path):
    other = write_pattern_folders(tmp_path / "other", per_class=3, classes=["a", "b"])
    competition = write_pattern_folders(tmp_path / "competition", per_class=3)
    for data, extra, weights, metric in ((other, [], [1.0, 1.0], "val_acc"),
                                         (other, ["--score-weights", "b=3"], [1.0, 3.0], "val_acc"),
                                         (competition, [], None, "val_score")):
        args = train_fire.parse_args(_argv(data, *extra))
        class_names, *_ = train_fire.load_data(args, torch.device("cpu"), 0, 1)
        assert args.best_metric == metric
        assert args.score_weights == (weights or [train_fire.COMPETITION_WEIGHTS[name] for name in class_names])
    assert sorted(class_names) == sorted(SEED_CLASSES) and sum(args.score_weights) == 6.5


def test_the_new_flags_take_the_sweep_agents_spelling_and_a_resume_keeps_them():
    args = train_fire.parse_args(["--random_erase=0.1", "--ema_decay=0.99", "--warmup_epochs=1", "--folds=5",
                                  "--fold=1", "--augment=randaugment", "--mixup=0.2", "--cutmix=1",
                                  "--score_weights=a=2,b=0.5", "--best_metric=val_score"])
    assert (args.random_erase, args.ema_decay, args.warmup_epochs, args.folds, args.fold, args.augment) == (
        0.1, 0.99, 1, 5, 1, "randaugment")
    assert (args.mixup, args.cutmix, args.score_weights, args.best_metric) == (0.2, 1.0, {"a": 2.0, "b": 0.5},
                                                                               "val_score")
    assert {"random_erase", "ema_decay", "warmup_epochs", "folds", "fold", "augment", "mixup", "cutmix",
            "score_weights", "best_metric"} <= set(train_fire.RESUME_SAME)


# ----------------------------------------------------------------------------- predict and submit

def predict_argv(trained, *extra):
    data, out, *_ = trained
    return ["--predict", str(data / "A.txt"), "--checkpoint", str(out / "best_model.pth"), "--num-workers", "0",
            "--project", "test", *extra]


def test_predict_writes_a_line_for_every_listed_image_in_the_lists_order_and_logs_a_predict_run(
        trained, offline_wandb, capsys):
    data, out, _, _, test_names, training_log = trained
    default_checkpoint = ["--predict", str(data / "A.txt"), "--out-dir", str(out), "--num-workers", "0",
                          "--project", "test"]  # OUT/best_model.pth
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*0badc0de\.jpg$"):
        submission = train_fire.main(default_checkpoint)
    assert submission == out / "submission.txt"
    assert "7 predictions (1 unreadable: 无风险)" in capsys.readouterr().out
    lines = submission.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == test_names  # A.txt's order, no header
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] in SEED_CLASSES for line in lines)
    assert lines[2] == "0badc0de.jpg\t无风险"  # unreadable: the training set's most frequent class
    header, *rows = [line.split(",") for line in (out / "predictions.csv").read_text(encoding="utf-8").splitlines()]
    assert header == ["name", *SEED_CLASSES] and [row[0] for row in rows] == test_names
    assert rows[2][1:] == [""] * 5
    for line, row in zip(lines, rows):
        if row[1]:
            probs = [float(p) for p in row[1:]]
            assert sum(probs) == pytest.approx(1, abs=1e-5) and line.split("\t")[1] == SEED_CLASSES[np.argmax(probs)]

    [log] = run_logs(offline_wandb)
    [run] = [record.run for record in read_records(next(offline_wandb.glob("wandb/*run-*/*.wandb")))
             if record.WhichOneof("record_type") == "run"]
    assert run.job_type == "predict" and log.exit_code == 0 and log.config["predict"] == str(data / "A.txt")
    # the file the default named, its hash, and a use of the training run's model artifact holding it
    assert log.config["checkpoint"] == str(out / "best_model.pth")
    assert log.config["checkpoint_sha256"] == wbflow.file_sha256(out / "best_model.pth")
    [model] = [a for a in log.artifacts if a["type"] == "model"]
    assert model["name"] == f"model-{training_log.run_id}" and model["used"]
    table = table_json(offline_wandb, "predictions")
    assert table["columns"] == ["image", "predicted", "confidence"] and len(table["data"]) == 6  # no true labels
    assert [row[1] for row in table["data"]] == [line.split("\t")[1] for line in lines if "0badc0de" not in line]
    [artifact] = [a for a in log.artifacts if a["type"] == "submission"]
    assert artifact["files"] == ["submission.txt"] and artifact["metadata"]["images"] == 7


def test_predict_on_a_folder_writes_its_sorted_names_and_tta_moves_the_probabilities(trained, tmp_path):
    data, *_ = trained
    with pytest.warns(UserWarning, match="unreadable"):
        plain = train_fire.main(predict_argv(trained, "--no-wandb", "--predict", str(data / "A"),  # a folder to make
                                             "--submission", f"{tmp_path / 'plain'}/"))  # (its submission.txt)
        tta = train_fire.main(predict_argv(trained, "--no-wandb", "--predict", str(data / "A"), "--tta",
                                           "--submission", str(tmp_path / "tta" / "s.txt")))
    assert plain == tmp_path / "plain" / "submission.txt"
    names = [line.split("\t")[0] for line in plain.read_text(encoding="utf-8").splitlines()]
    assert names == sorted(path.name for path in (data / "A").iterdir())
    assert (plain.parent / "predictions.csv").read_text() != (tta.parent / "predictions.csv").read_text()


def test_predict_skips_a_fifo_named_in_the_test_list_with_a_counted_warning_instead_of_waiting_on_it(
        trained, tmp_path, capsys):
    data, _, _, _, test_names, _ = trained
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / test_names[0]).write_bytes((data / "A" / test_names[0]).read_bytes())
    os.mkfifo(tmp_path / "A" / "pipe.jpg")
    listed = _write(tmp_path / "A.txt", f"pipe.jpg\n{test_names[0]}\n")
    argv = predict_argv(trained, "--no-wandb", "--predict", str(listed), "--submission", str(tmp_path / "out" / "s.txt"))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*pipe\.jpg$"):
        submission = within(60, train_fire.main, argv, fifo=tmp_path / "A" / "pipe.jpg")
    assert "2 predictions (1 unreadable: 无风险)" in capsys.readouterr().out
    assert [line.split("\t")[0] for line in submission.read_text(encoding="utf-8").splitlines()] == [
        "pipe.jpg", test_names[0]]


def _linked(tmp_path, folder):
    (tmp_path / "link").symlink_to(folder)
    return tmp_path / "link"


def _listing_predictions_csv(tmp_path, data):  # a list named like the probability CSV written beside the submission
    (tmp_path / "predictions.csv").write_text("".join(f"{path}\n" for path in sorted((data / "A").iterdir())))
    return ["--predict", str(tmp_path / "predictions.csv"), "--submission", str(tmp_path / "s.txt")]


@pytest.mark.parametrize("extra, match", [
    (lambda tmp, data, out: ["--submission", str(data / "A.txt")],
     r"--submission \S*/A\.txt would overwrite an input of this command \(--predict \S*/A\.txt\)$"),
    (lambda tmp, data, out: ["--submission", str(out / "best_model.pth")],
     r"--submission \S*/best_model\.pth would overwrite an input of this command \(--checkpoint \S*/best_model\.pth\)$"),
    (lambda tmp, data, out: ["--submission", f"{data}/./A/../A.txt"],
     r"--submission \S*/data/A/\.\./A\.txt would overwrite an input of this command \(--predict \S*/A\.txt\)$"),
    (lambda tmp, data, out: ["--submission", str(_linked(tmp, data) / "A.txt")],
     r"--submission \S*/link/A\.txt would overwrite an input of this command \(--predict "),
    (lambda tmp, data, out: ["--submission", str(data / "A" / "0badc0de.jpg")],
     r"would overwrite an input of this command \(an image --predict lists \S*/A/0badc0de\.jpg\)$"),
    (lambda tmp, data, out: ["--submission", str(tmp / "predictions.csv")],
     r"predictions\.csv \S*/predictions\.csv would overwrite another output of this command \(--submission "),
    (lambda tmp, data, out: _listing_predictions_csv(tmp, data),
     r"predictions\.csv \S*/predictions\.csv would overwrite an input of this command \(--predict "),
    (lambda tmp, data, out: ["--submission", str(data / "A.txt" / "submission.txt")],  # under a file: unwritable
     r"--submission \S*/A\.txt/submission\.txt cannot be written \(\S*/A\.txt: Not a directory\)$"),
])
def test_predict_refuses_an_output_that_is_an_input_or_cannot_be_written_before_predicting(
        trained, tmp_path, monkeypatch, extra, match):
    data, out, *_ = trained
    inputs = {path: path.read_bytes() for path in [data / "A.txt", out / "best_model.pth", *(data / "A").iterdir()]}
    monkeypatch.setattr(wbflow, "predict_images", lambda *args, **kwargs: pytest.fail("predicted before checking"))
    refused(train_fire.main, predict_argv(trained, "--no-wandb", *extra(tmp_path, data, out)), match)
    assert all(path.read_bytes() == content for path, content in inputs.items())
    assert not (data / "predictions.csv").exists() and not (data / "A" / "predictions.csv").exists()


def test_predict_refuses_a_list_whose_lines_are_not_one_name_each(trained, tmp_path, monkeypatch):
    data, *_ = trained
    names = (data / "A.txt").read_text().splitlines()
    # a name opening a quote swallows the lines after it: 7 lines, 2 names
    (tmp_path / "A.txt").write_text("\n".join([names[0], '"' + names[1], *names[2:]]) + "\n")
    monkeypatch.setattr(wbflow, "predict_images", lambda *args, **kwargs: pytest.fail("predicted before checking"))
    refused(train_fire.main, predict_argv(trained, "--no-wandb", "--predict", str(tmp_path / "A.txt")),
            r"A\.txt has 7 lines, but 2 names were read from them: the submission would not match the list line for "
            r"line$")


def test_predict_keeps_the_first_of_names_without_suffixes_and_reads_a_checkpoint_without_class_counts(
        trained, tmp_path, capsys):
    data, out, _, _, test_names, _ = trained
    (tmp_path / "T").mkdir()
    for name in test_names:  # the names without their .jpg, as some downloads list them
        (tmp_path / "T" / name[:-4]).write_bytes((data / "A" / name).read_bytes())
    (tmp_path / "T.txt").write_text("".join(name[:-4] + "\n" for name in test_names))
    older = wbflow.load_checkpoint(out / "best_model.pth")  # as written before --predict existed
    del older["config"]["class_counts"], older["config"]["mean_std"]
    wbflow.save_checkpoint(older, tmp_path / "older.pth")
    with pytest.warns(UserWarning, match="unreadable"):
        submission = train_fire.main(predict_argv(trained, "--no-wandb", "--predict", str(tmp_path / "T.txt"),
                                                  "--checkpoint", str(tmp_path / "older.pth")))
    lines = [line.split("\t") for line in submission.read_text(encoding="utf-8").splitlines()]
    assert [name for name, _ in lines] == [name[:-4] for name in test_names]  # the first row is an image too
    guesses = [label for name, label in lines if name != "0badc0de"]
    most_predicted = max(SEED_CLASSES, key=lambda label: (guesses.count(label), -SEED_CLASSES.index(label)))
    assert dict(lines)["0badc0de"] == most_predicted
    assert f"7 predictions (1 unreadable: {most_predicted}, the most frequent prediction) in" in capsys.readouterr().out


def test_predict_tta_averages_the_probabilities_of_each_image_and_its_mirror():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    images = torch.randn(5, 3, 4, 4)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(5))
    logits, _ = wbflow.predict_logits(model, dataset, batch_size=2, tta=True)
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    torch.testing.assert_close(logits.softmax(1), expected)
    assert not torch.allclose(logits.softmax(1), model(images).softmax(1))


def test_predict_on_a_labelled_list_prints_and_logs_its_accuracy_and_macro_f1(trained, offline_wandb, tmp_path, capsys):
    data, _, _, labelled, _, _ = trained
    submission = train_fire.main(predict_argv(trained, "--predict", str(data / "train.txt"),
                                              "--submission", str(tmp_path / "train_submission.txt")))
    guesses = dict(line.split("\t") for line in submission.read_text(encoding="utf-8").splitlines())
    y_true = [SEED_CLASSES.index(label) for label in labelled.values()]
    y_pred = [SEED_CLASSES.index(guesses[name]) for name in labelled]
    accuracy = 100.0 * np.mean(np.equal(y_true, y_pred))
    macro_f1 = wbflow.f1_scores(y_true, y_pred, 5)[1]
    assert f"35 labelled images: accuracy {accuracy:.2f}%, macro-F1 {macro_f1:.4f}" in capsys.readouterr().out
    [log] = run_logs(offline_wandb)
    assert log.summary["accuracy"] == pytest.approx(accuracy) and log.summary["macro_f1"] == pytest.approx(macro_f1)


# ----------------------------------------------------------------------------- the competition's score

def test_val_score_is_logged_every_epoch_as_the_score_of_the_validation_predictions(trained):
    data, out, *_, log = trained
    weights = [train_fire.COMPETITION_WEIGHTS[name] for name in SEED_CLASSES]
    assert log.config["score_weights"] == weights and log.summary["val_score"] == {"max": max(log.values("val_score"))}
    best = wbflow.load_checkpoint(out / "best_model.pth")
    [best_row] = [row for row in log.rows_with("val_score") if row["epoch"] == best["epoch"]]
    _, val_samples, _ = wbflow.find_image_samples(data, class_names=SEED_CLASSES, val_split=0.2, seed=0)
    model = wbflow.build_classifier("resnet18", 5, state_dict=best["model"])
    val_set = wbflow.ImageSamples(val_samples, wbflow.image_transforms(32, train=False))
    logits, labels = wbflow.predict_logits(model, val_set)
    score = wbflow.weighted_f1_score(labels, logits.argmax(1), weights)
    assert best_row["val_score"] == best["val_score"] == pytest.approx(score)


# ----------------------------------------------------------------------------- label smoothing

def test_label_smoothing_goes_into_the_cross_entropy(tmp_path):
    args = train_fire.parse_args(fire_args(tmp_path, tmp_path / "out", "--label-smoothing", "0.2"))
    criterion = train_fire.build_model(args, 3, [0, 1, 2], 1, torch.device("cpu")).criterion  # also val_loss's
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.2))


# ----------------------------------------------------------------------------- the smoke run and its generated data

def test_smoke_flags_given_win_over_its_defaults():
    smoke = train_fire.parse_args(["--smoke", "--epochs", "1", "--out-dir", "elsewhere"])
    assert (smoke.epochs, smoke.out_dir, smoke.model, smoke.weights, smoke.data_dir) == (
        1, "elsewhere", "resnet18", "none", None)  # no --data-dir: its own data, in OUT/data
    assert train_fire.parse_args(["--smoke", "--data-dir", "data/fire"]).data_dir == "data/fire"
    assert train_fire.parse_args([]).model == "resnet50"


def test_smoke_writes_the_download_trains_on_the_cpu_offline_and_writes_the_submission(
        offline_wandb, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")  # the smoke run sets it
    out = tmp_path / "smoke"
    train_fire.main(["--smoke", "--out-dir", str(out)])
    assert os.environ["WANDB_MODE"] == "offline"
    train_run, predict_run = run_logs(offline_wandb)
    assert train_run.exit_code == predict_run.exit_code == 0
    assert (train_run.config["device"], train_run.config["model"], train_run.config["epochs"]) == ("cpu", "resnet18", 2)
    assert sorted(train_run.config["classes"]) == sorted(SEED_CLASSES)  # the download's labels, read from train.txt
    epochs = train_run.rows_with("val_acc")
    assert [row["epoch"] for row in epochs] == [0, 1]
    for row in epochs:  # the seed's keys, every epoch
        assert {"epoch", "epoch/train_loss", "epoch/train_acc", "val_loss", "val_acc", "val_macro_f1"} <= set(row)
        assert any(key.startswith("val_f1/") for key in row)
    # the competition's classes: best_model.pth follows the competition's score
    assert train_run.config["best_metric"] == "val_score" and train_run.summary["val_score"]["max"] > 0
    assert train_run.rows_with("best_val_score") and train_run.rows_with("confusion_matrix_table")
    listed = (out / "data" / "A.txt").read_text(encoding="utf-8").splitlines()
    lines = (out / "submission.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(listed) == 20 and [line.split("\t")[0] for line in lines] == listed
    assert {line.split("\t")[1] for line in lines} <= set(SEED_CLASSES) and (out / "predictions.csv").is_file()
    assert predict_run.config["predict"] == str(out / "data" / "A.txt")
    assert f"20 predictions (0 unreadable: 无风险) in {out / 'submission.txt'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- refusals: one line, before any work

@pytest.mark.parametrize("change, extra, match", [
    (lambda data: open(data / "train.txt", "a").write("".join(f"gone{i}.jpg\t无风险\n" for i in range(4))), [],
     r"train\.txt: 4 listed file\(s\) do not exist: .*/train/gone0\.jpg, .*/train/gone1\.jpg, .*/train/gone2\.jpg, "
     r"\.\.\.$"),
    (lambda data: open(data / "train.txt", "a").write(f"{next((data / 'train').iterdir()).name}\t高危\n"),
     ["--class-names", SEED_ORDER], r"train\.txt: 1 label\(s\) not in the class names: 高危$"),
    (lambda data: (data / "train.txt").write_text("\n\n"), [], r"train\.txt lists no images$"),
    (lambda data: None, ["--class-names", SEED_ORDER + ",消防通道"], r"no readable images in .* for class\(es\): 消防通道$"),
    (lambda data: None, ["--label-smoothing", "1"], r"--label-smoothing 1\.0 needs --loss ce and a value below 1$"),
    (lambda data: None, ["--label-smoothing", "0.1", "--loss", "focal"], r"needs --loss ce"),
])
def test_training_data_and_settings_that_do_not_fit_are_refused_in_one_line(tmp_path, change, extra, match):
    write_download(tmp_path / "data", mix=dict.fromkeys(SEED_CLASSES, 2), test_images=0)
    change(tmp_path / "data")
    refused(train_fire.main, fire_args(tmp_path / "data", tmp_path / "out", "--no-wandb", *extra), match)
    assert not (tmp_path / "out" / "last.pth").exists()


@pytest.mark.parametrize("setting, value, match", [
    ("--sampler", "shuffle", r"trained with sampler balanced, this run has shuffle"),
    ("--best-metric", "val_acc", r"trained with best_metric val_macro_f1, this run has val_acc"),
    ("--label-smoothing", "0", r"trained with label_smoothing 0\.1, this run has 0\.0"),
])
def test_a_resume_refuses_another_sampler_best_metric_or_label_smoothing(trained, setting, value, match):
    _, out, argv, *_ = trained
    with pytest.warns(UserWarning, match=r"no image of class\(es\) '高风险'"):  # the data is read first
        refused(train_fire.main, argv + ["--no-wandb", "--resume", str(out / "last.pth"), setting, value], match)


@pytest.mark.parametrize("change, match", [
    (lambda tmp, out: ["--checkpoint", str(tmp / "none.pth")], r"checkpoint not found: .*none\.pth$"),
    (lambda tmp, out: ["--checkpoint", str(wbflow.save_checkpoint({"driver": "train_flow"}, tmp / "flow.pt"))],
     r"not a train_fire checkpoint \(train_flow wrote it\)$"),
    (lambda tmp, out: ["--checkpoint", "model-0000:best"], r"model-0000:best is neither a checkpoint file nor"),
    (lambda tmp, out: ["--predict", str(_write(tmp / "l.txt", "a.jpg\t高危\n"))],
     r"l\.txt: 1 label\(s\) not in the class names: 高危$"),
    (lambda tmp, out: ["--predict", str(_write(tmp / "l.txt", "a.jpg\nb.jpg\n"))],
     r"none of the 2 image file\(s\) can be read$"),
])
def test_predict_refuses_in_one_line_before_writing_anything(trained, tmp_path, change, match):
    _, out, *_ = trained
    before = sorted(path.name for path in out.iterdir())
    with warnings_allowed():
        refused(train_fire.main, predict_argv(trained, "--no-wandb", *change(tmp_path, out)), match)
    assert sorted(path.name for path in out.iterdir()) == before and not (tmp_path / "submission.txt").exists()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def warnings_allowed():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipped 2 unreadable image file(s)" before its refusal
        yield


# ----------------------------------------------------------------------------- k-fold cross-validation: a fold is one run

def test_a_fold_of_find_image_samples_validates_on_that_fold_and_trains_on_the_others(folds_run):
    root, *_ = folds_run
    train0, val0, classes = wbflow.find_image_samples(root / "data", fold=(0, 2), seed=0)
    train1, val1, _ = wbflow.find_image_samples(root / "data", fold=(1, 2), seed=0)
    assert sorted(val0 + val1) == sorted(train0 + val0) == sorted(train1 + val1)
    assert not set(val0) & set(val1) and sorted(classes) == sorted(CLASS_COUNTS)
    with pytest.raises(ValueError, match="cannot make 26 folds"):
        wbflow.find_image_samples(root / "data", fold=(0, 26))


def test_each_fold_is_one_run_in_the_experiments_w_and_b_group_and_cv_a_run_of_its_own(folds_run):
    _, out, _, _, (fold0, fold1, cv), printed = folds_run
    assert [log.exit_code for log in (fold0, fold1, cv)] == [0, 0, 0]
    assert [(log.group, log.job_type) for log in (fold0, fold1, cv)] == [("cv", "fold"), ("cv", "fold"), ("cv", "cv")]
    assert [(log.config["fold"], log.config["folds"], log.config["out_dir"]) for log in (fold0, fold1)] == [
        (0, 2, str(out / "fold0")), (1, 2, str(out / "fold1"))]
    for log in (fold0, fold1):  # each fold's own history, the competition's score its best model's metric
        assert log.rows_with("val_score") and log.summary["best_val_score"] == max(log.values("val_score"))
    assert {"oof_score", "oof_score_with_offsets", "oof_acc", "oof_macro_f1"} <= set(cv.summary)
    assert cv.rows_with("confusion_matrix_table") and any(key.startswith("oof_f1/") for key in cv.summary)
    assert "out-of-fold score" in printed and str(out / "ensemble.json") in printed


def test_out_of_fold_rows_cover_every_training_image_once_with_its_label(folds_run):
    _, out, _, labelled, _, _ = folds_run
    tables = [wbflow.read_probability_csv(out / f"fold{fold}" / "oof.csv") for fold in (0, 1)]
    names = tables[0][0] + tables[1][0]
    assert sorted(names) == sorted(labelled) and len(set(names)) == len(names)
    for fold, (fold_names, probs, labels, classes) in enumerate(tables):
        assert [classes[label] for label in labels] == [labelled[name] for name in fold_names]
        torch.testing.assert_close(probs.sum(1), torch.ones(len(fold_names), dtype=torch.float64), atol=1e-5, rtol=0)
        config = wbflow.load_checkpoint(out / f"fold{fold}" / "best_model.pth")["config"]
        assert config["val_images"] == len(fold_names) and config["classes"] == classes


def test_under_torchrun_the_folds_train_in_one_launch_and_cv_and_predict_run_once_on_rank_0(offline_wandb, tmp_path):
    labelled, _ = wbflow.write_pattern_dataset(tmp_path / "data", CLASS_COUNTS, test_images=2, seed=0)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              str(HERE / "train_fire.py")]
    command = [*launch, *fire_args(tmp_path / "data", tmp_path / "cv", "--folds", "2", "--epochs", "1",
                                   "--best-metric", "val_score")]
    env = {**os.environ, "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, also on a GPU host
    result = subprocess.run(command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("out-of-fold score") == 1  # --cv on rank 0 alone
    fold0, fold1, cv = run_logs(offline_wandb)
    assert [(log.exit_code, log.job_type, log.config["world_size"]) for log in (fold0, fold1)] == [(0, "fold", 2)] * 2
    assert (cv.exit_code, cv.job_type) == (0, "cv") and "oof_score" in cv.summary
    names = [name for fold in (0, 1) for name in wbflow.read_probability_csv(tmp_path / "cv" / f"fold{fold}" /
                                                                            "oof.csv")[0]]
    assert sorted(names) == sorted(str(tmp_path / "data" / "train" / name) for name in labelled)  # each image once
    assert (tmp_path / "cv" / "ensemble.json").is_file()
    predict = subprocess.run([*launch, "--predict", str(tmp_path / "data" / "A.txt"), "--checkpoint",
                              str(tmp_path / "cv" / "ensemble.json"), "--project", "test"], cwd=tmp_path, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert predict.returncode == 0, predict.stderr[-4000:]
    assert predict.stdout.count(" predictions (") == 1 and len(run_logs(offline_wandb)) == 4  # rank 0 alone predicts


def test_with_an_ema_the_best_model_and_the_oof_predictions_are_the_emas(folds_run):
    _, out, *_ = folds_run
    last, best = (wbflow.load_checkpoint(out / "fold0" / name) for name in ("last.pth", "best_model.pth"))
    ema_weights = {name[len("module."):]: tensor for name, tensor in last["ema"].items() if name.startswith("module.")}
    assert best["epoch"] == 0 and best["model"].keys() == ema_weights.keys()
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in ema_weights.items())
    assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])  # not the trained weights


# ----------------------------------------------------------------------------- --cv: offsets and ensemble.json

def test_cv_stores_offsets_that_reproduce_its_oof_score_and_never_lower_it(folds_run):
    _, out, _, _, (*_, cv), _ = folds_run
    document = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    paths, classes, offsets, _ = wbflow.read_ensemble(out / "ensemble.json")
    assert paths == [out / "fold0" / "best_model.pth", out / "fold1" / "best_model.pth"]
    assert classes == wbflow.load_checkpoint(paths[0])["config"]["classes"] and len(offsets) == len(classes)
    _, probs, labels, _ = wbflow.read_probability_csv(out / "fold0" / "oof.csv", out / "fold1" / "oof.csv")
    weights = document["score_weights"]
    assert sorted(weights) == [1.0, 1.0, 1.0, 1.5, 2.0]  # the competition's, one a class
    assert document["oof_score"] == pytest.approx(wbflow.weighted_f1_score(labels, probs.argmax(1), weights))
    with_offsets = wbflow.weighted_f1_score(labels, wbflow.apply_class_offsets(probs, offsets), weights)
    assert with_offsets == document["oof_score_with_offsets"] == cv.summary["oof_score_with_offsets"]
    assert with_offsets >= document["oof_score"] and document["oof_images"] == 25


def predictions(folder):
    """predictions.csv's probabilities in `folder` ([N, K] float64) and the submission's labels."""
    _, probs, _, classes = wbflow.read_probability_csv(folder / "predictions.csv")
    labels = [line.split("\t")[1] for line in (folder / "submission.txt").read_text(encoding="utf-8").splitlines()]
    return probs, [classes.index(label) for label in labels]


def test_an_ensemble_predicts_the_mean_of_its_models_probabilities_with_tta_and_the_offsets(folds_run, tmp_path):
    root, out, *_ = folds_run
    listed = ["--predict", str(root / "data" / "A.txt"), "--tta", "--num-workers", "0", "--no-wandb"]
    models = ["fold0/best_model.pth", "fold1/best_model.pth"]
    runs = {"fold0": models[:1], "fold1": models[1:], "both": models, "json": ["ensemble.json"]}
    for name, checkpoints in runs.items():
        train_fire.main([*listed, "--checkpoint", *[str(out / path) for path in checkpoints],
                         "--submission", str(tmp_path / name) + "/"])
    (fold0, _), (fold1, _) = predictions(tmp_path / "fold0"), predictions(tmp_path / "fold1")
    mean = (fold0 + fold1) / 2
    both, both_labels = predictions(tmp_path / "both")
    torch.testing.assert_close(both, mean, atol=2e-6, rtol=0)  # 6 decimals in the file
    assert both_labels == both.argmax(1).tolist()
    ensemble, ensemble_labels = predictions(tmp_path / "json")
    offsets = wbflow.read_ensemble(out / "ensemble.json")[2]
    torch.testing.assert_close(ensemble, both)
    assert ensemble_labels == wbflow.apply_class_offsets(ensemble, offsets).tolist()


def test_folds_alone_keep_the_done_folds_resume_a_stopped_one_and_score_them_again(folds_run, tmp_path, capsys):
    root, out, argv, *_ = folds_run
    shutil.copytree(out, tmp_path / "cv", ignore=shutil.ignore_patterns("ensemble.json"))
    (tmp_path / "cv" / "fold1" / "oof.csv").unlink()  # fold 1 stopped after its last epoch, before its report
    train_fire.main([*argv, "--out-dir", str(tmp_path / "cv"), "--no-wandb"])
    printed = capsys.readouterr().out
    assert "resuming epoch 1 at batch 0, step 1" in printed and printed.count("resuming") == 1  # fold 1 alone
    assert (tmp_path / "cv" / "fold1" / "oof.csv").read_bytes() == (out / "fold1" / "oof.csv").read_bytes()
    assert wbflow.read_ensemble(tmp_path / "cv" / "ensemble.json")[2] == wbflow.read_ensemble(out / "ensemble.json")[2]


# ----------------------------------------------------------------------------- k-fold refusals, in one line

def _with_other_classes(tmp_path, out):
    state = wbflow.load_checkpoint(out / "fold1" / "best_model.pth")
    state["config"]["classes"] = state["config"]["classes"][::-1]
    return [str(out / "fold0" / "best_model.pth"), str(wbflow.save_checkpoint(state, tmp_path / "other.pth"))]


def _reordered_ensemble(tmp_path, out):
    document = json.loads((out / "ensemble.json").read_text(encoding="utf-8"))
    document["class_names"] = document["class_names"][::-1]
    document["checkpoints"] = [{**member, "path": str(out / member["path"])} for member in document["checkpoints"]]
    (tmp_path / "ensemble.json").write_text(json.dumps(document), encoding="utf-8")
    return [str(tmp_path / "ensemble.json")]


def _changed_model(tmp_path, out):
    shutil.copytree(out, tmp_path / "cv")
    state = wbflow.load_checkpoint(tmp_path / "cv" / "fold1" / "best_model.pth")
    wbflow.save_checkpoint({**state, "epoch": 7}, tmp_path / "cv" / "fold1" / "best_model.pth")
    return [str(tmp_path / "cv" / "ensemble.json")]


@pytest.mark.parametrize("checkpoints, match", [
    (_with_other_classes, r"other\.pth: trained with classes \[.*\], this run has \[.*\] \(the models of an ensemble "
                          r"share classes, image_size, mean_std"),
    (_reordered_ensemble, r"fold0/best_model\.pth: trained with classes \[.*\], this run has \["),
    (_changed_model, r"fold1/best_model\.pth has changed since \S*ensemble\.json was written .* run --cv again$"),
])
def test_an_ensemble_of_other_classes_or_offsets_or_a_changed_model_is_refused(folds_run, tmp_path, checkpoints, match):
    root, out, *_ = folds_run
    refused(train_fire.main, ["--predict", str(root / "data" / "A.txt"), "--checkpoint", *checkpoints(tmp_path, out),
                              "--submission", str(tmp_path / "s.txt"), "--no-wandb"], match)
    assert not (tmp_path / "s.txt").exists()


@pytest.mark.parametrize("extra, match", [
    (["--folds", "2", "--fold", "2"], r"^train_fire: --fold 2 --folds 2: K is at least 2, and fold k from 0 to K-1$"),
    (["--fold", "0"], r"--fold 0 --folds None: K is at least 2"),
    (["--folds", "1"], r"--fold None --folds 1: K is at least 2"),
    (["--folds", "26", "--fold", "0"], r"25 samples cannot make 26 folds: choose 2 to 25$"),
    (["--score-weights", "消防=3"], r"^train_fire: --score-weights: 消防: no class of "),
    (["--mixup", "0.2", "--loss", "focal"], r"--mixup and --cutmix make soft labels: they need --loss ce$"),
    (["--ema-decay", "1"], r"--ema-decay must be in \[0, 1\), not 1\.0$"),
    (["--warmup-epochs", "1", "--epochs", "1"], r"the warm-up \(\d+ steps\) must be shorter than the run \(\d+ st"),
    (["--class-names", "高风险,中风险,高风险"], r"^train_fire: the class names repeat a name: 高风险,中风险,高风险$"),
    (["--model", "vit_b_32"], r"^train_fire: vit_b_32 does not take 32x32 images \(AssertionError: Wrong image "
                              r"height! Expected 224 but got 32!\)$"),
    (["--model", "convnext_tiyn"], r"unknown model 'convnext_tiyn': not a torchvision classification model \(did you "
                                   r"mean convnext_tiny"),
])
def test_bad_fold_and_recipe_settings_are_refused_in_one_line_before_training(folds_run, tmp_path, extra, match):
    root, *_ = folds_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused(train_fire.main, fire_args(root / "data", tmp_path / "out", "--no-wandb", *extra), match)
    assert not list(tmp_path.rglob("*.pth"))


def test_cv_of_an_experiment_with_a_fold_missing_says_which_to_train(folds_run, tmp_path):
    _, out, *_ = folds_run
    shutil.copytree(out, tmp_path / "cv", ignore=shutil.ignore_patterns("ensemble.json"))
    (tmp_path / "cv" / "fold1" / "oof.csv").unlink()
    refused(train_fire.main, ["--cv", str(tmp_path / "cv"), "--no-wandb"],
            r"^train_fire: --cv \S+: no oof\.csv of fold\(s\) 1: train \(or resume\) each fold$")
    refused(train_fire.main, ["--cv", str(tmp_path / "nothing"), "--no-wandb"],
            r"--cv \S+nothing/fold0/best_model\.pth")
    assert not (tmp_path / "cv" / "ensemble.json").exists()

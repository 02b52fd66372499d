"""K-fold cross-validation for the competition: stratified folds, a fold as one run in the experiment's W&B group,
out-of-fold predictions, --cv's decision offsets and ensemble.json, ensemble prediction, and the refusals."""
import contextlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import train_fire
import wbflow
from conftest import run_logs
from test_guard import refused
from test_wbflow import fire_args

# the competition's classes, imbalanced as its download is: 25 training images, 6 to predict
CLASS_COUNTS = {"高风险": 3, "中风险": 4, "低风险": 5, "无风险": 10, "非楼道": 3}
RECIPE = ["--augment", "trivialaugment", "--random-erase", "0.25", "--mixup", "0.2", "--cutmix", "1.0",
          "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def folds_run(tmp_path_factory):
    """`--folds 2` on the competition's layout, one epoch a fold, with torchvision's recipe (TrivialAugment, random
    erasing, MixUp and CutMix, an EMA) and W&B offline: two fold runs, then --cv. (root, experiment folder, argv,
    {training image: class}, [fold 0's RunLog, fold 1's, the cv run's], what it printed)."""
    root = tmp_path_factory.mktemp("folds")
    labelled, _ = wbflow.write_pattern_dataset(root / "data", CLASS_COUNTS, test_images=6, seed=0)
    argv = fire_args(root / "data", root / "cv", "--folds", "2", "--epochs", "1", "--best-metric", "val_score",
                     *RECIPE)
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


# ----------------------------------------------------------------------------- the folds

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=60), st.integers(2, 7), st.integers(0, 3))
def test_stratified_folds_are_disjoint_cover_the_data_and_share_every_class_evenly(labels, folds, seed):
    folds = min(folds, len(labels))
    split = wbflow.stratified_folds(labels, folds, seed=seed)
    assert len(split) == folds and sorted(sum(split, [])) == list(range(len(labels)))  # disjoint, covering
    assert all(fold == sorted(fold) for fold in split)
    assert max(map(len, split)) - min(map(len, split)) <= 1
    for label in set(labels):
        counts = [sum(labels[index] == label for index in fold) for fold in split]
        assert max(counts) - min(counts) <= 1
    assert wbflow.stratified_folds(labels, folds, seed=seed) == split  # seeded


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


def test_with_an_ema_the_best_model_and_the_oof_predictions_are_the_emas(folds_run):
    _, out, *_ = folds_run
    last, best = (wbflow.load_checkpoint(out / "fold0" / name) for name in ("last.pth", "best_model.pth"))
    ema_weights = {name[len("module."):]: tensor for name, tensor in last["ema"].items() if name.startswith("module.")}
    assert best["epoch"] == 0 and best["model"].keys() == ema_weights.keys()
    assert all(torch.equal(best["model"][name], tensor) for name, tensor in ema_weights.items())
    assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])  # not the trained weights


# ----------------------------------------------------------------------------- --cv: offsets and ensemble.json

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(4, 40), st.integers(0, 2 ** 16))
def test_fitted_offsets_never_lower_the_weighted_score_and_reproduce_the_score_they_report(classes, images, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(images, classes, generator=generator, dtype=torch.float64).softmax(1)
    labels = torch.randint(0, classes, (images,), generator=generator).tolist()
    weights = (torch.rand(classes, generator=generator, dtype=torch.float64) * 2 + 0.5).tolist()
    offsets, before, after = wbflow.fit_class_offsets(probs, labels, weights)
    assert before == pytest.approx(wbflow.weighted_f1_score(labels, probs.argmax(1), weights))
    assert after >= before
    assert wbflow.weighted_f1_score(labels, wbflow.apply_class_offsets(probs, offsets), weights) == after


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


# ----------------------------------------------------------------------------- refusals, in one line

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
                              "--submission", str(tmp_path / "s.txt"), "--no-wandb"], match, seconds=60)
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

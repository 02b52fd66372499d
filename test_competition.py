"""The fire-safety competition end to end (issue 17): its download as it is (hash-named JPEGs of many sizes,
train.txt of name<TAB>中文label lines without a header, an imbalanced class mix, A/ with A.txt), training on it
with per-class F1 and macro-F1 in W&B, --predict's submission file, and every refusal in one line."""
import contextlib
import hashlib
import io
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import train_fire
import wbflow
from conftest import read_records, run_logs
from test_guard import refused
from test_wbflow import SEED_CLASSES, fire_args, pattern_image, table_json, within

# the download's mix, as the competition's (无风险 59%, 低风险 19%, 中风险 14%, 非楼道 5%, 高风险 3%): 高风险's one image
# is for training, so the validation set has none of it
MIX = {"无风险": 20, "低风险": 7, "中风险": 5, "非楼道": 2, "高风险": 1}
SEED_ORDER = ",".join(SEED_CLASSES)  # 高风险,中风险,低风险,无风险,非楼道: the seed's label indices


def hashed_jpeg(folder, label, rng):
    """A pattern of class `label` (SEED_CLASSES' index) of a random size, saved as <md5 of its bytes>.jpg."""
    image = pattern_image(label, rng, size=32).resize(tuple(int(side) for side in rng.integers(24, 64, 2)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    name = hashlib.md5(buffer.getvalue()).hexdigest() + ".jpg"
    (folder / name).write_bytes(buffer.getvalue())
    return name


def write_download(root, mix=MIX, test_images=6, seed=0):
    """The competition's download: train/ and train.txt (name<TAB>label, shuffled, no header), A/ and A.txt (names
    only, not sorted, one of them a broken file). Returns {name: label} of train.txt and A.txt's names."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "A").mkdir()
    labelled = {hashed_jpeg(root / "train", SEED_CLASSES.index(label), rng): label
                for label, count in mix.items() for _ in range(count)}
    lines = [f"{name}\t{label}" for name, label in labelled.items()]
    rng.shuffle(lines)
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    test_names = [hashed_jpeg(root / "A", index % 5, rng) for index in range(test_images)]
    test_names.insert(2, "0badc0de.jpg")
    (root / "A" / "0badc0de.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "A.txt").write_text("\n".join(test_names) + "\n", encoding="utf-8")
    return labelled, test_names


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


@pytest.mark.parametrize("text", [
    "\ufeffname,label\na.png,x\nsub/b.png,y\n",  # comma, a BOM and a header; a name with a folder
    "a.png\tx\nsub/b.png\ty\n",  # tab, no header
])
def test_a_list_is_tab_or_comma_separated_with_or_without_header_and_bom_and_a_name_is_found_beside_it(tmp_path, text):
    from PIL import Image
    (tmp_path / "list").mkdir()
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "list" / "a.png")  # in the folder named like the list
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "b.png")  # only beside the list
    (tmp_path / "list.txt").write_text(text, encoding="utf-8")
    assert wbflow.list_images(tmp_path / "list.txt") == (
        [("a.png", str(tmp_path / "list" / "a.png"), 0), ("sub/b.png", str(tmp_path / "sub" / "b.png"), 1)], ["x", "y"])


@pytest.mark.parametrize("text, names", [
    ("a\tx\nb\ty\n", ["a", "b"]),  # names without suffixes: the first row is an image, not a header
    ("gone\tx\nb\ty\n", ["gone", "b"]),  # nor when its file is missing: it is named, not lost
    ("gone.png\tx\nc.png\ty\n", ["gone.png", "c.png"]),
    ("Image_ID\tlabel\na\tx\nb\ty\n", ["a", "b"]),  # a usual column name is a header
    ("file,label\nc.png,x\n", ["c.png"]),  # a first cell without the suffix the names have is a header
])
def test_a_header_is_only_a_first_row_that_cannot_be_a_name_in_the_folder(tmp_path, text, names):
    (tmp_path / "list").mkdir()
    for name in ("a", "b", "c.png"):
        (tmp_path / "list" / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text(text, encoding="utf-8")
    rows, _ = wbflow.list_images(tmp_path / "list.txt", strict=False)
    assert [name for name, _, _ in rows] == names


def test_labels_that_differ_only_by_whitespace_are_two_classes_named_in_one_warning(tmp_path):
    write_download(tmp_path / "data", mix=dict.fromkeys(SEED_CLASSES, 2), test_images=0)
    rng = np.random.default_rng(0)
    spaced = [hashed_jpeg(tmp_path / "data" / "train", SEED_CLASSES.index("无风险"), rng) for _ in range(2)]
    with open(tmp_path / "data" / "train.txt", "a", encoding="utf-8") as file:
        file.write("".join(f"{name}\t无 风险\n" for name in spaced))
    with pytest.warns(UserWarning, match=r"train\.txt: classes that differ only by whitespace: '无 风险' and '无风险'$"):
        _, _, class_names = wbflow.find_image_samples(tmp_path / "data")
    assert len(class_names) == 6 and "无 风险" in class_names


def test_a_gbk_list_reads_its_chinese_labels_and_a_list_of_no_known_encoding_is_one_line(tmp_path):
    from PIL import Image
    (tmp_path / "train").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / name)
    (tmp_path / "train.txt").write_bytes("a.jpg\t高风险\nb.jpg\t无风险\n".encode("gbk"))  # as Chinese Windows saves it
    rows, class_names = wbflow.list_images(tmp_path / "train.txt", SEED_CLASSES)
    assert [(name, SEED_CLASSES[label]) for name, _, label in rows] == [("a.jpg", "高风险"), ("b.jpg", "无风险")]
    (tmp_path / "train.txt").write_bytes(b"a.jpg\t\x81\x30\n")  # a GB18030 four-byte sequence cut short
    with pytest.raises(ValueError, match=r"^\S*train\.txt is neither UTF-8 nor GBK / GB18030 text$"):
        wbflow.list_images(tmp_path / "train.txt", SEED_CLASSES)


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


def test_f1_scores_equal_torchmetrics_per_class_and_macro():
    from torchmetrics.classification import MulticlassF1Score
    generator = torch.Generator().manual_seed(0)
    y_true, y_pred = torch.randint(0, 5, (200,), generator=generator), torch.randint(0, 4, (200,), generator=generator)
    f1, macro_f1 = wbflow.f1_scores(y_true.tolist(), y_pred.tolist(), 5)  # class 4 never predicted: F1 0
    torch.testing.assert_close(torch.tensor(f1, dtype=torch.float32), MulticlassF1Score(5, average=None)(y_pred, y_true))
    assert macro_f1 == pytest.approx(float(MulticlassF1Score(5, average="macro")(y_pred, y_true)))


def test_macro_f1_leaves_out_a_class_in_neither_labels_nor_predictions_and_counts_one_only_predicted():
    # by hand, as sklearn's f1_score(average="macro", zero_division=0) on the labels it finds, 2 tp / (2 tp + fp + fn):
    # class 0 2/3, class 1 4/6, class 2 (no label, predicted once) 0, class 3 (in neither) left out
    f1, macro_f1 = wbflow.f1_scores([0, 0, 1, 1, 1], [0, 1, 1, 1, 2], 4)
    assert f1[:3] == pytest.approx([2 / 3, 4 / 6, 0.0]) and math.isnan(f1[3])
    assert macro_f1 == pytest.approx((2 / 3 + 4 / 6 + 0.0) / 3)  # not / 4: the class in neither caps nothing


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30))
def test_macro_f1_is_torchmetrics_macro_f1_and_per_class_f1_its_per_class_f1_where_a_class_occurs(pairs):
    from torchmetrics.classification import MulticlassF1Score
    y_true, y_pred = (torch.tensor(values) for values in zip(*pairs))
    f1, macro_f1 = wbflow.f1_scores(y_true.tolist(), y_pred.tolist(), 5)
    occurring = set(y_true.tolist()) | set(y_pred.tolist())
    assert [label for label, value in enumerate(f1) if value == value] == sorted(occurring)
    expected = MulticlassF1Score(5, average=None)(y_pred, y_true)
    assert [f1[label] for label in sorted(occurring)] == pytest.approx(expected[sorted(occurring)].tolist(), abs=1e-6)
    assert macro_f1 == pytest.approx(float(MulticlassF1Score(5, average="macro")(y_pred, y_true)), abs=1e-6)


# ----------------------------------------------------------------------------- the competition's score

def test_the_score_is_each_classs_f1_weighted_as_the_competition_weighs_them_computed_by_hand():
    weights = [train_fire.COMPETITION_WEIGHTS[name] for name in SEED_CLASSES]
    assert weights == [2.0, 1.5, 1.0, 1.0, 1.0]  # 高风险 2, 中风险 1.5, the others 1
    y_true, y_pred = [0, 0, 1, 1, 2, 3, 4, 4], [0, 1, 1, 1, 2, 3, 4, 0]
    # F1 = 2 tp / (2 tp + fp + fn): 高风险 2/4, 中风险 4/5, 低风险 1, 无风险 1, 非楼道 2/3
    assert wbflow.weighted_f1_score(y_true, y_pred, weights) == pytest.approx(2 * 2 / 4 + 1.5 * 4 / 5 + 1 + 1 + 2 / 3)
    assert wbflow.weighted_f1_score(y_true, y_true, weights) == 6.5  # the maximum
    # a class in neither the labels nor the predictions counts 0, its weight still in the maximum
    assert wbflow.weighted_f1_score([0, 1], [0, 1], [1.0, 1.0, 5.0]) == 2.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30),
       st.lists(st.floats(0, 3), min_size=5, max_size=5))
def test_the_score_is_torchmetrics_per_class_f1_weighted(pairs, weights):
    from torchmetrics.classification import MulticlassF1Score
    y_true, y_pred = (torch.tensor(values) for values in zip(*pairs))
    per_class = MulticlassF1Score(5, average=None)(y_pred, y_true).double()
    expected = float((per_class * torch.tensor(weights, dtype=torch.float64)).sum())
    assert wbflow.weighted_f1_score(y_true.tolist(), y_pred.tolist(), weights) == pytest.approx(expected, abs=1e-6)


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


# ----------------------------------------------------------------------------- imbalance: sampler and label smoothing

def test_the_balanced_sampler_draws_each_class_equally_often_seeded_shared_by_the_ranks_and_exact_on_resume():
    labels = [0] * 90 + [1] * 10
    weights = wbflow.class_balanced_weights(labels, 2)[labels]

    def epoch_order(rank=0, world_size=1, epoch=3, skip_batches=0):
        loader, _ = wbflow.classifier_loaders(list(range(100)), [0], 5, sample_weights=weights, seed=7, rank=rank,
                                              world_size=world_size)
        loader.sampler.set_epoch(epoch, skip_batches=skip_batches)
        return [index for batch in loader for index in batch.tolist()]

    order = epoch_order()
    assert len(order) == 100 and 35 <= sum(index >= 90 for index in order) <= 65  # 10% of the data, half the draws
    assert order == epoch_order() and order != epoch_order(epoch=4)
    assert epoch_order(skip_batches=4) == order[20:]
    halves = [epoch_order(rank, 2) for rank in (0, 1)]
    assert [index for pair in zip(*halves) for index in pair] == order


def test_label_smoothing_goes_into_the_cross_entropy(tmp_path):
    args = train_fire.parse_args(fire_args(tmp_path, tmp_path / "out", "--label-smoothing", "0.2"))
    criterion = train_fire.build_model(args, 3, [0, 1, 2], 1, torch.device("cpu")).criterion  # also val_loss's
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(criterion(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.2))


# ----------------------------------------------------------------------------- the smoke run and its generated data

def test_write_pattern_dataset_writes_the_competitions_layout_with_classes_a_small_cnn_learns(tmp_path):
    counts = {"高风险": 24, "中风险": 24, "低风险": 24, "无风险": 24, "非楼道": 24, "sixth": 24}
    labelled, test = wbflow.write_pattern_dataset(tmp_path, counts, test_images=60, size=24, seed=1)
    rows, classes = wbflow.list_images(tmp_path / "train.txt")  # name<TAB>label, found in train/
    assert {name: classes[label] for name, _, label in rows} == labelled and sorted(classes) == sorted(counts)
    assert [line for line in (tmp_path / "A.txt").read_text(encoding="utf-8").splitlines()] == list(test)
    assert all((tmp_path / "A" / name).is_file() for name in test) and set(test.values()) <= set(counts)
    assert wbflow.write_pattern_dataset(tmp_path / "again", counts, test_images=60, size=24, seed=1) == (labelled, test)
    train_set = wbflow.ImageSamples([(path, label) for _, path, label in rows],
                                    wbflow.image_transforms(24, train=True, crop_scale=(0.5, 1)))
    test_set = wbflow.ImageSamples([(str(tmp_path / "A" / name), classes.index(label)) for name, label in test.items()],
                                   wbflow.image_transforms(24, train=False))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 6))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):  # epochs: flips and crops keep each class's shape
        for images, labels in torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    logits, labels = wbflow.predict_logits(model, test_set)
    assert (logits.argmax(1) == labels).double().mean() > 0.6  # chance: 1/6


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
        refused(train_fire.main, predict_argv(trained, "--no-wandb", *change(tmp_path, out)), match, seconds=60)
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


"""train_fire's edges: resume without W&B, resume with other settings, preemption of the whole process group,
data that does not fit (val/ classes, CSV duplicates and missing files, very large images, DDP ranks with
other classes), and a newcomer's first run (default folders, the closing line, --help)."""
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_fire
import train_flow
import wbflow
from test_guard import _help_blocks, refused
from test_wbflow import fire_args, write_pattern_folders

HERE = Path(__file__).resolve().parent


def headline(out_dir):
    """The last line a finished train_fire run prints, from its best_model.pth."""
    best = wbflow.load_checkpoint(out_dir / "best_model.pth")
    return f"best val_acc {best['val_acc']:.2f}% (epoch {best['epoch']}), model: {out_dir / 'best_model.pth'}"


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted 2-epoch train_fire run without W&B (1 step an epoch): (data, out dir, argv, stdout)."""
    root = tmp_path_factory.mktemp("fire")
    data = write_pattern_folders(root / "data", per_class=4)  # 15 training images
    argv = fire_args(data, root / "whole", "--epochs", "2", "--no-wandb")
    printed, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread sets for each test, which runs after this fixture
    try:
        with contextlib.redirect_stdout(printed):
            train_fire.main(argv)
    finally:
        torch.set_num_threads(threads)
    return data, root / "whole", argv, printed.getvalue()


# ----------------------------------------------------------------------------- resume without W&B
# (the exact resume of a run stopped mid-epoch: test_training.py with W&B, the group SIGTERM below without)

def test_train_fire_without_wandb_resumed_after_its_last_epoch_only_reports(whole_run, capsys):
    data, whole, argv, _ = whole_run
    before = (whole / "last.pth").read_bytes()
    best_acc = train_fire.main(argv + ["--resume", str(whole / "last.pth")])
    printed = capsys.readouterr().out
    assert "resuming epoch 2 at batch 0, step 2" in printed and "W&B: off" in printed
    assert best_acc == wbflow.load_checkpoint(whole / "best_model.pth")["val_acc"]
    assert printed.splitlines()[-1] == headline(whole)
    assert (whole / "last.pth").read_bytes() == before


# ----------------------------------------------------------------------------- resume with other settings

@pytest.mark.parametrize("change, match", [
    (["--learning-rate", "0.01"], r"trained with learning_rate 0.001, this run has 0.01 .*--learning-rate"),
    (["--batch-size", "4"], r"trained with batch_size 8, this run has 4 .*--batch-size"),
    (["--weight-decay", "0.1"], r"trained with weight_decay 0.0, this run has 0.1"),
    (["--optimizer", "sgd"], r"trained with optimizer Adam, this run has SGD .*--optimizer"),
    (["--loss", "focal"], r"trained with loss ce, this run has focal"),
    (["--focal-gamma", "1"], r"trained with focal_gamma 2.0, this run has 1.0"),
    (["--class-weights", "balanced"], r"trained with class_weights none, this run has balanced"),
    (["--grad-clip", "0.5"], r"trained with grad_clip 1.0, this run has 0.5"),
    (["--seed", "1"], r"trained with seed 0, this run has 1 .*--seed"),
    (["--val-split", "0.3"], r"trained with val_split 0.2, this run has 0.3"),
])
def test_train_fire_resume_refuses_another_setting_naming_the_checkpoints_value(whole_run, change, match):
    data, whole, argv, _ = whole_run
    refused(train_fire.main, argv + ["--resume", str(whole / "last.pth")] + change, match)


@pytest.mark.parametrize("key, saved, match", [
    ("weights", "imagenet", r"trained with weights imagenet, this run has none"),
    ("train_images", 99, r"trained with train_images 99, this run has 15 \(the data is not the data"),
])
def test_train_fire_resume_refuses_other_initial_weights_or_other_data(whole_run, tmp_path, key, saved, match):
    data, whole, argv, _ = whole_run
    state = wbflow.load_checkpoint(whole / "last.pth")
    state["config"][key] = saved
    path = wbflow.save_checkpoint(state, tmp_path / "changed.pth")
    refused(train_fire.main, fire_args(data, tmp_path / "out", "--epochs", "2", "--no-wandb", "--resume", str(path)),
            match)


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
    flow_defaults = wbflow.load_yaml_config(train_flow.DEFAULT_CONFIG)["data"]
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


def test_a_finished_run_ends_with_the_best_val_acc_its_epoch_and_the_model_file(whole_run):
    data, whole, argv, printed = whole_run
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

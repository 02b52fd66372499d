"""Refused before any work, in one line: bad settings and config files, an evaluation without what it needs, a --resume
that does not fit its run, DDP ranks that disagree; and --help that says every default once."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate_flow
import flow_config
import train_fire
import train_flow
import wbflow
from conftest import (FLOW_SMOKE, SEED_CLASSES, _help_blocks, fire_args, refused, write_cifar_batches,
                      write_pattern_folders)

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- bad settings, refused before training

@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], r"training\.epochs must be positive, not 0"),
    (["--epochs", "-3"], r"training\.epochs must be positive, not -3"),
    (["--batch-size", "0"], r"training\.batch_size must be positive, not 0"),
    (["--set", "training.no_such_key=1"], r"'training\.no_such_key' is not a key"),
    (["--set", "training.epochs=1.5"], r"training\.epochs=1\.5: expected int"),
    (["--set", "training.compile=yes please"], r"training\.compile=yes please: expected bool"),
    (["--set", "training.epochs=null"], r"training\.epochs=null: expected int"),
    (["--set", "sampling.solver=midpoint"], r"unknown solver 'midpoint'"),
    (["--set", "sampling.table_solvers=[euler, rk4]"], r"unknown solver 'rk4'"),
    (["--config", "missing.yaml"], r"missing\.yaml"),
])
def test_train_flow_refuses_a_bad_setting_in_one_line(argv, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


def test_the_flow_scripts_refuse_an_unknown_solver_flag_and_a_batch_smaller_than_the_ranks(tmp_path, monkeypatch):
    assert evaluate_flow.parse_args(["--checkpoint", "c.pt", "--solver", "heun"]).solver == "heun"
    with pytest.raises(SystemExit):
        evaluate_flow.parse_args(["--checkpoint", "c.pt", "--solver", "midpoint"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("RANK", raising=False)
    refused(train_flow.main, FLOW_SMOKE + ["--batch-size", "2"], r"batch_size 2 is smaller than the 4 ranks")


@pytest.mark.parametrize("argv, match", [
    (["--epochs", "0"], r"--epochs must be positive, not 0"),
    (["--batch-size", "0"], r"--batch-size must be positive, not 0"),
    (["--image-size", "0"], r"--image-size must be positive, not 0"),
    (["--num-workers", "-1"], r"--num-workers must not be negative, not -1"),
    (["--val-split", "1.5"], r"--val-split must be .* not 1\.5"),
    (["--learning-rate", "0"], r"--learning-rate must be positive"),
])
def test_train_fire_refuses_a_bad_setting_in_one_line(argv, match, tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=2, classes=["a", "b"])
    refused(train_fire.main, fire_args(data, tmp_path / "out") + argv, match)
    assert not (tmp_path / "out").exists()


def test_a_data_folder_with_one_class_is_refused(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=3, classes=["高风险"])
    refused(train_fire.main, fire_args(data, tmp_path / "out"), r"at least two classes; .* has 1: 高风险")


# one case per kind (a --set, a --config file, train_fire's flags): the in-process refusals check every message
@pytest.mark.parametrize("script, argv", [
    ("train_flow.py", ["--smoke", "--set", "training.nope=1"]),
    ("train_flow.py", ["--smoke", "--config", "broken.yaml"]),
    ("evaluate_flow.py", ["--smoke", "--checkpoint", "c.pt", "--nfe", "0"]),
    ("train_fire.py", ["--epochs", "-1"]),
])
def test_a_bad_setting_prints_no_traceback(tmp_path, script, argv):
    (tmp_path / "broken.yaml").write_text("data: {unclosed\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(HERE / script), *argv, "--out-dir", str(tmp_path / "o")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------- evaluate_flow.py checks before sampling

def _flow_like_checkpoint(path):
    return wbflow.save_checkpoint({"ema": {}, "config": {"model": {}}, "epoch": 1, "global_step": 1}, path)


def test_eval_without_fid_weights_stops_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    checkpoint = _flow_like_checkpoint(tmp_path / "c.pt")
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", str(checkpoint)], r"absent\.pth.*does not exist")


def test_eval_without_cifar10_or_cached_statistics_stops_before_sampling(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    (tmp_path / "weights.pth").write_bytes(b"any file: only its hash names the cache")
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "weights.pth"))
    checkpoint = _flow_like_checkpoint(tmp_path / "c.pt")
    argv = ["--smoke", "--checkpoint", str(checkpoint), "--data-dir", str(tmp_path / "nodata")]
    refused(evaluate_flow.main, argv, r"CIFAR-10 is not in .*nodata")
    def reached_the_model(*args, **kwargs):
        raise RuntimeError("checks passed")

    monkeypatch.setattr(wbflow, "make_ema", reached_the_model)
    with pytest.raises(RuntimeError, match="checks passed"):  # --metric is needs no CIFAR-10
        evaluate_flow.main(argv + ["--metric", "is"])


def test_eval_refuses_to_write_its_sample_grid_over_the_checkpoint_before_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow, "sample_images", lambda *a, **k: pytest.fail("sampled before checking"))
    checkpoint = _flow_like_checkpoint(tmp_path / "out" / "samples" / "eval_epoch_0001.png")  # its epoch is 1
    before = checkpoint.read_bytes()
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "out")],
            r"the sample grid \S*/eval_epoch_0001\.png would overwrite an input of this command \(--checkpoint ")
    assert checkpoint.read_bytes() == before


def test_a_reflow_run_refuses_an_out_dir_whose_checkpoints_it_would_replace_include_the_teacher(tmp_path):
    teacher = _flow_like_checkpoint(tmp_path / "out" / "last.pt")
    before = teacher.read_bytes()
    refused(train_flow.main, FLOW_SMOKE + ["--no-wandb", "--reflow", str(teacher), "--out-dir", str(tmp_path / "out"),
                                           "--overwrite"],
            r"--out-dir \S*/out/last\.pt would overwrite an input of this command \(--reflow \S*/out/last\.pt\)$")
    assert teacher.read_bytes() == before


def test_eval_of_a_checkpoint_that_is_not_train_flows_is_refused(tmp_path):
    path = wbflow.save_checkpoint({"model": {}, "config": {"model": "resnet18"}}, tmp_path / "last.pth")
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", str(path)], "not a train_flow checkpoint")


# ----------------------------------------------------------------------------- --resume must fit

@pytest.fixture
def flow_checkpoint(finished_flow_run):
    """The first checkpoint of finished_flow_run (FLOW: base_channels 8)."""
    return finished_flow_run.out / "checkpoint_epoch_1.pt"


def _resume_targets(tmp_path, finished_fire_run, flow_checkpoint):
    data, out, *_ = finished_fire_run
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((out / "last.pth").read_bytes()[:3000])
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Hostile(str(tmp_path / "pwned"))}, evil)
    return {"missing": (tmp_path / "nope.pth", r"not found: .*nope\.pth"),
            "missing, no suffix": (tmp_path / "last", r"checkpoint not found: .*last$"),  # a file, not a W&B lookup
            "directory": (tmp_path, r"is a folder, not a checkpoint file"),
            "truncated": (truncated, r"cut\.pth is not a loadable checkpoint"),
            "pickled code": (evil, r"evil\.pth is not a loadable checkpoint"),
            "other driver": (flow_checkpoint, r"not a train_fire checkpoint"),
            "best model": (out / "best_model.pth", r"lacks optimizer, scheduler, step.*last\.pth")}


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("case", ["missing", "missing, no suffix", "directory", "truncated", "pickled code",
                                  "other driver", "best model"])
def test_train_fire_resume_refuses_a_file_that_does_not_fit(tmp_path, finished_fire_run, flow_checkpoint, case):
    data, out, argv, _ = finished_fire_run
    path, match = _resume_targets(tmp_path, finished_fire_run, flow_checkpoint)[case]
    refused(train_fire.main, fire_args(data, tmp_path / "new") + ["--epochs", "2", "--resume", str(path)], match)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change, match", [
    (["--model", "resnet34"], r"trained with model resnet18, this run has resnet34"),
    (["--class-names", ",".join(reversed(SEED_CLASSES))],
     r"classes \['中风险', '低风险', '无风险', '非楼道', '高风险'\], this run has \['非楼道', '无风险', '低风险', "
     r"'中风险', '高风险'\].*--class-names"),
    (["--image-size", "48"], r"image_size 32, this run has 48"),
    (["--epochs", "4"], r"epochs 2, this run has 4 .*climb back up"),
])
def test_train_fire_resume_refuses_another_model_class_order_image_size_or_epochs(finished_fire_run, change, match):
    data, out, argv, _ = finished_fire_run
    refused(train_fire.main, argv + ["--resume", str(out / "last.pth")] + change, match)


@pytest.mark.parametrize("change, match", [
    (lambda state: state.pop("train_state"), r"lacks train_state"),  # a last.pth written before exact resume
    (lambda state: state["config"].update(world_size=2), r"world_size 2, this run has 1 processes"),
])
def test_train_fire_resume_refuses_an_older_format_or_another_number_of_ranks(finished_fire_run, change, match):
    data, out, argv, _ = finished_fire_run
    state = wbflow.load_checkpoint(out / "last.pth")
    change(state)
    path = wbflow.save_checkpoint(state, out / "changed.pth")
    try:
        refused(train_fire.main, argv + ["--resume", str(path)], match)
    finally:
        path.unlink()


@pytest.mark.parametrize("change, match", [
    (lambda state: state.pop("rng"), r"lacks rng"),
    (lambda state: state["config"].update(world_size=2), r"world_size 2, this run has 1 processes"),
])
def test_train_flow_resume_refuses_an_older_format_or_another_number_of_ranks(tmp_path, finished_flow_run,
                                                                             flow_checkpoint, change, match):
    state = wbflow.load_checkpoint(flow_checkpoint)
    change(state)
    path = wbflow.save_checkpoint(state, tmp_path / "changed.pt")
    refused(train_flow.main, finished_flow_run.argv + ["--out-dir", str(tmp_path / "new"), "--resume", str(path)],
            match)


@pytest.mark.parametrize("case", ["missing", "directory", "truncated", "pickled code", "fire checkpoint",
                                  "another model"])
def test_train_flow_resume_refuses_a_file_that_does_not_fit(tmp_path, finished_fire_run, finished_flow_run,
                                                           flow_checkpoint, case):
    targets = _resume_targets(tmp_path, finished_fire_run, flow_checkpoint)
    path, match = {**{key: targets[key] for key in ("missing", "directory", "truncated", "pickled code")},
                   "fire checkpoint": (finished_fire_run[1] / "last.pth", "not a train_flow checkpoint"),
                   "another model": (flow_checkpoint, r"holds another model \(base_channels 8 there, 16 here")}[case]
    if case == "missing":
        path = tmp_path / "nope.pt"
        match = r"not found: .*nope\.pt"
    base_channels = 16 if case == "another model" else 8
    refused(train_flow.main, finished_flow_run.argv + ["--out-dir", str(tmp_path / "new"), "--resume", str(path),
                                                       "--set", f"model.base_channels={base_channels}"], match)


# ----------------------------------------------------------------------------- DDP ranks that disagree

def test_torchrun_ranks_with_different_data_stop_at_start(tmp_path):
    # rank 1 reads a partial copy: its CIFAR-10 is cut short by data.max_images set through its environment
    write_cifar_batches(tmp_path / "data")
    script = tmp_path / "partial_copy.py"
    script.write_text(
        "import os, sys, wbflow\n"
        "real = wbflow.load_cifar10\n"
        "def partial(*a, **k):\n"
        "    images, labels = real(*a, **k)\n"
        "    return (images[:150], labels[:150]) if os.environ['RANK'] == '1' else (images, labels)\n"
        "wbflow.load_cifar10 = partial\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import train_flow\n"
        "train_flow.main()\n")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE), "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), "--smoke", "--data-dir", str(tmp_path / "data"), "--out-dir",
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "rank 0: 200 training images; rank 1: 150 training images" in result.stderr + result.stdout
    assert time.monotonic() - start < 90


# ----------------------------------------------------------------------------- --help and W&B config

@pytest.mark.parametrize("module", [train_flow, evaluate_flow, train_fire])
def test_help_shows_every_default(module, monkeypatch):
    blocks = _help_blocks(module.main)
    parser_defaults = vars(module.parse_args([]))
    assert len(blocks) >= 10
    for option, block in blocks.items():
        if option == "-h":
            continue
        assert "default" in block, block
        dest = option.lstrip("-").replace("-", "_")
        value = parser_defaults.get(dest)
        if value not in (None, False, []):
            assert f"default:{value}".replace(" ", "") in block.replace(" ", ""), block  # wrapped lines
    if module is train_flow:
        assert "default: training.epochs, 1025" in blocks["--epochs"]


# ----------------------------------------------------------------------------- config and the copy rule

@pytest.mark.parametrize("override, value", [
    ("training.gradient_clip=1", 1.0), ("training.learning_rate=1e-3", 1e-3), ("logging.notes=123", "123"),
    ("logging.entity=me", "me"), ("data.max_images=100", 100), ("training.compile=true", True)])
def test_load_yaml_config_accepts_values_of_the_files_type(override, value):
    config = wbflow.load_yaml_config(flow_config.DEFAULT_CONFIG, [override])
    section, key = override.split("=")[0].split(".")
    assert config[section][key] == value and type(config[section][key]) is type(value)


# ----------------------------------------------------------------------------- --resume must fit: train_fire's settings

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
def test_train_fire_resume_refuses_another_setting_naming_the_checkpoints_value(finished_fire_run, change, match):
    data, whole, argv, _ = finished_fire_run
    refused(train_fire.main, argv + ["--resume", str(whole / "last.pth")] + change, match)


@pytest.mark.parametrize("key, saved, match", [
    ("weights", "imagenet", r"trained with weights imagenet, this run has none"),
    ("train_images", 99, r"trained with train_images 99, this run has 15 \(the data is not the data"),
])
def test_train_fire_resume_refuses_other_initial_weights_or_other_data(finished_fire_run, tmp_path, key, saved, match):
    data, whole, argv, _ = finished_fire_run
    state = wbflow.load_checkpoint(whole / "last.pth")
    state["config"][key] = saved
    path = wbflow.save_checkpoint(state, tmp_path / "changed.pth")
    refused(train_fire.main, fire_args(data, tmp_path / "out", "--epochs", "2", "--no-wandb", "--resume", str(path)),
            match)


# ----------------------------------------------------------------------------- --resume must fit: train_flow's settings

@pytest.mark.parametrize("change, match", [
    (["--batch-size", "8"], r"holds another training \(batch_size 16 there, 8 here\)"),
    (["--set", "training.learning_rate=1e-3"], r"holds another training \(learning_rate 0\.0002 there, 0\.001 here\)"),
    (["--set", "training.ema_decay=0.99"], r"ema_decay 0\.9 there, 0\.99 here"),
    (["--set", "training.warmup_steps=5"], r"warmup_steps 4 there, 5 here"),
    (["--set", "training.gradient_clip=0.5"], r"gradient_clip 1\.0 there, 0\.5 here"),
    (["--set", "training.seed=7"], r"seed 42 there, 7 here"),
    (["--set", "training.coupling=ot"], r"holds another training \(coupling 'independent' there, 'ot' here\)"),
    (["--set", "data.max_images=32"], r"holds another data \(max_images 48 there, 32 here; images_sha256 "),
    (["--set", "sampling.seed=3"], r"holds another sampling \(seed 0 there, 3 here\)"),
    (["--set", "reflow.nfe=7"], r"holds another reflow \(nfe 4 there, 7 here\)"),
])
def test_a_resume_with_other_training_settings_is_refused_naming_the_checkpoints_value(finished_flow_run, change,
                                                                                       match):
    flow_run = finished_flow_run.out
    message = refused(train_flow.main, finished_flow_run.argv + ["--out-dir", str(flow_run), "--epochs", "4",
                                                                 "--resume", str(flow_run / "last.pt"), *change], match)
    assert "keeps the settings it trained with" in message or "trains on" in message


def test_a_resume_refuses_a_change_of_what_the_run_trains_on_the_teacher_or_the_images(finished_flow_run, tmp_path):
    flow_run, resume = finished_flow_run.out, finished_flow_run.argv + ["--epochs", "4", "--resume"]
    teacher = tmp_path / "teacher.pt"  # a teacher whose UNet is this run's, outside the run's out-dir
    teacher.write_bytes((flow_run / "checkpoint_epoch_1.pt").read_bytes())
    refused(train_flow.main, resume + [str(flow_run / "last.pt"), "--out-dir", str(flow_run), "--reflow", str(teacher)],
            rf"holds another reflow \(teacher_sha256 None there, '{wbflow.file_sha256(teacher)}' here\): a resumed run "
            rf"trains on what it trained on: the pairs of the --reflow teacher")
    state = wbflow.load_checkpoint(flow_run / "last.pt")  # a 2-RF student, resumed without --reflow
    state["config"]["reflow"]["teacher_sha256"] = "ab" * 32
    student = wbflow.save_checkpoint(state, tmp_path / "student.pt")
    refused(train_flow.main, resume + [str(student), "--out-dir", str(tmp_path / "student")],
            rf"holds another reflow \(teacher_sha256 '{'ab' * 32}' there, None here\)")
    write_cifar_batches(tmp_path / "cifar", per_batch=13)  # other CIFAR-10 files than those the run trained on
    refused(train_flow.main, resume + [str(flow_run / "last.pt"), "--out-dir", str(flow_run),
                                       "--data-dir", str(tmp_path / "cifar")],
            r"holds another data \(images_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' here\): a resumed run trains on "
            r"the images it trained on")


# ----------------------------------------------------------------------------- every bad setting in one line

def _config_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _default_config(change):
    """The default config's text after change(config)."""
    import yaml
    config = wbflow.load_yaml_config(flow_config.DEFAULT_CONFIG)
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
    (["--set", "data.max_images=0"], r"data\.max_images must be positive, not 0"),
    (["--set", "eval.stats_dir=5"], r"eval\.stats_dir must be text or null, not 5"),  # null in the YAML: any type
    (["--set", "model.base_channels=0"], r"model\.base_channels must be positive, not 0"),
    (["--set", "model.dropout=1.5"], r"model\.dropout must be in \[0, 1\), not 1\.5"),
    (["--set", "model.base_channels=9"], r"model settings .*'base_channels': 9.* make no FlowUNet"),  # odd channels
])
def test_train_flow_refuses_a_bad_value_in_one_line(argv, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, match", [
    (["--num-samples", "0"], r"--num-samples must be positive, not 0"),
    (["--num-samples", "1"], r"--num-samples is 1: FID needs at least two samples"),
    (["--set", "eval.num_real_images=1"], r"eval\.num_real_images is 1: FID needs at least two real images"),
    (["--nfe", "0"], r"--nfe must be positive, not 0"),
    (["--set", "sampling.solver=midpoint"], r"unknown solver 'midpoint'"),
])
def test_evaluate_flow_refuses_a_bad_value_in_one_line(argv, match, tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow, "load_checked", lambda *args, **kwargs: pytest.fail("read the checkpoint"))
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", "c.pt", "--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


def test_evaluate_flow_refuses_no_checkpoint_a_folder_and_torchrun_in_one_line(tmp_path, monkeypatch):
    refused(evaluate_flow.main, ["--smoke"],
            r"^evaluate_flow\.py: --checkpoint PATH\|ARTIFACT is needed: the checkpoint to score$")
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", str(tmp_path)],
            rf"^evaluate_flow\.py: --checkpoint {tmp_path} is a folder, not a checkpoint file$")
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process would score alone and log a run of its own
    refused(evaluate_flow.main, ["--smoke", "--checkpoint", "c.pt"],
            r"^evaluate_flow\.py: it runs in one process: launch it with python, not torchrun$")


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
    pytest.param(flow_config.DEFAULT_CONFIG.read_text().replace("  learning_rate: 2.0e-4",
                                                               "  learning_rate: 2.0e-4\n  learning_rate: 1"),
                 r"config\.yaml is not valid YAML \(key 'learning_rate' of line (\d+) repeated at line (?!\1)\d+, "
                 r"column 3\)", id="a repeated key"),  # plain YAML would keep the last value
])
def test_a_config_file_of_another_shape_is_refused_in_one_line(text, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out"), "--config", _config_file(tmp_path, text)],
            match)
    assert not (tmp_path / "out").exists()


def test_a_config_with_every_key_of_the_default_is_accepted(tmp_path):
    text = flow_config.DEFAULT_CONFIG.read_text().replace("learning_rate: 2.0e-4", "learning_rate: 1e-3")
    config = flow_config.load_config(train_flow.parse_args(["--config", _config_file(tmp_path, text)]), "train_flow.py")
    assert config["training"]["learning_rate"] == 1e-3  # YAML 1.1 reads "1e-3" as a string: a float here

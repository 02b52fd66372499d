"""Issue 15's edges on train_flow's side: last.pt before the epoch's end, stops honoured inside FID sampling and
--eval, resumes that must keep the run's settings, bad settings in one line (the config's shape, `python wbflow.py
fid`, kid), and a newcomer's first run (the FID weights, default folders, progress, headline). The stops and kills
elsewhere in an epoch, and the resumes without W&B, are in test_training.py, against one uninterrupted run."""
import contextlib
import io
import re
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import train_fire
import train_flow
import wbflow
from conftest import run_logs
from test_guard import FLOW_SMOKE, refused
from test_training import signal_on_call
from test_wbflow import tiny_flow_checkpoint, write_cifar_batches

HERE = Path(__file__).resolve().parent
# 64 synthetic images, batch 32: two steps an epoch; every epoch has samples, a one-row table and a checkpoint;
# a UNet of 8 channels that downsamples once, so its attention is at 16x16
FLOW = FLOW_SMOKE + ["--set", "training.log_interval=1", "--set", "model.base_channels=8",
                     "--set", "model.head_channels=8", "--set", "sampling.num_images=4"]


# ----------------------------------------------------------------------------- 1. last.pt before the epoch's end

def test_last_pt_is_written_right_after_the_epochs_training(tmp_path, monkeypatch):
    seen = []

    def grid_reads_last_pt(*args, **kwargs):
        seen.append(wbflow.load_checkpoint(tmp_path / "out" / "last.pt"))
        raise RuntimeError("killed while sampling")

    monkeypatch.setattr(wbflow, "sample_flow", grid_reads_last_pt)
    with pytest.raises(RuntimeError, match="killed while sampling"):
        train_flow.main(FLOW + ["--no-wandb", "--out-dir", str(tmp_path / "out")])
    [last] = seen
    assert (last["epoch"], last["global_step"], last["ended"], last["train_state"]) == (1, 2, False, None)
    assert last["table_rows"] == [] and last["epoch_loss"] == last["best_loss"] and last["best_epoch"] == 1
    assert set(last["last_window"]) == {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch",
                                        "train/skipped_steps"} and last["images_per_second"] > 0  # the epoch's row


# ----------------------------------------------------------------------------- 2. stops inside the epoch's end

def test_sigterm_during_fid_sampling_stops_between_batches_and_the_resume_logs_the_fid_once(
        offline_wandb, weights_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    out = tmp_path / "out"
    argv = FLOW + ["--epochs", "2", "--set", "data.max_images=16", "--set", "training.batch_size=8",
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


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_by_a_signal_ends_between_batches_in_one_line(tmp_path, monkeypatch, capsys, number):
    (tmp_path / "weights.pth").write_bytes(b"any file: sampling comes before the network")
    argv = ["--eval", "--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--metric", "is",
            "--num-samples", "6", "--set", "eval.sample_batch_size=2", "--nfe", "1",
            "--set", f"eval.fid_weights={tmp_path / 'weights.pth'}", "--out-dir", str(tmp_path / "out")]
    sampled = signal_on_call(wbflow.sample_flow, 1, number)
    monkeypatch.setattr(wbflow, "sample_flow", sampled)
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv)
    assert stopped.value.code == 128 + number and sampled.calls == 1  # the second batch never started
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip() and "sampling" not in line]
    assert lines == [f"train_flow.py: --eval stopped by {signal.Signals(number).name}; nothing was saved"]
    assert not (tmp_path / "out").exists()


def test_eval_shows_progress_bars_for_sampling_and_the_inception_pass(weights_path, tmp_path):  # noqa: F811
    argv = ["--eval", "--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--metric", "is",
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
    (["--set", "training.coupling=ot"], r"holds another training \(coupling 'independent' there, 'ot' here\)"),
    (["--set", "data.max_images=32"], r"holds another data \(max_images 64 there, 32 here; images_sha256 "),
    (["--set", "sampling.seed=3"], r"holds another sampling \(seed 0 there, 3 here\)"),
    (["--set", "reflow.nfe=7"], r"holds another reflow \(nfe 4 there, 7 here\)"),
])
def test_a_resume_with_other_training_settings_is_refused_naming_the_checkpoints_value(flow_run, change, match):
    message = refused(train_flow.main, FLOW + ["--out-dir", str(flow_run), "--epochs", "2",
                                               "--resume", str(flow_run / "last.pt"), *change], match)
    assert "keeps the settings it trained with" in message or "trains on" in message


def test_a_resume_refuses_a_change_of_what_the_run_trains_on_the_teacher_or_the_images(flow_run, tmp_path):
    resume = FLOW + ["--epochs", "2", "--resume"]
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
    write_cifar_batches(tmp_path / "cifar", per_batch=13)  # CIFAR-10 where the run trained on synthetic images
    refused(train_flow.main, resume + [str(flow_run / "last.pt"), "--out-dir", str(flow_run),
                                       "--data-dir", str(tmp_path / "cifar")],
            r"holds another data \(images_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' here\): a resumed run trains on "
            r"the images it trained on")


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
    (["--eval", "--checkpoint", "c.pt", "--set", "eval.num_real_images=1"],
     r"eval\.num_real_images is 1: FID needs at least two real images"),
    (["--eval", "--checkpoint", "c.pt", "--nfe", "0"], r"--nfe must be positive, not 0"),
    (["--set", "data.max_images=0"], r"data\.max_images must be positive, not 0"),
    (["--set", "eval.stats_dir=5"], r"eval\.stats_dir must be text or null, not 5"),  # null in the YAML: any type
    (["--set", "model.base_channels=0"], r"model\.base_channels must be positive, not 0"),
    (["--set", "model.dropout=1.5"], r"model\.dropout must be in \[0, 1\), not 1\.5"),
    (["--set", "model.base_channels=9"], r"model settings .*'base_channels': 9.* make no FlowUNet"),  # odd channels
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
    pytest.param(train_flow.DEFAULT_CONFIG.read_text().replace("  learning_rate: 2.0e-4",
                                                               "  learning_rate: 2.0e-4\n  learning_rate: 1"),
                 r"config\.yaml is not valid YAML \(key 'learning_rate' of line (\d+) repeated at line (?!\1)\d+, "
                 r"column 3\)", id="a repeated key"),  # plain YAML would keep the last value
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
        assert re.fullmatch(rf"python wbflow\.py fid: .*{match}.*", message), message
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
    assert re.fullmatch(rf"python wbflow\.py fid: {match}.*", message), message


def test_fid_command_says_cuda_is_missing_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, "--device", "cuda")
    assert message == "python wbflow.py fid: --device cuda: this machine has 0 CUDA devices; pass --device cpu"


def test_fid_of_one_image_says_it_needs_two_per_side(tmp_path, weights_path):  # noqa: F811
    one, two = _image_folder(tmp_path / "one", 1), _image_folder(tmp_path / "two", 2)
    message, _ = _fid_command(one, two, "--weights", weights_path, "--device", "cpu")
    assert message == "python wbflow.py fid: FID needs at least two images per side to estimate a covariance, got 1"
    with pytest.raises(ValueError, match="FID needs at least two images per side"):
        wbflow.fid(torch.randn(5, 8), torch.randn(1, 8))


def test_save_stats_writes_the_npz_it_names_and_refuses_an_existing_one(tmp_path, weights_path):  # noqa: F811
    folder = _image_folder(tmp_path / "images", 3)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert wbflow._command_line(["fid", folder, str(tmp_path / "stats"), "--save-stats", "--weights", weights_path,
                                     "--device", "cpu"]) is None
    assert printed.getvalue() == f"saved the statistics of 3 images to {tmp_path / 'stats.npz'}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "stats.npz"]
    mu, sigma = wbflow.feature_statistics(wbflow.inception_features(folder, weights_path=weights_path)[0])
    with np.load(tmp_path / "stats.npz") as stored:
        assert sorted(stored.files) == ["mu", "sigma"] and np.array_equal(stored["mu"], mu)
        assert np.array_equal(stored["sigma"], sigma)
    before = (tmp_path / "stats.npz").read_bytes()
    for name in ("stats", "stats.npz"):
        message, _ = _fid_command(folder, str(tmp_path / name), "--save-stats", "--weights", weights_path)
        assert message == (f"python wbflow.py fid: {tmp_path / 'stats.npz'} exists already: "
                           f"choose another name or delete it")
    assert (tmp_path / "stats.npz").read_bytes() == before


@pytest.mark.parametrize("settings", [dict(subset_size=1), dict(subset_size=0), dict(subsets=0, subset_size=4)])
def test_kid_refuses_subsets_it_cannot_average(settings):
    features = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError, match=r"KID needs subsets >= 1 of subset_size >= 2 images"):
        wbflow.kid(features, features, **settings)


# ----------------------------------------------------------------------------- 6. a newcomer's first run

def test_the_readmes_first_command_offline_names_the_fid_weights_and_cifar10_at_once_before_data_or_wandb(
        tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.chdir(tmp_path)  # no data/ here
    monkeypatch.delenv(wbflow.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    read_cifar10 = wbflow.load_cifar10
    monkeypatch.setattr(wbflow, "load_cifar10", lambda data_dir, train=True, download=True: read_cifar10(
        data_dir, train, download) if not download else pytest.fail("read the data before the check"))
    for name in ("synthetic_images", "wandb_run", "setup_distributed"):
        monkeypatch.setattr(wbflow, name, lambda *args, name=name, **kwargs: pytest.fail(f"{name} before the check"))
    message = refused(train_flow.main, ["--out-dir", str(tmp_path / "out")], "FID every 50 epochs")
    hub_path = tmp_path / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE
    assert f"download {wbflow.FID_WEIGHTS_URL} to {hub_path}" in message
    assert "--set eval.fid_weights=PATH" in message and "--set eval.fid_interval=0" in message
    assert "; and CIFAR-10 is not in data/cifar-10-batches-py (missing data_batch_1" in message  # the same line
    assert f"put {wbflow.CIFAR10_URL} in data/" in message
    assert "weights_path" not in message and not (tmp_path / "out").exists()


def test_a_copied_train_flow_reads_the_smoke_overrides_only_for_smoke_and_names_a_missing_file(tmp_path):
    import importlib.util
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cifar10_rectified_flow.yaml").write_text(train_flow.DEFAULT_CONFIG.read_text())
    (tmp_path / "train_flow.py").write_text((HERE / "train_flow.py").read_text())
    spec = importlib.util.spec_from_file_location("copied_train_flow", tmp_path / "train_flow.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)  # the recipe alone, without configs/smoke_overrides.txt
    assert "--smoke" in _help_text(lambda: copied.main(["--help"]))
    assert copied.load_config(copied.parse_args(["--epochs", "2"]))["training"]["epochs"] == 2
    missing = tmp_path / "configs" / "smoke_overrides.txt"
    refused(copied.main, ["--smoke"], rf"^train_flow\.py: --smoke reads its settings from {re.escape(str(missing))}, "
                                      rf"which could not be read \(No such file or directory\)$")
    (tmp_path / "configs" / "cifar10_rectified_flow.yaml").unlink()
    refused(copied.main, ["--help"], rf"its default config {re.escape(str(tmp_path))}.*cifar10_rectified_flow\.yaml "
                                     rf"is missing")


@pytest.mark.parametrize("argv, expected", [
    (["--no_wandb=True", "--smoke=true", "--overwrite=False"], (True, True, False)),  # as the sweep agent writes them
    (["--no-wandb", "--smoke", "--overwrite"], (True, True, True)),
    (["--no-wandb=0", "--smoke=no", "--eval=yes", "--use_wandb=1"], (False, False, False)),
])
def test_train_flows_boolean_flags_take_the_sweep_agents_spelling_and_still_work_bare(argv, expected):
    args = train_flow.parse_args(argv)
    assert (args.no_wandb, args.smoke, args.overwrite) == expected
    assert args.eval == ("--eval=yes" in argv) and args.use_wandb == ("--use_wandb=1" in argv)


def test_path_flags_are_taken_as_given_and_an_empty_one_is_refused():
    odd = " runs/a=b null [1, 2] # x "  # YAML-looking text, '=' and spaces at both ends: a folder name all the same
    config = train_flow.load_config(train_flow.parse_args(["--out-dir", odd, "--data-dir", "null", "--epochs", "3"]))
    assert (config["data"]["out_dir"], config["data"]["data_dir"], config["training"]["epochs"]) == (odd, "null", 3)
    for flag in ("--out-dir", "--data-dir"):  # "$OUT" unset: not the current folder
        refused(train_flow.main, [flag, ""], f"{flag} \\(data\\.\\w+\\) is empty: name a folder")
    refused(train_flow.main, ["--set", "data.out_dir="], r"--out-dir \(data\.out_dir\) is empty")  # in the config too


def test_train_flow_has_its_own_default_folders(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    flow = train_flow.load_config(train_flow.parse_args([]))["data"]
    smoke = train_flow.load_config(train_flow.parse_args(["--smoke"]))["data"]
    assert flow["out_dir"] == "runs/flow" and smoke["out_dir"] == "runs/flow-smoke" and flow["data_dir"] == "data"
    assert train_fire.parse_args([]).out_dir not in (flow["out_dir"], smoke["out_dir"])
    assert "`runs/flow`" in (HERE / "README.md").read_text()


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

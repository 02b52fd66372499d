"""train_flow.py and evaluate_flow.py as a user runs them: what a finished run logs, the command lines and a
checkpoint's evaluation, FID during training and its statistics cache, a newcomer's first run."""
import contextlib
import io
import math
import re
import signal
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate_flow
import flow_config
import train_fire
import train_flow
import wbflow
from conftest import _table_data, refused, run_logs, signal_on_call, tiny_flow_checkpoint, write_cifar_batches

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the command lines and evaluate_flow.py

@pytest.fixture
def cifar_dir(tmp_path):
    write_cifar_batches(tmp_path / "data")
    return tmp_path / "data"


def test_driver_without_data_offline_exits_with_the_message_and_no_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(SystemExit) as exit_info:
        train_flow.main(["--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out"), "--no-wandb",
                         "--set", "eval.fid_interval=0"])  # FID's missing weights would be named first
    assert "cifar-10-python.tar.gz" in str(exit_info.value.code)


def test_load_yaml_config_applies_typed_overrides_and_rejects_unknown_keys():
    path = HERE / "configs" / "cifar10_rectified_flow.yaml"
    config = wbflow.load_yaml_config(path, ["training.gradient_clip=0.5", "model.channel_mults=[1, 2]",
                                               "logging.entity=null", "training.learning_rate=1e-3"])
    assert config["training"]["gradient_clip"] == 0.5 and config["model"]["channel_mults"] == [1, 2]
    assert config["logging"]["entity"] is None and config["training"]["learning_rate"] == 1e-3
    seed_keys = {"use_wandb", "project_name", "entity", "run_name", "tags", "notes", "log_images_interval",
                 "log_model_interval"}
    assert seed_keys <= set(config["logging"])
    assert {"log_interval", "save_interval", "sample_interval", "gradient_clip"} <= set(config["training"])
    with pytest.raises(KeyError, match="training.gradient_clp"):
        wbflow.load_yaml_config(path, ["training.gradient_clp=0.5"])


def test_the_drivers_accept_the_seed_spelling_of_the_eval_flags_and_plain_training_flags():
    args = evaluate_flow.parse_args(["--checkpoint", "c.pt", "--num_samples", "10000", "--metric", "both",
                                     "--use_wandb", "--wandb_project", "flow_matching_cifar10_eval"])
    assert args.num_samples == 10000 and args.use_wandb and args.wandb_project == "flow_matching_cifar10_eval"
    config = flow_config.load_config(train_flow.parse_args(
        ["--data-dir", "/d", "--out-dir", "/o", "--epochs", "3", "--batch-size", "64", "--no-wandb",
         "--set", "training.gradient_clip=0.5", "--set", "logging.tags=[a, b]"]), "train_flow.py")
    assert (config["data"]["data_dir"], config["data"]["out_dir"]) == ("/d", "/o")
    assert (config["training"]["epochs"], config["training"]["batch_size"]) == (3, 64)
    assert config["training"]["gradient_clip"] == 0.5 and config["logging"]["tags"] == ["a", "b"]
    assert config["logging"]["use_wandb"] is False


SMALL = ["--set", "data.max_images=64", "--set", "training.log_interval=1"]


def test_eval_samples_the_checkpoints_ema_model_in_eval_mode_on_its_device(tmp_path, monkeypatch, weights_path):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    checkpoint = tiny_flow_checkpoint(tmp_path / "checkpoint_epoch_1.pt")
    seen = []

    def sample_images(velocity, count, **options):  # what evaluate_flow hands the sampler; then a stop, as Ctrl-C's
        seen.append((velocity.training, options["device"], count))
        return None, None

    monkeypatch.setattr(wbflow, "sample_images", sample_images)
    with pytest.raises(SystemExit) as stopped:
        evaluate_flow.main(["--smoke", "--checkpoint", str(checkpoint), "--metric", "is", "--num-samples", "3",
                            "--out-dir", str(tmp_path / "out")])
    assert stopped.value.code == 128 + signal.SIGINT and seen == [(False, torch.device("cpu"), 3)]


def test_eval_logs_fid_and_inception_score_against_cached_training_statistics(offline_wandb, cifar_dir, tmp_path,
                                                                               monkeypatch, weights_path):
    out_dir = tmp_path / "out"
    checkpoint = tiny_flow_checkpoint(tmp_path / "checkpoint_epoch_1.pt")
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    flags = ["--smoke", "--checkpoint", str(checkpoint), "--num-samples", "10",
             "--metric", "both", "--solver", "heun", "--nfe", "4", "--data-dir", str(cifar_dir),
             "--out-dir", str(out_dir), "--set", "eval.num_real_images=20"]
    metrics = evaluate_flow.main(flags + ["--use-wandb", "--wandb-project", "flow_eval"])
    [log] = run_logs(offline_wandb)
    for key in ("eval/fid_score", "eval/inception_score_mean", "eval/inception_score_std"):
        assert log.summary[key] == pytest.approx(metrics[key]) and math.isfinite(metrics[key])
    assert metrics["eval/fid_score"] >= 0 and metrics["eval/inception_score_mean"] >= 1
    assert log.values("eval/sample_images")[0]["_type"] == "image-file"
    assert log.config["solver"] == "heun" and log.config["nfe"] == 4
    [statistics] = (out_dir / "fid_stats").glob("cifar10-train-20-*-tensorflow-*.npz")  # never in the data folder
    assert not (cifar_dir / "fid_stats").exists()
    assert np.load(statistics)["num_images"] == 20  # eval.num_real_images: the first 20 of the 200

    cached = statistics.stat()  # reused, not written again (os.replace would give a new inode)
    again = evaluate_flow.main(flags + ["--metric", "fid"])  # W&B off without --use-wandb
    assert again["eval/fid_score"] == pytest.approx(metrics["eval/fid_score"], rel=1e-6)
    assert len(run_logs(offline_wandb)) == 1 and (statistics.stat().st_ino, statistics.stat().st_mtime_ns) == (
        cached.st_ino, cached.st_mtime_ns)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_eval_stopped_by_a_signal_ends_between_batches_in_one_line(tmp_path, monkeypatch, capsys, number):
    (tmp_path / "weights.pth").write_bytes(b"any file: sampling comes before the network")
    argv = ["--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--metric", "is",
            "--num-samples", "6", "--set", "eval.sample_batch_size=2", "--nfe", "1",
            "--set", f"eval.fid_weights={tmp_path / 'weights.pth'}", "--out-dir", str(tmp_path / "out")]
    sampled = signal_on_call(wbflow.sample_flow, 1, number)
    monkeypatch.setattr(wbflow, "sample_flow", sampled)
    with pytest.raises(SystemExit) as stopped:
        evaluate_flow.main(argv)
    assert stopped.value.code == 128 + number and sampled.calls == 1  # the second batch never started
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip() and "sampling" not in line]
    assert lines == [f"evaluate_flow.py: the evaluation stopped by {signal.Signals(number).name}; nothing was saved"]
    assert not (tmp_path / "out").exists()


def test_eval_shows_progress_bars_for_sampling_and_the_inception_pass(weights_path, tmp_path):  # noqa: F811
    argv = ["--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--metric", "is",
            "--num-samples", "4", "--set", "eval.sample_batch_size=2", "--set", "eval.inception_batch_size=2",
            "--nfe", "1", "--set", f"eval.fid_weights={weights_path}", "--out-dir", str(tmp_path / "out")]
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        evaluate_flow.main(argv)
    assert re.search(r"sampling: .*\| \d/2 \[", errors.getvalue()), errors.getvalue()  # tqdm: batches done / all
    assert re.search(r"Inception: .*\| \d/2 \[", errors.getvalue()), errors.getvalue()


# ----------------------------------------------------------------------------- what a finished run logged

def test_a_run_logs_every_seed_key_table_image_and_artifact(finished_flow_run):
    log, out = finished_flow_run.log, finished_flow_run.out
    assert "CIFAR-10: 48 training images" in finished_flow_run.printed and log.exit_code == 0
    windows = log.rows_with("train/loss")
    assert [row["_step"] for row in windows] == [2, 3, 4, 6, 8, 9]
    assert [row["train/epoch"] for row in windows] == [1, 1, 2, 2, 3, 3]
    assert all({"train/learning_rate", "train/grad_norm", "train/skipped_steps"} <= set(row) for row in windows)
    epoch_rows = log.rows_with("train/epoch_loss")  # each epoch's last window, loss, speed and grid: one row
    assert [row["_step"] for row in epoch_rows] == [3, 6, 9] and all(
        "train/loss" in row and row["train/images_per_second"] > 0 and math.isfinite(row["train/epoch_loss"])
        and row["eval/generated_samples"]["_type"] == "image-file" for row in epoch_rows)
    assert log.summary["train/epoch_loss"] == {"min": min(log.values("train/epoch_loss"))}
    assert log.summary["train/loss"] == {"min": min(log.values("train/loss"))}
    step_metrics = {(metric.name or metric.glob_name): metric.step_metric for metric in log.metrics}
    assert step_metrics == {"train/loss": "", "train/epoch": "", **dict.fromkeys(
        ["train/epoch_loss", "train/images_per_second", "eval/fid_score", "eval/inception_score_*",
         "eval/straightness"], "train/epoch")}
    assert sorted(path.name for path in (out / "samples").glob("epoch_000?.png")) == [
        "epoch_0001.png", "epoch_0002.png", "epoch_0003.png"]

    [table_row] = log.rows_with("eval/samples_table")  # with the last epoch's row
    assert table_row["_step"] == 9 and table_row["eval/samples_table"]["nrows"] == 12
    columns, data = _table_data(finished_flow_run.root)
    assert columns == ["epoch", "solver", "nfe", "seconds", "straightness", "samples"]
    straightness = {row["train/epoch"]: row["eval/straightness"] for row in log.rows_with("eval/straightness")}
    assert all(row[4] == pytest.approx(straightness[row[0]]) and row[4] > 0 for row in data)
    assert [(row[0], row[1], row[2]) for row in data if row[1] != "rk45"] == [
        (epoch, solver, nfe) for epoch in (1, 2, 3) for solver, nfe in [("euler", 1), ("euler", 2), ("heun", 2)]]
    assert [row[0] for row in data if row[1] == "rk45"] == [1, 2, 3]
    [table_artifact] = [artifact for artifact in log.artifacts if artifact["type"] == "run_table"]
    assert sorted(Path(name).name for name in table_artifact["files"] if name.endswith(".png")) == sorted(
        f"epoch_{row[0]:04d}_{row[1]}_nfe{row[2]:03d}.png" for row in data)

    models = [artifact for artifact in log.artifacts if artifact["type"] == "model"]  # one collection, 3 versions
    losses = log.values("train/epoch_loss")
    assert [model["name"] for model in models] == [f"model-{log.run_id}"] * 3
    for epoch, model in enumerate(models, 1):
        best = losses[epoch - 1] == min(losses[:epoch])
        assert set(model["aliases"]) == {"latest", f"epoch-{epoch}"} | ({"best"} if best else set())
        assert model["metadata"]["epoch"] == epoch and model["metadata"]["global_step"] == 3 * epoch
        assert model["files"] == [f"checkpoint_epoch_{epoch}.pt"]
    assert models[2]["metadata"]["config"]["training"]["gradient_clip"] == 1.0
    staged = {wbflow.file_sha256(path) for path in (finished_flow_run.root / "staging").rglob("*") if path.is_file()}
    assert staged and not staged & {wbflow.file_sha256(path) for path in out.glob("*.pt")}  # no checkpoint copies
    assert {"data", "model", "training", "logging", "sampling", "eval"} <= set(log.config)
    assert wbflow.load_checkpoint(out / "checkpoint_epoch_3.pt")["wandb_run_id"] == log.run_id
    assert sorted(path.name for path in out.glob("*.pt")) == [
        "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "checkpoint_epoch_3.pt", "last.pt"]


# ----------------------------------------------------------------------------- a newcomer's first run

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


def _copied_module(name, folder):
    import importlib.util
    (folder / f"{name}.py").write_text((HERE / f"{name}.py").read_text())
    spec = importlib.util.spec_from_file_location(f"copied_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copied_train_flow_reads_the_smoke_overrides_only_for_smoke_and_names_a_missing_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cifar10_rectified_flow.yaml").write_text(flow_config.DEFAULT_CONFIG.read_text())
    monkeypatch.setitem(sys.modules, "flow_config", _copied_module("flow_config", tmp_path))  # as its import finds it
    copied = _copied_module("train_flow", tmp_path)  # the recipe alone, without configs/smoke_overrides.txt
    assert "--smoke" in _help_text(lambda: copied.main(["--help"]))
    config = sys.modules["flow_config"].load_config(copied.parse_args(["--epochs", "2"]), "train_flow.py")
    assert config["training"]["epochs"] == 2
    missing = tmp_path / "configs" / "smoke_overrides.txt"
    refused(copied.main, ["--smoke"], rf"^train_flow\.py: --smoke reads its settings from {re.escape(str(missing))}, "
                                      rf"which could not be read \(No such file or directory\)$")
    (tmp_path / "configs" / "cifar10_rectified_flow.yaml").unlink()
    refused(copied.main, ["--help"], rf"its default config {re.escape(str(tmp_path))}.*cifar10_rectified_flow\.yaml "
                                     rf"is missing")


@pytest.mark.parametrize("argv, expected", [
    (["--no_wandb=True", "--smoke=true", "--overwrite=False"], (True, True, False)),  # as the sweep agent writes them
    (["--no-wandb", "--smoke", "--overwrite"], (True, True, True)),
    (["--no-wandb=0", "--smoke=no"], (False, False, False)),
])
def test_train_flows_boolean_flags_take_the_sweep_agents_spelling_and_still_work_bare(argv, expected):
    args = train_flow.parse_args(argv)
    assert (args.no_wandb, args.smoke, args.overwrite) == expected


@pytest.mark.parametrize("argv, expected", [
    (["--use_wandb=1", "--smoke=no"], (True, False)), (["--use-wandb", "--smoke"], (True, True)),
    (["--use-wandb=false", "--smoke=True"], (False, True)), ([], (False, False)),
])
def test_evaluate_flows_boolean_flags_take_the_sweep_agents_spelling_and_still_work_bare(argv, expected):
    args = evaluate_flow.parse_args(argv)
    assert (args.use_wandb, args.smoke) == expected


def test_train_flow_names_the_evaluation_script_for_an_earlier_eval_command(monkeypatch):
    monkeypatch.setattr(flow_config, "load_config", lambda *args: pytest.fail("read the config"))
    for eval_flag in ("--eval", "--eval=yes", "--eval=false"):
        refused(train_flow.main, [eval_flag, "--checkpoint", "c.pt"],
                r"^train_flow\.py: a checkpoint's FID and IS are evaluate_flow\.py's: python evaluate_flow\.py "
                r"--checkpoint PATH\|ARTIFACT")


def test_path_flags_are_taken_as_given_and_an_empty_one_is_refused():
    odd = " runs/a=b null [1, 2] # x "  # YAML-looking text, '=' and spaces at both ends: a folder name all the same
    config = flow_config.load_config(train_flow.parse_args(["--out-dir", odd, "--data-dir", "null", "--epochs", "3"]),
                                     "train_flow.py")
    assert (config["data"]["out_dir"], config["data"]["data_dir"], config["training"]["epochs"]) == (odd, "null", 3)
    for flag in ("--out-dir", "--data-dir"):  # "$OUT" unset: not the current folder
        refused(train_flow.main, [flag, ""], f"{flag} \\(data\\.\\w+\\) is empty: name a folder")
    refused(train_flow.main, ["--set", "data.out_dir="], r"--out-dir \(data\.out_dir\) is empty")  # in the config too


def test_train_flow_has_its_own_default_folders(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    flow = flow_config.load_config(train_flow.parse_args([]), "train_flow.py")["data"]
    smoke = flow_config.load_config(train_flow.parse_args(["--smoke"]), "train_flow.py")["data"]
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
                 _help_text(lambda: train_flow.main(["--help"])), _help_text(lambda: evaluate_flow.main(["--help"]))):
        assert "(default: None)" not in text and not re.search(r"\(default:[^)]*\) \(default:", text), text
    fid_help = _help_text(lambda: wbflow._command_line(["fid", "--help"]))
    options = fid_help.split("options:")[1]
    for option in ("--device DEVICE", "--batch-size BATCH_SIZE", "--weights WEIGHTS", "--resize", "--save-stats"):
        after = options.split(option, 1)[1].lstrip()
        assert not after.startswith("--"), f"{option} has no help"
    assert "--batch-size BATCH_SIZE images per Inception batch (default: 50)" in fid_help


# ----------------------------------------------------------------------------- FID during training

def test_fid_during_training_is_logged_per_epoch_and_leaves_training_unchanged(offline_wandb, weights_path, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    common = ["--smoke", "--epochs", "2", *SMALL, "--set", "data.max_images=16", "--set", "training.batch_size=8",
              "--set", "sampling.nfe=2", "--set", "sampling.table_nfes=[1]", "--set", "training.sample_interval=5",
              "--set", "logging.log_images_interval=5"]
    train_flow.main(common + ["--out-dir", str(tmp_path / "without")])
    train_flow.main(common + ["--out-dir", str(tmp_path / "with"), "--set", "eval.fid_interval=1",
                              "--set", "eval.fid_num_samples=6", "--set", "eval.inception_batch_size=6"])
    without, with_fid = run_logs(offline_wandb)
    assert without.values("train/loss") == with_fid.values("train/loss") and len(without.values("train/loss")) >= 2
    assert without.rows_with("eval/fid_score") == []
    rows = with_fid.rows_with("eval/fid_score")
    assert [row["train/epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["eval/fid_score"]) and row["eval/inception_score_mean"] >= 1 for row in rows)
    assert len(list((tmp_path / "with" / "fid_stats").glob("synthetic-16-*-tensorflow-*.npz"))) == 1


def test_fid_during_training_without_weights_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="absent.pth"):
        train_flow.main(["--smoke", "--no-wandb", "--out-dir", str(tmp_path), "--set", "eval.fid_interval=1", *SMALL])


# ----------------------------------------------------------------------------- the statistics cache of train_flow

def test_one_stats_dir_keeps_each_data_folders_statistics_and_a_damaged_one_is_computed_again(
        tmp_path, weights_path):
    """The flow scripts' one cache key (training and evaluate_flow.py both call fid_statistics): the statistics' file
    is named by what they were computed from, so two data folders sharing eval.stats_dir get their own."""
    stats = tmp_path / "stats"
    config = flow_config.load_config(train_flow.parse_args([
        "--smoke", "--out-dir", str(tmp_path / "out"), "--set", f"eval.stats_dir={stats}",
        "--set", f"eval.fid_weights={weights_path}", "--set", "eval.inception_batch_size=4"]), "train_flow.py")
    real_images = [torch.from_numpy(write_cifar_batches(tmp_path / name, per_batch=2, test_images=0, seed=seed)[0][:4])
                   for name, seed in (("a", 0), ("b", 1))]  # two data folders' first four images
    paths = [Path(flow_config.fid_statistics(images, config, "cpu", False)) for images in real_images]
    assert paths[0] != paths[1] and sorted(stats.iterdir()) == sorted(paths)
    means = [wbflow.feature_statistics(wbflow.inception_features(images, weights_path=weights_path)[0])[0]
             for images in real_images]
    for path, mu in zip(paths, means):  # each file holds its own images' statistics
        with np.load(path) as stored:
            np.testing.assert_allclose(stored["mu"], mu, rtol=1e-5, atol=1e-5)
    paths[0].write_bytes(paths[0].read_bytes()[:100])  # damaged: computed again, not a traceback after sampling
    assert Path(flow_config.fid_statistics(real_images[0], config, "cpu", False)) == paths[0]
    with np.load(paths[0]) as stored:
        np.testing.assert_allclose(stored["mu"], means[0], rtol=1e-5, atol=1e-5)


def test_an_unwritable_statistics_folder_or_out_dir_is_refused_before_sampling_or_training(
        tmp_path, weights_path, monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    monkeypatch.setattr(wbflow, "sample_images", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("trained before the check"))
    write_cifar_batches(tmp_path / "data", per_batch=2, test_images=0)
    (tmp_path / "file").write_text("a file where a folder would be: not writable, even by root")
    unwritable = tmp_path / "file" / "stats"
    argv = ["--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--num-samples", "2",
            "--data-dir", str(tmp_path / "data"), "--set", "eval.num_real_images=4"]
    refused(evaluate_flow.main, argv + ["--out-dir", str(tmp_path / "out"), "--set", f"eval.stats_dir={unwritable}"],
            rf"the FID statistics file \(eval\.stats_dir\) {re.escape(str(unwritable))}/\S+\.npz cannot be written "
            rf"\({re.escape(str(tmp_path / 'file'))}: Not a directory\)")
    refused(evaluate_flow.main, argv + ["--out-dir", str(unwritable)],
            rf"the sample grid {re.escape(str(unwritable))}/samples/\S+\.png cannot be written")
    refused(train_flow.main, ["--smoke", "--no-wandb", "--out-dir", str(tmp_path / "train"), *SMALL, "--set",
                              "eval.fid_interval=1", "--set", f"eval.stats_dir={unwritable}"],
            r"the FID statistics file \(eval\.stats_dir\) .* cannot be written")

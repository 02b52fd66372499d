"""What W&B records: the run helper, summaries, artifacts and their aliases, tables, credentials and an
unreachable server, errors after init, flush_run and the model graph. W&B runs offline; the record is read back."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_fire
import wbflow
from conftest import CE_LOSS, RunLog, closed_port, linear_batches, linear_classifier, run_logs

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- the W&B run helper

def test_wandb_run_without_wandb_installed_warns_once_and_trains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with wbflow.wandb_run({"a": 1}) as run:
        model = torch.nn.Linear(2, 1)
        stats = wbflow.train_epoch(model, [torch.randn(4, 2)], torch.optim.SGD(model.parameters(), lr=0.1),
                                   lambda m, b: m(b).pow(2).mean(), log_every=1, progress=False)
        run.log({"x": 1})
        run.summary["best"] = 1.0
    assert not run and stats["steps"] == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and "not installed" in warnings[0]


@pytest.mark.parametrize("enabled, mode", [(False, "offline"), (True, "disabled")])
def test_wandb_run_is_none_when_switched_off(enabled, mode, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with wbflow.wandb_run(project="test", enabled=enabled) as run:
        assert not run
        run.log({"x": 1})
        run.summary["best"] = 1.0
        assert wbflow.log_artifact(run, __file__, "nothing") is None
    assert not list(tmp_path.glob("wandb/*run-*"))


def test_wandb_run_finishes_with_exit_code_1_when_training_raises(offline_wandb):
    with pytest.raises(KeyboardInterrupt):
        with wbflow.wandb_run(project="test") as run:
            run.log({"x": 1.0}, step=1)
            raise KeyboardInterrupt
    log = run_logs(offline_wandb)[0]
    assert log.exit_code == 1 and log.values("x") == [1.0]


def test_wandb_run_resumes_the_same_run_id_and_steps_keep_increasing(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        run_id = run.id
        run.log({"train/loss": 1.0}, step=10)
    with wbflow.wandb_run(project="test", run_id=run_id) as run:
        assert run.id == run_id
        run.log({"train/loss": 0.5}, step=11)
    logs = run_logs(offline_wandb)
    assert [log.run_id for log in logs] == [run_id, run_id]
    assert [row["_step"] for log in logs for row in log.rows_with("train/loss")] == [10, 11]


def test_define_metric_through_the_guard_puts_epoch_metrics_on_the_epoch_axis(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        run.define_metric("epoch")
        for name in ["val/*", "train/epoch_loss"]:
            run.define_metric(name, step_metric="epoch")
    metrics = {(m.name or m.glob_name): m.step_metric for m in run_logs(offline_wandb)[0].metrics}
    assert metrics["val/*"] == "epoch" and metrics["train/epoch_loss"] == "epoch"


def test_watch_model_refuses_log_freq_below_100_and_logs_histograms(offline_wandb):
    model = linear_classifier()
    with pytest.raises(ValueError, match="log_freq"):
        wbflow.watch_model(None, model, log_freq=10)
    with wbflow.wandb_run(project="test") as run:
        wbflow.watch_model(run, model, log="all", log_freq=100)
        wbflow.train_epoch(model, linear_batches(100, batch_size=2), torch.optim.SGD(model.parameters(), lr=0.01),
                           CE_LOSS, log_every=50, progress=False,
                           on_log=lambda step, window: run.log({"train/loss": window["loss"]}, step=step))
    # wandb names the histograms of the n-th model watched in a process gradients/graph_<n>weight
    keys = {re.sub(r"/graph_\d+", "/", key) for key in set().union(*run_logs(offline_wandb)[0].history)}
    assert {"gradients/weight", "gradients/bias", "parameters/weight"} <= keys
    [gradients] = [key for key in set().union(*run_logs(offline_wandb)[0].history)
                   if key.startswith("gradients/") and key.endswith("weight")]
    assert run_logs(offline_wandb)[0].values(gradients)[0]["_type"] == "histogram"


# ----------------------------------------------------------------------------- a small train_fire run (the runs below)

def write_patterns(root, per_class, classes=("a", "b", "c", "d", "e")):
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.full((16, 16, 3), 40 * label, np.uint8) + rng.integers(0, 20, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def fire_argv(data, out, *extra):
    return ["--data-dir", str(data), "--out-dir", str(out), "--model", "resnet18", "--weights", "none",
            "--image-size", "16", "--batch-size", "2", "--num-workers", "0", "--project", "test", *extra]


# ----------------------------------------------------------------------------- artifacts

def test_fetch_checkpoint_downloads_the_model_artifact(tmp_path, monkeypatch):
    import wandb
    asked = {}

    class FakeArtifact:
        def download(self, root=None):
            folder = tmp_path / "artifact"
            folder.mkdir()
            wbflow.save_checkpoint({"epoch": 10}, folder / "checkpoint_epoch_10.pt")
            return str(folder)

    class FakeApi:
        default_entity = "me"

        def artifact(self, name, type=None):
            asked["name"], asked["type"] = name, type
            return FakeArtifact()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    path = wbflow.fetch_checkpoint("model-epoch-10", project="flow")
    assert asked == {"name": "me/flow/model-epoch-10:latest", "type": "model"}
    assert wbflow.load_checkpoint(path)["epoch"] == 10
    assert wbflow.fetch_checkpoint(path) == path
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        wbflow.fetch_checkpoint(str(tmp_path / "missing.pt"))


def staging_bytes(data_dir):
    return sum(path.stat().st_size for path in Path(data_dir).rglob("*") if path.is_file())


def test_log_artifact_versions_one_collection_without_staging_copies(offline_wandb, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # where W&B stages artifact files
    with wbflow.wandb_run(project="test") as run:
        for epoch in (1, 2, 3):
            path = wbflow.save_checkpoint({"w": torch.randn(250_000)}, tmp_path / f"checkpoint_epoch_{epoch}.pt")
            wbflow.log_artifact(run, path, f"model-{run.id}", aliases=["latest", f"epoch-{epoch}"] + ["best"] * (epoch == 2),
                                metadata={"epoch": epoch, "global_step": 10 * epoch})
    [log] = run_logs(offline_wandb)
    assert [(a["name"], a["type"], a["files"]) for a in log.artifacts] == [
        (f"model-{log.run_id}", "model", [f"checkpoint_epoch_{epoch}.pt"]) for epoch in (1, 2, 3)]
    assert [set(a["aliases"]) for a in log.artifacts] == [
        {"latest", "epoch-1"}, {"latest", "epoch-2", "best"}, {"latest", "epoch-3"}]
    assert [a["metadata"] for a in log.artifacts] == [{"epoch": epoch, "global_step": 10 * epoch} for epoch in (1, 2, 3)]
    assert staging_bytes(tmp_path / "data") < 1_000_000 / 10  # the three 1 MB files were not copied


def test_offline_save_best_keeps_each_versions_file_for_wandb_sync(offline_wandb, tmp_path, monkeypatch):
    from conftest import read_records
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    best = None
    with wbflow.wandb_run(project="test") as run:
        for epoch, val_acc in enumerate([50.0, 60.0, 70.0]):
            best, _ = wbflow.save_best({"epoch": epoch}, val_acc, best, tmp_path / "best_model.pth", run=run)
    [record_file] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_logs(offline_wandb)
    staged = [entry.local_path for record in read_records(record_file) if record.WhichOneof("record_type") == "artifact"
              for entry in record.artifact.manifest.contents]
    # what `wandb sync` uploads for each version is that version's model, not the file's last state
    assert [wbflow.load_checkpoint(path)["epoch"] for path in staged] == [0, 1, 2]


def test_fetch_checkpoint_resolves_the_best_alias_of_the_run_collection(tmp_path, monkeypatch):
    import wandb
    asked = []

    class FakeApi:
        default_entity = "me"

        def artifact(self, name, type=None):
            asked.append(name)
            folder = tmp_path / str(len(asked))
            wbflow.save_checkpoint({"epoch": 7}, folder / "checkpoint_epoch_7.pt")
            return type_artifact(folder)

    def type_artifact(folder):
        return type("Artifact", (), {"download": lambda self, root=None: str(folder)})()

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert wbflow.load_checkpoint(wbflow.fetch_checkpoint("model-abc123:best", project="flow"))["epoch"] == 7
    wbflow.fetch_checkpoint("team/flow/model-abc123", project="x")
    assert asked == ["me/flow/model-abc123:best", "team/flow/model-abc123:latest"]


# ----------------------------------------------------------------------------- tables: the guidance column and sweep

def test_samples_table_has_a_guidance_column_only_for_rows_that_hold_one(tmp_path):
    compared = [{"solver": "euler", "nfe": 2, "seconds": 0.5, "images": torch.zeros(2, 3, 8, 8)}]
    rows = [*wbflow.samples_table_rows(compared, 3, tmp_path, guidance=1.0),
            *wbflow.samples_table_rows(compared, 3, tmp_path, guidance=2.5)]
    assert [row["samples"] for row in rows] == [str(Path("samples") / f"epoch_0003_euler_nfe002_guidance{scale}.png")
                                                for scale in ("1", "2.5")]
    assert all((tmp_path / row["samples"]).is_file() for row in rows)
    table = wbflow.samples_table(rows, root=tmp_path)
    assert table.columns == ["epoch", "solver", "nfe", "guidance", "seconds", "straightness", "samples"]
    assert [row[3] for row in table.data] == [1.0, 2.5] and table.data[1][6]._caption.endswith("guidance 2.5")
    unguided = wbflow.samples_table(wbflow.samples_table_rows(compared, 3, tmp_path), root=tmp_path)
    assert unguided.columns == ["epoch", "solver", "nfe", "seconds", "straightness", "samples"]


def test_log_guidance_sweep_logs_a_table_and_a_line_plot_and_puts_the_best_scale_in_the_summary(offline_wandb):
    scores = [{"guidance": scale, "eval/fid_score": fid, "eval/inception_score_mean": 5.0 + scale}
              for scale, fid in ((3.0, 14.0), (1.0, 20.0), (2.0, 11.5), (1.5, 12.0))]
    with wbflow.wandb_run(project="test") as run:
        best = wbflow.log_guidance_sweep(run, scores)
    assert best["guidance"] == 2.0
    [log] = run_logs(offline_wandb)
    [row] = log.rows_with("eval/guidance_table")
    assert row["eval/guidance_table"]["_type"] == "table-file" and row["eval/fid_vs_guidance_table"]["nrows"] == 4
    [table_file] = offline_wandb.glob(f"wandb/*run-*/files/{row['eval/guidance_table']['path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["guidance", "eval/fid_score", "eval/inception_score_mean"]
    assert [(line[0], line[1]) for line in table["data"]] == [(1.0, 20.0), (1.5, 12.0), (2.0, 11.5), (3.0, 14.0)]
    assert log.summary["eval/best_guidance"] == 2.0 and log.summary["eval/best_fid_score"] == 11.5
    assert wbflow.log_guidance_sweep(None, scores)["eval/fid_score"] == 11.5  # without a run: the best, no log


# ----------------------------------------------------------------------------- summaries

def test_val_acc_summary_is_the_best_value_not_the_last(offline_wandb, tmp_path):
    val_accs = [50.0, 80.0, 60.0]
    with wbflow.wandb_run(project="test") as run:
        run.define_metric("epoch")
        run.define_metric("val_acc", step_metric="epoch", summary="max")
        run.define_metric("val_loss", step_metric="epoch", summary="min")
        best = None
        for epoch, (val_acc, val_loss) in enumerate(zip(val_accs, [2.0, 1.0, 1.5])):
            best, improved = wbflow.save_best({"epoch": epoch}, val_acc, best, tmp_path / "best.pth", run=run)
            run.log({"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss,
                     **({"best_val_acc": best} if improved else {})})
    [log] = run_logs(offline_wandb)
    assert log.summary["val_acc"] == {"max": max(log.values("val_acc"))} == {"max": 80.0}
    assert log.summary["val_loss"] == {"min": 1.0}
    assert log.summary["best_val_acc"] == 80.0


# ----------------------------------------------------------------------------- credentials and server

@pytest.fixture
def logged_out_wandb(tmp_path, monkeypatch):
    """This process's wandb as on a machine without credentials or WANDB_MODE (HOME, netrc and runs under
    tmp_path; no stdin to prompt on), set up afresh: wandb keeps its settings for the life of the process."""
    import wandb
    for key in [key for key in os.environ if key.startswith(("WANDB_", "NETRC")) and key != "WANDB_SERVICE"]:
        monkeypatch.delenv(key)  # WANDB_SERVICE, the service's address, is wandb.teardown()'s to remove
    for key, value in {"HOME": tmp_path, "NETRC": tmp_path / "netrc", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(key, str(value))
    wandb.teardown()
    yield tmp_path
    wandb.teardown()


def test_without_credentials_for_the_configured_host_it_logs_offline_without_prompting(logged_out_wandb, monkeypatch,
                                                                                        capsys):
    (logged_out_wandb / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    with wbflow.wandb_run({"a": 1}, project="p") as run:
        run.log({"x": 1.0}, step=1)
        mode, sync_dir = run.settings.mode, run.settings.sync_dir
    errors = capsys.readouterr().err
    assert mode == "offline" and "no W&B credentials for http://127.0.0.1:9" in errors
    assert f"wandb sync {sync_dir}" in errors
    [log] = run_logs(logged_out_wandb)
    assert log.values("x") == [1.0] and log.config["a"] == 1


def test_a_netrc_entry_for_the_configured_host_counts_as_credentials(logged_out_wandb, monkeypatch, capsys):
    port = closed_port()
    (logged_out_wandb / "netrc").write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with wbflow.wandb_run(project="p", init_timeout=1):
        pass
    errors = capsys.readouterr().err
    assert "no W&B credentials" not in errors and "wandb.init failed" not in errors, errors
    assert f"127.0.0.1:{port} did not answer" in errors  # it tried the server


# ----------------------------------------------------------------------------- W&B errors after init

def test_a_failing_wandb_call_warns_once_and_training_goes_on(offline_wandb, tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    with wbflow.wandb_run(project="test") as run:
        def broken(*args, **kwargs):
            raise ConnectionError("upload failed")

        run._target.log = broken
        run._target.log_artifact = broken
        for step in range(1, 4):
            run.log({"x": step}, step=step)
        path = wbflow.save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.pt")
        assert wbflow.log_artifact(run, path, "model-x") is None
        stats = wbflow.train_epoch(model, [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))] * 2,
                                   torch.optim.SGD(model.parameters(), lr=0.1),
                                   wbflow.classification_loss(torch.nn.CrossEntropyLoss()),
                                   log_every=1, progress=False,
                                   on_log=lambda step, window: run.log({"train/loss": window["loss"]}, step=step))
        run.summary["after"] = 1.0
    assert stats["steps"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line and "failed" in line]
    assert len(warnings) == 1 and "upload failed" in warnings[0]
    [log] = run_logs(offline_wandb)
    assert log.exit_code == 0 and log.summary["after"] == 1.0 and not log.rows_with("x")


def test_flush_run_puts_the_pending_row_on_disk_while_the_run_goes_on(offline_wandb):
    with wbflow.wandb_run(project="test") as run:
        # wandb_run's experimental setting, without which wandb-core writes the record every 15 s
        assert run.settings.x_transaction_log_flush_interval == 0.1
        run.log({"train/loss": 0.5}, step=3)
        wbflow.flush_run(run)
        [record] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "*.wandb"))
        assert RunLog(record).values("train/loss") == [0.5]
        run.log({"train/loss": 0.25}, step=4)  # the run goes on after it
    [log] = run_logs(offline_wandb)
    assert log.values("train/loss") == [0.5, 0.25]


# ----------------------------------------------------------------------------- the model graph

def test_log_graph_logs_the_torchviz_picture_as_model_graph(offline_wandb, tmp_path):
    import torchviz  # noqa: F401 - requirements-test.txt; .ci/run installs Graphviz
    assert shutil.which("dot"), "Graphviz's dot is missing: apt-get install graphviz"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(torch.zeros(1, 3, 8, 8))
    with wbflow.wandb_run(project="test") as run:
        assert wbflow.log_model_graph(run, model, torch.zeros(1, 3, 8, 8), step=0)
    [log] = run_logs(offline_wandb)
    [graph] = log.values("model_graph")
    assert graph["_type"] == "image-file" and graph["width"] > 10 and graph["height"] > 10
    assert glob.glob(str(offline_wandb / "wandb" / "*run-*" / "files" / graph["path"]))


def test_log_graph_without_dot_says_what_to_install_and_uses_wandbs_graph(offline_wandb, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    data = write_patterns(tmp_path / "data", per_class=3)
    train_fire.main(fire_argv(data, tmp_path / "out", "--epochs", "1", "--log-graph", "--val-split", "0.34"))
    printed = capsys.readouterr().out
    assert printed.count("apt-get install graphviz") == 1 and "pip install torchviz" in printed
    [log] = run_logs(offline_wandb)
    assert not log.rows_with("model_graph")
    # wandb.watch(..., log_graph=True): W&B's own graph, numbered per process (graph_0, graph_1, ...)
    graphs = [value for key, value in log.summary.items() if key.startswith("graph_")]
    assert [graph["_type"] for graph in graphs] == ["graph-file"]


# ----------------------------------------------------------------------------- a server that does not answer

@pytest.fixture(scope="module")
def unreachable_server_run(unreachable_server_process):
    """The unreachable server's run once it ended: (result, seconds to start, WANDB_DIR, the interpreter's folder)."""
    process, wandb_dir, tmp_path = unreachable_server_process
    stdout, stderr = process.communicate(timeout=180)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr
    return result, float(result.stdout.split("started after")[1].split()[0]), wandb_dir, tmp_path


def test_a_key_without_a_reachable_server_starts_fast_and_keeps_the_record_offline(unreachable_server_run):
    result, started_after, wandb_dir, _ = unreachable_server_run
    # init_timeout=10 (wandb's default is 90 s), plus wandb's two 5 s account lookups when its output is on
    assert started_after < 45
    [log] = run_logs(wandb_dir)
    assert log.values("train/loss") == [1.0, 0.5, 1.0 / 3] and log.config["lr"] == 0.1 and log.exit_code == 0
    [folder] = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    assert f"wandb sync {folder}" in result.stderr
    assert not glob.glob(str(wandb_dir / "wandb" / "run-*" / "*.wandb"))  # no empty record of the failed attempt


def test_the_offline_fallback_prints_only_paths_that_exist(unreachable_server_run):
    result, _, _, cwd = unreachable_server_run
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert output.count("Find logs at:") == 2  # the failed online attempt's and the offline run's
    assert "upload this run later with: wandb sync" in output
    paths = re.findall(r"(?:Find logs at:|wandb sync|saved locally in) (\S+)", output)
    assert paths and [path for path in paths if not (cwd / path).exists()] == []  # relative ones are from the cwd

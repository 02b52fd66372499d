"""train_flow.py's other objectives end to end: class-conditional runs with guidance, MeanFlow runs and
reflow (pairs from a teacher, a student that trains on them)."""
import glob
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_flow
import flow_config
import train_flow
import wbflow
from conftest import (_HANG, _table_data, assert_same_history, kill_when_marked, read_run, refused, run_logs,
                      run_offline, scalar_rows, signal_on_call, tiny_flow_checkpoint, uninterrupted_flow_run,
                      write_cifar_batches)

# ----------------------------------------------------------------------------- train_flow.py, class-conditional

CONDITIONAL = ["--smoke", "--epochs", "2", "--set", "model.num_classes=10", "--set", "training.coupling=ot",
               "--set", "data.max_images=32", "--set", "training.batch_size=16", "--set", "model.base_channels=8",
               "--set", "model.channel_mults=[1]", "--set", "model.head_channels=8", "--set", "sampling.num_images=20",
               "--set", "sampling.nfe=2", "--set", "sampling.table_solvers=[euler]", "--set", "sampling.table_nfes=[1]",
               "--set", "reflow.num_pairs=20", "--set", "reflow.shard_size=10", "--set", "reflow.nfe=1"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """One class-conditional --smoke run of two epochs on CIFAR-10's layout, W&B offline in its own folder: argv (all
    but --out-dir), out dir, RunLog, the W&B folder and the CIFAR labels. Tests only read it."""
    root = tmp_path_factory.mktemp("conditional")
    labels = write_cifar_batches(root / "data", per_batch=8, test_images=2)[1]
    argv = CONDITIONAL + ["--data-dir", str(root / "data")]
    run_offline(train_flow.main, argv + ["--out-dir", str(root / "out")], root)
    [log] = run_logs(root)
    return SimpleNamespace(argv=argv, out=root / "out", log=log, root=root, labels=labels)


def test_train_flow_reads_cifar_10s_own_labels_with_its_images(tmp_path):
    written_images, written_labels = write_cifar_batches(tmp_path / "data", per_batch=8, test_images=2)
    images_uint8, labels = train_flow.load_images({"data_dir": str(tmp_path / "data"), "max_images": 30}, 0, False)
    assert torch.equal(images_uint8, torch.from_numpy(written_images[:30])) and labels.tolist() == written_labels[:30]


def test_a_conditional_smoke_run_logs_a_class_grid_of_fixed_noise_and_the_guidance_column(conditional_run):
    log, out, classes = conditional_run.log, conditional_run.out, list(wbflow.CIFAR10_CLASSES)
    assert log.exit_code == 0 and log.config["model"]["num_classes"] == 10 and log.config["class_names"] == classes
    grids = log.values("eval/generated_samples")
    assert len(grids) == 2 and all(grid["caption"].endswith("guidance 1; rows: " + ", ".join(classes))
                                   for grid in grids)
    assert (grids[0]["height"], grids[0]["width"]) == (10 * 34 + 2, 2 * 34 + 2)  # a row per class, 2 noise columns
    last = wbflow.load_checkpoint(out / "last.pt")
    ema = wbflow.make_ema(wbflow.FlowUNet(**last["config"]["model"]))
    ema.load_state_dict(last["ema"])
    noise = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))[:2]  # sampling.seed's noise
    grid = wbflow.class_grid(ema.module.eval(), noise, classes, nfe=2)[0]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "epoch_0002.png")), grid)

    [row] = log.rows_with("eval/samples_table")
    [table_file] = conditional_run.root.glob(f"wandb/*run-*/files/{row['eval/samples_table']['path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["epoch", "solver", "nfe", "guidance", "seconds", "straightness", "samples"]
    assert [line[:4] for line in table["data"]] == [[epoch, "euler", 1, scale] for epoch in (1, 2) for scale in (1, 2)]
    straightness = log.values("eval/straightness")  # measured at sampling.guidance 1: the rows of that scale hold it
    assert [line[5] for line in table["data"]] == [straightness[0], None, straightness[1], None]
    assert last["config"]["class_names"] == classes
    models = [artifact for artifact in log.artifacts if artifact["type"] == "model"]
    assert len(models) == 2 and all(model["metadata"]["class_names"] == classes for model in models)


def test_eval_guidance_logs_fid_and_is_per_scale_and_the_best_scale_in_the_summary(conditional_run, offline_wandb,
                                                                                  weights_path, tmp_path):
    argv = ["--smoke", "--checkpoint", str(conditional_run.out / "last.pt"), "--guidance", "2.0,1.0",
            "--num-samples", "4", "--nfe", "1", "--use-wandb", "--data-dir", str(conditional_run.root / "data"),
            "--out-dir", str(tmp_path / "eval"), "--set", f"eval.fid_weights={weights_path}",
            "--set", "eval.num_real_images=4", "--set", "eval.inception_batch_size=4"]
    metrics = evaluate_flow.main(argv)
    [log] = run_logs(offline_wandb)
    [row] = log.rows_with("eval/guidance_table")
    [table_file] = offline_wandb.glob(f"wandb/*run-*/files/{row['eval/guidance_table']['path']}")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["guidance", "eval/fid_score", "eval/inception_score_mean", "eval/inception_score_std"]
    assert [line[0] for line in table["data"]] == [1.0, 2.0] and row["eval/fid_vs_guidance_table"]["nrows"] == 2
    fids = {line[0]: line[1] for line in table["data"]}
    assert all(np.isfinite(fid) for fid in fids.values()) and fids[1.0] != fids[2.0]
    best = min(fids, key=fids.get)
    assert log.summary["eval/best_guidance"] == best and log.summary["eval/best_fid_score"] == fids[best]
    assert metrics["eval/fid_score"] == fids[best] and log.config["guidance"] == [2.0, 1.0]
    assert log.values("eval/sample_images")[0]["caption"].endswith(
        f"guidance {best:g}; columns: " + ", ".join(wbflow.CIFAR10_CLASSES))


def test_a_stopped_conditional_run_resumes_to_the_uninterrupted_runs_weights(conditional_run, tmp_path, monkeypatch,
                                                                            capsys):
    argv = conditional_run.argv + ["--no-wandb", "--out-dir", str(tmp_path / "split")]
    real_loss = wbflow.rectified_flow_loss
    monkeypatch.setattr(wbflow, "rectified_flow_loss", signal_on_call(real_loss, 3))  # epoch 2, its first step
    with pytest.raises(SystemExit) as stop:
        train_flow.main(argv)
    assert stop.value.code == 128 + signal.SIGTERM and "stopped at step 3 (epoch 2)" in capsys.readouterr().out
    monkeypatch.setattr(wbflow, "rectified_flow_loss", real_loss)
    train_flow.main(argv + ["--resume", str(tmp_path / "split" / "last.pt")])
    end, expected = (wbflow.load_checkpoint(out / "last.pt") for out in (tmp_path / "split", conditional_run.out))
    assert end["global_step"] == expected["global_step"] == 4
    for key in ("model", "ema"):
        for name, tensor in expected[key].items():
            torch.testing.assert_close(end[key][name], tensor, rtol=1e-5, atol=1e-6)


def test_a_conditional_run_refuses_what_does_not_fit_in_one_line(conditional_run, tmp_path, weights_path):
    last, argv = str(conditional_run.out / "last.pt"), conditional_run.argv + ["--no-wandb"]
    resume = argv + ["--out-dir", str(tmp_path / "resumed"), "--resume", last]
    refused(train_flow.main, resume + ["--set", "model.num_classes=0"],
            r"trained with class_names \['airplane', .*\], this run has None: pass the model\.num_classes")
    refused(train_flow.main, resume + ["--set", "training.label_dropout=0.2"],
            r"holds another training \(label_dropout 0\.1 there, 0\.2 here\)")
    refused(train_flow.main, argv + ["--set", "model.num_classes=5"],
            r"^train_flow\.py: model\.num_classes must be 0 \(unconditional\) or 10 \(CIFAR-10's classes\), not 5$")
    refused(train_flow.main, argv + ["--set", "training.objective=meanflow", "--set", "training.coupling=independent"],
            r"^train_flow\.py: model\.num_classes is rectified flow's: meanflow_loss trains without labels$")
    refused(train_flow.main, argv + ["--set", "training.label_dropout=1.0"],
            r"^train_flow\.py: training\.label_dropout must be in \[0, 1\), not 1\.0$")
    unconditional = tiny_flow_checkpoint(tmp_path / "unconditional.pt")
    refused(evaluate_flow.main, ["--checkpoint", str(unconditional), "--guidance", "1,2",
                                 "--set", f"eval.fid_weights={weights_path}", "--out-dir", str(tmp_path / "eval")],
            r"--guidance needs a class-conditional checkpoint; .*unconditional\.pt holds a model for t alone$")
    refused(train_flow.main, argv + ["--out-dir", str(tmp_path / "student"), "--reflow", last,
                                     "--set", "model.num_classes=0"],
            r"--reflow .*last\.pt: trained with class_names \['airplane'")


def test_a_conditional_teachers_student_trains_every_pair_with_its_label(conditional_run, tmp_path, monkeypatch):
    batches, real_loss = [], wbflow.rectified_flow_loss

    def recording(model, batch, **options):
        batches.append(batch)
        return real_loss(model, batch, **options)

    monkeypatch.setattr(wbflow, "rectified_flow_loss", recording)
    train_flow.main(conditional_run.argv + ["--no-wandb", "--epochs", "1", "--out-dir", str(tmp_path / "student"),
                                            "--reflow", str(conditional_run.out / "last.pt")])
    shards = [wbflow.load_checkpoint(path) for path in sorted((tmp_path / "student" / "reflow_pairs").glob("*.pt"))]
    assert torch.equal(torch.cat([shard["labels"] for shard in shards]), torch.arange(20) % 10)
    assert shards[0]["guidance"] == 1.0 and shards[0]["num_classes"] == 10
    assert len(batches) == 1 and set(batches[0]) == {"noise", "data", "labels"}  # 16 of the 20 pairs, labelled
    assert ((batches[0]["labels"] >= 0) & (batches[0]["labels"] <= 10)).all()


def test_a_checkpoint_written_before_model_num_classes_resumes_and_teaches_as_unconditional(tmp_path):
    argv = [*CONDITIONAL, "--no-wandb", "--set", "model.num_classes=0", "--set", "training.coupling=independent",
            "--out-dir", str(tmp_path / "old")]
    train_flow.main(argv + ["--epochs", "1"])
    old = wbflow.load_checkpoint(tmp_path / "old" / "last.pt")  # as the code before class labels wrote it:
    del old["config"]["model"]["num_classes"], old["config"]["class_names"], old["config"]["training"]["label_dropout"]
    wbflow.save_checkpoint(old, tmp_path / "old" / "last.pt")
    result = train_flow.main(argv + ["--epochs", "2", "--resume", str(tmp_path / "old" / "last.pt")])
    assert result["step"] == 4
    config = flow_config.load_config(train_flow.parse_args(argv), "train_flow.py")
    assert flow_config.load_teacher(str(tmp_path / "old" / "checkpoint_epoch_1.pt"), config) is not None


# ----------------------------------------------------------------------------- train_flow's meanflow objective

# --smoke's workflow at toy sizes: 48 synthetic images, batch 16, 3 steps an epoch, 2 epochs; every epoch a grid, a
# table of 1, 2 and 4 jumps and a checkpoint
TOY_RUN = ["--smoke", "--epochs", "2", "--set", "data.max_images=48", "--set", "training.batch_size=16",
           "--set", "training.log_interval=2", "--set", "model.base_channels=8", "--set", "model.head_channels=8",
           "--set", "sampling.num_images=4", "--set", "sampling.nfe=1"]


MEANFLOW_RUN = TOY_RUN + ["--set", "training.objective=meanflow"]


@pytest.fixture(scope="module")
def meanflow_run(tmp_path_factory):
    """The uninterrupted MeanFlow run (uninterrupted_flow_run). Tests only read it."""
    return uninterrupted_flow_run(tmp_path_factory.mktemp("meanflow"), MEANFLOW_RUN)


def test_a_meanflow_smoke_run_logs_its_one_step_grid_and_a_table_of_1_2_and_4_jumps(meanflow_run):
    log, last = meanflow_run.log, wbflow.load_checkpoint(meanflow_run.out / "last.pt")
    assert log.exit_code == 0 and log.config["training"]["objective"] == "meanflow"
    assert log.config["model"]["second_time"] is True and log.config["sampling"]["solver"] == "meanflow"
    grids = log.values("eval/generated_samples")
    assert [grid["caption"] for grid in grids] == ["epoch 1, EMA, meanflow NFE 1", "epoch 2, EMA, meanflow NFE 1"]
    # the last grid is the one step of the last EMA weights from the run's fixed noise
    ema = wbflow.make_ema(wbflow.FlowUNet(**last["config"]["model"]))
    ema.load_state_dict(last["ema"])
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(last["config"]["sampling"]["seed"]))
    with torch.no_grad():
        expected = wbflow.sample_grid(noise + ema.module.eval()(noise, 0, r=1))
    from PIL import Image
    [run_folder] = (meanflow_run.root / "wandb").glob("offline-run-*")
    logged = np.asarray(Image.open(run_folder / "files" / grids[-1]["path"]).convert("RGB"))
    assert logged.shape == expected.shape and np.abs(logged.astype(int) - expected.astype(int)).max() <= 1
    columns, data = _table_data(meanflow_run.root)
    assert [(row[0], row[1], row[2]) for row in data] == [(epoch, "meanflow", nfe) for epoch in (1, 2)
                                                          for nfe in (1, 2, 4)]
    assert all(np.isfinite(log.values("train/loss"))) and last["global_step"] == 6


@pytest.mark.parametrize("argv, named", [
    (TOY_RUN, "second_time True there, None here"),
    (MEANFLOW_RUN + ["--set", "meanflow.norm_p=1.0"], "norm_p 0.75 there, 1.0 here")], ids=["objective", "setting"])
def test_a_meanflow_run_resumes_only_with_its_objective_and_settings(meanflow_run, tmp_path, argv, named):
    with pytest.raises(SystemExit) as refused:
        train_flow.main(argv + ["--no-wandb", "--out-dir", str(tmp_path / "out"),
                                "--resume", str(meanflow_run.out / "last.pt")])
    assert str(refused.value).startswith("train_flow.py: ") and named in str(refused.value)
    assert "\n" not in str(refused.value)


def test_eval_samples_a_meanflow_checkpoint_by_jumps_and_refuses_the_meanflow_solver_for_a_rectified_flow(
        meanflow_run, tmp_path, monkeypatch, weights_path, capsys):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    flags = ["--smoke", "--metric", "is", "--num-samples", "2", "--out-dir", str(tmp_path / "out")]
    metrics = evaluate_flow.main(flags + ["--checkpoint", str(meanflow_run.out / "last.pt"), "--nfe", "1"])
    assert "with meanflow, NFE 1" in capsys.readouterr().out and metrics["eval/inception_score_mean"] >= 1
    rectified_flow = tiny_flow_checkpoint(tmp_path / "rectified_flow.pt")
    with pytest.raises(SystemExit, match=r"^evaluate_flow.py: --solver meanflow samples a MeanFlow checkpoint; .* "
                                         r"is a rectified flow$"):
        evaluate_flow.main(flags + ["--checkpoint", str(rectified_flow), "--solver", "meanflow"])


def test_a_killed_meanflow_run_resumes_to_the_uninterrupted_runs_record_and_weights(meanflow_run, offline_wandb,
                                                                                    tmp_path):
    argv = meanflow_run.argv + ["--out-dir", str(tmp_path / "killed")]
    last = tmp_path / "killed" / "last.pt"
    kill_when_marked(_HANG.format(here=str(Path(__file__).resolve().parent), marker=str(tmp_path / "in_epoch_2"),
                                  argv=argv, patch="wbflow.meanflow_loss = hang_at(wbflow.meanflow_loss, 5)"),
                     tmp_path / "in_epoch_2")
    killed = wbflow.load_checkpoint(last)  # epoch 1 and its end; epoch 2's steps 4 and 5 are lost with the process
    assert (killed["epoch"], killed["global_step"], killed["ended"]) == (1, 3, True)
    train_flow.main(argv + ["--resume", str(last)])
    end, expected = wbflow.load_checkpoint(last), wbflow.load_checkpoint(meanflow_run.out / "last.pt")
    first = read_run(offline_wandb, killed["wandb_run_id"], lambda log: log.rows_with("train/epoch_loss"))
    resumed = read_run(offline_wandb, end["wandb_run_id"], lambda log: log.exit_code is not None)
    assert resumed.run_id != first.run_id and resumed.config["resumed_from"]["step"] == 3  # a killed run: a new one
    kept = [(step, values) for step, values in scalar_rows(first) if step <= 3] + scalar_rows(resumed)
    assert_same_history(kept, scalar_rows(meanflow_run.log))
    assert end["global_step"] == 6 and [row["nfe"] for row in end["table_rows"]] == [1, 2, 4] * 2
    for key in ("model", "ema"):
        for name, tensor in expected[key].items():
            torch.testing.assert_close(end[key][name], tensor, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- reflow

TINY = ["--smoke", "--set", "data.max_images=32", "--set", "training.batch_size=16", "--set", "model.base_channels=8",
        "--set", "model.head_channels=8", "--set", "sampling.num_images=4", "--set", "sampling.table_nfes=[1]",
        "--set", "sampling.table_solvers=[euler]", "--set", "reflow.num_pairs=32", "--set", "reflow.shard_size=16",
        "--set", "reflow.nfe=2", "--set", "sampling.nfe=4"]


def test_smoke_reflow_logs_pairs_that_use_the_teacher_and_a_student_that_uses_them(offline_wandb, tmp_path):
    train_flow.main(TINY + ["--out-dir", str(tmp_path / "teacher")])
    teacher_path = tmp_path / "teacher" / "last.pt"
    result = train_flow.main(TINY + ["--out-dir", str(tmp_path / "student"), "--reflow", str(teacher_path)])
    teacher, pairs, student = run_logs(offline_wandb)
    [used_model] = [artifact for artifact in pairs.artifacts if artifact["used"]]
    assert used_model["type"] == "model" and used_model["name"] == f"model-{teacher.run_id}"
    [dataset] = [artifact for artifact in pairs.artifacts if artifact["type"] == "dataset" and not artifact["used"]]
    assert dataset["name"] == f"reflow-pairs-{teacher.run_id}" and sorted(dataset["files"]) == [
        "pairs_00000.pt", "pairs_00001.pt"] and dataset["metadata"]["num_pairs"] == 32
    [used_dataset] = [artifact for artifact in student.artifacts if artifact["used"]]
    assert used_dataset["type"] == "dataset" and used_dataset["name"] == dataset["name"]
    assert [artifact["name"] for artifact in student.artifacts if artifact["type"] == "model"] == [
        f"model-{student.run_id}"] and student.config["reflow"]["teacher"] == str(teacher_path)
    [straightness] = student.values("eval/straightness")
    assert straightness > 0 and result["step"] == 2
    [table] = glob.glob(str(offline_wandb / "wandb" / f"*{student.run_id}" / "files" / "media" / "table" / "eval"
                            / "samples_table_*.table.json"))
    table = json.loads(open(table).read())
    assert table["columns"][4] == "straightness" and table["data"][0][4] == pytest.approx(straightness)


def test_the_epochs_end_and_the_pair_generation_sample_the_ema_model_in_eval_mode(tmp_path):
    """The samplers leave the velocity's mode as given: train_flow puts its EMA model in eval mode (no dropout)."""
    calls = []  # (training mode, inference mode) of every FlowUNet forward

    def record(module, args):
        if isinstance(module, wbflow.FlowUNet):
            calls.append((module.training, torch.is_inference_mode_enabled()))

    argv = TINY + ["--no-wandb", "--set", "model.dropout=0.5"]
    with torch.nn.modules.module.register_module_forward_pre_hook(record):  # removed at the end
        train_flow.main(argv + ["--out-dir", str(tmp_path / "teacher")])
        trained = len(calls)
        train_flow.main(argv + ["--out-dir", str(tmp_path / "student"), "--reflow", str(tmp_path / "teacher" / "last.pt")])
    sampled = [training for training, inference in calls if inference]
    assert set(calls[:trained]) == {(True, False), (False, True)}  # the steps; the grid, straightness and table
    assert sampled and not any(sampled) and (False, True) in calls[trained:]  # and the teacher's pairs


def test_reflow_with_another_teacher_refuses_the_earlier_pairs_or_with_overwrite_makes_them_again(tmp_path,
                                                                                                  monkeypatch):
    """A generation stopped under teacher A and run again with teacher B: never a mix of both teachers' pairs."""
    teachers = [tiny_flow_checkpoint(tmp_path / f"teacher_{name}.pt") for name in "ab"]
    hashes = [wbflow.file_sha256(path) for path in teachers]
    out = tmp_path / "student"
    argv = TINY + ["--no-wandb", "--set", "model.attention_resolutions=[]", "--out-dir", str(out)]  # the teachers' UNet
    real_sample = wbflow.sample_flow
    monkeypatch.setattr(wbflow, "sample_flow", signal_on_call(real_sample, 1))  # SIGTERM while making shard 0
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv + ["--reflow", str(teachers[0])])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [path.name for path in (out / "reflow_pairs").iterdir()] == ["pairs_00000.pt"]
    monkeypatch.setattr(wbflow, "sample_flow", real_sample)
    refused(train_flow.main, argv + ["--reflow", str(teachers[1])],
            rf"pairs_00000\.pt holds pairs of another generation \(teacher_sha256 '{hashes[0]}' there, '{hashes[1]}' "
            rf"here\): pass --overwrite to delete them")
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("training starts"))
    with pytest.raises(pytest.fail.Exception, match="training starts"):
        train_flow.main(argv + ["--reflow", str(teachers[1]), "--overwrite"])
    shards = [wbflow.load_checkpoint(path) for path in sorted((out / "reflow_pairs").iterdir())]
    assert [(shard["first"], shard["teacher_sha256"]) for shard in shards] == [(0, hashes[1]), (16, hashes[1])]

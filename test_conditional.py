"""Class-conditional flow with classifier-free guidance: FlowUNet's label embedding and its null class, label
dropout, the class-wise OT plan, guided_velocity, the class grid, the guidance column and the guidance sweep in W&B."""
import itertools
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import train_flow
import wbflow
from conftest import run_logs, run_offline
from test_guard import refused
from test_training import signal_on_call
from test_wbflow import tiny_flow_checkpoint, write_cifar_batches

HERE = Path(__file__).resolve().parent
TINY = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0)


def randomised(model, seed=0):
    """`model` with every parameter drawn at random: FlowUNet's zero-initialised output layer would hide the rest."""
    torch.manual_seed(seed)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    return model.eval()


class LabelledVelocity(nn.Module):
    """v(x, t, labels) = x * (1 + t) + an offset per label (the last row the null class), counting its calls."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.5, 0.25]]))
        self.batch_sizes = []

    def forward(self, x, t, labels=None):
        self.batch_sizes.append(x.shape[0])
        labels = torch.full((x.shape[0],), self.num_classes) if labels is None else labels
        return x * (1 + t[:, None]) + self.offset[labels]


# ----------------------------------------------------------------------------- the model

def test_an_unconditional_checkpoint_written_before_class_labels_loads_strictly_and_samples_identically():
    # written by wbflow 5b10d37 (before num_classes): a FlowUNet's state_dict, its noise and its Euler-4 samples
    saved = wbflow.load_checkpoint(HERE / "testdata" / "flow_unet_before_labels.pt")
    model = wbflow.FlowUNet(**saved["config"]["model"])
    model.load_state_dict(saved["model"])  # strict: every key, no other
    torch.testing.assert_close(wbflow.euler_sample(model.eval(), saved["noise"], 4), saved["samples"],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unconditional", [None, 0])
def test_num_classes_none_or_0_builds_exactly_the_state_dict_of_a_model_for_t_alone(unconditional):
    with torch.device("meta"):
        before = wbflow.FlowUNet(**TINY).state_dict()
        state = wbflow.FlowUNet(**TINY, num_classes=unconditional).state_dict()
        conditional = wbflow.FlowUNet(**TINY, num_classes=10).state_dict()
    assert [(key, value.shape) for key, value in state.items()] == [(key, value.shape) for key, value in before.items()]
    assert conditional.keys() - before.keys() == {"label_embed.weight"}
    assert conditional["label_embed.weight"].shape == (11, 32)  # one row per class and the null row, embed_dim 4 x 8


def test_a_label_adds_its_embedding_row_to_the_time_embedding_and_no_labels_is_the_null_row():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=3))
    t, labels = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([2, 0, 3])
    with torch.no_grad():
        time_only = wbflow.FlowUNet.embed(model, t) - model.label_embed.weight[3]  # embed() adds the null row
        torch.testing.assert_close(model.embed(t, labels=labels), time_only + model.label_embed.weight[labels])
        torch.testing.assert_close(model.embed(t), model.embed(t, labels=torch.full((3,), 3)))
        x = torch.randn(3, 3, 8, 8)
        cats, dogs = model(x, t, labels=torch.tensor([0, 0, 0])), model(x, t, labels=torch.tensor([1, 1, 1]))
        assert not torch.allclose(cats, dogs)


def test_a_flow_unet_with_a_second_time_and_classes_adds_both_terms_to_the_time_embedding():
    model = randomised(wbflow.FlowUNet(**TINY, second_time=True, num_classes=3))
    t, r, labels = torch.tensor([0.1, 0.5]), torch.tensor([0.6, 0.5]), torch.tensor([2, 0])
    with torch.no_grad():
        expected = (model.time_embed(model._sinusoid(t)) + model.interval_embed(model._sinusoid(r - t))
                    + model.label_embed.weight[labels])
        torch.testing.assert_close(model.embed(t, r=r, labels=labels), expected)


def test_a_conditional_flow_unet_trains_its_label_embedding_on_labelled_batches_with_dropout():
    model = wbflow.FlowUNet(**TINY, num_classes=2)
    torch.manual_seed(0)
    for module in (model.output[-1],):  # a non-zero output layer, so the gradient reaches the embedding
        nn.init.normal_(module.weight, std=0.05)
    before = model.label_embed.weight.detach().clone()
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(16, size=8), 8, labels=torch.arange(16) % 2)
    loss_fn = wbflow.drop_labels(wbflow.rectified_flow_loss, 0.5, null_label=2)
    stats = wbflow.train_epoch(model, loader, torch.optim.Adam(model.parameters(), lr=1e-2), loss_fn, progress=False)
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])
    assert (model.label_embed.weight - before).abs().amax(dim=1).gt(0).all()  # both classes and the null row learnt


# ----------------------------------------------------------------------------- training: labels, dropout, OT

def test_the_device_loader_yields_each_images_own_label_through_shuffles_and_flips():
    images_uint8 = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).clone()
    images_uint8[:, :, :, 0] = 200  # a left column, so a flip is visible
    loader = wbflow.DeviceImageLoader(images_uint8, 5, labels=torch.arange(20) % 7, seed=3)
    loader.set_epoch(2)
    seen, flipped = [], 0
    for images, labels in loader:
        index = ((images[:, 0] + 1) * 127.5).round().long().amin(dim=(1, 2))  # each image's own value
        seen += index.tolist()
        flipped += int((images[:, 0, 0, 1] > images[:, 0, 0, 0]).sum())
        assert labels.dtype == torch.long and torch.equal(labels, index % 7)
    assert sorted(seen) == list(range(20)) and 0 < flipped < 20


def test_the_device_loader_refuses_labels_of_another_count():
    with pytest.raises(ValueError, match=r"^DeviceImageLoader: \(5,\) labels for 4 images$"):
        wbflow.DeviceImageLoader(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), 2, labels=torch.zeros(5))


def test_drop_labels_replaces_each_samples_label_by_the_null_class_at_the_asked_rate():
    seen = []
    loss_fn = wbflow.drop_labels(lambda model, batch: seen.append(batch) or torch.zeros(()), 0.1, null_label=10)
    labels = torch.arange(40_000) % 10
    torch.manual_seed(0)
    loss_fn(None, (torch.zeros(40_000, 1), labels))
    (data, dropped), = seen
    null = dropped == 10
    assert torch.equal(dropped[~null], labels[~null])  # the others keep their own label
    assert abs(null.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 40_000) ** 0.5  # 4 sigma
    per_batch = null.view(400, 100).sum(dim=1)
    assert per_batch.min() < per_batch.max() and per_batch.max() < 100  # per sample, not a whole batch at once
    loss_fn(None, {"noise": torch.zeros(8, 1), "data": torch.zeros(8, 1), "labels": torch.zeros(8, dtype=torch.long)})
    assert set(seen[1]) == {"noise", "data", "labels"} and seen[1]["labels"].shape == (8,)


def test_drop_labels_at_rate_0_and_1_keeps_every_label_or_drops_every_one():
    seen = []
    labels = torch.arange(50) % 5
    for rate in (0.0, 1.0):
        wbflow.drop_labels(lambda model, batch: seen.append(batch[1]), rate, null_label=5)(None, (labels, labels))
    assert torch.equal(seen[0], labels) and torch.equal(seen[1], torch.full((50,), 5))


def _cost(noise, data):
    return (noise.flatten(1).double() - data.flatten(1).double()).square().sum().item()


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 2), min_size=1, max_size=9), shape=st.sampled_from([(2,), (1, 2, 2)]),
       seed=st.integers(0, 2**16))
def test_ot_pairs_with_labels_is_a_permutation_within_each_class_and_optimal_there(labels, shape, seed):
    generator, labels = torch.Generator().manual_seed(seed), torch.tensor(labels)
    noise, data = torch.randn(len(labels), *shape, generator=generator), torch.randn(len(labels), *shape,
                                                                                       generator=generator)
    paired = wbflow.ot_pairs(noise, data, labels)
    rows = {tuple(row): index for index, row in enumerate(noise.flatten(1).tolist())}
    order = [rows[tuple(row)] for row in paired.flatten(1).tolist()]  # data[j] got noise[order[j]]
    assert sorted(order) == list(range(len(labels)))
    assert all(labels[source] == labels[target] for target, source in enumerate(order))  # within its class
    for label in labels.unique():
        members = (labels == label).nonzero().flatten().tolist()
        best = min(_cost(noise[list(permuted)], data[members]) for permuted in itertools.permutations(members))
        assert _cost(paired[members], data[members]) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_rectified_flow_loss_passes_the_labels_and_pairs_ot_noise_within_each_class():
    seen = {}

    def model(x, t, labels=None):
        seen.update(x=x, t=t, labels=labels)
        return torch.zeros_like(x)

    data, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    torch.manual_seed(5)
    wbflow.rectified_flow_loss(model, (data, labels), coupling="ot")
    torch.manual_seed(5)
    noise = wbflow.ot_pairs(torch.randn(6, 2), data, labels)
    t = torch.rand(6)[:, None]
    assert seen["labels"] is labels
    torch.testing.assert_close(seen["x"], t * data + (1 - t) * noise)


# ----------------------------------------------------------------------------- guidance

def test_guided_velocity_is_the_cfg_formula_in_one_batched_forward():
    model, x, t = LabelledVelocity(), torch.randn(4, 2), torch.full((4,), 0.3)
    labels = torch.tensor([0, 1, 2, 1])
    guided = wbflow.guided_velocity(model, labels, 2.5)(x, t)
    assert model.batch_sizes == [8]  # the conditional and the null rows together
    v_cond, v_uncond = model(x, t, labels), model(x, t, torch.full((4,), 3))
    torch.testing.assert_close(guided, v_uncond + 2.5 * (v_cond - v_uncond))


def test_guided_velocity_at_scale_1_is_exactly_the_conditional_velocity():
    model, x, t = LabelledVelocity(), torch.randn(5, 2), torch.rand(5)
    labels = torch.tensor([2, 0, 1, 1, 0])
    assert torch.equal(wbflow.guided_velocity(model, labels, 1.0)(x, t), model(x, t, labels))
    assert model.batch_sizes == [5, 5]  # no null rows needed


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_flow_matchings_guidance_weight_w_is_our_scale_1_plus_w(w):
    model, x, t, labels = LabelledVelocity(), torch.randn(3, 2), torch.rand(3), torch.tensor([0, 1, 2])
    cond, uncond = model(x, t, labels), model(x, t, None)
    torch.testing.assert_close(wbflow.guided_velocity(model, labels, 1 + w)(x, t), (1 + w) * cond - w * uncond)


def test_guided_velocity_guides_only_for_t_inside_its_interval():
    model, x = LabelledVelocity(), torch.randn(5, 2)
    t, labels = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.95]), torch.tensor([0, 1, 2, 0, 1])
    guided = wbflow.guided_velocity(model, labels, 3.0, interval=(0.2, 0.8))(x, t)
    everywhere = wbflow.guided_velocity(model, labels, 3.0)(x, t)
    conditional = model(x, t, labels)
    inside = torch.tensor([False, True, True, True, False])
    assert torch.equal(guided[inside], everywhere[inside]) and torch.equal(guided[~inside], conditional[~inside])
    assert not torch.allclose(everywhere[~inside], conditional[~inside])


def test_guided_velocity_repeats_shorter_labels_along_the_batch_for_class_balanced_samples():
    model, x, t = LabelledVelocity(), torch.randn(7, 2), torch.rand(7)
    torch.testing.assert_close(wbflow.guided_velocity(model, torch.arange(3), 1.0)(x, t),
                               model(x, t, torch.tensor([0, 1, 2, 0, 1, 2, 0])))


def test_guided_velocity_runs_in_the_samplers_with_a_flow_unet_and_refuses_an_unconditional_one():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=2))
    noise = torch.randn(4, 3, 8, 8)
    samples, used = wbflow.sample_flow(wbflow.guided_velocity(model, torch.arange(2), 2.0), noise, "heun", 4)
    assert samples.shape == noise.shape and used == 4 and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="guided_velocity needs a model built with num_classes"):
        wbflow.guided_velocity(wbflow.FlowUNet(**TINY), torch.arange(2), 2.0)


def test_class_grid_draws_one_row_per_class_from_the_same_noise_and_names_the_classes():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=3))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid, caption, used = wbflow.class_grid(model, noise, ["cat", "dog", "ship"], guidance=2.0, nfe=3)
    assert caption == "rows: cat, dog, ship" and used == 3
    assert grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)  # 3 rows x 2 columns of 8-pixel images, 2-pixel padding
    cells = [[grid[2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column] for column in range(2)]
             for row in range(3)]
    expected = wbflow.euler_sample(wbflow.guided_velocity(model, torch.tensor([1, 1]), 2.0), noise, 3)
    assert np.array_equal(np.stack(cells[1]), wbflow.images_to_uint8(expected).permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(cells[0][0], cells[1][0])  # the label changes the sample of one noise
    again = wbflow.class_grid(model, noise, ["cat", "dog", "ship"], guidance=2.0, nfe=3)[0]
    assert np.array_equal(grid, again)
    with pytest.raises(ValueError, match="class_grid: 2 class names for a model of 3 classes"):
        wbflow.class_grid(model, noise, ["cat", "dog"])


# ----------------------------------------------------------------------------- W&B: the guidance column and sweep

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


# ----------------------------------------------------------------------------- reflow: pairs keep their labels

def test_a_conditional_teachers_reflow_pairs_keep_the_label_each_was_generated_for(tmp_path):
    seen = []

    def sample(noise, labels):  # a "teacher" whose sample shows the label it was asked for
        seen.append(labels.clone())
        return torch.full((len(noise), 2), 0, dtype=torch.uint8) + labels[:, None].to(torch.uint8)

    paths = wbflow.generate_reflow_pairs(sample, tmp_path, 10, shard_size=4, shape=(2,), num_classes=3)
    assert len(paths) == 3 and torch.equal(torch.cat(seen), torch.arange(10) % 3)  # class-balanced, pair i: i % 3
    images_uint8, seed, labels = wbflow.load_reflow_pairs(tmp_path, 10)
    assert torch.equal(labels, torch.arange(10) % 3) and torch.equal(images_uint8[:, 0].long(), labels)
    loader = wbflow.ReflowPairLoader(images_uint8, seed, 5, labels=labels)
    loader.set_epoch(2)
    for batch in loader:
        assert torch.equal(((batch["data"][:, 0] + 1) * 127.5).round().long(), batch["labels"])  # each pair its own
    plan, others = wbflow.reflow_shards(tmp_path, 10, shard_size=4, shape=(2,))  # an unconditional generation
    assert sorted(others.values()) == ["num_classes 3 there, None here"] * 3
    with pytest.raises(ValueError, match="pairs of another generation \\(num_classes 3 there, None here\\)"):
        wbflow.generate_reflow_pairs(lambda noise: noise, tmp_path, 10, shard_size=4, shape=(2,))


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
    argv = ["--smoke", "--eval", "--checkpoint", str(conditional_run.out / "last.pt"), "--guidance", "2.0,1.0",
            "--num-samples", "4", "--nfe", "1", "--use-wandb", "--data-dir", str(conditional_run.root / "data"),
            "--out-dir", str(tmp_path / "eval"), "--set", f"eval.fid_weights={weights_path}",
            "--set", "eval.num_real_images=4", "--set", "eval.inception_batch_size=4"]
    metrics = train_flow.main(argv)
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
    refused(train_flow.main, ["--eval", "--checkpoint", str(unconditional), "--guidance", "1,2",
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
    config = train_flow.load_config(train_flow.parse_args(argv))
    assert train_flow.load_teacher(str(tmp_path / "old" / "checkpoint_epoch_1.pt"), config) is not None

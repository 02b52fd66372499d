"""MeanFlow: FlowUNet's second time input, meanflow_times / meanflow_target / meanflow_loss, one-step and k-step
sampling through the samplers, the loss under DDP, torch.compile and autocast; train_flow.py's meanflow objective:
its record (the one-step grid, the table of jumps), its resume checks, --eval, and a kill and resume against one
uninterrupted run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import train_flow
import wbflow
from conftest import kill_when_marked
from test_training import _HANG, assert_same_history, read_run, scalar_rows, uninterrupted_flow_run
from test_wbflow import _table_data, tiny_flow_checkpoint

HERE = Path(__file__).resolve().parent
# a FlowUNet with every block kind (residual blocks, the middle attention, skips), for 8x8 images
TINY_MEANFLOW_UNET = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0,
                          image_size=8, second_time=True)


def tiny_meanflow_unet(seed=0, std=0.3):
    """A tiny FlowUNet built for (t, r), every weight random (the zero-initialised output layers too), so that
    its average velocity depends on z, t and r."""
    torch.manual_seed(seed)
    model = wbflow.FlowUNet(**TINY_MEANFLOW_UNET)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=std)
    return model


def fixed_times(t, r):
    """A `times` for meanflow_loss that gives these (t, r)."""
    return lambda count, device: (t.to(device), r.to(device))


def jump_times(count, seed=0):
    """(t, r): t in [0, 0.9], r between t and 1, r = t for the first sample."""
    generator = torch.Generator().manual_seed(seed)
    t = 0.9 * torch.rand(count, generator=generator)
    r = t + (1 - t) * torch.rand(count, generator=generator)
    r[0] = t[0]
    return t, r


# ----------------------------------------------------------------------------- the model's second time

def test_a_flow_unet_built_for_a_second_time_takes_r_and_r_none_is_the_instantaneous_velocity():
    model = tiny_meanflow_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, r=t))
        assert (model(x, t, r=torch.ones(3)) - model(x, t)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        torch.testing.assert_close(model(x, 0, r=1), model(x, torch.zeros(3), r=torch.ones(3)))
    plain_keys = set(wbflow.FlowUNet(**{**TINY_MEANFLOW_UNET, "second_time": False}).state_dict())
    assert set(model.state_dict()) - plain_keys == {f"interval_embed.{layer}.{kind}" for layer in (0, 2)
                                                    for kind in ("weight", "bias")}


# ----------------------------------------------------------------------------- (t, r)

def py_meanflow_times(count, P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, ratio=0.75):
    """py-meanflow's sample_two_timesteps_t_r_v1 (models/time_sampler.py), in its own time: noise at 1."""
    t = torch.sigmoid(torch.randn(count) * P_std_t + P_mean_t).clip(0.0, 1.0)
    r = torch.sigmoid(torch.randn(count) * P_std_r + P_mean_r).clip(0.0, 1.0)
    r = torch.where(torch.rand(count) < 1 - ratio, t, r)
    return t, torch.minimum(t, r)


def test_meanflow_times_are_py_meanflows_cifar10_times_mirrored_into_wbflows_time():
    torch.manual_seed(3)
    t_paper, r_paper = py_meanflow_times(100_000)
    torch.manual_seed(3)
    t, r = wbflow.meanflow_times(100_000)
    torch.testing.assert_close(t, 1 - t_paper, rtol=0, atol=1e-6)
    torch.testing.assert_close(r, 1 - r_paper, rtol=0, atol=1e-6)
    share = (r == t).float().mean().item()  # a quarter, and where r's draw fell on the other side of t's
    assert share == pytest.approx((r_paper == t_paper).float().mean().item(), abs=1e-3) and share > 0.25
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.6)).item(), abs=0.01)  # nearer the data


@settings(max_examples=30, deadline=None)
@given(mean_t=st.floats(-5, 5), mean_r=st.floats(-5, 5), std=st.floats(0.1, 3), equal_share=st.floats(0, 1))
def test_meanflow_times_give_jumps_forward_inside_zero_to_one(mean_t, mean_r, std, equal_share):
    t, r = wbflow.meanflow_times(64, mean_t=mean_t, std_t=std, mean_r=mean_r, std_r=std, equal_share=equal_share)
    assert t.shape == r.shape == (64,)
    assert (0 <= t).all() and (t <= r).all() and (r <= 1).all()


# ----------------------------------------------------------------------------- the target and the loss

def test_meanflow_target_equals_the_velocity_minus_t_minus_r_times_a_finite_difference_of_u_along_the_path():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(1)
    z, velocity = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t, r = jump_times(4)
    target = wbflow.meanflow_target(model, z, t, r, velocity)
    model64, eps = model.double(), 1e-3  # du/dt: z moves at the velocity, t at 1, r stays
    z64, velocity64, t64, r64 = z.double(), velocity.double(), t.double(), r.double()
    with torch.no_grad():
        du_dt = (model64(z64 + eps * velocity64, t64 + eps, r=r64)
                 - model64(z64 - eps * velocity64, t64 - eps, r=r64)) / (2 * eps)
    expected = velocity64 - (t64 - r64).view(-1, 1, 1, 1) * du_dt
    assert target.dtype == torch.float32 and not target.requires_grad
    assert (expected - velocity64)[1:].abs().amax(dim=(1, 2, 3)).min() > 1e-2  # the du/dt term matters
    torch.testing.assert_close(target.double(), expected, rtol=0, atol=2e-5)
    assert torch.equal(target[0], velocity[0])  # r = t: the velocity itself


class StraightPathVelocity(nn.Module):
    """The exact average velocity of the straight paths from x0 to x1 = scale * x0 + shift (per element): the
    paths do not cross, and along each the velocity x1 - x0 is constant, so the average over any jump is it,
    written as a function of z on the path and t (wrong_scale: the field of another scale)."""

    def __init__(self, scale, shift, wrong_scale=None):
        super().__init__()
        self.shift, self.field_scale = shift, scale if wrong_scale is None else wrong_scale

    def forward(self, z, t, r=None):
        t = t.view(-1, *([1] * (z.dim() - 1)))
        x0 = (z - t * self.shift) / (1 - t + t * self.field_scale)
        return (self.field_scale - 1) * x0 + self.shift


def test_meanflow_loss_is_zero_for_the_exact_average_velocity_of_straight_paths_and_not_for_another_field():
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(64, 3, 4, 4, generator=generator)
    scale, shift = 0.5 + torch.rand(3, 4, 4, generator=generator), torch.randn(3, 4, 4, generator=generator)
    batch = {"noise": noise, "data": scale * noise + shift}
    torch.manual_seed(0)
    assert wbflow.meanflow_loss(StraightPathVelocity(scale, shift), batch).item() < 1e-8
    assert wbflow.meanflow_loss(StraightPathVelocity(scale, shift, wrong_scale=scale + 0.3), batch).item() > 1e-2


def py_meanflow_loss(u_func, x, e, t, r, norm_p=0.75, norm_eps=1e-3):
    """py-meanflow's MeanFlow.forward_with_loss (models/meanflow.py) in the paper's time (data at 0, noise at 1),
    given its noise e and times t >= r."""
    t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - t) * x + t * e
    v = e - x
    u_pred, dudt = torch.func.jvp(u_func, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v - (t - r) * dudt).detach()
    loss = ((u_pred - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return (loss / (loss.detach() + norm_eps) ** norm_p).mean()


def test_meanflow_loss_in_wbflows_time_equals_py_meanflows_loss_in_the_papers_time():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(4)
    data, noise = torch.randn(6, 3, 8, 8, generator=generator), torch.randn(6, 3, 8, 8, generator=generator)
    t, r = jump_times(6)  # wbflow's: the paper's are 1 - t >= 1 - r

    def paper_u(z, t_paper, r_paper):  # the paper's u(z, r, t): the jump from t down to r, in its time
        return -model(z, 1 - t_paper.view(-1), r=1 - r_paper.view(-1))

    expected = py_meanflow_loss(paper_u, data, noise, 1 - t, 1 - r)
    loss = wbflow.meanflow_loss(model, {"noise": noise, "data": data}, times=fixed_times(t, r))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert loss.item() > 1e-2
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    expected_gradients = torch.autograd.grad(expected, list(model.parameters()))
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


class DropoutOfZ(nn.Module):
    """u(z, t, r) = dropout(z): its target's du/dt is the dropped-out velocity, with the prediction's mask only
    when both draw the same one."""

    def forward(self, z, t, r=None):
        return F.dropout(z, 0.5, self.training)


def test_meanflow_loss_computes_the_target_with_the_predictions_dropout_mask():
    generator = torch.Generator().manual_seed(5)
    data, noise = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    t, r = torch.full((8,), 0.2), torch.full((8,), 0.7)
    torch.manual_seed(6)
    loss = wbflow.meanflow_loss(DropoutOfZ(), {"noise": noise, "data": data}, times=fixed_times(t, r))
    torch.manual_seed(6)
    kept = F.dropout(torch.ones(8, 16), 0.5)  # the mask the prediction drew first: 0 or 2
    z, velocity = 0.2 * data + 0.8 * noise, data - noise
    squared_error = (kept * z - (velocity + 0.5 * kept * velocity)).square().sum(1)
    torch.testing.assert_close(loss, (squared_error / (squared_error + 1e-3) ** 0.75).mean())


def test_meanflow_loss_under_bf16_autocast_predicts_in_bf16_and_takes_the_jvp_in_float32():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(7)
    z, velocity = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t, r = jump_times(4)
    batch, times = {"noise": z, "data": z + velocity}, fixed_times(t, r)
    float32_target = wbflow.meanflow_target(model, z, t, r, velocity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(wbflow.meanflow_target(model, z, t, r, velocity), float32_target)
        assert model(z, t, r=r).dtype == torch.bfloat16
        loss = wbflow.meanflow_loss(model, batch, times=times)
    float32_loss = wbflow.meanflow_loss(model, batch, times=times)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(float32_loss.item(), rel=0.05) and loss.item() != float32_loss.item()


def test_a_meanflow_step_with_a_non_finite_loss_is_skipped_and_the_weights_stay():
    model = tiny_meanflow_unet()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    data = torch.randn(4, 3, 8, 8)
    data[1, 0, 0, 0] = float("inf")
    result = wbflow.train_step(model, data, torch.optim.Adam(model.parameters(), lr=1e-2), wbflow.meanflow_loss)
    assert not result["finite"]
    assert all(torch.equal(parameter, old) for parameter, old in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- sampling

class RecordedCalls(nn.Module):
    """An average velocity that records each call's (t, r): u = (r - t) + x."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, r=None):
        self.calls.append((t.tolist(), r.tolist()))
        return (r - t)[:, None] + x


def test_one_step_is_noise_plus_the_jump_from_0_to_1_and_k_steps_are_euler_on_jumps_of_1_over_k():
    model, noise = tiny_meanflow_unet().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = noise + model(noise, 0, r=1)
    torch.testing.assert_close(wbflow.euler_sample(wbflow.meanflow_velocity(model, 1), noise, 1), expected)
    recorded, noise = RecordedCalls(), torch.zeros(2, 1)
    samples = wbflow.euler_sample(wbflow.meanflow_velocity(recorded, 4), noise, 4)
    starts = [0.0, 0.25, 0.5, 0.75]
    assert [(t, r) for t, r in recorded.calls] == [([start] * 2, [start + 0.25] * 2) for start in starts]
    expected = torch.zeros(2, 1)
    for _ in starts:  # x += (1/4) * u, with u = 1/4 + x
        expected = expected + 0.25 * (0.25 + expected)
    torch.testing.assert_close(samples, expected)


def test_the_meanflow_solver_of_sample_flow_and_compare_solvers_makes_nfe_jumps_of_the_model():
    model, noise = tiny_meanflow_unet().eval(), torch.randn(2, 3, 8, 8)
    samples, used = wbflow.sample_flow(model, noise, "meanflow", 2)
    assert used == 2 and torch.equal(samples, wbflow.euler_sample(wbflow.meanflow_velocity(model, 2), noise, 2))
    rows = wbflow.compare_solvers(model, noise, solvers=("meanflow",), nfes=(1, 2, 4))
    assert [(row["solver"], row["nfe"]) for row in rows] == [("meanflow", 1), ("meanflow", 2), ("meanflow", 4)]
    with torch.no_grad():
        torch.testing.assert_close(rows[0]["images"], noise + model(noise, 0, r=1))
    assert torch.equal(rows[1]["images"], samples)


# ----------------------------------------------------------------------------- DDP and torch.compile

_DDP_RANK = """
import sys
sys.path.insert(0, {here!r})
import torch
import wbflow
from test_meanflow import ddp_batch, tiny_meanflow_unet, fixed_times

rank, world_size, device = wbflow.setup_distributed()
(noise, data), (t, r) = ddp_batch()
share = slice(rank * len(t) // world_size, (rank + 1) * len(t) // world_size)
loss_fn = lambda model, batch: wbflow.meanflow_loss(model, batch, times=fixed_times(t[share], r[share]))
gradients = []
for compiled in (False, True):  # DDP, and torch.compile outside DDP as train_flow compiles
    model = torch.nn.parallel.DistributedDataParallel(tiny_meanflow_unet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_model = torch.compile(model, backend="aot_eager") if compiled else model
    wbflow.train_step(train_model, {{"noise": noise[share], "data": data[share]}}, optimizer, loss_fn)
    gradients.append([parameter.grad for parameter in model.module.parameters()])
if rank == 0:
    torch.save(gradients, {gradients!r})
"""


def ddp_batch(count=8):
    """((noise, data), (t, r)) of the global batch the DDP test splits over two ranks."""
    generator = torch.Generator().manual_seed(8)
    return (torch.randn(count, 3, 8, 8, generator=generator), torch.randn(count, 3, 8, 8, generator=generator)), \
        jump_times(count, seed=9)


def test_meanflow_gradients_under_ddp_and_compile_on_two_gloo_processes_equal_one_process_on_the_global_batch(
        tmp_path):
    script, gradients_file = tmp_path / "rank.py", tmp_path / "gradients.pt"
    script.write_text(_DDP_RANK.format(here=str(HERE), gradients=str(gradients_file)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = tiny_meanflow_unet()
    (noise, data), (t, r) = ddp_batch()
    loss = wbflow.meanflow_loss(model, {"noise": noise, "data": data}, times=fixed_times(t, r))
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for ddp_gradients in torch.load(gradients_file, weights_only=True):  # DDP, then compiled DDP
        assert len(ddp_gradients) == len(expected)
        for gradient, expected_gradient in zip(ddp_gradients, expected):
            torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_a_compiled_flow_unet_trains_on_meanflow_loss_with_inductor():
    import torch._inductor
    graphs = []

    def inductor(graph_module, example_inputs):  # inductor, counting the graphs it compiles
        graphs.append(graph_module)
        return torch._inductor.compile(graph_module, example_inputs)

    torch._dynamo.reset()
    try:
        model = tiny_meanflow_unet(std=0.05)
        compiled = torch.compile(model, backend=inductor)
        eager = tiny_meanflow_unet(std=0.05)
        data = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10))
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, eager)]
        for step in range(3):
            results = []
            for train_model, optimizer in zip((compiled, eager), optimizers):
                torch.manual_seed(step)
                results.append(wbflow.train_step(train_model, data, optimizer, wbflow.meanflow_loss))
            assert all(result["finite"] for result in results)
            assert results[0]["loss"].item() == pytest.approx(results[1]["loss"].item(), rel=1e-4)
    finally:
        torch._dynamo.reset()
    assert graphs
    for parameter, eager_parameter in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(parameter, eager_parameter, rtol=1e-3, atol=1e-5)


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
    flags = ["--smoke", "--eval", "--metric", "is", "--num-samples", "2", "--out-dir", str(tmp_path / "out")]
    metrics = train_flow.main(flags + ["--checkpoint", str(meanflow_run.out / "last.pt"), "--nfe", "1"])
    assert "with meanflow, NFE 1" in capsys.readouterr().out and metrics["eval/inception_score_mean"] >= 1
    rectified_flow = tiny_flow_checkpoint(tmp_path / "rectified_flow.pt")
    with pytest.raises(SystemExit, match=r"^train_flow.py: --solver meanflow samples a MeanFlow checkpoint; .* is a "
                                         r"rectified flow$"):
        train_flow.main(flags + ["--checkpoint", str(rectified_flow), "--solver", "meanflow"])


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

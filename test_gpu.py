"""The GPU code paths: those torch can run on a CPU are tested here on every run (torch.compile with
inductor, bf16 autocast, channels_last, compile under DDP with rank 0 logging and FID over both ranks,
the --gpu benchmark's dry run); the CUDA ones (names ending in `on_cuda`) skip only where CUDA is absent.

tools/gpu_check.sh runs the CUDA tests on the device machine: python -m pytest test_gpu.py -k on_cuda
"""
import copy
import functools
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import bench_wbflow
import flow_config
import train_fire
import train_flow
import wbflow
from conftest import (fire_args, jump_times, pattern_image, run_logs, tiny_meanflow_unet, write_cifar_batches,
                      write_pattern_folders)

HERE = Path(__file__).resolve().parent
# The smallest FlowUNet that still has every block kind a compile must handle (residual blocks, the
# middle attention, skips): inductor's C++ kernels for it build in about a minute on 2 cores.
TINY_UNET = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0)
TINY_FLOW = ["--smoke", "--epochs", "1", "--set", "data.max_images=24", "--set", "training.batch_size=8",
             "--set", "model.base_channels=8", "--set", "model.channel_mults=[1]", "--set", "model.head_channels=8",
             "--set", "training.learning_rate=1.0e-3", "--set", "training.warmup_steps=0",
             "--set", "training.log_interval=1", "--set", "sampling.num_images=4", "--set", "sampling.nfe=2",
             "--set", "sampling.table_nfes=[1]"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def counting_compile(graphs):
    """torch.compile as the drivers call it, with inductor behind a backend that records each graph it
    compiles: a run that never compiled leaves `graphs` empty."""
    real_compile = torch.compile

    def compile_and_count(model, **options):
        def inductor(graph_module, example_inputs):
            graphs.append(graph_module)
            return torch._inductor.compile(graph_module, example_inputs)
        return real_compile(model, backend=inductor, **options)
    return compile_and_count


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches hold compiled frames per code object: start and end each compile test empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def flow_loss_at_fixed_noise(model, images, dtype=None):
    """The rectified-flow loss of `model` on `images` with the same t and noise every call."""
    with torch.random.fork_rng(devices=[images.device] if images.is_cuda else []):
        torch.manual_seed(1234)
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype or torch.float32,
                                             enabled=dtype not in (None, torch.float32)):
            return wbflow.rectified_flow_loss(model, images).item()


def record_conv_outputs(model):
    """(dtype, channels_last) of every Conv2d output in the model's forward passes, appended as they run."""
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda module, inputs, output: seen.append(
                (output.dtype, output.is_contiguous(memory_format=torch.channels_last))))
    return seen


def pattern_tensors(per_class, size=32, seed=0):
    """(images float (N, 3, size, size) in [0, 1], labels) of the five pattern classes, in memory."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(5):
        for _ in range(per_class):
            pixels = np.asarray(pattern_image(label, rng, size), dtype=np.float32) / 255
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            labels.append(label)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return torch.stack(images)[order], torch.tensor(labels)[order]


def small_resnet(num_classes=5):
    """torchvision's ResNet (BasicBlock, BatchNorm, the stem, the pooled head) one block per stage."""
    torch.manual_seed(0)
    return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                            num_classes=num_classes)


def assert_flow_unet_trains(device, dtype, *, amp=None, scaler=None):
    """A tiny channels_last FlowUNet (train_flow's layout on CUDA) lowers its fixed-noise loss by over 15% in 5
    epochs of train_epoch on `device`; its convolutions ran in `dtype` on channels_last activations (autocast
    as autocast_dtype chose it for `amp`), and its weights stayed channels_last through the optimiser's steps."""
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET).to(device).to(memory_format=torch.channels_last)
    held_out = next(iter(wbflow.DeviceImageLoader(wbflow.synthetic_images(64, size=16), 64, device=device,
                                                  shuffle=False, flip=False)))
    before = flow_loss_at_fixed_noise(model, held_out, dtype)
    conv_outputs = record_conv_outputs(model)
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(64, size=16, seed=1), 16, device=device,
                                      channels_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    for epoch in range(5):
        loader.set_epoch(epoch)
        wbflow.train_epoch(model, loader, optimizer, wbflow.rectified_flow_loss, grad_clip=1.0,
                           amp_dtype=wbflow.autocast_dtype(device, amp), scaler=scaler, epoch=epoch, progress=False)
    assert set(conv_outputs) == {(dtype, True)}
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert flow_loss_at_fixed_noise(model, held_out, dtype) < 0.85 * before  # 0.68 on the CPU in bf16 and float32


def assert_resnet_trains(device, dtype, *, amp=None, scaler=None):
    """A small ResNet learns the pattern classes (its loss falls by over 30% in 4 epochs) from CPU batches,
    pinned on CUDA as train_fire's loaders pin them; its convolutions ran in `dtype`."""
    resnet = small_resnet().to(device)
    conv_outputs = record_conv_outputs(resnet)
    images, labels = pattern_tensors(per_class=16)
    pin = (lambda tensor: tensor.pin_memory()) if device.type == "cuda" else (lambda tensor: tensor)
    batches = [(pin(batch), pin(batch_labels)) for batch, batch_labels in zip(images.split(16), labels.split(16))]
    optimizer = wbflow.build_optimizer("adam", resnet.parameters(), 1e-3, fused=True)
    loss_fn = wbflow.classification_loss(nn.CrossEntropyLoss())
    losses = [wbflow.train_epoch(resnet, batches, optimizer, loss_fn, device=device, grad_clip=1.0,
                                 amp_dtype=wbflow.autocast_dtype(device, amp), scaler=scaler, epoch=epoch,
                                 progress=False)["loss"] for epoch in range(4)]
    assert {output_dtype for output_dtype, _ in conv_outputs} == {dtype}
    assert losses[-1] < 0.7 * losses[0], losses


# ============================================================================= on the CPU: every path torch runs there

def test_compiled_smoke_run_trains_with_the_eager_runs_loss(offline_wandb, tmp_path, monkeypatch, fresh_dynamo):
    train_flow.main(TINY_FLOW + ["--out-dir", str(tmp_path / "eager")])
    graphs = []
    monkeypatch.setattr(torch, "compile", counting_compile(graphs))
    train_flow.main(TINY_FLOW + ["--out-dir", str(tmp_path / "compiled"), "--set", "training.compile=true"])
    eager, compiled = run_logs(offline_wandb)
    assert graphs, "training.compile=true trained without compiling"
    assert compiled.exit_code == 0 and compiled.config["training"]["compile"] is True
    assert [row["_step"] for row in compiled.rows_with("train/loss")] == [1, 2, 3]
    assert compiled.values("train/loss") == pytest.approx(eager.values("train/loss"), rel=1e-4)
    # the loss is mostly |x1 - x0|^2 while the zero-initialised output is small: the weights after three Adam
    # steps say whether the compiled forward and backward computed the eager gradients
    weights = {run: wbflow.load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("eager", "compiled")}
    for name, tensor in weights["eager"].items():  # 2.3e-7 apart at most when measured
        torch.testing.assert_close(weights["compiled"][name], tensor, rtol=1e-4, atol=1e-5)


def test_both_drivers_train_and_validate_in_the_dtype_autocast_dtype_picks(offline_wandb, tmp_path, monkeypatch):
    """train_epoch and predict_logits take autocast_dtype's answer for the driver's device (on CUDA bf16 or fp16; here
    train_flow is told bf16 as CUDA would be, and train_fire's --amp true asks for it on the CPU)."""
    seen = []

    def spy(function):
        def call(*args, amp_dtype=None, **kwargs):
            seen.append((function.__name__, amp_dtype))
            return function(*args, amp_dtype=amp_dtype, **kwargs)
        return call

    for name in ("train_epoch", "predict_logits"):
        monkeypatch.setattr(wbflow, name, spy(getattr(wbflow, name)))
    asked = wbflow.autocast_dtype
    monkeypatch.setattr(wbflow, "autocast_dtype", lambda device, amp=None: asked(device, True if amp is None else amp))
    train_flow.main(TINY_FLOW + ["--out-dir", str(tmp_path / "flow")])
    assert seen == [("train_epoch", torch.bfloat16)]
    monkeypatch.setattr(wbflow, "autocast_dtype", asked)
    seen.clear()
    data = write_pattern_folders(tmp_path / "data", per_class=4)
    train_fire.main(fire_args(data, tmp_path / "fire", "--epochs", "1", "--amp", "true", "--no-wandb"))
    assert seen == [("train_epoch", torch.bfloat16), ("predict_logits", torch.bfloat16),  # validation
                    ("predict_logits", torch.bfloat16)]  # the best model's report
    seen.clear()
    train_fire.main(fire_args(data, tmp_path / "fire-fp32", "--epochs", "1", "--no-wandb"))  # CPU: off
    assert seen == [("train_epoch", None), ("predict_logits", None), ("predict_logits", None)]


def test_bf16_autocast_on_the_cpu_trains_flow_unet_and_resnet_with_decreasing_loss():
    assert_flow_unet_trains(torch.device("cpu"), torch.bfloat16, amp=True)
    assert_resnet_trains(torch.device("cpu"), torch.bfloat16, amp=True)


def test_channels_last_flow_unet_trains():
    assert_flow_unet_trains(torch.device("cpu"), torch.float32, amp=False)


_COMPILED_RANK = """
import os, sys
sys.path.insert(0, {here!r})
import torch
import train_flow
from test_gpu import counting_compile
graphs = []
torch.compile = counting_compile(graphs)
try:
    train_flow.main({argv!r})
finally:
    with open({marker!r} + os.environ["RANK"], "w") as file:
        file.write(str(len(graphs)))
"""


def test_compiled_model_under_ddp_trains_on_two_gloo_processes_with_rank_0_logging_and_saving(tmp_path, weights_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "WBFLOW_FID_WEIGHTS": weights_path}
    # global batch 16: each rank's batch of 8 is the in-process compile test's, so inductor reuses its kernels;
    # FID of 3 samples, 2 on rank 0 and 1 on rank 1, each rank checking for a stop at the same 2 batches
    argv = TINY_FLOW + ["--out-dir", str(tmp_path / "out"), "--set", "training.compile=true",
                        "--set", "training.batch_size=16", "--set", "data.max_images=48", "--set", "eval.fid_interval=1",
                        "--set", "eval.fid_num_samples=3", "--set", "eval.sample_batch_size=1"]
    script = tmp_path / "compiled_rank.py"
    script.write_text(_COMPILED_RANK.format(here=str(HERE), argv=argv, marker=str(tmp_path / "graphs_rank")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int((tmp_path / f"graphs_rank{rank}").read_text()) > 0 for rank in (0, 1)] == [True, True]
    assert result.stdout.count("epoch 1: loss") == 1  # printed by rank 0 only
    [log] = run_logs(tmp_path)
    assert log.config["world_size"] == 2 and log.config["training"]["compile"] is True
    assert [row["_step"] for row in log.rows_with("train/loss")] == [1, 2, 3]
    assert all(math.isfinite(loss) for loss in log.values("train/loss"))
    [fid_row] = log.rows_with("eval/fid_score")  # over both ranks' samples, logged once
    assert fid_row["_step"] == 3 and math.isfinite(fid_row["eval/fid_score"])
    assert [a["name"] for a in log.artifacts if a["type"] == "model"] == [f"model-{log.run_id}"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pt")) == ["checkpoint_epoch_1.pt", "last.pt"]


def test_gpu_benchmark_dry_run_prints_every_row_of_the_table(weights_path, capsys, fresh_dynamo):
    rows = bench_wbflow.bench_gpu(dry_run=True, weights_path=weights_path)
    printed = capsys.readouterr().out
    expected = [("flow training", "torchcfm train_cifar10.py step"), ("flow training", "float32 eager"),
                ("flow training", "bf16 + channels_last eager"),
                ("flow training", "bf16 + channels_last + torch.compile (aot_eager)"),
                ("flow training", "MeanFlow (meanflow_loss), bf16 + channels_last eager"),
                ("profile", "train_flow step, bf16 + channels_last eager"),
                ("profile", "train_flow step, bf16 + channels_last compiled (aot_eager)"),
                ("FID features", "wbflow.inception_features"),
                ("FID features", "torch-fidelity 0.4.0 inception-v3-compat"),
                *[("train_fire resnet18", f"{size} px: {what}") for size in (32, 40)
                  for what in ("training", "loader alone", "loader alone", "GPU alone")],
                ("train_fire resnet18", "32 px: training with the competition recipe"),
                ("sampling", "4 Euler-2 samples, bf16"), ("sampling", "4 Euler-2 samples, float32"),
                ("sampling", "4 Euler-2 samples, guidance 2, bf16")]
    assert len(rows) == len(expected)
    for row, (section, measurement) in zip(rows, expected):
        assert row["section"] == section and row["measurement"].startswith(measurement), row
    for row in rows:
        assert f"| {row['section']} | {row['measurement']} | {row['result']} | n/a |" in printed
    assert "CPU (dry run: toy sizes)" in printed and "MFU against no known peak" in printed
    assert "the busiest operators" in printed  # the profiles' tables
    torchcfm_row, other_rows = rows[0], rows[1:]
    if importlib.util.find_spec("torchcfm"):
        assert re.fullmatch(r"[\d.,]+ images/s \([\d.]+ ms/step\)", torchcfm_row["result"])
        assert all(re.match(r"[\d.]+x torchcfm", row["reference"]) for row in rows[1:5])
    else:
        assert torchcfm_row["result"].startswith("not run: torchcfm is not installed")
    assert re.search(r"(^|, )[\d.]+x rectified flow's$", rows[4]["reference"])  # MeanFlow beside the same UNet's
    meanflow_flops, flow_flops = (float(re.match(r"([\d.]+) GFLOP/image", row["settings"]).group(1))
                                  for row in (rows[4], rows[2]))
    assert meanflow_flops > flow_flops  # its JVP counted
    assert all(float(re.match(r"[\d.,]+", row["result"]).group().replace(",", "")) > 0 for row in other_rows)
    shares = re.findall(r"(\d+)%", rows[5]["settings"])
    assert len(shares) == 3 and abs(sum(map(int, shares)) - 100) <= 2
    difference = float(re.search(r"max feature difference ([\d.e+-]+)", rows[7]["settings"]).group(1))
    assert difference < 1e-4
    recipe_row = rows[17]
    assert re.fullmatch(r"[\d.]+x plain training", recipe_row["reference"])
    assert recipe_row["settings"] == "augment trivialaugment, random_erase 0.25, mixup 0.2, cutmix 1.0, ema_decay 0.999"


# ============================================================================= on CUDA (skipped only where it is absent)

@cuda
def test_bf16_steps_train_flow_unet_and_resnet_on_cuda():
    device = torch.device("cuda")
    assert wbflow.autocast_dtype(device) == torch.bfloat16 and not wbflow.make_scaler(device).is_enabled()
    assert_flow_unet_trains(device, torch.bfloat16)
    assert_resnet_trains(device, torch.bfloat16)


@cuda
def test_fp16_steps_with_a_grad_scaler_train_flow_unet_and_resnet_on_cuda(monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100 or T4
    assert wbflow.autocast_dtype(device) == torch.float16 and wbflow.make_scaler(device).is_enabled()
    for check in (assert_flow_unet_trains, assert_resnet_trains):
        scaler = wbflow.make_scaler(device)
        check(device, torch.float16, scaler=scaler)
        assert 0 < scaler.get_scale() < math.inf


@cuda
def test_an_inf_in_fp16_lowers_the_loss_scale_and_skips_the_step_on_cuda(monkeypatch):
    device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, growth_interval=1_000_000)  # no growth in the test
    snapshots = []

    def loss_with_an_inf_at_step_3(model, batch):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        loss = wbflow.rectified_flow_loss(model, batch)
        return loss * math.inf if len(snapshots) == 3 else loss

    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(40, size=16), 8, device=device, channels_last=True)
    stats = wbflow.train_epoch(model, loader, optimizer, loss_with_an_inf_at_step_3, grad_clip=1.0, scaler=scaler,
                               amp_dtype=wbflow.autocast_dtype(device), progress=False)
    assert stats["skipped"] == 1 and stats["steps"] == 5
    assert scaler.get_scale() == 512.0  # halved once, for the one inf
    assert all(torch.equal(before, after) for before, after in zip(snapshots[2], snapshots[3]))
    assert {int(optimizer.state[p]["step"]) for p in model.parameters()} == {4}


def strict_between_log_points(batches, log_every):
    """Yield `batches` with CUDA's sync debug mode at "error" for every step that does not end at a log point,
    so any host sync there raises; the steps that end at a log point may read the device."""
    try:
        for index, batch in enumerate(batches, start=1):
            torch.cuda.set_sync_debug_mode("error" if index % log_every else "default")
            yield batch
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_train_epoch_makes_no_host_sync_between_log_points_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET).to(device).to(memory_format=torch.channels_last)
    ema_model = wbflow.make_ema(model, decay=0.999)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, total_iters=100)
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(96, size=16), 8, device=device, channels_last=True)
    resnet = small_resnet().to(device)
    resnet_optimizer = wbflow.build_optimizer("adamw", resnet.parameters(), 1e-3, fused=True)
    resnet_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(resnet_optimizer, T_max=100)
    images, labels = pattern_tensors(per_class=20)
    batches = [(batch.pin_memory(), batch_labels.pin_memory()) for batch, batch_labels in
               zip(images[:96].split(8), labels[:96].split(8))]  # 12 steps an epoch, as the flow case
    cases = [(model, loader, optimizer, wbflow.rectified_flow_loss, scheduler, ema_model),
             (resnet, batches, resnet_optimizer, wbflow.classification_loss(nn.CrossEntropyLoss()), resnet_scheduler,
              None)]
    for train_model, train_batches, train_optimizer, loss_fn, train_scheduler, ema in cases:
        windows = []

        def run(epoch, batches):
            return wbflow.train_epoch(train_model, batches, train_optimizer, loss_fn, device=device,
                                      scheduler=train_scheduler, ema_model=ema, grad_clip=1.0, step=12 * epoch,
                                      amp_dtype=wbflow.autocast_dtype(device),
                                      epoch=epoch, log_every=4, on_log=lambda step, w: windows.append(step),
                                      progress=False)
        run(0, train_batches)  # warm-up: cuDNN, cuBLAS and the optimiser's state start here
        stats = run(1, strict_between_log_points(train_batches, log_every=4))
        assert stats["steps"] == 12 and stats["skipped"] == 0
        assert windows[-3:] == [16, 20, 24]


@cuda
def test_channels_last_bf16_matches_float32_contiguous_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = wbflow.FlowUNet(dropout=0.0).to(device)  # the recipe's 35.7M UNet
    for module in model.modules():  # its zero-initialised output layers would make every output 0
        if isinstance(module, nn.Conv2d) and not module.weight.any():
            module.reset_parameters()
    images = wbflow.synthetic_images(8).to(device).float() / 127.5 - 1
    t = torch.rand(8, device=device)

    def output_and_gradient(model, images, dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            output = model(images, t).float()
        output.square().mean().backward()
        return output, torch.cat([p.grad.flatten() for p in model.parameters()])

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            expected_output, expected_gradient = output_and_gradient(model, images, None)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    model = model.to(memory_format=torch.channels_last)
    output, gradient = output_and_gradient(model, images.contiguous(memory_format=torch.channels_last),
                                           torch.bfloat16)
    # bf16 keeps 8 significant bits; through this depth the CPU's bf16 autocast lands at 1.9e-2 and 1.7e-2
    assert (output - expected_output).norm() / expected_output.norm() < 5e-2
    assert (gradient - expected_gradient).norm() / expected_gradient.norm() < 5e-2


@cuda
def test_sample_images_starts_from_the_cpus_seeded_noise_and_runs_a_velocity_closure_in_bf16_on_cuda():
    seen = []

    def still(x, t):  # v = 0: the samples are the noise
        seen.append((x.device.type, t.device.type, torch.is_autocast_enabled("cuda")
                     and torch.get_autocast_dtype("cuda")))
        return torch.zeros_like(x)

    images_uint8, nfe = wbflow.sample_images(still, 3, device="cuda", nfe=2, amp_dtype=torch.bfloat16, seed=4)
    expected = wbflow.images_to_uint8(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(images_uint8, expected) and nfe == 2  # uint8 on the CPU, the same noise as a CPU run's
    assert set(seen) == {("cuda", "cuda", torch.bfloat16)}


@cuda
def test_a_conditional_flow_unet_trains_with_label_dropout_and_class_wise_ot_in_bf16_on_cuda():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET, num_classes=5).to(device).to(memory_format=torch.channels_last)
    conv_outputs, labels = record_conv_outputs(model), torch.arange(64) % 5
    held_out = next(iter(wbflow.DeviceImageLoader(wbflow.synthetic_images(64, size=16), 64, device=device,
                                                  shuffle=False, flip=False, labels=labels)))

    def held_out_loss():  # the same t and noise every call, in bf16
        with torch.random.fork_rng(devices=[device]), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            torch.manual_seed(1234)
            return wbflow.rectified_flow_loss(model, held_out).item()

    before, embedding = held_out_loss(), model.label_embed.weight.detach().clone()
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(64, size=16, seed=1), 16, device=device,
                                      channels_last=True, labels=labels)
    loss_fn = wbflow.drop_labels(functools.partial(wbflow.rectified_flow_loss, coupling="ot"), 0.1, null_label=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    for epoch in range(5):
        loader.set_epoch(epoch)
        stats = wbflow.train_epoch(model, loader, optimizer, loss_fn, grad_clip=1.0, epoch=epoch, progress=False,
                                   amp_dtype=wbflow.autocast_dtype(device))
        assert stats["skipped"] == 0
    assert set(conv_outputs) == {(torch.bfloat16, True)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (model.label_embed.weight - embedding).abs().amax(dim=1).gt(0).all()  # every class and the null row
    assert held_out_loss() < 0.85 * before


@cuda
def test_guided_sampling_runs_one_bf16_forward_of_both_halves_a_step_and_matches_the_cpus_float32_on_cuda():
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET, num_classes=3)
    for parameter in model.parameters():  # non-zero output layers: a field that depends on the label
        nn.init.normal_(parameter, std=0.05)
    on_cuda = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last).eval()
    seen = []
    on_cuda.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].shape[0], output.dtype)))
    guided = wbflow.guided_velocity(on_cuda, torch.arange(3), 2.0, interval=(0.0, 0.7))
    images_uint8, nfe = wbflow.sample_images(guided, 12, device="cuda", nfe=4, amp_dtype=torch.bfloat16,
                                             batch_size=6, shape=(3, 16, 16), seed=2)
    assert images_uint8.device.type == "cpu" and images_uint8.shape == (12, 3, 16, 16) and nfe == 4
    assert seen == [(12, torch.bfloat16)] * 8  # 2 batches x 4 steps, each one forward of the cond and null rows
    expected, _ = wbflow.sample_images(wbflow.guided_velocity(model.eval(), torch.arange(3), 2.0, interval=(0.0, 0.7)),
                                       12, nfe=4, batch_size=6, shape=(3, 16, 16), seed=2)
    difference = (images_uint8.float() - expected.float()).abs()
    assert difference.mean() < 2.0 and difference.max() <= 32  # bf16 against float32, in 0..255 levels


@cuda
def test_a_bf16_meanflow_step_predicts_in_bf16_and_takes_its_jvp_in_float32_on_cuda():
    device = torch.device("cuda")
    model = tiny_meanflow_unet().to(device).to(memory_format=torch.channels_last)
    conv_outputs = record_conv_outputs(model)
    images = wbflow.synthetic_images(8, size=8).to(device).float() / 127.5 - 1
    images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    results = [wbflow.train_step(model, images, optimizer, wbflow.meanflow_loss, amp_dtype=torch.bfloat16,
                                 grad_clip=1.0) for _ in range(3)]
    assert all(bool(result["finite"]) for result in results)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert set(conv_outputs) == {(torch.bfloat16, True), (torch.float32, True)}  # the prediction, the JVP
    z, velocity = torch.randn(8, 3, 8, 8, device=device), torch.randn(8, 3, 8, 8, device=device)
    t, r = (time.to(device) for time in jump_times(8))
    float32_target = wbflow.meanflow_target(model, z, t, r, velocity)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(wbflow.meanflow_target(model, z, t, r, velocity), float32_target,
                                   rtol=0, atol=1e-5)


@cuda
def test_one_step_meanflow_samples_on_cuda_are_the_noise_plus_the_jump_from_0_to_1():
    model = tiny_meanflow_unet().eval()
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = wbflow.images_to_uint8(noise + model(noise, 0, r=1))  # on the CPU, float32
    model = model.cuda()
    for amp_dtype, levels in ((None, 1), (torch.bfloat16, 4)):  # 2 levels apart on the CPU in bf16
        images_uint8, nfe = wbflow.sample_images(wbflow.meanflow_velocity(model, 1), 4, device="cuda", nfe=1,
                                                 shape=(3, 8, 8), seed=3, amp_dtype=amp_dtype)
        assert nfe == 1 and images_uint8.device.type == "cpu"
        assert (images_uint8.int() - expected.int()).abs().max() <= levels


@cuda
def test_inception_features_on_cuda_match_the_cpus_within_1e_4(weights_path):
    images_uint8 = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cpu_features, cpu_logits = wbflow.inception_features(images_uint8, wbflow.load_fid_inception(weights_path))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # inception_features turns them off
    try:
        features, logits = wbflow.inception_features(images_uint8.cuda(), wbflow.load_fid_inception(weights_path, "cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert features.device.type == "cpu" and (features - cpu_features).abs().max() < 1e-4
    assert (logits - cpu_logits).abs().max() < 1e-4


def flow_flags_on_cuda(data_dir, out_dir):
    """--smoke's settings without --smoke, which keeps a run on the CPU: the same small run, on the GPU."""
    smoke_settings = [flag for override in flow_config.smoke_overrides("train_flow.py") for flag in ("--set", override)]
    return smoke_settings + ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--epochs", "2"]


def run_train_flow_on_cuda(tmp_path, *extra):
    """train_flow.main with the smoke settings on CUDA (256 images, batch 32, 2 epochs: 16 steps); its result."""
    write_cifar_batches(tmp_path / "data", per_batch=64)
    return train_flow.main(flow_flags_on_cuda(tmp_path / "data", tmp_path / "out") + list(extra))


def assert_flow_run_on_cuda_trained(wandb_dir, out_dir, result, printed):
    assert "parameters, 1 x cuda" in printed and result["step"] == 16
    [log] = run_logs(wandb_dir)
    assert log.exit_code == 0 and [row["_step"] for row in log.rows_with("train/loss")] == list(range(2, 17, 2))
    assert all(math.isfinite(loss) for loss in log.values("train/loss")) and log.rows_with("eval/generated_samples")
    state = wbflow.load_checkpoint(out_dir / "last.pt")
    assert state["global_step"] == 16
    weight = state["model"]["input_conv.weight"]  # saved with its strides: the model trained channels_last
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


@cuda
def test_train_flow_smoke_settings_run_end_to_end_on_cuda(offline_wandb, tmp_path, capsys):
    result = run_train_flow_on_cuda(tmp_path)
    assert_flow_run_on_cuda_trained(offline_wandb, tmp_path / "out", result, capsys.readouterr().out)


@cuda
def test_train_fire_runs_end_to_end_on_cuda_with_bf16_and_loader_workers(offline_wandb, tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=20)
    best_acc = train_fire.main(fire_args(data, tmp_path / "out", "--epochs", "3", "--num-workers", "2"))
    [log] = run_logs(offline_wandb)
    assert log.exit_code == 0 and log.config["device"] == "cuda" and log.config["amp"] == "bfloat16"
    epoch_losses = log.values("epoch/train_loss")
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0] and best_acc > 20.0
    assert (tmp_path / "out" / "best_model.pth").is_file()


@cuda
def test_train_fire_recipe_augmentation_mixup_and_ema_step_on_cuda(tmp_path):
    # TrivialAugment and random erasing in the loader's workers, MixUp / CutMix batches, a warm-up, bf16 autocast
    # and the EMA's update on the GPU (its tensors stay there), validated and saved from the EMA
    data = write_pattern_folders(tmp_path / "data", per_class=12)
    train_fire.main(fire_args(data, tmp_path / "out", "--epochs", "2", "--num-workers", "2", "--no-wandb",
                              "--augment", "trivialaugment", "--random-erase", "0.25", "--mixup", "0.2",
                              "--cutmix", "1.0", "--ema-decay", "0.9", "--warmup-epochs", "1"))
    last = wbflow.load_checkpoint(tmp_path / "out" / "last.pth", map_location=None)  # where they were saved from
    assert (last["config"]["device"], last["config"]["amp"]) == ("cuda", "bfloat16")
    assert all(tensor.is_cuda for tensor in last["ema"].values())
    assert int(last["ema"]["n_averaged"]) == last["step"] + 1  # the copy at the start, then one update a step
    best = wbflow.load_checkpoint(tmp_path / "out" / "best_model.pth")
    assert math.isfinite(best["val_loss"]) and 0 <= best["val_score"] <= 6.5 and best["epoch"] in (0, 1)
    if best["epoch"] == 1:  # the last epoch's best model is the EMA that last.pth holds
        ema_weights = {name[len("module."):]: tensor for name, tensor in last["ema"].items() if name != "n_averaged"}
        assert all(torch.equal(best["model"][name], tensor.cpu()) for name, tensor in ema_weights.items())


@cuda
def test_torchrun_one_nccl_process_trains_flow_on_cuda(tmp_path):
    write_cifar_batches(tmp_path / "data", per_batch=64)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(HERE / "train_flow.py"), *flow_flags_on_cuda(tmp_path / "data", tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 x cuda:0" in result.stdout  # joined the process group (nccl) on its local GPU
    [log] = run_logs(tmp_path)
    assert log.exit_code == 0 and log.config["world_size"] == 1
    assert [row["_step"] for row in log.rows_with("train/loss")] == list(range(2, 17, 2))


@cuda
def test_train_flow_with_compile_runs_end_to_end_on_cuda(offline_wandb, tmp_path, monkeypatch, capsys, fresh_dynamo):
    graphs = []
    monkeypatch.setattr(torch, "compile", counting_compile(graphs))
    result = run_train_flow_on_cuda(tmp_path, "--set", "training.compile=true")
    assert graphs, "training.compile=true trained without compiling"
    assert_flow_run_on_cuda_trained(offline_wandb, tmp_path / "out", result, capsys.readouterr().out)

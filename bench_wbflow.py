"""Benchmarks for wbflow: every ratio is measured side by side in one run, on this machine.

    python bench_wbflow.py            # all of them (CPU; about 5 minutes on 2 cores)
    python bench_wbflow.py train      # train_epoch vs a bare loop, W&B offline logging every 10 steps
    python bench_wbflow.py fid        # Fréchet distance vs pytorch-fid / torchmetrics; Inception features
    python bench_wbflow.py flow       # DeviceImageLoader vs torchvision; euler_sample vs steps x forward
    python bench_wbflow.py flow --data-dir data --device cuda
    python bench_wbflow.py fewer      # 8 Gaussians: 1-RF vs OT vs 2-RF vs MeanFlow (W2 at NFE 1/2/100, time)
    python bench_wbflow.py conditional  # overlapping 2-D classes: guidance 1-3 vs unconditional (own-class share, W2)
    python bench_wbflow.py competition  # the fire competition: one model vs the 5-fold ensemble and its offsets
    python bench_wbflow.py --gpu      # CUDA: flow training vs torchcfm, Euler and guided sampling, FID, train_fire
    python bench_wbflow.py --gpu --dry-run             # the same sections and table at toy sizes on the CPU

The fid benchmark and --gpu need the test-only peers (pip install -r requirements-test.txt); --gpu's torchcfm
row needs torchcfm (pip install --no-deps -r requirements-torchcfm.txt), and says so when it is missing.
"""
import argparse
import concurrent.futures
import contextlib
import copy
import functools
import io
import json
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import wbflow


def _best_seconds(run, repeats, warm_up=True):
    """The fastest of `repeats` timed calls of run(), after one untimed warm-up call."""
    if warm_up:
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return min(timings)


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def bench_train_epoch(steps=50, batch_size=32, rounds=9):
    """train_epoch (grad norm, device-side sums, W&B offline log every 10 steps) over a bare loop."""
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, 32, 32, generator=generator),
                torch.randint(0, 10, (batch_size,), generator=generator)) for _ in range(steps)]
    criterion = nn.CrossEntropyLoss()
    loss_fn = wbflow.classification_loss(criterion)
    model = _small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def bare_loop():
        model.train()
        for images, labels in batches:
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as wandb_dir:
        os.environ["WANDB_DIR"] = wandb_dir
        with wbflow.wandb_run(project="bench") as run:
            state = {"step": 0}

            def with_train_epoch():
                stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, step=state["step"], log_every=10,
                                           on_log=lambda step, window: run.log({"train/loss": window["loss"]},
                                                                               step=step), progress=False)
                state["step"] = stats["step"]

            bare_loop(), with_train_epoch()  # warm-up
            bare_seconds, train_epoch_seconds = [], []
            for round_index in range(rounds):  # interleaved, first one then the other, so load hits both alike
                contenders = [(bare_loop, bare_seconds), (with_train_epoch, train_epoch_seconds)]
                for run_once, seconds in contenders[::1 if round_index % 2 else -1]:
                    seconds.append(_best_seconds(run_once, 1, warm_up=False))
    bare, ours = statistics.median(bare_seconds), statistics.median(train_epoch_seconds)
    ratio = ours / bare
    print(f"train_epoch vs bare loop ({steps} steps, batch {batch_size}, small CNN, CPU, "
          f"{torch.get_num_threads()} threads, median of {rounds}): bare {bare:.3f}s, "
          f"train_epoch {ours:.3f}s, ratio {ratio:.3f} (target <= 1.05)")
    return ratio


def _gaussian_statistics(dims=2048, samples=10_000):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(dims, dims, generator=generator, dtype=torch.float64) / dims ** 0.5
    real = torch.randn(samples, dims, generator=generator, dtype=torch.float64)
    fake = torch.randn(samples, dims, generator=generator, dtype=torch.float64) @ mixing + 0.1
    return wbflow.feature_statistics(real), wbflow.feature_statistics(fake)


def bench_frechet_distance():
    """Time frechet_distance vs pytorch-fid and torchmetrics; returns a dict of timings and ratios.

        print(bench_frechet_distance())
    """
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid

    (mu1, sigma1), (mu2, sigma2) = _gaussian_statistics()
    tensors = [torch.from_numpy(value) for value in (mu1, sigma1, mu2, sigma2)]
    ours = wbflow.frechet_distance(mu1, sigma1, mu2, sigma2)
    reference = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    ours_s = _best_seconds(lambda: wbflow.frechet_distance(mu1, sigma1, mu2, sigma2), repeats=3)
    pytorch_fid_s = _best_seconds(lambda: calculate_frechet_distance(mu1, sigma1, mu2, sigma2),
                                  repeats=1)
    torchmetrics_s = _best_seconds(lambda: _compute_fid(*tensors), repeats=1)
    return {"distance": ours, "relative_difference": abs(ours - reference) / abs(reference),
            "wbflow_s": ours_s, "pytorch_fid_s": pytorch_fid_s, "torchmetrics_s": torchmetrics_s,
            "speedup_vs_pytorch_fid": pytorch_fid_s / ours_s,
            "speedup_vs_torchmetrics": torchmetrics_s / ours_s}


def _calibrated_weights_file(directory):
    """The tests' calibrated random FID-Inception, saved as a weights file (the real one needs the network)."""
    from conftest import _calibrated_fid_inception
    path = os.path.join(directory, wbflow.FID_WEIGHTS_FILE)
    torch.save(_calibrated_fid_inception().state_dict(), path)
    return path


def bench_feature_extraction(num_images=64, batch_size=32):
    """Time CPU Inception features vs pytorch-fid's InceptionV3 on identical weights and images.

        print(bench_feature_extraction())
    """
    import pytorch_fid.inception

    with tempfile.TemporaryDirectory() as directory:
        weights_path = _calibrated_weights_file(directory)
        state_dict = torch.load(weights_path, weights_only=True)
        inception = wbflow.load_fid_inception(weights_path)
    # pytorch-fid downloads its weights inside the constructor; hand it the same state dict.
    download = pytorch_fid.inception.load_state_dict_from_url
    pytorch_fid.inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        reference = pytorch_fid.inception.InceptionV3([3]).eval()
    finally:
        pytorch_fid.inception.load_state_dict_from_url = download
    images_uint8 = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8)

    def reference_features():
        with torch.no_grad():
            return torch.cat([reference(batch.float() / 255)[0].flatten(1)
                              for batch in images_uint8.split(batch_size)])

    def our_features():
        return wbflow.inception_features(images_uint8, inception, resize="pytorch-fid",
                                         batch_size=batch_size)[0]

    max_abs_difference = (our_features() - reference_features()).abs().max().item()
    reference_s = _best_seconds(reference_features, repeats=2)
    ours_s = _best_seconds(our_features, repeats=2)
    return {"images": num_images, "threads": torch.get_num_threads(),
            "max_abs_difference": max_abs_difference,
            "wbflow_images_per_s": num_images / ours_s,
            "pytorch_fid_images_per_s": num_images / reference_s,
            "speedup_vs_pytorch_fid": reference_s / ours_s}


def bench_fid():
    """Both FID benchmarks, one line each."""
    results = {"frechet_distance": bench_frechet_distance(),
               "feature_extraction": bench_feature_extraction()}
    for name, numbers in results.items():
        print(name, " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                             for key, value in numbers.items()))
    return results


def _write_synthetic_cifar(root, images_per_batch=10000):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images = wbflow.synthetic_images(images_per_batch, seed=index).numpy().reshape(images_per_batch, -1)
        with open(folder / name, "wb") as file:
            pickle.dump({"data": images, "labels": [0] * images_per_batch}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, file)


class _CIFAR10Unchecked(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 without the md5 check, so it also reads the synthetic files."""

    def _check_integrity(self):
        return True

    def _load_meta(self):
        self.classes = [str(index) for index in range(10)]


def bench_loader(data_dir, batch_size=128, torchvision_batches=60, repeats=3):
    """images/s of torchvision CIFAR10 + DataLoader and of DeviceImageLoader on the CPU, same batch size."""
    import torchvision.transforms as T
    dataset = _CIFAR10Unchecked(str(data_dir), train=True, download=False,
                                transform=T.Compose([T.ToTensor(), T.RandomHorizontalFlip()]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)

    def torchvision_pass():
        for index, (images, _) in enumerate(loader):
            if index + 1 == torchvision_batches:
                return

    images_uint8, _ = wbflow.load_cifar10(data_dir, download=False)
    device_loader = wbflow.DeviceImageLoader(images_uint8, batch_size, device="cpu")

    def device_pass():
        for images in device_loader:
            pass

    torchvision_pass(), device_pass()  # warm-up
    torchvision_seconds = _best_seconds(torchvision_pass, repeats, warm_up=False)
    device_seconds = _best_seconds(device_pass, 3 * repeats, warm_up=False)  # each pass is short: more tries against noise
    torchvision_rate = torchvision_batches * batch_size / torchvision_seconds
    device_rate = len(device_loader) * batch_size / device_seconds
    return {"torchvision_images_per_s": torchvision_rate, "device_loader_images_per_s": device_rate,
            "loader_speedup": device_rate / torchvision_rate}


def bench_euler(model_config, batch_size=16, steps=20, repeats=3, device="cpu"):
    """Euler wall time over steps x (one forward) on the same noise batch, both in inference mode."""
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**model_config).to(device).eval()
    for parameter in model.parameters():  # non-zero output layers, so the field is not trivially zero
        torch.nn.init.normal_(parameter, std=0.02)
    noise = torch.randn(batch_size, 3, 32, 32, device=device)
    t = torch.full((batch_size,), 0.5, device=device)

    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def forwards():
        with torch.inference_mode():
            for _ in range(steps):
                model(noise, t)
        synchronize()

    def euler():
        wbflow.euler_sample(model, noise, steps)
        synchronize()

    forwards(), euler()  # warm-up
    forward_seconds, euler_seconds = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        forward_seconds.append(_best_seconds(forwards, 1, warm_up=False))
        euler_seconds.append(_best_seconds(euler, 1, warm_up=False))
    forward_seconds, euler_seconds = min(forward_seconds), min(euler_seconds)
    return {"forward_ms": 1000 * forward_seconds / steps, "euler_ms": 1000 * euler_seconds, "steps": steps,
            "euler_over_steps_x_forward": euler_seconds / forward_seconds}


def bench_flow(data_dir=None, batch_size=128, steps=20, device="cpu"):
    """Run both benchmarks, print them with their targets, and return the numbers.

    Usage: numbers = bench_flow()  # or python bench_wbflow.py --data-dir data
    """
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as temp_dir:
        if data_dir is None or not (Path(data_dir) / "cifar-10-batches-py" / "data_batch_1").is_file():
            data_dir = temp_dir
            _write_synthetic_cifar(data_dir)
            source = "synthetic CIFAR-format files (50,000 images)"
        else:
            source = f"CIFAR-10 from {data_dir}"
        loader = bench_loader(data_dir, batch_size)
    euler = bench_euler(dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, head_channels=32,
                             dropout=0.0), steps=steps, device=device)
    print(f"loader ({source}, batch {batch_size}, CPU, {torch.get_num_threads()} threads):")
    print(f"  torchvision CIFAR10 + DataLoader  {loader['torchvision_images_per_s']:>12,.0f} images/s")
    print(f"  DeviceImageLoader                 {loader['device_loader_images_per_s']:>12,.0f} images/s")
    print(f"  speed-up                          {loader['loader_speedup']:>12.1f}x   (target >= 20x)")
    print(f"euler_sample ({steps} steps, batch 16, FlowUNet 32 channels, {device}):")
    print(f"  one forward {euler['forward_ms']:.1f} ms, Euler {euler['euler_ms']:.1f} ms, "
          f"ratio to steps x forward {euler['euler_over_steps_x_forward']:.3f}   (target <= 1.05)")
    return {**loader, **euler}

# ----------------------------------------------------------------------------- fewer steps: OT coupling and reflow

class _VelocityMLP(nn.Module):  # v(x, t) on the plane; with second_time, the average velocity u(x, t, r)
    def __init__(self, width=128, second_time=False):
        super().__init__()
        self.second_time = second_time  # then the jump's length r - t is a third input
        self.net = nn.Sequential(nn.Linear(3 + second_time, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, r=None):
        jump = [(t if r is None else r)[:, None] - t[:, None]] if self.second_time else []
        return self.net(torch.cat([x, t[:, None]] + jump, dim=1))


def _eight_gaussians(count, generator, radius=4.0, std=0.2):
    angles = torch.randint(8, (count,), generator=generator) * (torch.pi / 4)
    return torch.stack([angles.cos(), angles.sin()], 1) * radius + std * torch.randn(count, 2, generator=generator)


def _fit(model, batches, loss_fn=wbflow.rectified_flow_loss, lr=1e-3):
    """(train_epoch's stats, the model in eval mode) after one pass of Adam over `batches`."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return wbflow.train_epoch(model, batches, optimizer, loss_fn, progress=False), model.eval()


def _w2(samples, held_out):
    """Exact W2 between two equal point sets: the optimal assignment's mean squared distance, rooted."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.cdist(samples.double(), held_out.double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean() ** 0.5)


def bench_fewer_steps(steps=3000, batch_size=256, num_pairs=50_000, evaluated=2000, seed=0):
    """Plain 1-RF vs OT coupling vs 2-RF (reflow of that 1-RF) vs MeanFlow from scratch on a 2-D mixture of 8
    Gaussians, each trained with train_epoch on the same batches: exact W2 to held-out data at NFE 1, 2 and 100
    (Euler; MeanFlow's NFE k is k jumps of 1/k, meanflow_velocity), straightness and training seconds; then the
    cost of ot_pairs on one CIFAR batch of 128 (CPU).

    Usage: numbers = bench_fewer_steps()  # or python bench_wbflow.py fewer
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batches = list(_eight_gaussians(steps * batch_size, generator).split(batch_size))
    held_out, noise = _eight_gaussians(evaluated, generator), torch.randn(evaluated, 2, generator=generator)
    fits = {"1-RF": _fit(_VelocityMLP(), batches),
            "OT": _fit(_VelocityMLP(), batches, functools.partial(wbflow.rectified_flow_loss, coupling="ot"))}
    pair_noise = torch.randn(num_pairs, 2, generator=generator)  # 2-RF: the 1-RF's own pairs, from its weights
    pairs = {"noise": pair_noise, "data": wbflow.euler_sample(fits["1-RF"][1], pair_noise, 100)}
    student = copy.deepcopy(fits["1-RF"][1])
    pair_batches = [{"noise": pairs["noise"][index], "data": pairs["data"][index]}
                    for index in torch.randint(num_pairs, (steps, batch_size), generator=generator)]
    fits["2-RF"] = _fit(student, pair_batches)
    fits["MeanFlow"] = _fit(_VelocityMLP(second_time=True), batches, wbflow.meanflow_loss)  # no teacher
    numbers = {}
    print(f"fewer steps (8 Gaussians, radius 4, std 0.2; {steps} steps of batch {batch_size} each; W2 on "
          f"{evaluated} held-out points; 2-RF on {num_pairs} pairs of the 1-RF, Euler NFE 100, its seconds without "
          f"them; MeanFlow: meanflow_loss's defaults, NFE k = k jumps):")
    print(f"  {'model':8} {'W2 NFE 1':>9} {'NFE 2':>7} {'NFE 100':>8} {'straightness':>13} {'train s':>8}")
    for name, (stats, model) in fits.items():
        velocity = functools.partial(wbflow.meanflow_velocity, model) if name == "MeanFlow" else lambda nfe: model
        row = {nfe: _w2(wbflow.euler_sample(velocity(nfe), noise, nfe), held_out) for nfe in (1, 2, 100)}
        row["straightness"] = wbflow.straightness(velocity(100), noise, steps=100)
        row["seconds"], row["steps"] = stats["seconds"], stats["steps"]
        numbers[name] = row
        print(f"  {name:8} {row[1]:9.3f} {row[2]:7.3f} {row[100]:8.3f} {row['straightness']:13.4f} "
              f"{row['seconds']:8.1f}")
    for name in ("OT", "2-RF"):
        print(f"  {name}: one-step W2 {numbers[name][1] / numbers['1-RF'][1]:.2f}x 1-RF's (target <= 0.5x), "
              f"straightness {numbers[name]['straightness'] / numbers['1-RF']['straightness']:.3f}x (target <= 0.25x)")
    print(f"  MeanFlow: one-step W2 {numbers['MeanFlow'][1] / numbers['1-RF'][100]:.2f}x 1-RF's 100-step W2 "
          f"(target <= 1.2x) in {numbers['MeanFlow']['steps'] / numbers['1-RF']['steps']:.2f}x 1-RF's steps "
          f"(target <= 2x), "
          f"{numbers['MeanFlow']['seconds'] / numbers['1-RF']['seconds']:.1f}x its training seconds")
    x0, x1 = torch.randn(128, 3, 32, 32), torch.rand(128, 3, 32, 32) * 2 - 1
    numbers["ot_pairs_ms"] = _best_seconds(lambda: wbflow.ot_pairs(x0, x1), 10) * 1000
    print(f"  ot_pairs on a CIFAR batch of 128 (3072 dims, CPU, {torch.get_num_threads()} threads): "
          f"{numbers['ot_pairs_ms']:.1f} ms")
    return numbers


# ----------------------------------------------------------------------------- conditional: classifier-free guidance

class _LabelledVelocityMLP(nn.Module):  # v(x, t, labels) on the plane; labels=None is the null class (index C)
    def __init__(self, num_classes, width=128):
        super().__init__()
        self.num_classes = num_classes
        self.label_embed = nn.Embedding(num_classes + 1, width)
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, labels=None):
        labels = torch.full((len(x),), self.num_classes, device=x.device) if labels is None else labels
        hidden = self.net[1](self.net[0](torch.cat([x, t[:, None]], dim=1)) + self.label_embed(labels))
        return self.net[2:](hidden)


def _overlapping_classes(count, generator, centres, std):
    """`count` points of the classes 0, 1, ... in turn, class c a Gaussian of `std` around centres[c]."""
    labels = torch.arange(count) % len(centres)
    return centres[labels] + std * torch.randn(count, 2, generator=generator), labels


def _class_scores(samples, labels, held_out, held_out_labels, centres):
    """(share of samples in their own class's region (the nearest centre: the Bayes region of equal isotropic
    classes), mean over the classes of the exact W2 between the class's samples and its held-out points)."""
    own = (torch.cdist(samples, centres).argmin(dim=1) == labels).float().mean().item()
    return own, statistics.mean(_w2(samples[labels == label], held_out[held_out_labels == label])
                                for label in range(len(centres)))


def bench_conditional(steps=3000, batch_size=256, evaluated=3000, guidance=(1.0, 1.5, 2.0, 3.0), seed=0):
    """A class-conditional flow with classifier-free guidance on a 2-D problem whose classes overlap (3 Gaussians
    of std 1 around centres 1.5 apart from the origin), trained with train_epoch and drop_labels (rate 0.1), beside
    an unconditional flow on the same data: for samples of class-balanced labels (Euler NFE 100, the same noise),
    the share that lands in its own class's region and the per-class W2 to held-out points of that class, at each
    guidance scale. The "held-out data" row is a second held-out draw: the best a sampler of the true classes gets.

    Usage: numbers = bench_conditional()  # or python bench_wbflow.py conditional
    """
    generator, num_classes = torch.Generator().manual_seed(seed), 3
    torch.manual_seed(seed)
    angles = torch.arange(num_classes) * (2 * torch.pi / num_classes)
    centres = 1.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
    points, labels = _overlapping_classes(steps * batch_size, generator, centres, 1.0)
    batches = list(zip(points.split(batch_size), labels.split(batch_size)))
    held_out, held_out_labels = _overlapping_classes(evaluated, generator, centres, 1.0)
    noise = torch.randn(evaluated, 2, generator=generator)
    models = {"unconditional": _VelocityMLP(), "conditional": _LabelledVelocityMLP(num_classes)}
    losses = {"unconditional": wbflow.rectified_flow_loss,
              "conditional": wbflow.drop_labels(wbflow.rectified_flow_loss, 0.1, null_label=num_classes)}
    for name, model in models.items():
        started = time.perf_counter()
        wbflow.train_epoch(model, [batch[0] for batch in batches] if name == "unconditional" else batches,
                           torch.optim.Adam(model.parameters(), lr=1e-3), losses[name], progress=False)
        print(f"  {name}: trained in {time.perf_counter() - started:.1f} s", flush=True)
        model.eval()
    sample_labels = torch.arange(evaluated) % num_classes
    rows = {"held-out data": _class_scores(_overlapping_classes(evaluated, generator, centres, 1.0)[0],
                                           sample_labels, held_out, held_out_labels, centres),
            "unconditional": _class_scores(wbflow.euler_sample(models["unconditional"], noise, 100), sample_labels,
                                           held_out, held_out_labels, centres)}
    for scale in guidance:
        velocity = wbflow.guided_velocity(models["conditional"], torch.arange(num_classes), scale)
        rows[f"guidance {scale:g}"] = _class_scores(wbflow.euler_sample(velocity, noise, 100), sample_labels, held_out,
                                                   held_out_labels, centres)
    print(f"conditional (3 Gaussians of std 1, centres 1.5 from the origin; {steps} steps of batch {batch_size}, "
          f"label dropout 0.1; {evaluated} class-balanced samples, Euler NFE 100, the same noise):")
    print(f"  {'sampler':15} {'own-class share':>15} {'per-class W2':>13}")
    for name, (own, w2) in rows.items():
        print(f"  {name:15} {own:15.3f} {w2:13.3f}")
    conditional = rows["guidance 1"]
    print(f"  guidance 1: per-class W2 {conditional[1] / rows['unconditional'][1]:.2f}x the unconditional model's "
          f"(target < 1); own-class share at guidance {max(guidance):g} {rows[f'guidance {max(guidance):g}'][0]:.3f} "
          f"vs {conditional[0]:.3f} at 1 (target: higher)")
    return {name: {"own_class_share": own, "per_class_w2": w2} for name, (own, w2) in rows.items()}


# ----------------------------------------------------------------------------- --gpu: the GPU run, side by side

GPU_SECTIONS = ("train", "profile", "inception", "fire", "euler")
# NVIDIA's dense bf16 tensor-core peaks (datasheets); every row's MFU is taken against it, float32 rows too
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}
RECIPE_TORCHCFM_UNET = dict(num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4,
                            num_head_channels=64, attention_resolutions="16", dropout=0.1)  # its train_cifar10.py


COMPETITION_SHARES = {"无风险": 0.59, "低风险": 0.19, "中风险": 0.14, "非楼道": 0.05, "高风险": 0.03}  # its download's


def _held_out_score(data, checkpoints, out, labelled):
    """train_fire --predict of the labelled held-out list data/A.txt with `checkpoints` (--tta): the weighted
    score, macro-F1 and accuracy of its submission against `labelled` ({name: class})."""
    import train_fire
    with contextlib.redirect_stdout(io.StringIO()):
        submission = train_fire.main(["--predict", str(data / "A.txt"), "--checkpoint", *map(str, checkpoints),
                                      "--submission", str(out) + "/", "--tta", "--num-workers", "0", "--no-wandb"])
    predicted = dict(line.split("\t") for line in submission.read_text(encoding="utf-8").splitlines())
    classes = list(COMPETITION_SHARES)
    scores = wbflow.classification_scores([classes.index(labelled[name]) for name in predicted],
                                          [classes.index(label) for label in predicted.values()],
                                          [train_fire.COMPETITION_WEIGHTS[name] for name in classes])
    return scores["score"], scores["macro_f1"], scores["acc"]


def bench_competition(images=500, held_out=500, epochs=3, image_size=32, folds=5, seed=0):
    """The competition's workflow on generated images in its layout and class shares (59/19/14/5/3 %), a ResNet-18
    at low resolution on the CPU: the weighted score (at most 6.5) on a labelled held-out list of one model selected
    on val_acc, the same run's model selected on val_score, the 5-fold ensemble, and the ensemble with --cv's
    offsets (each with --tta). Prints a markdown table and returns its rows."""
    import train_fire
    counts = {name: max(1, round(share * images)) for name, share in COMPETITION_SHARES.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: a second thread on 2 shared cores costs more than it gives
    with tempfile.TemporaryDirectory() as root, contextlib.redirect_stdout(io.StringIO()):
        root, started = Path(root), time.perf_counter()
        _, labelled = wbflow.write_pattern_dataset(root / "data", counts, test_images=held_out, size=image_size,
                                                   seed=seed)
        (root / "data" / "A.txt").write_text("".join(f"{name}\t{label}\n" for name, label in labelled.items()),
                                             encoding="utf-8")  # the held-out list, with its labels
        common = ["--data-dir", str(root / "data"), "--model", "resnet18", "--weights", "none", "--epochs", str(epochs),
                  "--image-size", str(image_size), "--batch-size", "32", "--num-workers", "0", "--no-wandb",
                  "--seed", str(seed)]
        for metric in ("val_acc", "val_score"):  # one run each, trained alike: only the selection differs
            train_fire.main([*common, "--best-metric", metric, "--out-dir", str(root / metric)])
        train_fire.main([*common, "--folds", str(folds), "--out-dir", str(root / "cv")])
        ensemble = json.loads((root / "cv" / "ensemble.json").read_text(encoding="utf-8"))
        models = [root / "cv" / member["path"] for member in ensemble["checkpoints"]]
        rows = [("one model, selected on val_acc", [root / "val_acc" / "best_model.pth"], ""),
                ("one model, selected on val_score", [root / "val_score" / "best_model.pth"], ""),
                (f"{folds}-fold ensemble", models, f"OOF score {ensemble['oof_score']:.3f}"),
                (f"{folds}-fold ensemble with --cv's offsets", [root / "cv" / "ensemble.json"],
                 f"OOF score {ensemble['oof_score_with_offsets']:.3f}")]
        rows = [(name, *_held_out_score(root / "data", paths, root / f"predict{index}", labelled), note)
                for index, (name, paths, note) in enumerate(rows)]
    torch.set_num_threads(threads)
    print(f"competition: {sum(counts.values())} training images {counts}, {held_out} held out, ResNet-18 from scratch "
          f"at {image_size} px, {epochs} epochs, batch 32, Adam 0.003, TTA, CPU, 1 thread, "
          f"{time.perf_counter() - started:.0f} s")
    print("\n| model | held-out score (max 6.5) | macro-F1 | accuracy | out-of-fold |\n|---|---|---|---|---|")
    for name, score, macro_f1, accuracy, note in rows:
        print(f"| {name} | {score:.3f} | {macro_f1:.3f} | {accuracy:.1f}% | {note} |")
    return rows


def gpu_sizes(dry_run):
    """What each --gpu section measures: the recipe's sizes on the GPU, or toy ones on the CPU (--dry-run),
    where the compile row uses aot_eager (dynamo and AOTAutograd as on the GPU, without inductor's minute of
    C++ builds) and train_fire's row a ResNet-18."""
    if not dry_run:
        return {"device": "cuda", "unet": None, "torchcfm_unet": RECIPE_TORCHCFM_UNET, "image_size": 32,
                "batch": None, "log_every": None, "train_steps": 300, "compile_backend": "inductor",
                "samples": 10_000, "sample_batch": 500, "euler_steps": 100, "inception_images": 10_000,
                "inception_batch": 200, "classifier": "resnet50", "jpegs": 1920, "jpeg_size": (640, 480),
                "fire_sizes": (224, 256), "fire_batch": 32, "warm_up_batches": 10,
                "workers": wbflow.default_num_workers(), "all_workers": len(os.sched_getaffinity(0))}
    # the two toy UNets are one architecture (176,195 parameters each), as the recipe's are at full size
    return {"device": "cpu", "unet": dict(base_channels=32, channel_mults=(1,), num_res_blocks=1, head_channels=32),
            "torchcfm_unet": dict(num_res_blocks=1, num_channels=32, channel_mult=[1], num_heads=1,
                                  num_head_channels=32, attention_resolutions="16", dropout=0.1),
            "image_size": 16, "batch": 4, "log_every": 1, "train_steps": 3, "compile_backend": "aot_eager",
            "samples": 4, "sample_batch": 2, "euler_steps": 2, "inception_images": 2, "inception_batch": 1,
            "classifier": "resnet18", "jpegs": 20, "jpeg_size": (48, 40), "fire_sizes": (32, 40), "fire_batch": 4,
            "warm_up_batches": 1, "workers": 0, "all_workers": 1}


def _row(section, measurement, result, *, mfu=None, reference="", settings=""):
    return {"section": section, "measurement": measurement, "result": result, "mfu": mfu,
            "reference": reference, "settings": settings}


def _rate(value, unit="images/s"):
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def _seconds(value):
    return f"{value:.1f} s" if value >= 1 else f"{value:.3g} s"


def _workers(count):
    return f"{count} loader worker{'s' * (count != 1)}"


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak_flops(device, peak_tflops=None):
    """FLOP/s of the device's dense bf16 peak (or `peak_tflops`), None where unknown (the CPU)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def _mfu(images_per_second, flops_per_image, peak_flops):
    return images_per_second * flops_per_image / peak_flops if peak_flops else None


def _training_flops_per_image(loss_of_batch, batch_size):
    """FLOPs of one forward and backward (torch.utils.flop_counter: matmuls, convolutions, attention) per image."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss_of_batch().backward()
    return counter.get_total_flops() / batch_size


def _rate_between_log_points(reached, batch_size):
    """images/s from the first to the last log point (`reached`: step -> time), so compiling and warm-up stay out."""
    first, last = min(reached), max(reached)
    return (last - first) * batch_size / (reached[last] - reached[first])


def _recipe():
    """The flow scripts' default config: the model and training sections of configs/cifar10_rectified_flow.yaml."""
    import flow_config
    return wbflow.load_yaml_config(flow_config.DEFAULT_CONFIG)


def _torchcfm():
    """torchcfm's (UNetModelWrapper, ConditionalFlowMatcher), or None when torchcfm is not installed."""
    for backend in ("JAX", "CUPY", "TENSORFLOW"):  # torchcfm imports POT, whose other backends would start them
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{backend}", "1")
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
        from torchcfm.models.unet.unet import UNetModelWrapper
    except ImportError:
        return None
    return UNetModelWrapper, ConditionalFlowMatcher


def _torchcfm_ema(source, target, decay):
    # torchcfm's examples/images/cifar10/utils_cifar.py ema(), as its training step calls it
    source_dict = source.state_dict()
    target_dict = target.state_dict()
    for key in source_dict.keys():
        target_dict[key].data.copy_(target_dict[key].data * decay + source_dict[key].data * (1 - decay))


FLOW_LOSSES = {"rectified_flow": wbflow.rectified_flow_loss, "meanflow": wbflow.meanflow_loss}


def _flow_recipe(model_config, training, *, device, channels_last, compile_backend, image_size=32,
                 objective="rectified_flow"):
    """train(loader, amp, on_log=None) -> train_epoch's stats: one epoch of train_flow.py's loop (a FlowUNet,
    fused Adam, the warm-up schedule, EMA, clipping, a window every log_interval steps) on the objective's loss
    (FLOW_LOSSES), each call continuing."""
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**model_config, image_size=image_size, second_time=objective == "meanflow").to(device)
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    ema_model = wbflow.make_ema(model, training["ema_decay"])
    optimizer = torch.optim.Adam(model.parameters(), lr=training["learning_rate"], fused=True)
    warmup_steps = max(1, training["warmup_steps"])
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps - 1)
    train_model = torch.compile(model, backend=compile_backend) if compile_backend else model
    progress = {"step": 0}

    def train(loader, amp, on_log=None):
        stats = wbflow.train_epoch(train_model, loader, optimizer, FLOW_LOSSES[objective], device=device,
                                   scheduler=scheduler, ema_model=ema_model, grad_clip=training["gradient_clip"],
                                   amp_dtype=wbflow.autocast_dtype(device, amp), step=progress["step"],
                                   log_every=training["log_interval"], on_log=on_log, progress=False)
        progress["step"] = stats["step"]
        return stats
    return train


def _flow_recipe_rate(images_uint8, model_config, training, *, device, amp, channels_last, compile_backend, run,
                      objective="rectified_flow"):
    """images/s of train_flow.py's training loop on a DeviceImageLoader, with W&B logging every log_interval
    steps, from its first log point to its last."""
    train = _flow_recipe(model_config, training, device=device, channels_last=channels_last,
                         compile_backend=compile_backend, image_size=images_uint8.shape[-1], objective=objective)
    reached = {}

    def log_window(step, window):  # train_epoch has just read its sums: every step before this one has run
        reached[step] = time.perf_counter()
        run.log({"train/loss": window["loss"], "train/learning_rate": window["learning_rate"],
                 "train/grad_norm": window["grad_norm"], "train/epoch": window["epoch"]}, step=step)

    loader = wbflow.DeviceImageLoader(images_uint8, training["batch_size"], device=device, channels_last=channels_last)
    train(loader, amp, log_window)
    return _rate_between_log_points(reached, training["batch_size"])


def _torchcfm_rate(images_uint8, unet_config, training, *, device):
    """(images/s, FLOPs per image) of the training step of torchcfm's examples/images/cifar10/train_cifar10.py:
    its UNetModelWrapper, ConditionalFlowMatcher (sigma 0: our objective; its default OT-CFM adds a CPU OT solve
    per batch), Adam, clipping, warm-up and EMA, on CPU batches in [-1, 1] as its DataLoader yields them, with a
    device sync at every log_interval step for the clock."""
    unet_class, matcher_class = _torchcfm()
    torch.manual_seed(0)
    net_model = unet_class(dim=tuple(images_uint8.shape[1:]), **unet_config).to(device)
    ema_model = copy.deepcopy(net_model)
    batches = (images_uint8.float() / 127.5 - 1).split(training["batch_size"])
    flow_matcher = matcher_class(sigma=0.0)

    def loss_of(x1):
        t, xt, ut = flow_matcher.sample_location_and_conditional_flow(torch.randn_like(x1), x1)
        return torch.mean((net_model(t, xt) - ut) ** 2)

    flops = _training_flops_per_image(lambda: loss_of(batches[0].to(device)), training["batch_size"])
    optim = torch.optim.Adam(net_model.parameters(), lr=training["learning_rate"])
    warmup = training["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, warmup) / warmup)
    reached = {}
    for step, x1 in enumerate(batches, start=1):
        optim.zero_grad()
        loss = loss_of(x1.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net_model.parameters(), training["gradient_clip"])
        optim.step()
        sched.step()
        _torchcfm_ema(net_model, ema_model, training["ema_decay"])
        if step % training["log_interval"] == 0:
            _synchronize(device)
            reached[step] = time.perf_counter()
    return _rate_between_log_points(reached, training["batch_size"]), flops


def _recipe_training(sizes):
    """(model config, training config, uint8 images for train_steps batches) of the recipe at these sizes."""
    config = _recipe()
    training = {**config["training"], "batch_size": sizes["batch"] or config["training"]["batch_size"],
                "log_interval": sizes["log_every"] or config["training"]["log_interval"]}
    images_uint8 = wbflow.synthetic_images(training["batch_size"] * sizes["train_steps"], size=sizes["image_size"])
    return sizes["unet"] or config["model"], training, images_uint8


def gpu_train_rows(sizes, peak_flops):
    """Flow training images/s of the default recipe, each row as soon as it is measured: torchcfm's step first
    (the reference), then ours in float32 eager, bf16 + channels_last eager, and bf16 + channels_last + compile,
    then MeanFlow's step (meanflow_loss on the same UNet with its second time) in bf16 + channels_last eager."""
    model_config, training, images_uint8 = _recipe_training(sizes)
    device, batch_size = sizes["device"], training["batch_size"]
    cfm_rate = None
    if _torchcfm() is None:
        yield _row("flow training", "torchcfm train_cifar10.py step", "not run: torchcfm is not installed "
                   "(pip install --no-deps -r requirements-torchcfm.txt)")
    else:
        cfm_rate, cfm_flops = _torchcfm_rate(images_uint8, sizes["torchcfm_unet"], training, device=device)
        yield _row("flow training", "torchcfm train_cifar10.py step (float32 eager, its UNetModelWrapper)",
                   f"{_rate(cfm_rate)} ({1000 * batch_size / cfm_rate:.1f} ms/step)",
                   mfu=_mfu(cfm_rate, cfm_flops, peak_flops), reference="1.00x torchcfm",
                   settings=f"{cfm_flops / 1e9:.2f} GFLOP/image measured; the same recipe, torchcfm's step")
    flops, parameters = _flow_flops_per_image(model_config, sizes, images_uint8[:batch_size], "rectified_flow")
    meanflow_flops, _ = _flow_flops_per_image(model_config, sizes, images_uint8[:batch_size], "meanflow")
    settings = (f"FlowUNet of {parameters:,} parameters, batch {batch_size}, Adam (fused), "
                f"EMA {training['ema_decay']}, clip {training['gradient_clip']}, "
                f"W&B log at every log_interval ({training['log_interval']}) steps, "
                f"timed from step {training['log_interval']} to {sizes['train_steps']}")
    default = "bf16 + channels_last eager (train_flow's default)"
    variants = {"float32 eager (TF32 convolutions: PyTorch's CUDA default)": (False, False, None, "rectified_flow"),
                default: (True, True, None, "rectified_flow"),
                f"bf16 + channels_last + torch.compile ({sizes['compile_backend']})":
                    (True, True, sizes["compile_backend"], "rectified_flow"),
                f"MeanFlow (meanflow_loss), {default}": (True, True, None, "meanflow")}
    os.environ.setdefault("WANDB_MODE", "offline")
    rates = {}
    with tempfile.TemporaryDirectory() as wandb_dir:
        os.environ["WANDB_DIR"] = wandb_dir
        with wbflow.wandb_run({"bench": "gpu train"}, project="bench") as run:
            for name, (amp, channels_last, backend, objective) in variants.items():
                rates[name] = rate = _flow_recipe_rate(images_uint8, model_config, training, device=device, amp=amp,
                                                       channels_last=channels_last, compile_backend=backend, run=run,
                                                       objective=objective)
                reference = [f"{rate / cfm_rate:.2f}x torchcfm"] if cfm_rate else []
                if objective == "meanflow":  # beside rectified flow's step on the same UNet
                    reference.append(f"{rate / rates[default]:.2f}x rectified flow's")
                objective_flops = meanflow_flops if objective == "meanflow" else flops
                yield _row("flow training", name, f"{_rate(rate)} ({1000 * batch_size / rate:.1f} ms/step)",
                           mfu=_mfu(rate, objective_flops, peak_flops), reference=", ".join(reference),
                           settings=f"{objective_flops / 1e9:.2f} GFLOP/image measured; {settings}")


def _flow_flops_per_image(model_config, sizes, images_uint8, objective):
    """(training FLOPs per image of the objective's loss, counted once in float32, parameters) of the recipe's
    FlowUNet; the counter misses some fused attention kernels of other layouts, and counts MeanFlow's JVP."""
    model = wbflow.FlowUNet(**model_config, image_size=sizes["image_size"], second_time=objective == "meanflow")
    model = model.to(sizes["device"])
    images = images_uint8.to(sizes["device"]).float() / 127.5 - 1
    flops = _training_flops_per_image(lambda: FLOW_LOSSES[objective](model, images), len(images))
    return flops, sum(parameter.numel() for parameter in model.parameters())


def _kernel_kind(name):
    """matmul/conv, attention or other, by a kernel's (CUDA) or an operator's (CPU) name."""
    name = name.lower()
    if any(word in name for word in ("flash", "fmha", "attention")):
        return "attention"
    if name.startswith("triton_"):  # inductor's kernels: templates (matmul, conv) or fused elementwise/reductions
        return "matmul/conv" if name.startswith("triton_tem") else "other"
    if any(word in name for word in ("gemm", "conv", "xmma", "cutlass", "nvjet", "cudnn", "aten::mm", "aten::addmm",
                                     "aten::bmm")):
        return "matmul/conv"
    return "other"


def gpu_profile_rows(sizes, steps=5):
    """Where a training step's time goes: torch.profiler over `steps` steps of train_flow's loop in bf16 +
    channels_last, eager and compiled, after warm-up steps; prints each profile's busiest kernels (operators on
    the CPU) and yields a row with the shares of matmul and convolution kernels, attention and the rest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    model_config, training, images_uint8 = _recipe_training(sizes)
    device, batch_size = torch.device(sizes["device"]), training["batch_size"]
    on_cuda = device.type == "cuda"
    # kernels on CUDA (an operator's device time repeats its kernels'), operators' own time on the CPU
    timed_kind, time_key = (DeviceType.CUDA, "self_device_time_total") if on_cuda else (DeviceType.CPU,
                                                                                        "self_cpu_time_total")
    warm_up = wbflow.DeviceImageLoader(images_uint8[:batch_size * 2 * steps], batch_size, device=device,
                                       channels_last=True)
    profiled = wbflow.DeviceImageLoader(images_uint8[:batch_size * steps], batch_size, device=device,
                                        channels_last=True)
    for name, backend in (("eager", None), (f"compiled ({sizes['compile_backend']})", sizes["compile_backend"])):
        train = _flow_recipe(model_config, training, device=device, channels_last=True, compile_backend=backend,
                             image_size=sizes["image_size"])
        train(warm_up, True)
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_cuda) as profiler:
            train(profiled, True)
        print(f"--gpu profile, {name}: the busiest {'kernels' if on_cuda else 'operators'}\n"
              + profiler.key_averages().table(sort_by=time_key, row_limit=15), flush=True)
        shares = {"matmul/conv": 0.0, "attention": 0.0, "other": 0.0}
        for event in profiler.events():
            if event.device_type == timed_kind:
                shares[_kernel_kind(event.name)] += getattr(event, time_key)
        total = sum(shares.values())
        yield _row("profile", f"train_flow step, bf16 + channels_last {name}",
                   f"{total / 1000 / steps:.1f} ms {'device' if on_cuda else 'CPU'} time/step",
                   settings=", ".join(f"{kind} {100 * part / total:.0f}%" for kind, part in shares.items())
                   + f" (by kernel name; {steps} steps after {2 * steps}, batch {batch_size})")


def gpu_euler_rows(sizes):
    """Seconds for `samples` Euler samples of the recipe's FlowUNet (channels_last on CUDA, as train_flow's EMA
    model), in batches of eval.sample_batch_size, to uint8 on the CPU as train_flow's sample_images does; then
    the same with classifier-free guidance (a 10-class FlowUNet, guided_velocity at scale 2: 2N rows a forward)."""
    device = torch.device(sizes["device"])
    torch.manual_seed(0)
    unet = sizes["unet"] or _recipe()["model"]
    model, conditional = (_sampling_model(wbflow.FlowUNet(**unet, image_size=sizes["image_size"], num_classes=classes),
                                          device) for classes in (None, 10))
    generator, shape = torch.Generator(device).manual_seed(0), (3, sizes["image_size"], sizes["image_size"])
    noise = [torch.randn(min(sizes["sample_batch"], sizes["samples"] - start), *shape, device=device,
                         generator=generator) for start in range(0, sizes["samples"], sizes["sample_batch"])]
    bf16, guided = wbflow.autocast_dtype(device, True), wbflow.guided_velocity(conditional, torch.arange(10), 2.0)
    runs = {"bf16": (model, bf16, ""), "float32": (model, None, ", TF32 convolutions (PyTorch's CUDA default)"),
            "guidance 2, bf16": (guided, bf16, ", 10 classes, guided_velocity: one forward of 2 x batch a step")}
    seconds, what = {}, f"{sizes['samples']:,} Euler-{sizes['euler_steps']} samples"
    for name, (velocity, amp_dtype, note) in runs.items():
        wbflow.euler_sample(velocity, noise[0], 1, amp_dtype=amp_dtype)  # warm-up
        _synchronize(device)
        started = time.perf_counter()
        for batch in noise:
            samples = wbflow.euler_sample(velocity, batch, sizes["euler_steps"], amp_dtype=amp_dtype)
            wbflow.images_to_uint8(samples).cpu()
        seconds[name] = time.perf_counter() - started
        yield _row("sampling", f"{what}, {name}",
                   f"{_seconds(seconds[name])} ({_rate(sizes['samples'] / seconds[name], 'samples/s')})",
                   reference="" if name == "bf16" else f"{seconds[name] / seconds['bf16']:.2f}x bf16's time",
                   settings=f"batch {sizes['sample_batch']}, the recipe's FlowUNet, to uint8 on the CPU{note}")


def _sampling_model(model, device):
    """`model` with non-zero output layers (so the field is not trivially zero), in eval mode on `device`
    (channels_last on CUDA, as train_flow's EMA model)."""
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model = model.to(device)
    return (model.to(memory_format=torch.channels_last) if device.type == "cuda" else model).eval()


def gpu_inception_rows(sizes, weights_path=None):
    """Inception features (TF32 off in both) of the same uint8 32x32 images: wbflow against torch-fidelity
    0.4.0's inception-v3-compat extractor with the same weights; images/s and the largest feature difference."""
    import torch_fidelity.feature_extractor_inceptionv3 as extractor_module
    device = torch.device(sizes["device"])
    with tempfile.TemporaryDirectory() as directory:
        weights_path = weights_path or _calibrated_weights_file(directory)
        inception = wbflow.load_fid_inception(weights_path, device)
        extractor = extractor_module.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path).to(device).eval()
    images_uint8 = torch.randint(0, 256, (sizes["inception_images"], 3, 32, 32), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(0)).to(device)
    batch_size = sizes["inception_batch"]

    def torch_fidelity_features(images):
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return torch.cat([extractor(batch)[0] for batch in images.split(batch_size)]).cpu()

    extractors = {"wbflow": lambda images: wbflow.inception_features(images, inception, batch_size=batch_size)[0],
                  "torch-fidelity": torch_fidelity_features}
    seconds, features = {}, {}
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, extract in extractors.items():
            extract(images_uint8[:batch_size])  # warm-up
            _synchronize(device)
            started = time.perf_counter()
            features[name] = extract(images_uint8)
            seconds[name] = time.perf_counter() - started
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    difference = (features["wbflow"] - features["torch-fidelity"]).abs().max().item()
    count = sizes["inception_images"]
    settings = f"{count:,} uint8 32x32 images to 299, batch {batch_size}, float32 without TF32, features to the CPU"
    yield _row("FID features", "wbflow.inception_features", _rate(count / seconds["wbflow"]),
               reference=f"{seconds['torch-fidelity'] / seconds['wbflow']:.2f}x torch-fidelity",
               settings=f"max feature difference {difference:.1e} (limit 1e-4); {settings}")
    yield _row("FID features", "torch-fidelity 0.4.0 inception-v3-compat", _rate(count / seconds["torch-fidelity"]),
               reference="1.00x torch-fidelity", settings=settings)


def _write_jpeg_folder(root, count, size, classes=5):
    """`count` JPEGs (quality 90) of `size` (width, height) in `classes` class folders: smooth colour shapes
    with pixel noise, so they decode like photos rather than flat colour."""
    from PIL import Image
    small = wbflow.synthetic_images(count, size=32).float()

    def write(index):
        image = F.interpolate(small[index:index + 1], size=size[::-1], mode="bilinear")[0]
        image = image + 12 * torch.randn(image.shape, generator=torch.Generator().manual_seed(index))
        folder = Path(root) / f"class_{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(folder / f"{index}.jpg", quality=90)

    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(write, range(count)))


# docs/competition.md's recipe: --augment trivialaugment --random-erase 0.25 --mixup 0.2 --cutmix 1.0 --ema-decay 0.999
FIRE_RECIPE = {"augment": "trivialaugment", "random_erase": 0.25, "mixup": 0.2, "cutmix": 1.0, "ema_decay": 0.999}


def _fire_loader(train_samples, image_size, sizes, workers, recipe=None):
    """train_fire.py's training loader (ImageSamples, its augmentation, classifier_loaders) at `image_size`;
    with `recipe` (FIRE_RECIPE), its augmentation policy, random erasing and MixUp / CutMix too."""
    recipe = recipe or {}
    train_set = wbflow.ImageSamples(train_samples, wbflow.image_transforms(
        image_size, train=True, augment=recipe.get("augment", "none"), random_erase=recipe.get("random_erase", 0.0)))
    mix = wbflow.mix_batches(5, mixup=recipe.get("mixup", 0.0), cutmix=recipe.get("cutmix", 0.0))
    return wbflow.classifier_loaders(train_set, train_set, sizes["fire_batch"], num_workers=workers,
                                     device=sizes["device"], seed=0, batch_transform=mix)[0]


def _fire_trainer(sizes, steps, ema_decay=0.0):
    """train(batches, epoch) -> train_epoch's stats, with train_fire.py's model, Adam, cosine schedule over
    `steps`, AMP, clipping and logging interval (and its EMA of the weights, with `ema_decay`)."""
    device = torch.device(sizes["device"])
    torch.manual_seed(0)
    model = wbflow.build_classifier(sizes["classifier"], 5, "none").to(device)
    optimizer = wbflow.build_optimizer("adam", model.parameters(), 0.003, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    scaler, loss_fn = wbflow.make_scaler(device), wbflow.classification_loss(nn.CrossEntropyLoss())
    ema_model = wbflow.make_ema(model, ema_decay) if ema_decay else None

    def train(batches, epoch):
        return wbflow.train_epoch(model, batches, optimizer, loss_fn, device=device, scheduler=scheduler,
                                  grad_clip=1.0, amp_dtype=wbflow.autocast_dtype(device), scaler=scaler, epoch=epoch,
                                  ema_model=ema_model,
                                  log_every=10, progress=False)
    return train


def _loader_rate(train_loader, epoch):
    """images/s of one epoch of the loader alone (decode, crop, flip, normalise; pinned memory on CUDA)."""
    train_loader.sampler.set_epoch(epoch)
    started, images = time.perf_counter(), 0
    for batch_images, _ in train_loader:
        images += len(batch_images)
    return images / (time.perf_counter() - started)


def _fire_rates(train_samples, image_size, sizes):
    """images/s of train_fire's training epoch, of its loader alone (its workers, and one per core), and of the
    GPU alone (one pre-decoded batch on the device, repeated), each after a warm-up epoch."""
    train_loader = _fire_loader(train_samples, image_size, sizes, sizes["workers"])
    train = _fire_trainer(sizes, steps=4 * len(train_loader) + sizes["warm_up_batches"])
    for epoch in range(2):  # the first: workers start, cuDNN and the allocator warm up
        train_loader.sampler.set_epoch(epoch)
        stats = train(train_loader, epoch)
    rates = {"training": stats["samples"] / stats["seconds"], "loader": _loader_rate(train_loader, 2)}
    batch = [tensor.to(sizes["device"]) for tensor in next(iter(train_loader))]
    train([batch] * sizes["warm_up_batches"], 3)
    stats = train([batch] * len(train_loader), 4)
    rates["gpu"] = stats["samples"] / stats["seconds"]
    every_core_loader = _fire_loader(train_samples, image_size, sizes, sizes["all_workers"])
    _loader_rate(every_core_loader, 0)  # its workers start
    rates["every_core_loader"] = _loader_rate(every_core_loader, 1)
    return rates


def _fire_recipe_rate(train_samples, image_size, sizes):
    """images/s of train_fire's training epoch with FIRE_RECIPE (after a warm-up epoch)."""
    train_loader = _fire_loader(train_samples, image_size, sizes, sizes["workers"], recipe=FIRE_RECIPE)
    train = _fire_trainer(sizes, steps=2 * len(train_loader), ema_decay=FIRE_RECIPE["ema_decay"])
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)
        stats = train(train_loader, epoch)
    return stats["samples"] / stats["seconds"]


def gpu_fire_rows(sizes):
    """train_fire.py --model resnet50 training images/s at each size from a JPEG folder, and where the time goes."""
    device = torch.device(sizes["device"])
    name = f"train_fire {sizes['classifier']}"
    with tempfile.TemporaryDirectory() as data_dir:
        _write_jpeg_folder(data_dir, sizes["jpegs"], sizes["jpeg_size"])
        train_samples, _, _ = wbflow.find_image_samples(data_dir, val_split=0.2, seed=0)
        rates_by_size = {}
        for image_size in sizes["fire_sizes"]:
            rates = _fire_rates(train_samples, image_size, sizes)
            rates_by_size[image_size] = rates["training"]
            bound = "decode-bound" if rates["training"] < 0.8 * rates["gpu"] else "GPU-bound"
            settings = (f"{len(train_samples):,} training JPEGs of {sizes['jpeg_size'][0]}x{sizes['jpeg_size'][1]}, "
                        f"batch {sizes['fire_batch']}, {wbflow.autocast_dtype(device) or 'float32'}, Adam, clip 1.0")
            yield from [
                _row(name, f"{image_size} px: training, {_workers(sizes['workers'])}", _rate(rates["training"]),
                     reference=f"{bound}: {rates['training'] / rates['gpu']:.2f}x the GPU alone", settings=settings),
                _row(name, f"{image_size} px: loader alone, {_workers(sizes['workers'])}", _rate(rates["loader"]),
                     settings="decode, random resized crop, flip, normalise"),
                _row(name, f"{image_size} px: loader alone, {_workers(sizes['all_workers'])}",
                     _rate(rates["every_core_loader"]), settings="one worker per core"),
                _row(name, f"{image_size} px: GPU alone", _rate(rates["gpu"]),
                     settings="train_epoch on one pre-decoded batch on the device, repeated")]
        image_size = sizes["fire_sizes"][0]
        recipe_rate = _fire_recipe_rate(train_samples, image_size, sizes)
        yield _row(name, f"{image_size} px: training with the competition recipe, {_workers(sizes['workers'])}",
                   _rate(recipe_rate), reference=f"{recipe_rate / rates_by_size[image_size]:.2f}x plain training",
                   settings=", ".join(f"{key} {value}" for key, value in FIRE_RECIPE.items()))


def format_gpu_table(rows, peak_flops):
    """The --gpu rows as a markdown table, headed by the device, torch, the date and the peak behind MFU."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: toy sizes)"
    peak = f"{peak_flops / 1e12:.1f} TFLOP/s (dense bf16)" if peak_flops else "no known peak: n/a"
    lines = [f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; MFU against {peak}", "",
             "| section | measurement | result | MFU | vs reference | settings |", "|---|---|---|---|---|---|"]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        lines.append(f"| {row['section']} | {row['measurement']} | {row['result']} | {mfu} | {row['reference']} | "
                     f"{row['settings']} |")
    return "\n".join(lines)


def bench_gpu(sections=GPU_SECTIONS, *, dry_run=False, results=None, peak_tflops=None, weights_path=None):
    """Run the --gpu sections; append each row to `results` (JSON lines) as it is measured, when given; print the
    table of every row there (or of this run's) and return this run's rows.

    Usage: rows = bench_gpu(dry_run=True)  # or python bench_wbflow.py --gpu [SECTION ...] [--results FILE]
    """
    sizes = gpu_sizes(dry_run)
    peak_flops = bf16_peak_flops(sizes["device"], peak_tflops)
    measure = {"train": lambda: gpu_train_rows(sizes, peak_flops), "profile": lambda: gpu_profile_rows(sizes),
               "inception": lambda: gpu_inception_rows(sizes, weights_path), "fire": lambda: gpu_fire_rows(sizes),
               "euler": lambda: gpu_euler_rows(sizes)}
    rows = []
    for section in sections:
        started = time.perf_counter()
        for row in measure[section]():  # each row kept as soon as it is measured: a time limit loses only the rest
            rows.append(row)
            if results:
                with open(results, "a") as file:
                    file.write(json.dumps(row) + "\n")
        print(f"--gpu {section}: {time.perf_counter() - started:.1f} s", flush=True)
    every_row = [json.loads(line) for line in Path(results).read_text().splitlines()] if results else rows
    print(format_gpu_table(every_row, peak_flops), flush=True)
    return rows

BENCHMARKS = {"train": lambda args: bench_train_epoch(),
              "fid": lambda args: bench_fid(),
              "flow": lambda args: bench_flow(args.data_dir, args.batch_size, args.steps, args.device),
              "fewer": lambda args: bench_fewer_steps(),
              "conditional": lambda args: bench_conditional(),
              "competition": lambda args: bench_competition()}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", help=f"any of {', '.join(BENCHMARKS)}; with --gpu any of "
                                                 f"{', '.join(GPU_SECTIONS)} (default: all)")
    parser.add_argument("--data-dir", help="flow: folder holding cifar-10-batches-py (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=128, help="flow: loader batch size")
    parser.add_argument("--steps", type=int, default=20, help="flow: Euler steps")
    parser.add_argument("--device", default="cpu", help="flow: device for the Euler benchmark")
    parser.add_argument("--gpu", action="store_true", help="the GPU sections (CUDA), side by side on one GPU")
    parser.add_argument("--dry-run", action="store_true", help="--gpu at toy sizes on the CPU, the same table")
    parser.add_argument("--results", help="--gpu: append the rows to this JSON-lines file and print all of its rows")
    parser.add_argument("--peak-tflops", type=float, help="--gpu: the dense bf16 peak for MFU (default: known "
                                                          "for H100 and H200)")
    arguments = parser.parse_args()
    choices = GPU_SECTIONS if arguments.gpu else tuple(BENCHMARKS)
    unknown = set(arguments.which) - set(choices)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(choices)}")
    if arguments.dry_run and not arguments.gpu:
        parser.error("--dry-run goes with --gpu")
    if arguments.gpu and not arguments.dry_run and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA; --gpu --dry-run runs every section at toy sizes on the CPU")
    if arguments.gpu:
        bench_gpu(arguments.which or GPU_SECTIONS, dry_run=arguments.dry_run, results=arguments.results,
                  peak_tflops=arguments.peak_tflops)
    else:
        for name in arguments.which or BENCHMARKS:
            BENCHMARKS[name](arguments)

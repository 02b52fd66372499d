"""Benchmarks for wbflow: every ratio is measured side by side in one run, on this machine.

    python bench_wbflow.py            # all of them (CPU; about 5 minutes on 2 cores)
    python bench_wbflow.py train      # train_epoch vs a bare loop, W&B offline logging every 10 steps
    python bench_wbflow.py fid        # Fréchet distance vs pytorch-fid / torchmetrics; Inception features
    python bench_wbflow.py flow       # DeviceImageLoader vs torchvision; euler_sample vs steps x forward
    python bench_wbflow.py flow --data-dir data --device cuda

The fid benchmark needs the test-only peers (pip install -r requirements-test.txt).
"""
import argparse
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
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
    from test_wbflow import _calibrated_fid_inception
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

BENCHMARKS = {"train": lambda args: bench_train_epoch(),
              "fid": lambda args: bench_fid(),
              "flow": lambda args: bench_flow(args.data_dir, args.batch_size, args.steps, args.device)}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--data-dir", help="flow: folder holding cifar-10-batches-py (default: synthetic)")
    parser.add_argument("--batch-size", type=int, default=128, help="flow: loader batch size")
    parser.add_argument("--steps", type=int, default=20, help="flow: Euler steps")
    parser.add_argument("--device", default="cpu", help="flow: device for the Euler benchmark")
    arguments = parser.parse_args()
    unknown = set(arguments.which) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    for name in arguments.which or BENCHMARKS:
        BENCHMARKS[name](arguments)

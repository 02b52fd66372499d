"""Benchmarks for wbflow: ratios measured side by side in one run.

    python bench_wbflow.py train    # train_epoch vs a bare loop, W&B offline logging every 10 steps

Each comparison alternates the contenders over several rounds and reports the median time of each.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn

import wbflow


def _median_seconds(contenders, rounds):
    """Run each contender once per round, alternating, and return the median seconds of each."""
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run_once in contenders.items():
            started = time.perf_counter()
            run_once()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


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
                stats = wbflow.train_epoch(model, batches, optimizer, loss_fn, run=run, step=state["step"],
                                           log_every=10, progress=False)
                state["step"] = stats["step"]

            bare_loop()  # warm-up
            seconds = _median_seconds({"bare loop": bare_loop, "train_epoch": with_train_epoch}, rounds)
    ratio = seconds["train_epoch"] / seconds["bare loop"]
    print(f"train_epoch vs bare loop ({steps} steps, batch {batch_size}, small CNN, CPU, "
          f"{torch.get_num_threads()} threads, median of {rounds}): bare {seconds['bare loop']:.3f}s, "
          f"train_epoch {seconds['train_epoch']:.3f}s, ratio {ratio:.3f} (target <= 1.05)")
    return ratio


BENCHMARKS = {"train": bench_train_epoch}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="*", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    for name in parser.parse_args().which:
        BENCHMARKS[name]()

"""Train the fire-safety image classifier (高风险 中风险 低风险 无风险 非楼道) and track it in W&B.

    python train_fire.py --data-dir data --model resnet50                        # one GPU, or CPU
    torchrun --standalone --nproc_per_node=4 train_fire.py --data-dir data       # DDP on 4 GPUs
    python train_fire.py --data-dir data --resume checkpoints/last.pth           # continue a killed run
    wandb sweep sweep.yaml                                                        # then: wandb agent <id>

Data: DATA/train/<class>/* and DATA/val/<class>/*; or DATA/<class>/* split by a seeded stratified
--val-split; or a CSV of path,label. Class names come from the folders (or --class-names).
W&B, with the seed's names: every 10 batches epoch, batch, train_loss, train_acc, learning_rate;
every epoch train_loss, train_acc, val_loss, val_acc on the epoch axis, and best_val_acc when it
improves; the best model (on val_acc) in OUT/best_model.pth, uploaded as a model artifact with
aliases best and latest; after training, with the best model: a predictions table, a confusion
matrix and per-class precision and recall. OUT/last.pth is written every epoch for --resume.
The learning rate follows a cosine from --learning-rate to 0, stepped every optimiser step.
--batch-size is per process. Every flag also takes the underscore form the sweep agent writes
(--batch_size=32, --watch=False).
"""
import argparse
import functools
import shlex
import signal
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import wbflow

LOSS_NAMES = {"ce": "CrossEntropyLoss", "focal": "FocalLoss"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = functools.partial(wbflow.add_sweep_argument, parser)
    add("--data-dir", default="data", help="image folders or a path,label CSV (default: %(default)s)")
    add("--class-names", type=lambda text: text.split(","), help="comma-separated, in label order")
    add("--val-split", type=float, default=0.2, help="val fraction when there is no val/ folder")
    add("--model", choices=wbflow.CLASSIFIER_NAMES, default="resnet50")
    add("--weights", choices=("imagenet", "none"), default="imagenet")
    add("--loss", choices=tuple(LOSS_NAMES), default="ce")
    add("--focal-gamma", type=float, default=2.0)
    add("--class-weights", choices=("none", "balanced"), default="none",
        help="balanced: CE weights / focal alpha of n / (classes * count)")
    add("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    add("--learning-rate", type=float, default=0.003)
    add("--weight-decay", type=float, default=0.0)
    add("--epochs", type=int, default=10)
    add("--batch-size", type=int, default=32)
    add("--image-size", type=int, default=256)
    add("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    add("--amp", type=wbflow.str2bool, default=None, help="default: on for CUDA only")
    add("--num-workers", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--out-dir", default="checkpoints")
    add("--resume", help="OUT/last.pth of the run to continue (pass the same flags)")
    add("--num-predictions", type=int, default=32, help="validation images in the predictions table")
    add("--watch", type=wbflow.str2bool, default=False, help='wandb.watch(model, log="all", log_freq=100)')
    add("--no-wandb", type=wbflow.str2bool, default=False)
    add("--project", default="tianchi-fire-safety")
    add("--run-name")
    return parser.parse_args(argv)


def resume_command(argv, checkpoint, world_size):
    """The command line that continues this run from `checkpoint`: the same flags, --resume replaced."""
    flags, skip = [], False
    for flag in argv:
        if not skip and not flag.startswith("--resume="):
            skip = flag == "--resume"
            flags += [] if skip else [flag]
        else:
            skip = False
    launcher = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
    return shlex.join([*launcher.split(), Path(__file__).name, *flags, "--resume", str(checkpoint)])


def rng_states(world_size):
    """Every rank's RNG states, gathered for rank 0's checkpoint, so each rank resumes its own."""
    if world_size == 1:
        return [wbflow.capture_rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, wbflow.capture_rng_state())
    return states


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    rank, world_size, device = wbflow.setup_distributed()
    master = rank == 0  # the only process that prints, logs to W&B and writes checkpoints
    if not master:
        warnings.simplefilter("ignore")
    torch.manual_seed(args.seed + rank)  # each rank its own randomness
    out_dir = Path(args.out_dir)

    # data and model; a bad data folder or unavailable weights ends with the message, no traceback
    try:
        train_samples, val_samples, class_names = wbflow.find_image_samples(
            args.data_dir, class_names=args.class_names, val_split=args.val_split, seed=args.seed)
        model = wbflow.build_classifier(args.model, len(class_names), args.weights).to(device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"train_fire: {error}") from None
    train_set = wbflow.ImageSamples(train_samples, wbflow.image_transforms(args.image_size, train=True))
    val_set = wbflow.ImageSamples(val_samples, wbflow.image_transforms(args.image_size, train=False))
    train_loader, val_loader = wbflow.classifier_loaders(
        train_set, val_set, args.batch_size, num_workers=args.num_workers, device=device, seed=args.seed,
        rank=rank, world_size=world_size)
    if master:
        print(f"{len(train_set)} training and {len(val_set)} validation images, classes: {' '.join(class_names)}")

    # loss, optimiser, cosine schedule over every optimiser step, AMP scaler
    class_weights = (wbflow.class_balanced_weights(train_set.labels, len(class_names)).to(device)
                     if args.class_weights == "balanced" else None)
    criterion = (nn.CrossEntropyLoss(weight=class_weights) if args.loss == "ce"
                 else functools.partial(wbflow.focal_loss, gamma=args.focal_gamma, alpha=class_weights))
    loss_fn = wbflow.classification_loss(criterion)
    device_ids = [device.index] if device.type == "cuda" else None
    train_model = nn.parallel.DistributedDataParallel(model, device_ids) if world_size > 1 else model
    optimizer = wbflow.build_optimizer(args.optimizer, model.parameters(), args.learning_rate,
                                          weight_decay=args.weight_decay, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))
    scaler = wbflow.make_scaler(device, args.amp)

    start_epoch, step, best_acc, run_id, skipped_steps, epoch_state, resumed_from = 0, 0, None, None, 0, None, None
    if args.resume:
        state = wbflow.load_checkpoint(args.resume, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without fp16 (bf16 or CPU)
            scaler.load_state_dict(state["scaler"])
        step, best_acc, skipped_steps = state["step"], state["best_val_acc"], state["skipped_steps"]
        epoch_state = state["train_state"]
        start_epoch = state["epoch"] + (epoch_state is None)  # a stopped epoch is finished first
        wbflow.restore_rng_state(state["rng"][rank])
        if state["wandb_last_act"]:  # written when the run stopped: the run has nothing after it
            run_id = state["wandb_run_id"]
        else:  # an epoch checkpoint: the run may have logged past it, and W&B would drop those steps
            resumed_from = {"run_id": state["wandb_run_id"], "step": step, "checkpoint": str(args.resume)}
        if master:
            print(f"resuming epoch {start_epoch} at batch {epoch_state['batches'] if epoch_state else 0}, step {step} "
                  f"(best val_acc {best_acc}) from {args.resume}; W&B: "
                  + (f"continuing run {run_id}" if run_id else
                     f"a new run (config resumed_from: run {resumed_from['run_id']}, step {step}), since "
                     f"run {resumed_from['run_id']} may have logged past this checkpoint"))

    config = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate, "optimizer": type(optimizer).__name__,
              "loss_function": LOSS_NAMES[args.loss], "scheduler": "CosineAnnealingLR",
              "image_size": args.image_size, "classes": class_names, "weights": args.weights,
              "focal_gamma": args.focal_gamma, "class_weights": args.class_weights,
              "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
              "world_size": world_size, "train_images": len(train_set), "val_images": len(val_set)}

    def checkpoint(epoch, train_state=None, last_act=False):
        """Everything a resume needs; train_state is a stopped epoch's, last_act marks the run's final write."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "best_val_acc": best_acc,
                "skipped_steps": skipped_steps, "rng": rng_states(world_size), "train_state": train_state,
                "wandb_run_id": run_id, "wandb_last_act": last_act, "config": config}

    run_config = config if resumed_from is None else {**config, "resumed_from": resumed_from}
    with wbflow.stop_on_signals() as stop, wbflow.wandb_run(
            run_config, project=args.project, enabled=not args.no_wandb, run_id=run_id, name=args.run_name) as run:
        wbflow.define_epoch_metrics(run, ["train_loss", "train_acc", "val_loss", "val_acc", "best_val_acc"],
                                    epoch_key="epoch")
        if run is not None:
            run_id = run.id
            if args.watch:
                wbflow.watch_model(run, model, log="all", log_freq=100)

        def log_window(step, window):
            nonlocal skipped_steps
            skipped_steps += window["skipped"]
            if run is not None:
                run.log({"epoch": window["epoch"], "batch": window["batch"], "train_loss": window["loss"],
                         "train_acc": window["accuracy"], "learning_rate": window["learning_rate"]}, step=step)

        for epoch in range(start_epoch, args.epochs):
            train_loader.sampler.set_epoch(epoch, skip_batches=epoch_state["batches"] if epoch_state else 0)
            train = wbflow.train_epoch(train_model, train_loader, optimizer, loss_fn, device=device,
                                       scheduler=scheduler, grad_clip=args.grad_clip or None, amp=args.amp,
                                       scaler=scaler, step=step, epoch=epoch, log_every=10, on_log=log_window,
                                       stop=stop, resume=epoch_state, progress=master)
            step, epoch_state = train["step"], None
            if train["stopped"]:  # SIGTERM or Ctrl-C: save where this epoch stands, and say how to go on
                state = checkpoint(epoch, train_state=train["state"], last_act=True)
                if master:
                    path = wbflow.save_checkpoint(state, out_dir / "last.pth")
                    print(f"stopped at step {step} (epoch {epoch}); continue with:\n  "
                          f"{resume_command(argv, path, world_size)}", flush=True)
                raise SystemExit(128 + (stop.signal or signal.SIGTERM))
            # the unwrapped model: DDP's forward would sync buffers, and val shards differ in length
            val = wbflow.validate(model, val_loader, loss_fn, device=device, amp=args.amp)
            best_state = {"model": model.state_dict(), "epoch": epoch, "val_acc": val["accuracy"],
                          "class_names": class_names, "config": config}
            best_acc, improved = wbflow.save_best(best_state, val["accuracy"], best_acc, out_dir / "best_model.pth",
                                                  run=run, metadata={"epoch": epoch, "config": config})
            epoch_metrics = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["accuracy"],
                             "val_loss": val["loss"], "val_acc": val["accuracy"]}
            if improved:
                epoch_metrics["best_val_acc"] = best_acc
            wbflow.log_metrics(run, epoch_metrics, step=step)
            state = checkpoint(epoch)  # every rank takes part in gathering the RNG states
            if master:
                wbflow.save_checkpoint(state, out_dir / "last.pth")
                print(f"Epoch: {epoch} | Train Loss: {train['loss']:.4f} | Train Acc: {train['accuracy']:.2f}% | "
                      f"Val Loss: {val['loss']:.4f} | Val Acc: {val['accuracy']:.2f}%"
                      + (f" | best, saved to {out_dir / 'best_model.pth'}" if improved else ""))

        state = checkpoint(args.epochs - 1, last_act=True)  # only the report follows: a resume may continue the run
        if master and start_epoch < args.epochs:
            wbflow.save_checkpoint(state, out_dir / "last.pth")
        # the final report uses the best model on the whole validation set, once, on rank 0
        if master and (out_dir / "best_model.pth").is_file():
            model.load_state_dict(wbflow.load_checkpoint(out_dir / "best_model.pth", map_location=device)["model"])
            probs, labels = wbflow.predict_dataset(model, val_set, device=device, batch_size=args.batch_size)
            display_set = wbflow.ImageSamples(
                val_samples, wbflow.image_transforms(args.image_size, train=False, normalize=False))
            report = wbflow.log_classification_report(run, probs, labels, class_names, images=display_set,
                                                         table_rows=args.num_predictions, step=step + 1)
            for name, precision, recall in zip(class_names, report["precision"], report["recall"]):
                print(f"{name}: precision {precision:.3f} recall {recall:.3f}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return best_acc


if __name__ == "__main__":
    main()

"""Train the fire-safety image classifier (高风险 中风险 低风险 无风险 非楼道) and track it in W&B.

    python train_fire.py --data-dir data/fire --model resnet50                   # one GPU, or CPU
    torchrun --standalone --nproc_per_node=4 train_fire.py --data-dir data/fire  # DDP on 4 GPUs
    python train_fire.py --data-dir data/fire --resume runs/fire/last.pth        # continue a killed run
    wandb sweep sweep.yaml                                                        # then: wandb agent <id>
    python train_fire.py --predict data/fire/A.txt --checkpoint runs/fire/best_model.pth   # the submission file
    python train_fire.py --smoke       # generated data, train, predict, submission: CPU, offline, under a minute

Data: DATA/train/<class>/* and DATA/val/<class>/*; DATA/<class>/* split by a seeded stratified --val-split; a list
of name<TAB>label or path,label lines; the competition's download (DATA/train.txt, DATA/train/*). W&B keys follow
the seed (main defines them, train_epochs logs them, the README lists them). Each improvement of --best-metric saves
OUT/best_model.pth, a new version of a model artifact (aliases best, latest); after training, the best model's
predictions table, confusion matrix, per-class precision and recall. OUT/last.pth, written every epoch, is what
--resume continues; a resume refuses a change of any setting that shapes the run (RESUME_SAME). The cosine schedule
steps with every optimiser step; --batch-size is per process; flags also take the sweep agent's --batch_size=32.
"""
import argparse
import dataclasses
import functools
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import wbflow

LOSS_NAMES = {"ce": "CrossEntropyLoss", "focal": "FocalLoss"}
# what --resume needs in a checkpoint (last.pth holds them; best_model.pth does not)
RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "scaler", "epoch", "best", "skipped_steps", "rng",
               "train_state", "wandb_run_id", "wandb_last_act", "config")
# the config a resume must share with its checkpoint: a resumed run is the same run, so the schedule (laid
# out over epochs * steps_per_epoch), the data split and order, and the W&B config must not change under it
RESUME_SAME = ("model", "classes", "image_size", "epochs", "world_size", "batch_size", "learning_rate",
               "optimizer", "weight_decay", "grad_clip", "loss", "focal_gamma", "class_weights", "weights", "seed",
               "val_split", "train_images", "val_images", "sampler", "label_smoothing", "best_metric")
OUT_FILES = ("best_model.pth", "last.pth")  # what this driver writes into --out-dir
SMOKE_DEFAULTS = {"out_dir": "runs/fire-smoke", "data_dir": None, "model": "resnet18", "weights": "none", "epochs": 2,
                  "image_size": 32, "batch_size": 8, "learning_rate": 0.001, "num_workers": 0, "num_predictions": 16}
SMOKE_CLASS_COUNTS = {"高风险": 8, "中风险": 12, "低风险": 16, "无风险": 32, "非楼道": 12}  # imbalanced, as the download


def default_num_workers():
    """4 loader workers per process, but never more than this process's share of the cores it may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def default_out_dir():
    """runs/fire; runs/fire/<run id> under a sweep agent, whose runs all get the same flags."""
    sweep_run_id = os.environ.get("WANDB_RUN_ID") if "WANDB_SWEEP_ID" in os.environ else None
    return f"runs/fire/{sweep_run_id}" if sweep_run_id else "runs/fire"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: VALUE)" to each flag's help, except where the default is None (its help says what)."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add = functools.partial(wbflow.add_sweep_argument, parser)
    add("--data-dir", default="data/fire", help="image folders, a name<TAB>label / path,label list, train.txt's folder")
    add("--class-names", type=lambda text: text.split(","),
        help="comma-separated, in label order (default: the sorted folder names / labels)")
    add("--val-split", type=float, default=0.2, help="val fraction when there is no val/ folder")
    add("--model", choices=wbflow.CLASSIFIER_NAMES, default="resnet50", help="architecture")
    add("--weights", choices=("imagenet", "none"), default="imagenet", help="initial weights")
    add("--loss", choices=tuple(LOSS_NAMES), default="ce", help="cross-entropy or focal loss")
    add("--focal-gamma", type=float, default=2.0, help="focusing parameter of --loss focal")
    add("--class-weights", choices=("none", "balanced"), default="none", help="balanced: n / (classes * count)")
    add("--label-smoothing", type=float, default=0.0, help="label smoothing of --loss ce, in [0, 1)")
    add("--sampler", choices=("shuffle", "balanced"), default="shuffle", help="balanced: each class equally often")
    add("--best-metric", choices=("val_acc", "val_macro_f1"), default="val_acc", help="what best_model.pth follows")
    add("--optimizer", choices=("adam", "adamw", "sgd"), default="adam", help="sgd: Nesterov momentum 0.9")
    add("--learning-rate", type=float, default=0.003, help="peak of the cosine schedule")
    add("--weight-decay", type=float, default=0.0, help="optimiser weight decay")
    add("--epochs", type=int, default=10, help="the cosine schedule's length; --resume needs the run's own")
    add("--batch-size", type=int, default=32, help="images per process and optimiser step")
    add("--image-size", type=int, default=256, help="side of the square crop the model sees")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    add("--amp", type=wbflow.str2bool, default=None, help="mixed precision (default: on for CUDA only)")
    add("--num-workers", type=int, default=default_num_workers(), help="loader processes: at most 4, a core share")
    add("--seed", type=int, default=0, help="seeds the split, the data order and the initial weights")
    add("--out-dir", default=default_out_dir(), help="best_model.pth and last.pth (runs/fire/RUN_ID under a sweep "
                                                     "agent); a new run refuses one with an earlier run's checkpoints")
    add("--overwrite", type=wbflow.str2bool, default=False, help="delete an earlier run's checkpoints in --out-dir")
    add("--resume", help="OUT/last.pth of the run to continue, with the same flags (default: a new run)")
    add("--num-predictions", type=int, default=32, help="images in the predictions table (validation, or --predict)")
    add("--watch", type=wbflow.str2bool, default=False, help='wandb.watch(model, log="all", log_freq=100)')
    add("--log-graph", type=wbflow.str2bool, default=False, help="model_graph (torchviz + Graphviz), else W&B's graph")
    add("--no-wandb", type=wbflow.str2bool, default=False, help="train without W&B")
    add("--project", default="tianchi-fire-safety", help="W&B project")
    add("--run-name", help="W&B run name (default: W&B picks one)")
    add("--predict", help="a list (A.txt) or folder of images to write the submission for (default: train)")
    add("--checkpoint", help="--predict's model file or W&B model artifact (default: OUT/best_model.pth)")
    add("--submission", help="--predict's file or folder, and predictions.csv (default: submission.txt by the model)")
    add("--tta", type=wbflow.str2bool, default=False, help="--predict: average the image's and its mirror's prediction")
    add("--smoke", type=wbflow.str2bool, default=False, help="the whole workflow in seconds: SMOKE_DEFAULTS (flags "
        "given win), generated data in OUT/data (unless --data-dir names some), CPU, W&B offline, --predict A.txt")
    if parser.parse_args(argv).smoke:  # its defaults, under the flags given
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args(argv)


def check_settings(args, world_size):
    """(out_dir, the earlier run's checkpoints that --overwrite replaces); a bad setting is refused in one line."""
    with wbflow.exit_on_error("train_fire", (ValueError,)):
        wbflow.check_numbers({"--epochs": args.epochs, "--batch-size": args.batch_size, "--image-size": args.image_size,
                              "--learning-rate": args.learning_rate, "WORLD_SIZE": world_size},
                             {"--num-workers": args.num_workers, "--num-predictions": args.num_predictions,
                              "--grad-clip": args.grad_clip, "--weight-decay": args.weight_decay,
                              "--focal-gamma": args.focal_gamma, "--label-smoothing": args.label_smoothing})
        if args.label_smoothing and (args.loss != "ce" or args.label_smoothing >= 1):
            raise ValueError(f"--label-smoothing {args.label_smoothing} needs --loss ce and a value below 1")
        if not 0 <= args.val_split < 1:
            raise ValueError(f"--val-split must be at least 0 and below 1, not {args.val_split}")
        if args.class_names is not None and len(set(args.class_names)) != len(args.class_names):
            raise ValueError(f"--class-names repeats a name: {','.join(args.class_names)}")
        out_dir, earlier_run = wbflow.prepare_out_dir(args.out_dir, resume=args.resume, overwrite=args.overwrite,
                                                      patterns=OUT_FILES)
        # (--resume continues its run: the last.pth it starts from is the one it goes on writing)
        data_list = next((path for path in (Path(args.data_dir), Path(args.data_dir) / "train.txt") if path.is_file()),
                         None)
        wbflow.check_outputs({f"--out-dir's {name}": out_dir / name for name in OUT_FILES}, {"--data-dir": data_list})
        return out_dir, earlier_run


def load_data(args, device, rank, world_size):
    """The class names, train and validation ImageSamples and the training loader; bad data ends in one line."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):
        train_samples, val_samples, class_names = wbflow.find_image_samples(
            args.data_dir, class_names=args.class_names, val_split=args.val_split, seed=args.seed)
        wbflow.check_same_on_every_rank({"training images": len(train_samples),
                                         "validation images": len(val_samples)}, class_names=class_names)
    train_set = wbflow.ImageSamples(train_samples, wbflow.image_transforms(args.image_size, train=True))
    val_set = wbflow.ImageSamples(val_samples, wbflow.image_transforms(args.image_size, train=False))
    weights = wbflow.class_balanced_weights(train_set.labels, len(class_names))[train_set.labels]  # 1 / class count
    train_loader, _ = wbflow.classifier_loaders(  # validation: predict_logits shards val_set over the ranks itself
        train_set, val_set, args.batch_size, num_workers=args.num_workers, device=device, seed=args.seed, rank=rank,
        world_size=world_size, sample_weights=weights if args.sampler == "balanced" else None)
    if rank == 0:  # each class quoted: a name may hold a space
        print(f"{len(train_set)} training and {len(val_set)} validation images, classes: "
              f"{', '.join(map(repr, class_names))}")
        warn_of_absent_classes(val_set.labels, class_names, "the validation set", "val_macro_f1")
    return class_names, train_set, val_set, train_loader


@dataclasses.dataclass
class RunState:
    """What the run trains and where it stands: train_epochs advances it, last.pth holds its checkpoint()."""
    model: nn.Module  # unwrapped (train_epochs trains it in DDP across the ranks)
    criterion: object  # (logits, labels) -> loss: training's, and val_loss on every validation image's logits
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # cosine, over every optimiser step of the run
    scaler: torch.amp.GradScaler
    config: dict = None  # what W&B and every checkpoint get
    step: int = 0  # optimiser steps taken: W&B's x-axis
    best: float = None  # the best --best-metric so far (best_model.pth's); None before the first epoch
    skipped_steps: int = 0  # steps the fp16 scaler skipped
    wandb_run_id: str = None
    epoch: int = 0  # the next epoch to train
    epoch_state: dict = None  # its train_state when a stop interrupted it: the resume finishes that epoch first

    def checkpoint(self, epoch, train_state=None, last_act=False):
        """What a resume needs (RESUME_KEYS); last_act marks the run's final write. Every rank gathers its RNG."""
        return {**{name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scheduler", "scaler")},
                **{name: getattr(self, name) for name in ("step", "best", "skipped_steps", "wandb_run_id", "config")},
                "epoch": epoch, "train_state": train_state, "rng": wbflow.gather_from_ranks(wbflow.capture_rng_state()),
                "wandb_last_act": last_act, "driver": "train_fire"}


def build_model(args, num_classes, train_labels, steps_per_epoch, device):
    """A new run's RunState: model, criterion, optimiser, a per-step cosine schedule, AMP scaler; one-line errors."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):
        model = wbflow.build_classifier(args.model, num_classes, args.weights).to(device)
    class_weights = (wbflow.class_balanced_weights(train_labels, num_classes).to(device)
                     if args.class_weights == "balanced" else None)
    criterion = (nn.CrossEntropyLoss(weight=class_weights, label_smoothing=args.label_smoothing) if args.loss == "ce"
                 else functools.partial(wbflow.focal_loss, gamma=args.focal_gamma, alpha=class_weights))
    optimizer = wbflow.build_optimizer(args.optimizer, model.parameters(), args.learning_rate,
                                       weight_decay=args.weight_decay, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    return RunState(model, criterion, optimizer, scheduler, wbflow.make_scaler(device, args.amp))


def resume_run(args, state, device, rank):
    """Continue --resume (else a new run: None): this driver's last.pth, holding state.config's RESUME_SAME values
    (else one line names the first that differs), loaded into `state`; returns config's resumed_from."""
    if not args.resume:
        return None
    expected = {key: state.config[key] for key in RESUME_SAME}
    hints = {**{key: f" (a resumed run goes on as the same run: resume with the run's --{key.replace('_', '-')}, "
                     f"or start a new run)" for key in expected},
             "epochs": " (its cosine schedule ends there; changing --epochs would make the learning rate climb "
                       "back up: resume with the run's --epochs, or start a new run)",
             "classes": " (the labels keep their indices: pass --class-names in the checkpoint's order)",
             "world_size": " processes (each rank resumes its own batches and RNG: resume with the same number)",
             **dict.fromkeys(("train_images", "val_images"), " (the data is not the data the run trained on: resume "
                                                             "with the run's data, or start a new run)")}
    _, saved = wbflow.load_checked(args.resume, program="train_fire", flag="--resume", driver="train_fire", device=device,
                                   artifacts=False, required=RESUME_KEYS,
                                   hints={"optimizer": " (best_model.pth holds weights only; resume from OUT/last.pth)"})
    with wbflow.exit_on_error(f"train_fire: --resume {args.resume}", (ValueError,)):
        wbflow.check_checkpoint(saved, driver="train_fire", expected=expected, hints=hints)
    for name in ("model", "optimizer", "scheduler", "scaler"):
        if saved[name]:  # the scaler's is empty when saved without fp16 (bf16 or CPU)
            getattr(state, name).load_state_dict(saved[name])
    wbflow.restore_rng_state(saved["rng"][rank])
    state.step, state.best, state.skipped_steps = saved["step"], saved["best"], saved["skipped_steps"]
    state.wandb_run_id, resumed_from, wandb_plan = wbflow.wandb_resume_plan(
        saved["wandb_run_id"], saved["wandb_last_act"], saved["step"], args.resume)
    state.epoch_state = saved["train_state"]  # a stopped epoch's, which train_epochs finishes first
    state.epoch = saved["epoch"] + (state.epoch_state is None)
    if rank == 0:
        print(f"resuming epoch {state.epoch} at batch {(state.epoch_state or {'batches': 0})['batches']}, step "
              f"{state.step} (best {args.best_metric} {state.best}) from {args.resume}; "
              f"W&B: {'off' if args.no_wandb else wandb_plan}")
    return resumed_from


def train_epochs(args, argv, run, stop, state, data):
    """From state.epoch: train (a stop saves and exits), validate, best, log, last.pth; then the best model's report."""
    (train_loader, val_set), out_dir, (rank, world_size) = data, Path(args.out_dir), wbflow.rank_and_world_size()
    device, master, classes = next(state.model.parameters()).device, rank == 0, state.config["classes"]  # 0 writes
    amp_dtype, loss_fn = wbflow.autocast_dtype(device, args.amp), wbflow.classification_loss(state.criterion)
    train_model = nn.parallel.DistributedDataParallel(  # validation uses state.model: its shards differ in length
        state.model, [device.index] if device.type == "cuda" else None) if world_size > 1 else state.model

    def log_window(step, window):
        state.skipped_steps += window["skipped"]
        run.log({"epoch": window["epoch"], "batch": window["batch"], "train_loss": window["loss"],
                 "train_acc": window["accuracy"], "learning_rate": window["learning_rate"]}, step=step)
    for epoch in range(state.epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch, skip_batches=state.epoch_state["batches"] if state.epoch_state else 0)
        train = wbflow.train_epoch(train_model, train_loader, state.optimizer, loss_fn, device=device,
                                   scheduler=state.scheduler, grad_clip=args.grad_clip or None, amp_dtype=amp_dtype,
                                   scaler=state.scaler, step=state.step, epoch=epoch, log_every=10, on_log=log_window,
                                   stop=stop, resume=state.epoch_state, progress=master)
        state.step, state.epoch_state = train["step"], None
        if train["stopped"]:  # SIGTERM or Ctrl-C: save where this epoch stands, and say how to go on
            wbflow.exit_stopped(stop, state.checkpoint(epoch, train["state"], last_act=True), out_dir / "last.pth",
                                script=__file__, argv=argv, where=f" at step {state.step} (epoch {epoch})")
        logits, labels = wbflow.predict_logits(state.model, val_set, device=device, amp_dtype=amp_dtype,
                                               batch_size=args.batch_size, num_workers=args.num_workers)
        f1, macro_f1 = wbflow.f1_scores(labels.tolist(), logits.argmax(dim=1).tolist(), len(classes))
        scores = {"val_loss": float(state.criterion(logits.to(device), labels.to(device))),  # on every val image
                  "val_acc": 100.0 * float((logits.argmax(dim=1) == labels).double().mean()), "val_macro_f1": macro_f1}
        best_state = {"model": state.model.state_dict(), "epoch": epoch, **scores, "class_names": classes,
                      "config": state.config, "driver": "train_fire", "wandb_run_id": state.wandb_run_id}
        state.best, improved = wbflow.save_best(
            best_state, scores[args.best_metric], state.best, out_dir / "best_model.pth", run=run,
            name=args.best_metric, aliases=(f"epoch-{epoch}",),
            metadata={"epoch": epoch, "global_step": state.step, "config": state.config})
        run.log({"epoch": epoch, "epoch/train_loss": train["loss"], "epoch/train_acc": train["accuracy"], **scores,
                 **{f"val_f1/{name}": f for name, f in zip(classes, f1) if f == f},  # NaN: in neither, no F1
                 **({f"best_{args.best_metric}": state.best} if improved else {})}, step=state.step)
        state.epoch, checkpoint = epoch + 1, state.checkpoint(epoch, last_act=epoch == args.epochs - 1)
        if master:
            wbflow.flush_run(run)  # what the epoch logged is on disk before the checkpoint a resume starts from
            wbflow.save_checkpoint(checkpoint, out_dir / "last.pth")
            print(f"Epoch: {epoch} | Train Loss: {train['loss']:.4f} | Train Acc: {train['accuracy']:.2f}% | "
                  f"Val Loss: {scores['val_loss']:.4f} | Val Acc: {scores['val_acc']:.2f}% | "
                  f"Val macro-F1: {scores['val_macro_f1']:.4f}"
                  + (f" | best, saved to {out_dir / 'best_model.pth'}" if improved else ""))
    if state.best is not None:  # the report: the best model on the whole val set (every rank predicts a share)
        best = wbflow.load_checkpoint(out_dir / "best_model.pth", map_location=device)
        state.model.load_state_dict(best["model"])
        logits, labels = wbflow.predict_logits(state.model, val_set, device=device, amp_dtype=amp_dtype,
                                               batch_size=args.batch_size, num_workers=args.num_workers)
        if master:
            display_set = wbflow.ImageSamples(val_set.samples,
                                              wbflow.image_transforms(args.image_size, train=False, normalize=False))
            report = wbflow.log_classification_report(run, logits.softmax(dim=1), labels, classes, images=display_set,
                                                      table_rows=args.num_predictions, step=state.step + 1)
            for name, precision, recall in zip(classes, report["precision"], report["recall"]):
                print(f"{name}: precision {precision:.3f} recall {recall:.3f}")
            value = f"{best['val_acc']:.2f}%" if args.best_metric == "val_acc" else f"{best['val_macro_f1']:.4f}"
            print(f"best {args.best_metric} {value} (epoch {best['epoch']}), model: {out_dir / 'best_model.pth'}")


def predict(args):
    """--predict: the submission (the list's order; unreadable: the most frequent class), predictions.csv, W&B."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):
        checkpoint, state = wbflow.load_checked(
            args.checkpoint or f"{args.out_dir}/best_model.pth", program="train_fire", driver="train_fire",
            flag="--checkpoint" if args.checkpoint else "the best model", project=args.project,
            required=("model", "config"))
        config, submission = state["config"], Path(args.submission or checkpoint.parent)
        if submission.is_dir() or (args.submission or "").endswith(("/", os.sep)):  # runs/new/: a folder to make
            submission = submission / "submission.txt"
        rows, classes = wbflow.list_images(args.predict, config["classes"], strict=False)
        names, paths, labels = map(list, zip(*rows)) if rows else ([], [], [])
        check_list_lines(args.predict, names)
        # before the long work: nothing this command reads is what it writes, and it can write there
        wbflow.check_outputs({"--submission": submission, "predictions.csv": submission.with_name("predictions.csv")},
                             {"--predict": args.predict, "--checkpoint": checkpoint, "an image --predict lists": paths})
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = wbflow.build_classifier(config["model"], len(classes)).to(device)
        model.load_state_dict(state["model"])
        transform = wbflow.image_transforms(config["image_size"], train=False, mean_std=config.get("mean_std"))
        probs = wbflow.predict_images(model, paths, transform, device=device,
                                      amp_dtype=wbflow.autocast_dtype(device, args.amp), batch_size=args.batch_size,
                                      num_workers=args.num_workers, tta=args.tta, progress=True)
        read = ~probs.isnan().any(1)
        # a best_model.pth written before --predict existed has no class counts: the predictions' counts stand in
        counts = config.get("class_counts") or torch.bincount(probs[read].argmax(1), minlength=len(classes)).tolist()
        most_frequent = max(range(len(classes)), key=counts.__getitem__)
        predicted = wbflow.write_submission(submission, names, probs, classes, fallback=most_frequent)
    print(f"{len(names)} predictions ({int((~read).sum())} unreadable: {classes[most_frequent]}"
          f"{'' if 'class_counts' in config else ', the most frequent prediction'}) in {submission}")
    scores, labelled = {}, [(label, guess) for label, guess in zip(labels, predicted) if label is not None]
    if labelled:  # a list with labels: how the submission scores
        warn_of_absent_classes([label for label, _ in labelled], classes, "the list", "macro_f1")
        scores = {"accuracy": 100.0 * sum(label == guess for label, guess in labelled) / len(labelled),
                  "macro_f1": wbflow.f1_scores(*zip(*labelled), len(classes))[1]}
        print(f"{len(labelled)} labelled images: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.4f}")
    sha256 = wbflow.file_sha256(checkpoint)  # the file used, whichever flag or default named it
    with wbflow.wandb_run({**config, "predict": args.predict, "checkpoint": args.checkpoint or str(checkpoint),
                           "checkpoint_sha256": sha256, "tta": args.tta}, project=args.project,
                          enabled=not args.no_wandb, job_type="predict", name=args.run_name) as run:
        if run and args.checkpoint and not os.path.isfile(args.checkpoint):  # a model artifact: this run used it
            run.use_artifact(args.checkpoint)
        elif run:  # the file: W&B keys versions by content, so this is the training run's version that holds it
            wbflow.use_artifact(run, checkpoint, f"model-{state.get('wandb_run_id') or sha256[:12]}")
        if scores:
            run.log(scores)
        wbflow.log_classification_report(run, probs[read], None, classes, table_rows=args.num_predictions,
                                          images=[path for path, ok in zip(paths, read.tolist()) if ok])
        wbflow.log_artifact(run, submission, "submission", type="submission", policy="mutable",
                            metadata={"images": len(names), "tta": args.tta, **scores})
    return submission


def check_list_lines(source, names):
    """The submission has a line per name: refuse a list (not a folder) whose non-empty lines are not one name each
    (a header aside, which is printed)."""
    lines = ([line for line in Path(source).read_bytes().splitlines() if line.strip()] if os.path.isfile(source)
             else names)  # a folder: its names are its files
    if len(lines) == len(names) + 1:
        print(f"{source}: its first line is a header, not an image: {lines[0].decode('utf-8-sig', 'replace')}")
    elif len(lines) != len(names):
        raise ValueError(f"{source} has {len(lines)} lines, but {len(names)} names were read from them: the "
                         f"submission would not match the list line for line")


def warn_of_absent_classes(labels, classes, where, metric):
    """One warning naming the classes without an image in `labels`: `metric` averages the others (f1_scores)."""
    present = set(labels)
    absent = [repr(name) for index, name in enumerate(classes) if index not in present]
    if absent:
        warnings.warn(f"{where} has no image of class(es) {', '.join(absent)}: {metric} is the mean over the classes "
                      f"that occur in its labels or predictions, and a class in neither has no F1", stacklevel=2)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.out_dir == "":  # Path("") is the current folder: checkpoints and the lock would land there
        raise SystemExit("train_fire: --out-dir is empty: name a folder")
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    if args.predict:
        return predict(args)
    generate = args.smoke and args.data_dir is None  # --smoke's data, unless --data-dir names some
    args.data_dir = str(Path(args.out_dir) / "data") if generate else args.data_dir
    out_dir, earlier_run = check_settings(args, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size, device = wbflow.setup_distributed()
    master, device = rank == 0, torch.device("cpu") if args.smoke else device  # rank 0 alone prints, logs, writes
    if not master:
        warnings.simplefilter("ignore")
    if generate and master:
        wbflow.write_pattern_dataset(args.data_dir, SMOKE_CLASS_COUNTS, test_images=20, seed=args.seed)
    wbflow.gather_from_ranks(generate)  # a barrier: no rank reads --smoke's data before it is written
    torch.manual_seed(args.seed + rank)  # each rank its own randomness
    class_names, train_set, val_set, train_loader = load_data(args, device, rank, world_size)
    state = build_model(args, len(class_names), train_set.labels, len(train_loader), device)
    # every setting as given, then what they became (names as the seed logs them)
    state.config = {**{key: value for key, value in vars(args).items() if key != "resume"},
                    "optimizer": type(state.optimizer).__name__, "loss_function": LOSS_NAMES[args.loss],
                    "scheduler": "CosineAnnealingLR", "classes": class_names,
                    "amp": str(wbflow.autocast_dtype(device, args.amp) or "off").replace("torch.", ""),
                    "device": device.type, "world_size": world_size, "steps_per_epoch": len(train_loader),
                    "train_images": len(train_set), "val_images": len(val_set), "mean_std": wbflow.IMAGENET_MEAN_STD,
                    "class_counts": [train_set.labels.count(label) for label in range(len(class_names))]}
    resumed_from = resume_run(args, state, device, rank)
    run_config = state.config if resumed_from is None else {**state.config, "resumed_from": resumed_from}
    with wbflow.exit_on_error("train_fire", ()), wbflow.stop_on_signals() as stop, wbflow.wandb_run(
            run_config, project=args.project, enabled=not args.no_wandb, run_id=state.wandb_run_id,
            name=args.run_name) as run:
        # windows on the global step, epoch means (own keys) and val_* on the epoch axis; summaries: the best value
        run.define_metric("epoch")
        for key, summary in {"train_loss": "min", "train_acc": "max", "epoch/train_loss": "min",
                             "epoch/train_acc": "max", "val_loss": "min", "val_acc": "max", "val_macro_f1": "max",
                             "val_f1/*": "max", f"best_{args.best_metric}": "last"}.items():
            run.define_metric(key, step_metric=None if key.startswith("train_") else "epoch", summary=summary)
        state.wandb_run_id = run.id if run else state.wandb_run_id
        graph_logged = args.log_graph and run and wbflow.log_model_graph(
            run, state.model, val_set[0][0][None].to(device), state.step)
        if args.watch or (args.log_graph and not graph_logged):
            wbflow.watch_model(run, state.model, log="all" if args.watch else None, log_freq=100,
                               log_graph=args.log_graph and not graph_logged)
        if master:  # --overwrite: every check has passed, so the earlier run's checkpoints go now
            for path in earlier_run:
                path.unlink(missing_ok=True)
        train_epochs(args, argv, run, stop, state, (train_loader, val_set))
    if dist.is_initialized():
        dist.destroy_process_group()
    if args.smoke and master and (Path(args.data_dir) / "A.txt").is_file():  # the submission of the smoke's model
        predict(argparse.Namespace(**{**vars(args), "predict": str(Path(args.data_dir) / "A.txt")}))
    return state.best


if __name__ == "__main__":
    main()

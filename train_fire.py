"""Train the fire-safety image classifier (高风险 中风险 低风险 无风险 非楼道) and track it in W&B.

    python train_fire.py --data-dir data/fire --model resnet50                   # one GPU, or CPU
    torchrun --standalone --nproc_per_node=4 train_fire.py --data-dir data/fire  # DDP on 4 GPUs
    python train_fire.py --data-dir data/fire --resume runs/fire/last.pth        # continue a killed run
    wandb sweep sweep.yaml                                                        # then: wandb agent <id>
    python train_fire.py --predict data/fire/A.txt --checkpoint runs/fire/best_model.pth   # the submission file
    python train_fire.py --data-dir data/fire --folds 5 --out-dir runs/cv  # 5 folds, then --cv runs/cv; --fold 2: one
    python train_fire.py --predict data/fire/A.txt --checkpoint runs/cv/ensemble.json --tta   # the fold ensemble
    python train_fire.py --smoke       # generated data, train, predict, submission: CPU, offline, under a minute

Data: class folders, a name<TAB>label list, or the competition's download (DATA/train.txt). W&B keys follow the seed
(main defines them, train_epochs logs them). OUT/best_model.pth follows --best-metric; --resume continues OUT/last.pth
(refusing a change of RESUME_SAME). docs/fire.md and docs/competition.md (the score, folds, offsets) say more.
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
# what --resume needs in a checkpoint (last.pth's), and the config it keeps: the schedule, the data split, W&B's config
RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "scaler", "epoch", "best", "skipped_steps", "rng",
               "train_state", "wandb_run_id", "wandb_last_act", "config")
RESUME_SAME = ("model", "classes", "image_size", "epochs", "world_size", "batch_size", "learning_rate",
               "optimizer", "weight_decay", "grad_clip", "loss", "focal_gamma", "class_weights", "weights", "seed",
               "val_split", "train_images", "val_images", "sampler", "label_smoothing", "best_metric", "score_weights",
               "folds", "fold", "augment", "random_erase", "mixup", "cutmix", "ema_decay", "warmup_epochs")
COMPETITION_WEIGHTS = {"高风险": 2.0, "中风险": 1.5, "低风险": 1.0, "无风险": 1.0, "非楼道": 1.0}  # score: sum w * F1
OUT_FILES = ("best_model.pth", "last.pth")  # what this driver writes into --out-dir
SMOKE_DEFAULTS = {"out_dir": "runs/fire-smoke", "data_dir": None, "model": "resnet18", "weights": "none", "epochs": 2,
                  "image_size": 32, "batch_size": 8, "learning_rate": 0.001, "num_workers": 0, "num_predictions": 16}
SMOKE_CLASS_COUNTS = {"高风险": 8, "中风险": 12, "低风险": 16, "无风险": 32, "非楼道": 12}  # imbalanced, as the download


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=wbflow.DefaultsHelpFormatter)
    add = functools.partial(wbflow.add_sweep_argument, parser)
    add("--data-dir", default="data/fire", help="image folders, a name<TAB>label / path,label list, train.txt's folder")
    add("--class-names", type=lambda text: text.split(","), help="A,B,... in label order (default: sorted labels)")
    add("--val-split", type=float, default=0.2, help="val fraction when there is no val/ folder")
    add("--model", default="resnet50", help="any torchvision classification model: resnet50, convnext_tiny, ...")
    add("--weights", choices=("imagenet", "none"), default="imagenet", help="initial weights")
    add("--loss", choices=tuple(LOSS_NAMES), default="ce", help="cross-entropy or focal loss")
    add("--focal-gamma", type=float, default=2.0, help="focusing parameter of --loss focal")
    add("--class-weights", choices=("none", "balanced"), default="none", help="balanced: n / (classes * count)")
    add("--label-smoothing", type=float, default=0.0, help="label smoothing of --loss ce, in [0, 1)")
    add("--sampler", choices=("shuffle", "balanced"), default="shuffle", help="balanced: each class equally often")
    add("--best-metric", choices=("val_acc", "val_macro_f1", "val_score"),
        help="best_model.pth's (default: val_score; for other classes than the competition's: val_acc)")
    add("--score-weights", type=wbflow.name_values, help="NAME=W,...; others 1 (default: 高风险=2,中风险=1.5)")
    add("--folds", type=int, help="K stratified folds: --fold k's, or all in turn, then --cv (default: --val-split)")
    add("--fold", type=int, help="train fold k of --folds K as one run, in OUT/fold{k} (default: every fold)")
    add("--cv", help="a --folds run's OUT: score its out-of-fold predictions, fit offsets (default: train)")
    add("--augment", choices=("none", "trivialaugment", "randaugment"), default="none", help="training policy")
    add("--random-erase", type=float, default=0.0, help="random erasing probability of a training image")
    add("--mixup", type=float, default=0.0, help="MixUp's alpha (0: off); with --cutmix, each half the batches")
    add("--cutmix", type=float, default=0.0, help="CutMix's alpha (0: off)")
    add("--ema-decay", type=float, default=0.0, help="EMA of the weights per step (0: off): validated and saved")
    add("--warmup-epochs", type=int, default=0, help="linear learning-rate warm-up before the cosine decay")
    add("--optimizer", choices=("adam", "adamw", "sgd"), default="adam", help="sgd: Nesterov momentum 0.9")
    add("--learning-rate", type=float, default=0.003, help="peak of the cosine schedule")
    add("--weight-decay", type=float, default=0.0, help="optimiser weight decay")
    add("--epochs", type=int, default=10, help="the cosine schedule's length; --resume needs the run's own")
    add("--batch-size", type=int, default=32, help="images per process and optimiser step")
    add("--image-size", type=int, default=256, help="side of the square crop the model sees")
    add("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    add("--amp", type=wbflow.str2bool, default=None, help="mixed precision (default: on for CUDA only)")
    add("--num-workers", type=int, default=wbflow.default_num_workers(), help="loader processes: 4, or a core share")
    add("--seed", type=int, default=0, help="seeds the split, the data order and the initial weights")
    sweep_run = os.environ.get("WANDB_RUN_ID") if "WANDB_SWEEP_ID" in os.environ else None  # its runs share flags
    add("--out-dir", default=f"runs/fire/{sweep_run}" if sweep_run else "runs/fire", help="for the checkpoints")
    add("--overwrite", type=wbflow.str2bool, default=False, help="delete an earlier run's checkpoints in --out-dir")
    add("--resume", help="OUT/last.pth of the run to continue, with the same flags (default: a new run)")
    add("--num-predictions", type=int, default=32, help="images in the predictions table (validation, or --predict)")
    add("--watch", type=wbflow.str2bool, default=False, help='wandb.watch(model, log="all", log_freq=100)')
    add("--log-graph", type=wbflow.str2bool, default=False, help="model_graph (torchviz + Graphviz), else W&B's graph")
    add("--no-wandb", type=wbflow.str2bool, default=False, help="train without W&B")
    add("--project", default="tianchi-fire-safety", help="W&B project")
    add("--run-name", help="W&B run name (default: W&B picks one)")
    add("--predict", help="a list (A.txt) or folder of images to write the submission for (default: train)")
    add("--checkpoint", nargs="+", help="--predict's model(s), or ensemble.json (default: OUT/best_model.pth)")
    add("--submission", help="--predict's file or folder, and predictions.csv (default: submission.txt by the model)")
    add("--tta", type=wbflow.str2bool, default=False, help="--predict: average the image's and its mirror's prediction")
    add("--smoke", type=wbflow.str2bool, default=False, help="SMOKE_DEFAULTS, generated data, CPU, W&B offline")
    if parser.parse_args(argv).smoke:  # its defaults, under the flags given
        parser.set_defaults(**SMOKE_DEFAULTS)
    return parser.parse_args(argv)


def check_settings(args, world_size):
    """(out_dir, the earlier run's checkpoints that --overwrite replaces); a bad setting is refused in one line."""
    with wbflow.exit_on_error("train_fire", (ValueError,)):
        wbflow.check_numbers(
            {"--epochs": args.epochs, "--batch-size": args.batch_size, "--image-size": args.image_size,
             "--learning-rate": args.learning_rate, "WORLD_SIZE": world_size},
            {"--num-workers": args.num_workers, "--num-predictions": args.num_predictions, "--mixup": args.mixup,
             "--grad-clip": args.grad_clip, "--weight-decay": args.weight_decay, "--focal-gamma": args.focal_gamma,
             "--label-smoothing": args.label_smoothing, "--cutmix": args.cutmix, "--warmup-epochs": args.warmup_epochs},
            {"--val-split": args.val_split, "--random-erase": args.random_erase, "--ema-decay": args.ema_decay})
        if (args.label_smoothing or args.mixup or args.cutmix) and args.loss != "ce" or args.label_smoothing >= 1:
            raise ValueError(f"--label-smoothing {args.label_smoothing} needs --loss ce and a value below 1"
                             if args.label_smoothing else "--mixup and --cutmix make soft labels: they need --loss ce")
        if (args.folds or 2) < 2 or args.fold is not None and not 0 <= args.fold < (args.folds or 0):
            raise ValueError(f"--fold {args.fold} --folds {args.folds}: K is at least 2, and fold k from 0 to K-1")
        out_dir, earlier_run = wbflow.prepare_out_dir(args.out_dir, resume=args.resume, overwrite=args.overwrite,
                                                      patterns=OUT_FILES)
        data_list = next((path for path in (Path(args.data_dir), Path(args.data_dir, "train.txt")) if path.is_file()),
                         None)
        wbflow.check_outputs({f"--out-dir's {name}": out_dir / name for name in OUT_FILES}, {"--data-dir": data_list})
        return out_dir, earlier_run


def load_data(args, device, rank, world_size):
    """Class names, train and val ImageSamples, the training loader; --score-weights, --best-metric; one-line errors."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):
        train_samples, val_samples, class_names = wbflow.find_image_samples(
            args.data_dir, class_names=args.class_names, val_split=args.val_split, seed=args.seed,
            fold=None if args.fold is None else (args.fold, args.folds))
        wbflow.check_same_on_every_rank({"training images": len(train_samples),
                                         "validation images": len(val_samples)}, class_names=class_names)
        competition = set(class_names) == set(COMPETITION_WEIGHTS)  # then its weights and val_score by default
        named = args.score_weights or (COMPETITION_WEIGHTS if competition else {})
        with wbflow.exit_on_error("train_fire: --score-weights", (ValueError,)):  # one a class, as config holds them
            args.score_weights = wbflow.weights_by_name(named, class_names)
        args.best_metric = args.best_metric or ("val_score" if competition else "val_acc")
    train_set = wbflow.ImageSamples(train_samples, wbflow.image_transforms(
        args.image_size, train=True, augment=args.augment, random_erase=args.random_erase))
    val_set = wbflow.ImageSamples(val_samples, wbflow.image_transforms(args.image_size, train=False))
    weights = wbflow.class_balanced_weights(train_set.labels, len(class_names))[train_set.labels]  # 1 / class count
    train_loader, _ = wbflow.classifier_loaders(  # validation: predict_logits shards val_set over the ranks itself
        train_set, val_set, args.batch_size, num_workers=args.num_workers, device=device, seed=args.seed, rank=rank,
        world_size=world_size, sample_weights=weights if args.sampler == "balanced" else None,
        batch_transform=wbflow.mix_batches(len(class_names), mixup=args.mixup, cutmix=args.cutmix))
    if rank == 0:  # each class quoted: a name may hold a space
        print(f"{len(train_set)} training and {len(val_set)} validation images, classes: "
              f"{', '.join(map(repr, class_names))}")
        wbflow.warn_of_absent_classes(val_set.labels, class_names, "the validation set", "val_macro_f1")
    return class_names, train_set, val_set, train_loader


@dataclasses.dataclass
class RunState:
    """What the run trains and where it stands: train_epochs advances it, last.pth holds its checkpoint()."""
    model: nn.Module  # unwrapped (train_epochs trains it in DDP across the ranks)
    criterion: object  # (logits, labels) -> loss: training's, and val_loss on every validation image's logits
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # warm-up and cosine, over every optimiser step of the run
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel = None  # --ema-decay's: validated, and best_model.pth's weights
    config: dict = None  # what W&B and every checkpoint get
    step: int = 0  # optimiser steps taken: W&B's x-axis
    best: float = None  # the best --best-metric so far (best_model.pth's); None before the first epoch
    skipped_steps: int = 0  # steps the fp16 scaler skipped
    wandb_run_id: str = None
    epoch: int = 0  # the next epoch to train
    epoch_state: dict = None  # its train_state when a stop interrupted it: the resume finishes that epoch first

    def checkpoint(self, epoch, train_state=None, last_act=False):
        """What a resume needs (RESUME_KEYS); last_act marks the run's final write. Every rank gathers its RNG."""
        return wbflow.checkpoint_state(  # state dicts, and every rank's RNG states
            {key: getattr(self, key) for key in (*RESUME_KEYS, "ema") if hasattr(self, key)}, epoch=epoch,
            train_state=train_state, wandb_last_act=last_act, driver="train_fire")


def build_model(args, num_classes, train_labels, steps_per_epoch, device):
    """A new run's RunState: model, criterion, optimiser, per-step warm-up and cosine schedule, AMP scaler, EMA."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):  # also a warm-up as long as the run
        model = wbflow.build_classifier(args.model, num_classes, args.weights, image_size=args.image_size).to(device)
        optimizer = wbflow.build_optimizer(args.optimizer, model.parameters(), args.learning_rate,
                                           weight_decay=args.weight_decay, fused=device.type == "cuda" or None)
        scheduler = wbflow.warmup_cosine_schedule(optimizer, args.epochs * steps_per_epoch,
                                                  args.warmup_epochs * steps_per_epoch)
    class_weights = (wbflow.class_balanced_weights(train_labels, num_classes).to(device)
                     if args.class_weights == "balanced" else None)
    criterion = (nn.CrossEntropyLoss(weight=class_weights, label_smoothing=args.label_smoothing) if args.loss == "ce"
                 else functools.partial(wbflow.focal_loss, gamma=args.focal_gamma, alpha=class_weights))
    return RunState(model, criterion, optimizer, scheduler, wbflow.make_scaler(device, args.amp),
                    ema=wbflow.make_ema(model, args.ema_decay) if args.ema_decay else None)


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
    restored = {key: getattr(state, key) for key in ("model", "optimizer", "scheduler", "step", "scaler", "best",
                                                     "skipped_steps", "ema")}  # the scaler's is empty without fp16
    saved, (state.wandb_run_id, resumed_from, wandb_plan) = wbflow.resume_from(
        args.resume, restored, program="train_fire", driver="train_fire", device=device, artifacts=False,
        required=RESUME_KEYS, expected=expected, hints=hints,
        missing_hints={"optimizer": " (best_model.pth holds weights only; resume from OUT/last.pth)"})
    for key, value in restored.items():
        setattr(state, key, value)
    state.epoch_state = saved["train_state"]  # a stopped epoch's, which train_epochs finishes first
    state.epoch = saved["epoch"] + (state.epoch_state is None)
    if rank == 0:
        print(f"resuming epoch {state.epoch} at batch {(state.epoch_state or {'batches': 0})['batches']}, step "
              f"{state.step} (best {args.best_metric} {state.best}) from {args.resume}; "
              f"W&B: {'off' if args.no_wandb else wandb_plan}")
    return resumed_from


def train_epochs(args, argv, run, stop, state, data):
    """From state.epoch: train (a stop saves, exits), validate, best, log, last.pth; the best's report, a fold's OOF."""
    (train_loader, val_set), out_dir, (rank, world_size) = data, Path(args.out_dir), wbflow.rank_and_world_size()
    device, master, classes = next(state.model.parameters()).device, rank == 0, state.config["classes"]  # 0 writes
    amp_dtype, loss_fn = wbflow.autocast_dtype(device, args.amp), wbflow.classification_loss(state.criterion)
    predicting = dict(device=device, amp_dtype=amp_dtype, batch_size=args.batch_size, num_workers=args.num_workers)
    train_model = nn.parallel.DistributedDataParallel(  # validation uses state.model: its shards differ in length
        state.model, [device.index] if device.type == "cuda" else None) if world_size > 1 else state.model

    def log_window(step, window):
        state.skipped_steps += window["skipped"]
        run.log({"epoch": window["epoch"], "batch": window["batch"], "train_loss": window["loss"],
                 "train_acc": window["accuracy"], "learning_rate": window["learning_rate"]}, step=step)
    for epoch in range(state.epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch, skip_batches=state.epoch_state["batches"] if state.epoch_state else 0)
        train = wbflow.train_epoch(train_model, train_loader, state.optimizer, loss_fn, device=device,
                                   scheduler=state.scheduler, ema_model=state.ema, grad_clip=args.grad_clip or None,
                                   amp_dtype=amp_dtype, scaler=state.scaler, step=state.step, epoch=epoch, log_every=10,
                                   on_log=log_window, stop=stop, resume=state.epoch_state, progress=master)
        state.step, state.epoch_state = train["step"], None
        if train["stopped"]:  # SIGTERM or Ctrl-C: save where this epoch stands, and say how to go on
            wbflow.exit_stopped(stop, state.checkpoint(epoch, train["state"], last_act=True), out_dir / "last.pth",
                                script=__file__, argv=argv, where=f" at step {state.step} (epoch {epoch})")
        eval_model = state.ema.module if state.ema else state.model  # --ema-decay: the EMA is validated and saved
        val, _, _ = wbflow.evaluate_classifier(eval_model, val_set, state.criterion, args.score_weights, **predicting)
        scores = {f"val_{key}": val[key] for key in ("loss", "acc", "macro_f1", "score")}  # val_loss, val_acc, ...
        best_state = {"model": eval_model.state_dict(), "epoch": epoch, **scores, "class_names": classes,
                      "config": state.config, "driver": "train_fire", "wandb_run_id": state.wandb_run_id}
        state.best, improved = wbflow.save_best(
            best_state, scores[args.best_metric], state.best, out_dir / "best_model.pth", run=run,
            name=args.best_metric, aliases=(f"epoch-{epoch}",),
            metadata={"epoch": epoch, "global_step": state.step, "config": state.config})
        run.log({"epoch": epoch, "epoch/train_loss": train["loss"], "epoch/train_acc": train["accuracy"], **scores,
                 **{f"val_f1/{name}": f for name, f in zip(classes, val["f1"]) if f == f},  # NaN: in neither
                 **({f"best_{args.best_metric}": state.best} if improved else {})}, step=state.step)
        state.epoch, checkpoint = epoch + 1, state.checkpoint(epoch, last_act=epoch == args.epochs - 1)
        if master:
            wbflow.flush_run(run)  # what the epoch logged is on disk before the checkpoint a resume starts from
            wbflow.save_checkpoint(checkpoint, out_dir / "last.pth")
            print(f"Epoch: {epoch} | Train Loss: {train['loss']:.4f} | Train Acc: {train['accuracy']:.2f}% | Val Loss: "
                  f"{val['loss']:.4f} | Val Acc: {val['acc']:.2f}% | Val macro-F1: {val['macro_f1']:.4f} | Val score: "
                  f"{val['score']:.4f}" + (f" | best, saved to {out_dir / 'best_model.pth'}" if improved else ""))
    if state.best is not None:  # the report (and a fold's oof.csv): the best model on the whole val set
        best = wbflow.load_checkpoint(out_dir / "best_model.pth", map_location=device)
        state.model.load_state_dict(best["model"])
        _, probs, labels = wbflow.evaluate_classifier(state.model, val_set, state.criterion, args.score_weights,
                                                      **predicting)
        if master:
            report = wbflow.log_classification_report(run, probs, labels, classes, table_rows=args.num_predictions,
                step=state.step + 1, images=wbflow.ImageSamples(  # shown as they are: not normalised
                    val_set.samples, wbflow.image_transforms(args.image_size, train=False, normalize=False)))
            for name, precision, recall in zip(classes, report["precision"], report["recall"]):
                print(f"{name}: precision {precision:.3f} recall {recall:.3f}")
            if args.fold is not None:  # out-of-fold predictions: --cv scores and ensembles the folds on them
                wbflow.write_probability_csv(out_dir / "oof.csv", [path for path, _ in val_set.samples], probs,
                                             classes, labels)
            value = f"{best['val_acc']:.2f}%" if args.best_metric == "val_acc" else f"{best[args.best_metric]:.4f}"
            print(f"best {args.best_metric} {value} (epoch {best['epoch']}), model: {out_dir / 'best_model.pth'}")


def predict(args):
    """--predict: submission (list order), predictions.csv, W&B; several models or ensemble.json: their mean."""
    with wbflow.exit_on_error("train_fire", (FileNotFoundError, ValueError)):
        references = args.checkpoint or [f"{args.out_dir}/best_model.pth"]  # --cv's ensemble.json: the folds', offsets
        ensemble = references[0] if len(references) == 1 and references[0].endswith(".json") else None
        references, ensemble_classes, offsets, _ = (wbflow.read_ensemble(ensemble) if ensemble else
                                                    (references, None, None, None))
        members = wbflow.load_checkpoints(  # one list of classes and one preprocessing for every model
            references, same=("classes", "image_size", "mean_std"), program="train_fire", driver="train_fire",
            flag="--checkpoint" if args.checkpoint else "the best model", project=args.project,
            required=("model", "config"), expected={"classes": ensemble_classes} if offsets else {})
        checkpoint, config = members[0][0], members[0][1]["config"]
        submission = wbflow.output_file(args.submission, Path(ensemble or checkpoint).parent, "submission.txt")
        rows, classes = wbflow.list_images(args.predict, config["classes"], strict=False)
        names, paths, labels = map(list, zip(*rows)) if rows else ([], [], [])
        # before the long work: nothing this command reads is what it writes, and it can write there
        wbflow.check_outputs({"--submission": submission, "predictions.csv": submission.with_name("predictions.csv")},
                             {"--predict": args.predict, "--checkpoint": [path for path, _ in members],
                              "an image --predict lists": paths})
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        probs, predicted, fallback = wbflow.predict_submission(  # unreadable: the training set's most frequent class
            [member for _, member in members], names, paths, submission, offsets=offsets, device=device, tta=args.tta,
            amp_dtype=wbflow.autocast_dtype(device, args.amp), batch_size=args.batch_size, num_workers=args.num_workers)
    read, weights = ~probs.isnan().any(1), config.get("score_weights") or [1.0] * len(classes)  # training's score
    print(f"{len(names)} predictions ({int((~read).sum())} unreadable: {classes[fallback]}"
          f"{'' if 'class_counts' in config else ', the most frequent prediction'}) in {submission}")
    scores, labelled = {}, [(label, guess) for label, guess in zip(labels, predicted) if label is not None]
    if labelled:  # a list with labels: how the submission scores
        wbflow.warn_of_absent_classes([label for label, _ in labelled], classes, "the list", "macro_f1")
        listed = wbflow.classification_scores(*zip(*labelled), weights)
        scores = {"accuracy": listed["acc"], "macro_f1": listed["macro_f1"], "score": listed["score"]}
        print(f"{len(labelled)} labelled images: accuracy {scores['accuracy']:.2f}%, macro-F1 {scores['macro_f1']:.4f},"
              f" score {scores['score']:.4f} (at most {sum(weights):g})")
    sha256 = [wbflow.file_sha256(path) for path, _ in members]  # the files used, whichever flag or default named them
    with wbflow.wandb_run({**config, "predict": args.predict, "checkpoint": args.checkpoint or str(checkpoint),
                           "checkpoint_sha256": sha256[0] if len(sha256) == 1 else sha256, "tta": args.tta,
                           "offsets": offsets}, project=args.project, enabled=not args.no_wandb, job_type="predict",
                          name=args.run_name) as run:
        for (path, member), sha in zip(members, sha256):  # W&B keys versions by content: the training run's version
            wbflow.use_artifact(run, path, f"model-{member.get('wandb_run_id') or sha[:12]}")
        if scores:
            run.log(scores)
        wbflow.log_classification_report(run, probs[read], None, classes, table_rows=args.num_predictions,
                                          images=[path for path, ok in zip(paths, read.tolist()) if ok])
        wbflow.log_artifact(run, submission, "submission", type="submission", policy="mutable",
                            metadata={"images": len(names), "tta": args.tta, **scores})
    return submission


def cross_validate(args):
    """--cv OUT: score the folds' OOF predictions, fit decision offsets, write OUT/ensemble.json; W&B job_type cv."""
    out, load = Path(args.cv), {"program": "train_fire", "flag": "--cv", "driver": "train_fire", "artifacts": False}
    with wbflow.exit_on_error(f"train_fire: --cv {out}", (FileNotFoundError, ValueError)):
        config = wbflow.load_checked(out / "fold0" / "best_model.pth", **load, required=("config",))[1]["config"]
        models = [out / f"fold{fold}" / "best_model.pth" for fold in range(config.get("folds") or 0)]
        missing = [str(fold) for fold, model in enumerate(models) if not model.with_name("oof.csv").is_file()]
        if missing or not models:
            raise FileNotFoundError(f"no oof.csv of fold(s) {', '.join(missing or ['0'])}: train (or resume) each fold")
        wbflow.load_checkpoints(models, same=[key for key in RESUME_SAME if key not in ("fold", "train_images",
                                                                                        "val_images")], **load)
        weights, ensemble = config["score_weights"], out / "ensemble.json"  # the folds' validation score
        wbflow.check_outputs({"--cv's ensemble.json": ensemble})
        with wbflow.wandb_run({**config, "cv": str(out), "fold": None}, project=args.project, enabled=not args.no_wandb,
                              job_type="cv", group=config["group"], name=f"{config['group']}-cv") as run:
            scores, offsets = wbflow.fit_ensemble([model.with_name("oof.csv") for model in models], models,
                                                  config["classes"], weights, ensemble, run=run)
    print(f"out-of-fold score {scores['oof_score']:.4f} (at most {sum(weights):g}); with the offsets "
          f"{', '.join(f'{offset:+.2f}' for offset in offsets)}: {scores['oof_score_with_offsets']:.4f}; {ensemble}")
    return scores


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.out_dir == "":  # Path("") is the current folder: checkpoints and the lock would land there
        raise SystemExit("train_fire: --out-dir is empty: name a folder")
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    if args.predict or args.cv:  # one process's work: under torchrun the other ranks leave it to rank 0
        return (predict if args.predict else cross_validate)(args) if os.environ.get("RANK", "0") == "0" else None
    generate = args.smoke and args.data_dir is None  # --smoke's data, unless --data-dir names some
    args.data_dir = str(Path(args.out_dir) / "data") if generate else args.data_dir
    if args.fold is not None:  # fold k: one run of its own in OUT/fold{k}, in the experiment's W&B group
        args.group = args.run_name or Path(args.out_dir).resolve().name
        args.out_dir, args.run_name = str(Path(args.out_dir) / f"fold{args.fold}"), f"{args.group}-fold{args.fold}"
    out_dir, earlier_run = check_settings(args, int(os.environ.get("WORLD_SIZE", 1)))
    joined = not dist.is_initialized()  # under torchrun, --folds K's fold runs share the group it joins
    rank, world_size, device = wbflow.setup_distributed()
    if args.folds and args.fold is None:  # --folds K: each fold's run in turn (done: with its oof.csv), then --cv
        for fold, last in enumerate(Path(args.out_dir, f"fold{fold}", "last.pth") for fold in range(args.folds)):
            if args.overwrite or not last.with_name("oof.csv").is_file():  # a stopped fold resumes from its last.pth
                main([*argv, "--fold", str(fold), *["--resume", str(last)] * (last.is_file() and not args.overwrite)])
        scores = cross_validate(argparse.Namespace(**{**vars(args), "cv": args.out_dir})) if rank == 0 else None
        if joined and dist.is_initialized():
            dist.destroy_process_group()
        return scores
    master, device = rank == 0, torch.device("cpu") if args.smoke else device  # rank 0 alone prints, logs, writes
    if not master:
        warnings.simplefilter("ignore")
    if generate and master and not Path(args.data_dir, "train.txt").is_file():  # a fold's run may find it there
        wbflow.write_pattern_dataset(args.data_dir, SMOKE_CLASS_COUNTS, test_images=20, seed=args.seed)
    wbflow.gather_from_ranks(generate)  # a barrier: no rank reads --smoke's data before it is written
    torch.manual_seed(args.seed + rank)  # each rank its own randomness
    class_names, train_set, val_set, train_loader = load_data(args, device, rank, world_size)
    state = build_model(args, len(class_names), train_set.labels, len(train_loader), device)
    # every setting as given, then what they became (names as the seed logs them)
    state.config = {**{key: value for key, value in vars(args).items() if key != "resume"},
                    "optimizer": type(state.optimizer).__name__, "loss_function": LOSS_NAMES[args.loss],
                    "scheduler": type(state.scheduler).__name__, "classes": class_names,
                    "amp": str(wbflow.autocast_dtype(device, args.amp) or "off").replace("torch.", ""),
                    "device": device.type, "world_size": world_size, "steps_per_epoch": len(train_loader),
                    "train_images": len(train_set), "val_images": len(val_set), "mean_std": wbflow.IMAGENET_MEAN_STD,
                    "class_counts": [train_set.labels.count(label) for label in range(len(class_names))]}
    resumed_from = resume_run(args, state, device, rank)
    run_config = state.config if resumed_from is None else {**state.config, "resumed_from": resumed_from}
    with wbflow.exit_on_error("train_fire", ()), wbflow.stop_on_signals() as stop, wbflow.wandb_run(
            run_config, project=args.project, enabled=not args.no_wandb, run_id=state.wandb_run_id,
            name=args.run_name, group=vars(args).get("group"), job_type=None if args.fold is None else "fold") as run:
        wbflow.define_metrics(run, {  # windows on the global step, the rest by epoch; summaries: the best value
            "train_loss": "min", "train_acc": "max", "epoch/train_loss": "min", "epoch/train_acc": "max",
            "val_loss": "min", "val_acc": "max", "val_macro_f1": "max", "val_score": "max", "val_f1/*": "max",
            f"best_{args.best_metric}": "last"}, "epoch", global_step=("train_",))
        state.wandb_run_id = run.id if run else state.wandb_run_id
        graph = args.log_graph and not (run and wbflow.log_model_graph(run, state.model, val_set[0][0][None].to(device),
                                                                       state.step))
        if args.watch or graph:  # W&B's graph where torchviz drew none
            wbflow.watch_model(run, state.model, log="all" if args.watch else None, log_freq=100, log_graph=graph)
        for path in earlier_run if master else []:  # --overwrite: every check has passed, the earlier run's files go
            path.unlink(missing_ok=True)
        train_epochs(args, argv, run, stop, state, (train_loader, val_set))
    if joined and dist.is_initialized():
        dist.destroy_process_group()
    if args.smoke and master and args.fold is None and (Path(args.data_dir) / "A.txt").is_file():  # its submission
        predict(argparse.Namespace(**{**vars(args), "predict": str(Path(args.data_dir) / "A.txt")}))
    return state.best


if __name__ == "__main__":
    main()

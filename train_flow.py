"""Rectified flow on CIFAR-10, tracked in W&B the way seed 000 describes.

  python train_flow.py                                         # one GPU, configs/cifar10_rectified_flow.yaml
  torchrun --standalone --nproc_per_node=8 train_flow.py       # DDP on one node (gloo on CPU)
  python train_flow.py --smoke                                 # the whole workflow on CPU, offline, < 2 min
  python train_flow.py --epochs 10 --batch-size 256 --set training.gradient_clip=0.5 --no-wandb
  python train_flow.py --resume runs/flow/checkpoint_epoch_10.pt         # or --resume model-<run id>:latest
  python train_flow.py --eval --checkpoint runs/flow/checkpoint_epoch_1020.pt --num-samples 10000 \
      --metric both --solver euler --nfe 100 --use-wandb --wandb-project flow_matching_cifar10_eval

Recipe: config -> data, model, optimiser -> epochs of wbflow.train_epoch on the rectified-flow loss,
with EMA samples, the solver table, checkpoints and artifacts -> (--eval) FID / Inception Score.
"""
import argparse
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import wbflow

HERE = Path(__file__).resolve().parent
# --smoke: a tiny UNet on a few hundred images, every interval one epoch, small sample counts, its own out_dir.
SMOKE_OVERRIDES = [
    "data.max_images=256", "data.out_dir=runs/flow-smoke", "model.base_channels=16", "model.channel_mults=[1, 2]",
    "model.num_res_blocks=1", "model.head_channels=16", "model.dropout=0.0", "training.epochs=1",
    "training.batch_size=32", "training.warmup_steps=10", "training.ema_decay=0.9", "training.log_interval=2",
    "training.save_interval=1", "training.sample_interval=1", "logging.log_images_interval=1",
    "logging.log_model_interval=1", "sampling.num_images=16", "sampling.nfe=10", "sampling.table_nfes=[1, 2, 4]",
    "sampling.rk45_tolerance=1.0e-3", "eval.sample_batch_size=16", "eval.inception_batch_size=10",
    "eval.fid_interval=0"]
# what --resume needs in a checkpoint; the driver field, when present, must say train_flow
RESUME_KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "global_step", "best_loss", "best_epoch",
               "epoch_loss", "table_rows", "skipped_steps", "rng", "train_state", "pending", "last_fid",
               "best_checkpoint", "wandb_run_id", "wandb_last_act", "config")
# settings a resume must keep: another value would make the run's W&B config lie, or the resume inexact
RESUME_FIXED = {"training": ("batch_size", "learning_rate", "warmup_steps", "gradient_clip", "ema_decay", "seed"),
                "data": ("max_images",), "sampling": ("num_images", "seed")}
# the parts of an epoch's end, in order, after its training; last.pt says which are still to do, so a stop or
# a kill in one resumes there. "fid" and "samples" log to the epoch's last step, which a W&B run that has
# finished that step no longer takes: a resume before them logs to a new run.
EPOCH_END = ("fid", "samples", "table", "checkpoint")
STEP_BOUND = ("fid", "samples")
# settings that must be above 0, or not below 0, checked before any data is read
POSITIVE = {"training": ("epochs", "batch_size", "learning_rate", "log_interval", "save_interval", "sample_interval"),
            "logging": ("log_images_interval", "log_model_interval"),
            "sampling": ("num_images", "nfe", "rk45_tolerance"),
            "eval": ("sample_batch_size", "inception_batch_size", "fid_num_samples")}
NOT_NEGATIVE = {"training": ("warmup_steps", "gradient_clip", "keep_checkpoints"), "eval": ("fid_interval",)}
SOLVERS = ("euler", "heun", "rk45")
DEFAULT_CONFIG = HERE / "configs" / "cifar10_rectified_flow.yaml"


def parse_args(argv=None):
    defaults = wbflow.load_yaml_config(DEFAULT_CONFIG)  # for the defaults --help shows
    data, training, sampling = defaults["data"], defaults["training"], defaults["sampling"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set training.gradient_clip=0.5 (default: none)")
    parser.add_argument("--data-dir", "--data_dir",
                        help=f"folder holding cifar-10-batches-py/ (default: data.data_dir, {data['data_dir']})")
    parser.add_argument("--out-dir", "--out_dir", help=f"checkpoints and sample PNGs; a new run refuses a folder "
                                                       f"holding checkpoints (default: data.out_dir, {data['out_dir']})")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run's checkpoints in --out-dir instead of refusing (default: off)")
    parser.add_argument("--epochs", type=int, help=f"default: training.epochs, {training['epochs']}")
    parser.add_argument("--batch-size", "--batch_size", type=int,
                        help=f"global, over all ranks (default: training.batch_size, {training['batch_size']})")
    parser.add_argument("--no-wandb", "--no_wandb", action="store_true",
                        help="train without W&B (default: logging.use_wandb decides)")
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, a few hundred images (--data-dir, else "
                                                             "synthetic), CPU, W&B offline, --out-dir runs/flow-smoke "
                                                             "(default: off)")
    parser.add_argument("--resume", metavar="PATH|ARTIFACT",
                        help="checkpoint file or W&B model artifact of the run to continue (default: none)")
    evaluation = parser.add_argument_group("evaluation (--eval)")
    evaluation.add_argument("--eval", action="store_true", help="FID / Inception Score of --checkpoint (default: off)")
    evaluation.add_argument("--checkpoint", metavar="PATH|ARTIFACT", help="what --eval samples from (default: none)")
    evaluation.add_argument("--num-samples", "--num_samples", type=int, default=10000,
                            help="images to sample (default: %(default)s)")
    evaluation.add_argument("--metric", choices=("fid", "is", "both"), default="both", help="default: %(default)s")
    evaluation.add_argument("--solver", choices=SOLVERS, help=f"default: sampling.solver, {sampling['solver']}")
    evaluation.add_argument("--nfe", type=int, help=f"model evaluations per sample (default: sampling.nfe, "
                                                    f"{sampling['nfe']})")
    evaluation.add_argument("--use-wandb", "--use_wandb", action="store_true",
                            help="log the scores to W&B (default: off)")
    evaluation.add_argument("--wandb-project", "--wandb_project",
                            help=f"default: {defaults['logging']['project_name']}_eval")
    return parser.parse_args(argv)


def load_config(args):
    flags = {"training.epochs": args.epochs, "training.batch_size": args.batch_size}
    overrides = ((SMOKE_OVERRIDES if args.smoke else []) + args.set
                 + [f"{key}={value}" for key, value in flags.items() if value is not None])
    try:
        config = wbflow.load_yaml_config(args.config, overrides, reference=DEFAULT_CONFIG)
    except (OSError, KeyError, ValueError) as error:  # a missing file, an unknown key, a value of the wrong type
        raise SystemExit(f"train_flow.py: {error.args[0] if isinstance(error, KeyError) else error}") from None
    for key in ("data_dir", "out_dir"):  # paths are set as given, not parsed as YAML
        config["data"][key] = getattr(args, key) or config["data"][key]
    if args.no_wandb:
        config["logging"]["use_wandb"] = False
    return config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = load_config(args)
    data, training, evaluation = config["data"], config["training"], config["eval"]
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):  # every setting, before any data or process group
        wbflow.check_numbers({**settings(config, POSITIVE), "--num-samples": args.num_samples, "--nfe": args.nfe or 1,
                              "data.max_images": data["max_images"] or 1,
                              "eval.num_real_images": evaluation["num_real_images"] or 1},
                             settings(config, NOT_NEGATIVE))
        if not 0 <= training["ema_decay"] < 1:
            raise ValueError(f"training.ema_decay must be in [0, 1), not {training['ema_decay']}")
        if training["batch_size"] < world_size:
            raise ValueError(f"training.batch_size {training['batch_size']} is smaller than the {world_size} ranks "
                             f"(it is the global batch, split over them)")
        if args.eval and args.metric != "is" and args.num_samples < 2:
            raise ValueError(f"--num-samples is {args.num_samples}: FID needs at least two samples")
        if not args.eval and evaluation["fid_interval"] and evaluation["fid_num_samples"] < max(2, world_size):
            raise ValueError(f"eval.fid_num_samples is {evaluation['fid_num_samples']}: FID needs at least two "
                             f"samples, and one per rank")
        for flag, reference in (("--resume", args.resume), ("--checkpoint", args.checkpoint)):
            if reference and os.path.isdir(reference):
                raise ValueError(f"{flag} {reference} is a folder, not a checkpoint file")
        for solver in [config["sampling"]["solver"], *config["sampling"]["table_solvers"]]:
            if solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r} in sampling.solver / sampling.table_solvers; "
                                 f"choose from {', '.join(SOLVERS)}")
        if args.eval and not args.checkpoint:
            raise ValueError("--eval needs --checkpoint PATH|ARTIFACT")
        if not args.eval and evaluation["fid_interval"]:  # found (or downloaded) before any data or W&B
            check_fid_weights(evaluation["fid_weights"], evaluation["fid_interval"])
        if not args.eval:
            _, earlier_run = wbflow.prepare_out_dir(data["out_dir"], resume=args.resume, overwrite=args.overwrite)
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    with wbflow.exit_on_error("train_flow.py"):  # missing data, checkpoint or weights; a full disk
        if not args.eval:
            return train(config, argv, resume=args.resume, smoke=args.smoke, synthetic=args.smoke and not args.data_dir,
                         earlier_run=earlier_run)
        sampling, evaluation, logging = config["sampling"], config["eval"], config["logging"]
        return evaluate(args.checkpoint, num_samples=args.num_samples, metric=args.metric,
                        solver=args.solver or sampling["solver"], nfe=args.nfe or sampling["nfe"],
                        tolerance=sampling["rk45_tolerance"], seed=sampling["seed"], data_dir=data["data_dir"],
                        out_dir=data["out_dir"], stats_dir=evaluation["stats_dir"],
                        num_real_images=evaluation["num_real_images"], sample_batch_size=evaluation["sample_batch_size"],
                        inception_batch_size=evaluation["inception_batch_size"], fid_weights=evaluation["fid_weights"],
                        project=logging["project_name"], entity=logging["entity"], use_wandb=args.use_wandb,
                        eval_project=args.wandb_project or f"{logging['project_name']}_eval",
                        device=torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))


def settings(config, names):
    """{"section.key": value} of the config for `names` ({section: keys})."""
    return {f"{section}.{key}": config[section][key] for section, keys in names.items() for key in keys}


def check_fid_weights(weights, fid_interval=None):
    """The FID Inception weights file (found, or downloaded into the torch hub cache), else a one-line
    ValueError saying where to put it and, for FID during training (every fid_interval epochs), how to go on
    without."""
    try:
        return wbflow.fid_weights_path(weights)
    except FileNotFoundError:
        hub_path = Path(torch.hub.get_dir()) / "checkpoints" / wbflow.FID_WEIGHTS_FILE  # where they are looked for
        given = weights or os.environ.get(wbflow.FID_WEIGHTS_ENV)
        needs = f"FID every {fid_interval} epochs (eval.fid_interval)" if fid_interval else "--eval"
        found = f"{given} does not exist" if given else "they could not be downloaded"
        without = "; or train without FID: --set eval.fid_interval=0" if fid_interval else ""
        raise ValueError(f"{needs} needs the FID Inception weights, but {found}: download {wbflow.FID_WEIGHTS_URL} "
                         f"to {hub_path}, or anywhere and pass --set eval.fid_weights=PATH{without}") from None


def train(config, argv, *, resume=None, smoke=False, synthetic=False, earlier_run=()):
    data, training, logging = config["data"], config["training"], config["logging"]
    sampling, evaluation = config["sampling"], config["eval"]
    rank, world_size, device = wbflow.setup_distributed()
    config["world_size"] = world_size  # in W&B and in checkpoints: a resume needs the same number of ranks
    device = torch.device("cpu") if smoke else device
    is_main = rank == 0  # the only process that prints, logs to W&B and writes checkpoints
    say = print if is_main else (lambda *_, **__: None)
    out_dir = Path(data["out_dir"])
    torch.manual_seed(training["seed"] + rank)

    # Data: the training set as one uint8 tensor on the device (rank 0 downloads first).
    if synthetic:
        images_uint8 = wbflow.synthetic_images(data["max_images"], seed=training["seed"])
        say(f"smoke: {len(images_uint8)} synthetic images (pass --data-dir to use CIFAR-10)")
    else:
        if world_size > 1 and not is_main:
            dist.barrier()
        images_uint8 = wbflow.load_cifar10(data["data_dir"], download=is_main)[0][:data["max_images"]]
        if world_size > 1 and is_main:
            dist.barrier()
        say(f"CIFAR-10: {len(images_uint8)} training images from {data['data_dir']}")
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        wbflow.check_same_on_every_rank({"training images": len(images_uint8)})
    channels_last = training["channels_last"] and device.type == "cuda"
    loader = wbflow.DeviceImageLoader(images_uint8, training["batch_size"] // world_size, device=device,
                                      seed=training["seed"], rank=rank, world_size=world_size,
                                      channels_last=channels_last)
    if len(loader) == 0:
        raise SystemExit(f"train_flow.py: {len(images_uint8)} images make no batch of {loader.batch_size} per rank")

    # Model, EMA, optimiser, warm-up schedule; AMP chosen once: bf16 (fp16 with a scaler where bf16 is missing) on CUDA.
    model = wbflow.FlowUNet(**config["model"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = wbflow.make_ema(model, training["ema_decay"])
    optimizer = torch.optim.Adam(model.parameters(), lr=training["learning_rate"], fused=True)
    warmup_steps = max(1, training["warmup_steps"])  # lr * (step + 1) / warmup_steps, then constant
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps - 1)
    amp_dtype = wbflow.autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    say(f"FlowUNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world_size} x {device}")

    # Resume: this driver's checkpoint of the same model and settings; W&B continues the run only from its last act.
    start_epoch, step, best_loss, best_epoch, run_id, table_rows, skipped_steps = 1, 0, None, None, None, [], 0
    epoch_state, resumed_from, pending, epoch_loss, last_fid, best_checkpoint = None, None, [], None, None, None
    if resume:
        path = wbflow.fetch_checkpoint(resume, project=logging["project_name"], entity=logging["entity"])
        with wbflow.exit_on_error(f"train_flow.py: --resume {resume}", (ValueError,)):
            state = wbflow.load_checkpoint(path, map_location=device)
            wbflow.check_checkpoint(
                state, driver="train_flow", required=RESUME_KEYS,
                expected={"model": config["model"], "world_size": world_size,
                          **{section: {key: config[section][key] for key in keys}
                             for section, keys in RESUME_FIXED.items()}},
                hints={"model": ": pass the --config/--set (and --smoke) of the run it came from",
                       **dict.fromkeys(RESUME_FIXED, ": a resumed run keeps the settings it trained with (only "
                                                     "training.epochs and the intervals may change)"),
                       "world_size": " processes (each rank resumes its own batches and RNG: resume with the same number)"})
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 (bf16 or CPU)
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_loss, best_epoch = state["global_step"], state["best_loss"], state["best_epoch"]
        table_rows, last_fid, best_checkpoint = state["table_rows"], state["last_fid"], state["best_checkpoint"]
        skipped_steps, epoch_state, pending = state["skipped_steps"], state["train_state"], state["pending"]
        epoch_loss = state["epoch_loss"]  # the artifact's "best" alias and best_checkpoint read it
        start_epoch = state["epoch"] + (epoch_state is None and not pending)  # a stopped epoch or its end goes first
        wbflow.restore_rng_state(state["rng"][rank])
        say(f"resumed from {resume} at epoch {state['epoch']}"
            f"{', batch ' + str(epoch_state['batches']) if epoch_state else ''}"
            f"{', before its ' + ', '.join(pending) if pending else ''}, step {step}")
        run_id, step_bound = state["wandb_run_id"], [part for part in pending if part in STEP_BOUND]
        if not logging["use_wandb"]:
            pass  # the run id stays in the checkpoints, for a resume with W&B
        elif state["wandb_last_act"] and run_id and not step_bound:  # the run has nothing after this checkpoint
            say(f"W&B: continuing run {run_id} from step {step}")
        else:
            why = ("the run it came from logged no W&B" if not run_id else
                   f"run {run_id} has finished step {step}, where epoch {state['epoch']}'s {' and '.join(step_bound)} "
                   f"belong" if state["wandb_last_act"] else
                   f"run {run_id} may have logged past this checkpoint")  # an epoch checkpoint: W&B would drop those
            resumed_from, run_id = {"run_id": run_id, "step": step, "checkpoint": str(path)}, None
            say(f"W&B: a new run (config resumed_from: run {resumed_from['run_id']}, step {step}), since {why}")

    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if training["compile"]:  # compile outside DDP, so DDP's bucketing splits the graph
        train_model = torch.compile(train_model)
    # The same seeded noise every time, so eval/generated_samples show progress, not new noise.
    fixed_noise = torch.randn(sampling["num_images"], 3, 32, 32,
                              generator=torch.Generator().manual_seed(sampling["seed"])).to(device)
    solver, nfe, tolerance = sampling["solver"], sampling["nfe"], sampling["rk45_tolerance"]
    inception = None

    def checkpoint(epoch, train_state=None, last_act=False, pending=()):
        """Everything a resume needs; train_state is a stopped epoch's, pending the parts of the epoch's end
        still to do (EPOCH_END), last_act marks the run's final write."""
        return {"model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "global_step": step, "best_loss": best_loss, "best_epoch": best_epoch, "epoch_loss": epoch_loss,
                "config": config,
                "rng": wbflow.gather_from_ranks(wbflow.capture_rng_state()),  # each rank resumes its own
                "table_rows": table_rows, "skipped_steps": skipped_steps, "train_state": train_state,
                "pending": list(pending), "last_fid": last_fid, "best_checkpoint": best_checkpoint,
                "wandb_run_id": run.id if run else run_id, "wandb_last_act": last_act, "driver": "train_flow"}

    def stop_run(state, where):
        """SIGTERM or Ctrl-C: save where the run stands as its last act, say how to go on, exit 128 + signal."""
        wbflow.exit_stopped(stop, state, out_dir / "last.pt", script=__file__, argv=argv, where=f" {where}")

    def stop_agreed():  # every rank stops at the same sampling batch, or the next collective hangs
        flag = torch.tensor(float(stop.is_set()), device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def log_fid(epoch):
        """FID/IS of the EMA model against the training images; every rank samples a share, rank 0 logs.
        False when a stop request cut it short."""
        nonlocal inception, last_fid
        if stop_agreed():
            return False
        inception = inception or wbflow.load_fid_inception(evaluation["fid_weights"], device)
        name = "synthetic" if synthetic else "cifar10-train"
        statistics = wbflow.save_statistics(
            images_uint8[rank::world_size], out_dir / "fid_stats" if synthetic else
            evaluation["stats_dir"] or Path(data["data_dir"]) / "fid_stats",
            name if len(images_uint8) == 50000 else f"{name}-{len(images_uint8)}",
            batch_size=evaluation["inception_batch_size"], device=device, weights_path=evaluation["fid_weights"])
        count = evaluation["fid_num_samples"]
        samples_uint8, _ = sample_images(
            ema_model.module, len(range(rank, count, world_size)), batch_size=evaluation["sample_batch_size"],
            batches=math.ceil(math.ceil(count / world_size) / evaluation["sample_batch_size"]),  # as on every rank
            seed=sampling["seed"] + 1 + rank, solver=solver, nfe=nfe, tolerance=tolerance, device=device,
            stop=stop_agreed)
        if samples_uint8 is None:
            return False
        quality = scores(samples_uint8, inception, statistics, batch_size=evaluation["inception_batch_size"])
        last_fid = {"epoch": epoch, "fid": quality["eval/fid_score"], "samples": count}
        say(f"epoch {epoch}: FID {last_fid['fid']:.2f} on {count} samples")
        run.log({**quality, "train/epoch": epoch}, step=step)
        return True

    def log_samples(epoch):
        """eval/generated_samples of the fixed noise, also a PNG in out_dir/samples."""
        samples, nfe_used = sample(ema_model.module, fixed_noise, solver, nfe, tolerance, dtype=amp_dtype)
        grid = wbflow.sample_grid(samples)
        wbflow.save_png(grid, out_dir / "samples" / f"epoch_{epoch:04d}.png")
        wbflow.log_image_grid(run, "eval/generated_samples", grid, step=step,
                              caption=f"epoch {epoch}, EMA, {solver} NFE {nfe_used}")
        return True

    def add_table_rows(epoch):
        """This epoch's rows of eval/samples_table, kept only when every solver and NFE is done."""
        rows = solver_rows(ema_model.module, fixed_noise, epoch, out_dir, solvers=sampling["table_solvers"],
                           nfes=sampling["table_nfes"], tolerance=tolerance, dtype=amp_dtype, stop=stop.is_set)
        table_rows.extend(rows or [])
        return rows is not None

    def finish_epoch(epoch, pending):
        """Do the parts of `pending` that can be stopped (all but "checkpoint"), in order; rank 0 alone samples
        the grid and the table. Returns the parts left, every rank the same: none unless a stop request came."""
        parts = {"fid": log_fid, "samples": log_samples, "table": add_table_rows}
        done = 0
        for part in pending:
            if part in parts and (part == "fid" or is_main):
                if (part != "fid" and stop.is_set()) or not parts[part](epoch):
                    break
            done += 1
        left = wbflow.gather_from_ranks(pending[done:])[0]  # rank 0's account
        return [] if left == ["checkpoint"] else left

    run_config = config if resumed_from is None else {**config, "resumed_from": resumed_from}
    with wbflow.stop_on_signals() as stop, wbflow.wandb_run(
            run_config, project=logging["project_name"], enabled=logging["use_wandb"], run_id=run_id,
            entity=logging["entity"], name=logging["run_name"], tags=logging["tags"], notes=logging["notes"]) as run:
        # per-step series on the global step; epoch ones on train/epoch; summaries hold the best, not the last
        run.define_metric("train/loss", summary="min")
        run.define_metric("train/epoch")
        run.define_metric("train/epoch_loss", step_metric="train/epoch", summary="min")
        run.define_metric("train/images_per_second", step_metric="train/epoch")
        run.define_metric("eval/fid_score", step_metric="train/epoch", summary="min")
        run.define_metric("eval/inception_score_*", step_metric="train/epoch")

        def log_window(step, window):
            nonlocal skipped_steps
            skipped_steps += window["skipped"]
            run.log({"train/loss": window["loss"], "train/learning_rate": window["learning_rate"],
                     "train/grad_norm": window["grad_norm"], "train/epoch": window["epoch"],
                     "train/skipped_steps": skipped_steps}, step=step)

        if is_main:  # --overwrite: every check has passed, so the earlier run's checkpoints go now
            for path in earlier_run:
                path.unlink(missing_ok=True)
        for epoch in range(start_epoch, training["epochs"] + 1):
            trained = not pending  # else a resumed epoch, trained already, whose end was cut short
            if trained:
                loader.set_epoch(epoch, skip_batches=epoch_state["batches"] if epoch_state else 0)
                stats = wbflow.train_epoch(train_model, loader, optimizer, wbflow.rectified_flow_loss, device=device,
                                           scheduler=scheduler, ema_model=ema_model, grad_clip=training["gradient_clip"],
                                           scaler=scaler, step=step, epoch=epoch, log_every=training["log_interval"],
                                           on_log=log_window, stop=stop, resume=epoch_state, progress=is_main)
                step, epoch_state = stats["step"], None
                if stats["stopped"]:  # save where this epoch stands
                    stop_run(checkpoint(epoch, train_state=stats["state"], last_act=True),
                             f"at step {step} (epoch {epoch})")
                # train_epoch's loss and sample count are over all ranks already
                epoch_loss, images_per_second = stats["loss"], stats["samples"] / stats["seconds"]
                say(f"epoch {epoch}: loss {epoch_loss:.4f}, {images_per_second:.0f} images/s, step {step}")
                run.log({"train/epoch_loss": epoch_loss, "train/images_per_second": images_per_second,
                         "train/epoch": epoch}, step=step)
                if not math.isnan(epoch_loss) and (best_loss is None or epoch_loss < best_loss):
                    best_loss, best_epoch = epoch_loss, epoch
                pending = epoch_end_parts(epoch, config)
            state = checkpoint(epoch, pending=pending)  # every rank takes part in gathering the RNG states
            if is_main and trained:  # the epoch's training is safe before its FID, samples and table
                wbflow.save_checkpoint(state, out_dir / "last.pt")
            left = finish_epoch(epoch, pending)
            if left:
                stop_run(checkpoint(epoch, pending=left, last_act=True),
                         f"at step {step} (epoch {epoch}), before its {', '.join(left)}")
            due, pending = pending, []
            if not due:  # the last.pt above has it all
                continue
            if "checkpoint" in due and not math.isnan(epoch_loss) and (
                    best_checkpoint is None or epoch_loss < best_checkpoint["epoch_loss"]):
                best_checkpoint = {"path": f"checkpoint_epoch_{epoch}.pt", "epoch": epoch, "epoch_loss": epoch_loss}
            state = checkpoint(epoch)
            if not is_main:
                continue
            wbflow.flush_run(run)  # what the epoch logged is on disk before the checkpoints a resume starts from
            if "checkpoint" in due:
                path = wbflow.save_checkpoint(state, out_dir / f"checkpoint_epoch_{epoch}.pt")
                wbflow.rotate_checkpoints(out_dir, keep=training["keep_checkpoints"])
                say(f"saved {path}")
                if epoch % logging["log_model_interval"] == 0:
                    wbflow.log_artifact(run, path, f"model-{run.id}",
                                        aliases=["latest", f"epoch-{epoch}"] + ["best"] * (best_epoch == epoch),
                                        metadata={"epoch": epoch, "global_step": step, "config": config})
            wbflow.save_checkpoint(state, out_dir / "last.pt")  # the epoch's end is done: nothing pending

        if run and table_rows:
            run.log({"eval/samples_table": wbflow.samples_table(table_rows, root=out_dir)},
                    step=step + 1)  # flush_run committed step
        state = checkpoint(training["epochs"], last_act=True)  # the run's last act: a resume may continue it
        if is_main and start_epoch <= training["epochs"]:
            wbflow.save_checkpoint(state, out_dir / "last.pt")
    if world_size > 1:
        dist.destroy_process_group()
    say(headline(out_dir, step, best_loss, best_epoch, last_fid, best_checkpoint))
    return {"step": step, "best_loss": best_loss, "out_dir": out_dir}


def epoch_end_parts(epoch, config):
    """The parts of EPOCH_END that `epoch` has, by the config's intervals."""
    training, logging, evaluation = config["training"], config["logging"], config["eval"]
    last = epoch == training["epochs"]
    due = {"fid": evaluation["fid_interval"] and epoch % evaluation["fid_interval"] == 0,
           "samples": epoch % logging["log_images_interval"] == 0,
           "table": epoch % training["sample_interval"] == 0 or last,
           "checkpoint": epoch % training["save_interval"] == 0 or epoch % logging["log_model_interval"] == 0 or last}
    return [part for part in EPOCH_END if due[part]]


def headline(out_dir, step, best_loss, best_epoch, last_fid, best_checkpoint):
    """The run's result in two lines: the best epoch loss, the last FID, where the checkpoints are."""
    best = f"best epoch loss {best_loss:.4f} (epoch {best_epoch})" if best_loss is not None else "no finite epoch loss"
    fid = (f", last FID {last_fid['fid']:.2f} (epoch {last_fid['epoch']}, {last_fid['samples']} samples)"
           if last_fid else "")
    lowest = (f"; the lowest-loss checkpoint: {out_dir / best_checkpoint['path']} (epoch {best_checkpoint['epoch']})"
              if best_checkpoint else "")
    return f"done at step {step}: {best}{fid}\n  last checkpoint: {out_dir / 'last.pt'}{lowest}"


def sample(model, noise, solver, nfe, tolerance, dtype=None):
    """(samples, evaluations used) with solver "euler" (nfe steps), "heun" (nfe // 2 steps) or "rk45"
    (adaptive at `tolerance`; nfe unused)."""
    if solver == "rk45":
        return wbflow.rk45_sample(model, noise, tolerance=tolerance, dtype=dtype)
    steps = max(1, nfe // 2) if solver == "heun" else nfe
    return wbflow.euler_sample(model, noise, steps, heun=solver == "heun", dtype=dtype), steps * (1 + (solver == "heun"))


def sample_images(model, count, *, batch_size, seed, solver, nfe, tolerance, device, batches=None, stop=None,
                  progress=False):
    """(count samples as uint8 on the CPU, evaluations used per sample), in float32 as the published FIDs
    sample, or (None, None) when stop() turned true before a batch. The noise comes from its own generator and
    nothing here draws from the global one, so a training run goes on exactly as without it. `batches`
    (default: as many as count needs) may add empty ones, so that every rank checks stop() as often."""
    from tqdm.auto import tqdm
    generator, parts, used = torch.Generator().manual_seed(seed), [], nfe
    batches = math.ceil(count / batch_size) if batches is None else batches
    for start in tqdm(range(0, batches * batch_size, batch_size), desc="sampling", unit="batch", disable=not progress,
                      leave=False, dynamic_ncols=True):
        if stop is not None and stop():
            return None, None
        if start < count:
            noise = torch.randn(min(batch_size, count - start), 3, 32, 32, generator=generator).to(device)
            samples, used = sample(model, noise, solver, nfe, tolerance)
            parts.append(wbflow.images_to_uint8(samples).cpu())
    return torch.cat(parts), used


def scores(samples_uint8, inception, statistics=None, *, inception_score=True, batch_size, progress=False):
    """eval/fid_score against `statistics` (when given) and eval/inception_score_*, from one Inception
    pass over the samples (features for FID, logits for IS; gathered over the ranks)."""
    features, logits = wbflow.inception_features(samples_uint8, inception, batch_size=batch_size, progress=progress)
    metrics = {} if statistics is None else {"eval/fid_score": wbflow.fid(statistics, features)}
    if inception_score:
        metrics["eval/inception_score_mean"], metrics["eval/inception_score_std"] = wbflow.inception_score(
            logits, splits=min(10, len(logits)))
    return metrics


def solver_rows(model, noise, epoch, out_dir, *, solvers, nfes, tolerance, dtype, stop=None):
    """This epoch's rows of eval/samples_table (None when stop() cut compare_solvers short); each grid goes to
    a PNG that the table reads at the end, named relative to out_dir so the rows in a checkpoint survive
    moving the folder or the machine."""
    rows = []
    compared = wbflow.compare_solvers(model, noise, solvers=solvers, nfes=nfes, tolerance=tolerance, dtype=dtype,
                                      stop=stop)
    for row in compared or []:
        name = f"epoch_{epoch:04d}_{row['solver']}_nfe{row['nfe']:03d}.png"
        path = wbflow.save_png(wbflow.sample_grid(row["images"]), out_dir / "samples" / name)
        rows.append({"epoch": epoch, "solver": row["solver"], "nfe": row["nfe"], "seconds": row["seconds"],
                     "samples": str(path.relative_to(out_dir))})
    return None if compared is None else rows


def cifar10_train_batches(data_dir, batch_size):
    """CIFAR-10 training images in batches, read only when the FID statistics are not cached yet."""
    images_uint8, _ = wbflow.load_cifar10(data_dir)
    yield from images_uint8.split(batch_size)


def evaluate(checkpoint, *, num_samples, metric, solver, nfe, tolerance, seed, data_dir, out_dir, stats_dir,
             num_real_images, sample_batch_size, inception_batch_size, fid_weights, project, entity, use_wandb,
             eval_project, device):
    """--eval: FID and/or Inception Score of `checkpoint`'s EMA model, logged to its own W&B run in eval_project
    (`project` is the training run's, where a model artifact is looked up)."""
    # Everything the scores need is checked first: sampling can take hours.
    path = wbflow.fetch_checkpoint(checkpoint, project=project, entity=entity)
    with wbflow.exit_on_error(f"train_flow.py: --checkpoint {checkpoint}", (ValueError,)):
        state = wbflow.load_checkpoint(path, map_location=device)
        wbflow.check_checkpoint(state, driver="train_flow", required=("ema", "config", "epoch", "global_step"),
                                hints={"ema": " (not a train_flow checkpoint: every one holds the EMA weights)"})
    statistics_name = f"cifar10-train-{num_real_images}" if num_real_images else "cifar10-train"
    statistics_dir = stats_dir or Path(data_dir) / "fid_stats"
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        weights_hash = wbflow.file_sha256(check_fid_weights(fid_weights))[:12]
    if metric != "is" and not (Path(statistics_dir) / f"{statistics_name}-tensorflow-{weights_hash}.npz").is_file():
        wbflow.load_cifar10(data_dir)  # downloads when absent, else says which archive to put where

    # Samples from the EMA weights, with the same seeded noise every time. SIGTERM or Ctrl-C stops between
    # sampling batches or after the Inception pass; a second one at once. Nothing is saved until the end.
    ema_model = wbflow.make_ema(wbflow.FlowUNet(**state["config"]["model"]).to(device))
    ema_model.load_state_dict(state["ema"])
    try:
        with wbflow.stop_on_signals() as stop:
            samples_uint8, used = sample_images(ema_model.module, num_samples, batch_size=sample_batch_size, seed=seed,
                                                solver=solver, nfe=nfe, tolerance=tolerance, device=device,
                                                stop=stop.is_set, progress=True)
            if samples_uint8 is None:
                raise KeyboardInterrupt  # as a second signal does: the except below says so in one line
            print(f"sampled {len(samples_uint8)} images from {path} (epoch {state['epoch']}) with {solver}, NFE {used}")
            inception = wbflow.load_fid_inception(fid_weights, device)
            statistics = None if metric == "is" else wbflow.save_statistics(
                cifar10_train_batches(data_dir, inception_batch_size), statistics_dir, statistics_name,
                batch_size=inception_batch_size, device=device, num_images=num_real_images, weights_path=fid_weights,
                progress=True)
            metrics = scores(samples_uint8, inception, statistics, inception_score=metric != "fid",
                             batch_size=inception_batch_size, progress=True)
            if stop.is_set():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        number = stop.signal or signal.SIGINT
        print(f"train_flow.py: --eval stopped by {signal.Signals(number).name}; nothing was saved", file=sys.stderr)
        raise SystemExit(128 + number) from None
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))

    grid = wbflow.sample_grid(samples_uint8[:64])
    wbflow.save_png(grid, Path(out_dir) / "samples" / f"eval_epoch_{state['epoch']:04d}.png")
    eval_config = {"checkpoint": str(checkpoint), "epoch": state["epoch"], "global_step": state["global_step"],
                   "num_samples": num_samples, "metric": metric, "solver": solver, "nfe": used,
                   "model": state["config"]["model"], "fid_reference": wbflow.fid_reference()}
    with wbflow.wandb_run(eval_config, project=eval_project, enabled=use_wandb, entity=entity, job_type="eval") as run:
        run.log(metrics)
        wbflow.log_image_grid(run, "eval/sample_images", grid, caption=f"{solver} NFE {used}, epoch {state['epoch']}")
    return metrics


if __name__ == "__main__":
    main()

"""Rectified flow on CIFAR-10, tracked in W&B the way seed 000 describes.

  python train_flow.py                                         # one GPU, configs/cifar10_rectified_flow.yaml
  torchrun --standalone --nproc_per_node=8 train_flow.py       # DDP on one node (gloo on CPU)
  python train_flow.py --smoke                                 # the whole workflow on CPU, offline, < 2 min
  python train_flow.py --epochs 10 --batch-size 256 --set training.gradient_clip=0.5 --no-wandb
  python train_flow.py --resume checkpoints/checkpoint_epoch_10.pt       # or --resume model-<run id>:latest
  python train_flow.py --eval --checkpoint checkpoints/checkpoint_epoch_1020.pt --num-samples 10000 \
      --metric both --solver euler --nfe 100 --use-wandb --wandb-project flow_matching_cifar10_eval

Recipe: config -> data, model, optimiser -> epochs of wbflow.train_epoch on the rectified-flow loss,
with EMA samples, the solver table, checkpoints and artifacts -> (--eval) FID / Inception Score.
"""
import argparse
import errno
import math
import os
import shlex
import sys
from pathlib import Path

import signal

import torch
import torch.distributed as dist

import wbflow

HERE = Path(__file__).resolve().parent
# --smoke: a tiny UNet on a few hundred images, every interval one epoch, small sample counts.
SMOKE_OVERRIDES = [
    "data.max_images=256", "model.base_channels=16", "model.channel_mults=[1, 2]", "model.num_res_blocks=1",
    "model.head_channels=16", "model.dropout=0.0", "training.epochs=1", "training.batch_size=32",
    "training.warmup_steps=10", "training.ema_decay=0.9", "training.log_interval=2", "training.save_interval=1",
    "training.sample_interval=1", "logging.log_images_interval=1", "logging.log_model_interval=1",
    "sampling.num_images=16", "sampling.nfe=10", "sampling.table_nfes=[1, 2, 4]", "sampling.rk45_tolerance=1.0e-3",
    "eval.sample_batch_size=16", "eval.inception_batch_size=10", "eval.fid_interval=0"]
# what --resume needs in a checkpoint; the driver field, when present, must say train_flow
RESUME_KEYS = ("model", "ema", "optimizer", "scheduler", "epoch", "global_step", "config")


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
                                                             "synthetic), CPU, W&B offline (default: off)")
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
        config = wbflow.load_yaml_config(args.config, overrides)
    except (OSError, KeyError, ValueError) as error:  # a missing file, an unknown key, a value of the wrong type
        raise SystemExit(f"train_flow.py: {error.args[0] if isinstance(error, KeyError) else error}") from None
    for key in ("data_dir", "out_dir"):  # paths are set as given, not parsed as YAML
        config["data"][key] = getattr(args, key) or config["data"][key]
    if args.no_wandb:
        config["logging"]["use_wandb"] = False
    return config


def check_settings(config, args, world_size):
    """One line naming the first bad setting, before any data is read or any process group is joined."""
    training, sampling = config["training"], config["sampling"]
    positive = {f"{section}.{key}": config[section][key] for section, keys in {
        "training": ("epochs", "batch_size", "log_interval", "save_interval", "sample_interval"),
        "logging": ("log_images_interval", "log_model_interval"), "sampling": ("num_images", "nfe"),
        "eval": ("sample_batch_size", "inception_batch_size")}.items() for key in keys}
    positive.update({"--num-samples": args.num_samples, "--nfe": args.nfe or 1,
                     "data.max_images": config["data"]["max_images"] or 1})
    for name, value in positive.items():
        if not value > 0:
            raise SystemExit(f"train_flow.py: {name} must be positive, not {value}")
    for name in ("warmup_steps", "keep_checkpoints"):
        if not training.get(name, 0) >= 0:
            raise SystemExit(f"train_flow.py: training.{name} must not be negative, not {training[name]}")
    if training["batch_size"] < world_size:
        raise SystemExit(f"train_flow.py: training.batch_size {training['batch_size']} is smaller than the "
                         f"{world_size} ranks (it is the global batch, split over them)")
    for flag, reference in (("--resume", args.resume), ("--checkpoint", args.checkpoint)):
        if reference and os.path.isdir(reference):
            raise SystemExit(f"train_flow.py: {flag} {reference} is a folder, not a checkpoint file")
    for solver in [sampling["solver"], *sampling["table_solvers"]]:
        if solver not in SOLVERS:
            raise SystemExit(f"train_flow.py: unknown solver {solver!r} in sampling.solver / sampling.table_solvers;"
                             f" choose from {', '.join(SOLVERS)}")


def check_resume_checkpoint(state, config, reference):
    """Refuse in one line a --resume / --checkpoint file that is not this driver's, or that holds another model."""
    where = f"train_flow.py: {reference}"
    saved_config = state.get("config") if isinstance(state, dict) else None
    if (not isinstance(saved_config, dict) or not isinstance(saved_config.get("model"), dict)
            or state.get("driver", "train_flow") != "train_flow"):
        raise SystemExit(f"{where} is not a train_flow checkpoint (a train_fire.py one is resumed by train_fire.py)")
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise SystemExit(f"{where} cannot be resumed: it lacks {', '.join(missing)}")
    changed = [f"{key} {saved_config['model'].get(key)!r} there, {value!r} here"
               for key, value in config["model"].items() if saved_config["model"].get(key) != value]
    if changed:
        raise SystemExit(f"{where} holds another model ({'; '.join(changed)}): pass the --config/--set "
                         f"(and --smoke) of the run it came from")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = load_config(args)
    check_settings(config, args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    try:
        if not args.eval:
            wbflow.prepare_out_dir(config["data"]["out_dir"], resume=args.resume, overwrite=args.overwrite)
    except ValueError as error:
        raise SystemExit(f"train_flow.py: {error}") from None
    try:
        return evaluate(config, args) if args.eval else train(config, args, argv)
    except FileNotFoundError as error:  # missing data, checkpoint or weights: the message says what to do
        raise SystemExit(f"train_flow.py: {error}") from None
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise SystemExit(f"train_flow.py: {error.strerror}") from None


def resume_command(argv, checkpoint, world_size):
    """The command line that continues this run from `checkpoint`: the same flags, --resume replaced."""
    flags, skip = [], False
    for flag in argv:
        if not skip and not flag.startswith(("--resume=",)):
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


def train(config, args, argv):
    data, training, logging, sampling = config["data"], config["training"], config["logging"], config["sampling"]
    rank, world_size, device = wbflow.setup_distributed()
    device = torch.device("cpu") if args.smoke else device
    is_main = wbflow.is_main_process()
    say = print if is_main else (lambda *_, **__: None)
    out_dir = Path(data["out_dir"])
    torch.manual_seed(training["seed"] + rank)

    # A checkpoint to resume from must fit: this driver's, the same model (checked before any data is read).
    state = None
    if args.resume:
        path = wbflow.fetch_checkpoint(args.resume, project=logging["project_name"], entity=logging["entity"])
        try:
            state = wbflow.load_checkpoint(path, map_location=device)
        except ValueError as error:
            raise SystemExit(f"train_flow.py: --resume: {error}") from None
        check_resume_checkpoint(state, config, f"--resume {args.resume}")

    # Data: the training set as one uint8 tensor on the device (rank 0 downloads first).
    if args.smoke and not args.data_dir:
        images_uint8 = wbflow.synthetic_images(data["max_images"], seed=training["seed"])
        say(f"smoke: {len(images_uint8)} synthetic images (pass --data-dir to use CIFAR-10)")
    else:
        if world_size > 1 and not is_main:
            dist.barrier()
        images_uint8 = wbflow.load_cifar10(data["data_dir"], download=is_main)[0][:data["max_images"]]
        if world_size > 1 and is_main:
            dist.barrier()
        say(f"CIFAR-10: {len(images_uint8)} training images from {data['data_dir']}")
    try:
        wbflow.check_same_on_every_rank({"training images": len(images_uint8)})
    except ValueError as error:
        raise SystemExit(f"train_flow.py: {error}") from None
    channels_last = training["channels_last"] and device.type == "cuda"
    loader = wbflow.DeviceImageLoader(images_uint8, training["batch_size"] // world_size, device=device,
                                         seed=training["seed"], rank=rank, world_size=world_size,
                                         channels_last=channels_last)
    if len(loader) == 0:
        raise SystemExit(f"train_flow.py: {len(images_uint8)} images make no batch of {loader.batch_size} per rank")

    # Model, EMA, optimiser, warm-up schedule, AMP scaler (enabled only for fp16).
    model = wbflow.FlowUNet(**config["model"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = wbflow.make_ema(model, training["ema_decay"])
    optimizer = torch.optim.Adam(model.parameters(), lr=training["learning_rate"], fused=True)
    warmup_steps = max(1, training["warmup_steps"])  # lr * (step + 1) / warmup_steps, then constant
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps - 1)
    scaler = wbflow.make_scaler(device)
    say(f"FlowUNet: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world_size} x {device}")

    start_epoch, step, best_loss, run_id, table_rows, skipped_steps = 1, 0, None, None, [], 0
    epoch_state, resumed_from = None, None
    if state is not None:
        model.load_state_dict(state["model"])
        ema_model.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16 (bf16 or CPU)
            scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_loss, table_rows = state["global_step"], state["best_loss"], state["table_rows"]
        skipped_steps, epoch_state = state["skipped_steps"], state["train_state"]
        start_epoch = state["epoch"] + (epoch_state is None)  # a stopped epoch is finished first
        wbflow.restore_rng_state(state["rng"][rank])
        say(f"resumed from {args.resume} at epoch {state['epoch']}"
            f"{', batch ' + str(epoch_state['batches']) if epoch_state else ''}, step {step}")
        if state["wandb_last_act"]:  # written when the run stopped: the run has nothing after it
            run_id = state["wandb_run_id"]
            say(f"W&B: continuing run {run_id} from step {step}")
        else:  # an epoch checkpoint: the run may have logged past it, and W&B would drop those steps
            resumed_from = {"run_id": state["wandb_run_id"], "step": step, "checkpoint": str(path)}
            say(f"W&B: a new run (config resumed_from: run {resumed_from['run_id']}, step {step}), since "
                f"run {resumed_from['run_id']} may have logged past this checkpoint")

    train_model = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if training["compile"]:  # compile outside DDP, so DDP's bucketing splits the graph
        train_model = torch.compile(train_model)
    # The same seeded noise every time, so eval/generated_samples show progress, not new noise.
    fixed_noise = torch.randn(sampling["num_images"], 3, 32, 32,
                              generator=torch.Generator().manual_seed(sampling["seed"])).to(device)
    amp_dtype = wbflow.autocast_dtype(device)

    def checkpoint(epoch, train_state=None, last_act=False):
        """Everything a resume needs; train_state is a stopped epoch's, last_act marks the run's final write."""
        return {"model": model.state_dict(), "ema": ema_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "global_step": step, "best_loss": best_loss, "config": config, "rng": rng_states(world_size),
                "table_rows": table_rows, "skipped_steps": skipped_steps, "train_state": train_state,
                "wandb_run_id": run.id if run else run_id, "wandb_last_act": last_act, "driver": "train_flow"}

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
        inception = None
        if config["eval"]["fid_interval"]:  # a missing weights file stops the run before it trains
            wbflow.fid_weights_path(config["eval"]["fid_weights"])

        def log_window(step, window):
            nonlocal skipped_steps
            skipped_steps += window["skipped"]
            run.log({"train/loss": window["loss"], "train/learning_rate": window["learning_rate"],
                     "train/grad_norm": window["grad_norm"], "train/epoch": window["epoch"],
                     "train/skipped_steps": skipped_steps}, step=step)

        for epoch in range(start_epoch, training["epochs"] + 1):
            loader.set_epoch(epoch, skip_batches=epoch_state["batches"] if epoch_state else 0)
            stats = wbflow.train_epoch(train_model, loader, optimizer, wbflow.rectified_flow_loss, device=device,
                                       scheduler=scheduler, ema_model=ema_model, grad_clip=training["gradient_clip"],
                                       scaler=scaler, step=step, epoch=epoch, log_every=training["log_interval"],
                                       on_log=log_window, stop=stop, resume=epoch_state, progress=is_main)
            step, epoch_state = stats["step"], None
            if stats["stopped"]:  # SIGTERM or Ctrl-C: save where this epoch stands, and say how to go on
                state = checkpoint(epoch, train_state=stats["state"], last_act=True)
                if is_main:
                    path = wbflow.save_checkpoint(state, out_dir / "last.pt")
                    print(f"stopped at step {step} (epoch {epoch}); continue with:\n  "
                          f"{resume_command(argv, path, world_size)}", flush=True)
                raise SystemExit(128 + (stop.signal or signal.SIGTERM))
            # train_epoch's loss and sample count are over all ranks already
            step, epoch_loss, images_per_second = stats["step"], stats["loss"], stats["samples"] / stats["seconds"]
            say(f"epoch {epoch}: loss {epoch_loss:.4f}, {images_per_second:.0f} images/s, step {step}")
            run.log({"train/epoch_loss": epoch_loss, "train/images_per_second": images_per_second,
                     "train/epoch": epoch}, step=step)
            if config["eval"]["fid_interval"] and epoch % config["eval"]["fid_interval"] == 0:
                # FID/IS of the EMA model over training; every rank samples a share, rank 0 logs
                inception = inception or wbflow.load_fid_inception(config["eval"]["fid_weights"], device)
                quality = ema_quality(ema_model.module, inception, images_uint8, config, device, rank, world_size,
                                      stats_dir=None if args.data_dir or not args.smoke else out_dir / "fid_stats")
                say(f"epoch {epoch}: FID {quality['eval/fid_score']:.2f} on {config['eval']['fid_num_samples']} samples")
                run.log({**quality, "train/epoch": epoch}, step=step)
            is_best = not math.isnan(epoch_loss) and (best_loss is None or epoch_loss < best_loss)
            best_loss = epoch_loss if is_best else best_loss
            state = checkpoint(epoch)  # every rank takes part in gathering the RNG states
            if not is_main:
                continue

            if epoch % logging["log_images_interval"] == 0:
                samples, nfe = sample(ema_model.module, fixed_noise, sampling["solver"], sampling["nfe"],
                                      sampling["rk45_tolerance"], dtype=amp_dtype)
                grid = wbflow.sample_grid(samples)
                wbflow.save_png(grid, out_dir / "samples" / f"epoch_{epoch:04d}.png")
                wbflow.log_image_grid(run, "eval/generated_samples", grid, step=step,
                                         caption=f"epoch {epoch}, EMA, {sampling['solver']} NFE {nfe}")
            if epoch % training["sample_interval"] == 0 or epoch == training["epochs"]:
                table_rows += solver_rows(ema_model.module, fixed_noise, sampling, epoch, out_dir, amp_dtype)

            state["table_rows"], state["epoch_loss"] = table_rows, epoch_loss
            wbflow.save_checkpoint(state, out_dir / "last.pt")  # each epoch: a crash loses at most one
            upload = epoch % logging["log_model_interval"] == 0
            if epoch % training["save_interval"] == 0 or upload or epoch == training["epochs"]:
                path = wbflow.save_checkpoint(state, out_dir / f"checkpoint_epoch_{epoch}.pt")
                wbflow.rotate_checkpoints(out_dir, keep=training["keep_checkpoints"])
                say(f"saved {path}")
                if upload:
                    wbflow.log_artifact(run, path, f"model-{run.id}",
                                        aliases=["latest", f"epoch-{epoch}"] + ["best"] * is_best,
                                        metadata={"epoch": epoch, "global_step": step, "config": config})

        if run and table_rows:
            run.log({"eval/samples_table": wbflow.samples_table(table_rows, root=out_dir)}, step=step)
        state = checkpoint(training["epochs"], last_act=True)  # the run's last act: a resume may continue it
        if is_main and start_epoch <= training["epochs"]:
            wbflow.save_checkpoint(state, out_dir / "last.pt")
    if world_size > 1:
        dist.destroy_process_group()
    return {"step": step, "best_loss": best_loss, "out_dir": out_dir}


def sample(model, noise, solver, nfe, tolerance, dtype=None):
    """(samples, evaluations used) with solver "euler" (nfe steps), "heun" (nfe // 2 steps) or "rk45"
    (adaptive at `tolerance`; nfe unused)."""
    if solver == "rk45":
        return wbflow.rk45_sample(model, noise, tolerance=tolerance, dtype=dtype)
    steps = max(1, nfe // 2) if solver == "heun" else nfe
    return wbflow.euler_sample(model, noise, steps, heun=solver == "heun", dtype=dtype), steps * (1 + (solver == "heun"))


def solver_rows(model, noise, sampling, epoch, out_dir, amp_dtype):
    """This epoch's rows of eval/samples_table; each grid goes to a PNG that the table reads at the end,
    named relative to out_dir so the rows in a checkpoint survive moving the folder or the machine."""
    rows = []
    for row in wbflow.compare_solvers(model, noise, solvers=sampling["table_solvers"], nfes=sampling["table_nfes"],
                                      tolerance=sampling["rk45_tolerance"], dtype=amp_dtype):
        name = f"epoch_{epoch:04d}_{row['solver']}_nfe{row['nfe']:03d}.png"
        path = wbflow.save_png(wbflow.sample_grid(row["images"]), out_dir / "samples" / name)
        rows.append({"epoch": epoch, "solver": row["solver"], "nfe": row["nfe"], "seconds": row["seconds"],
                     "samples": str(path.relative_to(out_dir))})
    return rows


def ema_quality(ema_model, inception, train_images_uint8, config, device, rank, world_size, stats_dir=None):
    """eval/fid_score and eval/inception_score_* of eval.fid_num_samples EMA samples (one Inception pass)
    against the cached statistics of the training images. The noise comes from its own generator and
    nothing here draws from the global one, so the training run goes on exactly as without it."""
    evaluation, sampling = config["eval"], config["sampling"]
    count = len(range(rank, evaluation["fid_num_samples"], world_size))
    generator, batches = torch.Generator().manual_seed(sampling["seed"] + 1 + rank), []
    for start in range(0, count, evaluation["sample_batch_size"]):
        noise = torch.randn(min(evaluation["sample_batch_size"], count - start), 3, 32, 32, generator=generator)
        samples, _ = sample(ema_model, noise.to(device), sampling["solver"], sampling["nfe"], sampling["rk45_tolerance"])
        batches.append(wbflow.images_to_uint8(samples))
    # gathered over the ranks: every rank holds the features of all samples
    features, logits = wbflow.inception_features(torch.cat(batches), inception,
                                                 batch_size=evaluation["inception_batch_size"])
    name = "synthetic" if stats_dir else "cifar10-train"
    statistics = wbflow.save_statistics(
        train_images_uint8[rank::world_size], stats_dir or evaluation["stats_dir"] or Path(config["data"]["data_dir"]) / "fid_stats",
        name if len(train_images_uint8) == 50000 else f"{name}-{len(train_images_uint8)}",
        batch_size=evaluation["inception_batch_size"], device=device, weights_path=evaluation["fid_weights"])
    inception_score_mean, inception_score_std = wbflow.inception_score(logits, splits=min(10, len(logits)))
    return {"eval/fid_score": wbflow.fid(statistics, features), "eval/inception_score_mean": inception_score_mean,
            "eval/inception_score_std": inception_score_std}


def cifar10_train_batches(data_dir, batch_size):
    """CIFAR-10 training images in batches, read only when the FID statistics are not cached yet."""
    images_uint8, _ = wbflow.load_cifar10(data_dir)
    yield from images_uint8.split(batch_size)


def check_eval_inputs(fid_weights, statistics_dir, statistics_name, data_dir, need_statistics):
    """The FID weights, and for FID the cached CIFAR-10 statistics or CIFAR-10 itself, found (or fetched)
    before sampling starts; a FileNotFoundError says which file to put where."""
    weights_path = wbflow.fid_weights_path(fid_weights)
    cached = Path(statistics_dir) / f"{statistics_name}-tensorflow-{wbflow.file_sha256(weights_path)[:12]}.npz"
    if need_statistics and not cached.is_file():
        wbflow.load_cifar10(data_dir)  # downloads when absent, else says which archive to put where


def evaluate(config, args):
    data, sampling, evaluation, logging = config["data"], config["sampling"], config["eval"], config["logging"]
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.checkpoint:
        raise SystemExit("train_flow.py: --eval needs --checkpoint PATH|ARTIFACT")

    # Everything the scores need is checked first: sampling can take hours.
    path = wbflow.fetch_checkpoint(args.checkpoint, project=logging["project_name"], entity=logging["entity"])
    try:
        state = wbflow.load_checkpoint(path, map_location=device)
    except ValueError as error:
        raise SystemExit(f"train_flow.py: --checkpoint: {error}") from None
    if not (isinstance(state, dict) and "ema" in state and isinstance(state.get("config"), dict)
            and state.get("driver", "train_flow") == "train_flow"):
        raise SystemExit(f"train_flow.py: --checkpoint {args.checkpoint} is not a train_flow checkpoint "
                         f"(it needs the EMA weights and the config of a train_flow.py run)")
    statistics_name = f"cifar10-train-{evaluation['num_real_images']}" if evaluation["num_real_images"] else "cifar10-train"
    statistics_dir = evaluation["stats_dir"] or Path(data["data_dir"]) / "fid_stats"
    check_eval_inputs(evaluation["fid_weights"], statistics_dir, statistics_name, data["data_dir"],
                      need_statistics=args.metric in ("fid", "both"))

    # Samples from the EMA weights, with the same seeded noise every time.
    ema_model = wbflow.make_ema(wbflow.FlowUNet(**state["config"]["model"]).to(device))
    ema_model.load_state_dict(state["ema"])
    solver, nfe, tolerance = args.solver or sampling["solver"], args.nfe or sampling["nfe"], sampling["rk45_tolerance"]
    generator, batches = torch.Generator().manual_seed(sampling["seed"]), []
    for start in range(0, args.num_samples, evaluation["sample_batch_size"]):
        noise = torch.randn(min(evaluation["sample_batch_size"], args.num_samples - start), 3, 32, 32,
                            generator=generator).to(device)
        # float32, as the published FIDs sample (training previews use the AMP dtype)
        samples, used = sample(ema_model.module, noise, solver, nfe, tolerance)
        batches.append(wbflow.images_to_uint8(samples).cpu())
    samples_uint8 = torch.cat(batches)
    print(f"sampled {len(samples_uint8)} images from {path} (epoch {state['epoch']}) with {solver}, NFE {used}")

    # One Inception pass over the samples serves both FID (features) and IS (logits).
    inception = wbflow.load_fid_inception(evaluation["fid_weights"], device)
    features, logits = wbflow.inception_features(samples_uint8, inception,
                                                   batch_size=evaluation["inception_batch_size"])
    metrics = {}
    if args.metric in ("fid", "both"):
        statistics = wbflow.save_statistics(
            cifar10_train_batches(data["data_dir"], evaluation["inception_batch_size"]), statistics_dir,
            statistics_name, batch_size=evaluation["inception_batch_size"], device=device,
            num_images=evaluation["num_real_images"], weights_path=evaluation["fid_weights"])
        metrics["eval/fid_score"] = wbflow.fid(statistics, features)
    if args.metric in ("is", "both"):
        metrics["eval/inception_score_mean"], metrics["eval/inception_score_std"] = wbflow.inception_score(
            logits, splits=min(10, len(logits)))
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))

    grid = wbflow.sample_grid(samples_uint8[:64])
    wbflow.save_png(grid, Path(data["out_dir"]) / "samples" / f"eval_epoch_{state['epoch']:04d}.png")
    eval_config = {"checkpoint": str(args.checkpoint), "epoch": state["epoch"], "global_step": state["global_step"],
                   "num_samples": args.num_samples, "metric": args.metric, "solver": solver, "nfe": used,
                   "model": state["config"]["model"], "fid_reference": wbflow.fid_reference()}
    with wbflow.wandb_run(eval_config, project=args.wandb_project or f"{logging['project_name']}_eval",
                          enabled=args.use_wandb, entity=logging["entity"], job_type="eval") as run:
        run.log(metrics)
        wbflow.log_image_grid(run, "eval/sample_images", grid,
                                 caption=f"{solver} NFE {used}, epoch {state['epoch']}")
    return metrics


if __name__ == "__main__":
    main()

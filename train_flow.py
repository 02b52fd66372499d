"""Rectified flow (or one-step MeanFlow) on CIFAR-10, tracked in W&B the way seed 000 describes.

  python train_flow.py                                         # one GPU, configs/cifar10_rectified_flow.yaml
  torchrun --standalone --nproc_per_node=8 train_flow.py       # DDP on one node (gloo on CPU)
  python train_flow.py --smoke                                 # the whole workflow on CPU, offline, in seconds
  python train_flow.py --epochs 10 --batch-size 256 --set training.gradient_clip=0.5 --no-wandb
  python train_flow.py --resume runs/flow/checkpoint_epoch_10.pt         # or --resume model-<run id>:latest
  python train_flow.py --reflow runs/flow/checkpoint_epoch_1020.pt       # 2-rectified flow from that teacher
  python train_flow.py --set training.objective=meanflow                 # one-step MeanFlow from scratch
  python train_flow.py --set model.num_classes=10                        # class-conditional, for guidance

Recipe: config -> data, model, optimiser -> each epoch: train_epoch, last.pt, its end (FID, grid, solver table),
its W&B row, checkpoints, artifact. evaluate_flow.py scores a checkpoint (FID and Inception Score).
"""
import functools
import math
import os
import sys
from pathlib import Path

import torch

import flow_config
import wbflow

# where a run stands, in every checkpoint beside the model, EMA, optimiser, scheduler and scaler (docs/flow.md)
PROGRESS = {"epoch": 0, "ended": True, "train_state": None, "last_window": None, "epoch_loss": None,
            "images_per_second": None, "global_step": 0, "skipped_steps": 0, "best_loss": None, "best_epoch": None,
            "best_checkpoint": None, "last_fid": None, "table_rows": []}
# what a resume keeps, else the W&B config lies or the resume is inexact (docs/guarantees.md, stop and resume)
RESUME_FIXED = {"training": ("batch_size", "learning_rate", "warmup_steps", "gradient_clip", "ema_decay", "seed",
                             "coupling"),
                "data": ("max_images", "images_sha256"), "sampling": ("num_images", "seed"),
                "reflow": ("teacher_sha256", "num_pairs", "shard_size", "solver", "nfe", "seed")}


def parse_args(argv=None):
    parser, add, _ = flow_config.config_parser("train_flow.py", __doc__.splitlines()[0], flow_config.CONFIG_FLAGS,
                                               "tiny UNet, a few hundred images (--data-dir, else synthetic), CPU, "
                                               "W&B offline, --out-dir runs/flow-smoke")
    add("--overwrite", type=wbflow.str2bool, default=False,
        help="delete an earlier run's checkpoints (and --reflow's pairs of another teacher or settings) in "
             "--out-dir, not refuse (default: off)")
    add("--no-wandb", type=wbflow.str2bool, default=False,
        help="train without W&B (default: logging.use_wandb decides)")
    add("--resume", metavar="PATH|ARTIFACT",
        help="checkpoint file or W&B model artifact of the run to continue (default: none)")
    add("--reflow", metavar="PATH|ARTIFACT", help="train a 2-rectified flow on pairs of this teacher checkpoint "
                                                 "(reflow.*), in --out-dir + '-reflow' (default: none)")
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg.partition("=")[0] == "--eval" for arg in argv):  # any spelling: train_flow.py has no --eval now
        raise SystemExit("train_flow.py: a checkpoint's FID and IS are evaluate_flow.py's: python evaluate_flow.py "
                         "--checkpoint PATH|ARTIFACT and --eval's other flags (python evaluate_flow.py --help)")
    args = parse_args(argv)
    config = flow_config.load_config(args, "train_flow.py")
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        check_settings(args, config)
        earlier_run = wbflow.prepare_out_dir(config["data"]["out_dir"], resume=args.resume,
                                             overwrite=args.overwrite)[1]
        out_dir = Path(config["data"]["out_dir"])  # what --overwrite deletes and the run writes or rotates away
        wbflow.check_outputs({"--out-dir": [*earlier_run, out_dir / "last.pt", *out_dir.glob("checkpoint_epoch_*.pt")]},
                             {"--reflow": args.reflow})
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    with wbflow.exit_on_error("train_flow.py"):  # missing data, checkpoint or weights; a full disk
        return train(config, argv, resume=args.resume, smoke=args.smoke, synthetic=args.smoke and not args.data_dir,
                     earlier_run=earlier_run, teacher=args.reflow, overwrite=args.overwrite)


def check_settings(args, config):
    """A ValueError naming the first bad setting or flag, before any data, process group or W&B."""
    training, evaluation, world_size = config["training"], config["eval"], int(os.environ.get("WORLD_SIZE", 1))
    flow_config.check_config(config, more_refusals=[
        (training["batch_size"] < world_size, f"training.batch_size {training['batch_size']} is smaller than the "
                                              f"{world_size} ranks (it is the global batch, split over them)"),
        (evaluation["fid_interval"] and evaluation["fid_num_samples"] < max(2, world_size),
         f"eval.fid_num_samples is {evaluation['fid_num_samples']}: FID needs at least two samples, and one per rank"),
        *[(reference and os.path.isdir(reference), f"{flag} {reference} is a folder, not a checkpoint file")
          for flag, reference in {"--resume": args.resume, "--reflow": args.reflow}.items()]])
    flow_config.check_model(config["model"])
    if evaluation["fid_interval"]:  # an offline first run learns of the weights and of CIFAR-10 at once
        flow_config.check_fid_files(
            config, reads_cifar10=not (args.smoke and not args.data_dir),
            word_missing_weights=lambda error: f"FID every {evaluation['fid_interval']} epochs (eval.fid_interval): "
                                               f"{error}; or train without FID: --set eval.fid_interval=0")


def train(config, argv, *, resume=None, smoke=False, synthetic=False, earlier_run=(), teacher=None, overwrite=False):
    """Data, model and optimiser, then each epoch: its training, last.pt, its end, its one W&B row, its checkpoints."""
    training, logging, out_dir = config["training"], config["logging"], Path(config["data"]["out_dir"])
    rank, world_size, device = wbflow.setup_distributed()
    device = torch.device("cpu") if smoke else device
    config["world_size"] = world_size  # in W&B and in checkpoints: a resume needs the same number of ranks
    torch.manual_seed(training["seed"] + rank)
    images_uint8, labels = load_images(config["data"], training["seed"], synthetic)
    config["data"]["images_sha256"] = wbflow.images_sha256(images_uint8)  # what it trains on, which a resume keeps
    channels_last = training["channels_last"] and device.type == "cuda"
    state = new_state(config, device, channels_last)
    amp_dtype, teacher_checkpoint = wbflow.autocast_dtype(device), flow_config.load_teacher(teacher, config)
    resumed_from = load_resume(resume, config, state, device) if resume else None
    pairs, dataset = (images_uint8, None, labels if config["class_names"] else None), None  # or the teacher's pairs
    if teacher:  # a new student starts from its teacher's EMA weights
        pairs, dataset = reflow_pairs(teacher_checkpoint, config, state, amp_dtype, new=not resume, overwrite=overwrite)
    loader = training_loader(*pairs, training, device, channels_last)
    train_model = state["model"] if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        state["model"], device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(train_model) if training["compile"] else train_model  # outside DDP: it splits the graph
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        statistics = (flow_config.fid_statistics(images_uint8, config, device, synthetic)
                      if config["eval"]["fid_interval"] else None)

    with wbflow.stop_on_signals() as stop, wbflow.wandb_run(
            {**config, "resumed_from": resumed_from} if resumed_from else config, project=logging["project_name"],
            enabled=logging["use_wandb"], run_id=state["wandb_run_id"], entity=logging["entity"],
            name=logging["run_name"], tags=logging["tags"], notes=logging["notes"]) as run:
        state["wandb_run_id"] = run.id if run else state["wandb_run_id"]  # without W&B: kept for a resume with it
        define_metrics(run)
        if teacher:  # lineage: teacher model -> pairs -> this model
            wbflow.use_artifact(run, *dataset, type="dataset")
        for path in earlier_run if rank == 0 else ():  # --overwrite: every check has passed, so they go now
            path.unlink(missing_ok=True)
        for epoch in range(state["epoch"] + 1 if state["ended"] else state["epoch"], training["epochs"] + 1):
            if state["ended"] or state["train_state"]:  # else a resume into this epoch's end: trained already
                train_one_epoch(epoch, state, train_model, loader, flow_loss(config), run, stop, training, amp_dtype)
            if state["train_state"]:  # stopped: last.pt of where this epoch stands
                stop_run(stop, state, config, argv)
            trained = checkpoint(state, config)  # every rank gathers its RNG state
            if rank == 0:  # the epoch's training is safe before its end
                wbflow.save_checkpoint(trained, out_dir / "last.pt")
            end = epoch_end(epoch, state["ema"].module, statistics, config, stop, amp_dtype)
            if end is None:  # it logged nothing: the resume does the end again, whole, from last.pt
                stop_run(stop, state, config, argv, ", in its end")
            log_epoch(run, epoch, state, end, config)
            save_epoch(run, epoch, state, config)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    say(headline(out_dir, state))
    return {"step": state["global_step"], "best_loss": state["best_loss"], "out_dir": out_dir}


def flow_loss(config):
    """The objective's loss_fn(model, batch): rectified flow with its coupling (and label dropout for a class-conditional
    model, which learns its null class from the dropped labels), or MeanFlow with meanflow.*."""
    training, meanflow, classes = config["training"], dict(config["meanflow"]), config["model"]["num_classes"]
    if training["objective"] == "rectified_flow":
        loss_fn = functools.partial(wbflow.rectified_flow_loss, coupling=training["coupling"])
        return wbflow.drop_labels(loss_fn, training["label_dropout"], null_label=classes) if classes else loss_fn
    weight = {key: meanflow.pop(key) for key in ("norm_p", "norm_eps")}  # the rest are meanflow_times'
    return functools.partial(wbflow.meanflow_loss, times=functools.partial(wbflow.meanflow_times, **meanflow), **weight)


def say(*args):
    """print, on rank 0 alone."""
    if wbflow.rank_and_world_size()[0] == 0:
        print(*args)


def new_state(config, device, channels_last):
    """A new run's state: the FlowUNet (its size printed), its EMA, Adam with a linear warm-up, the fp16 GradScaler,
    and PROGRESS."""
    training = config["training"]
    model = wbflow.FlowUNet(**config["model"]).to(device, memory_format=torch.channels_last if channels_last else
                                                  torch.preserve_format)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    say(f"FlowUNet: {parameters / 1e6:.2f}M parameters, {wbflow.rank_and_world_size()[1]} x {device}")
    optimizer = torch.optim.Adam(model.parameters(), lr=training["learning_rate"], fused=True)
    warmup_steps = max(1, training["warmup_steps"])  # lr * (step + 1) / warmup_steps, then constant
    return {"model": model, "ema": wbflow.make_ema(model, training["ema_decay"]), "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, total_iters=warmup_steps - 1),
            "scaler": wbflow.make_scaler(device), **PROGRESS, "wandb_run_id": None}


def define_metrics(run):
    """Per-step series on the global step, epoch ones on train/epoch; summaries hold the best, not the last."""
    wbflow.define_metrics(run, {"train/loss": "min", "train/epoch_loss": "min", "train/images_per_second": None,
                                "eval/fid_score": "min", "eval/inception_score_*": None, "eval/straightness": "min"},
                          "train/epoch", global_step=("train/loss",))


def checkpoint(state, config, last_act=False):
    """`state` as a checkpoint (every rank gathers); last_act: nothing is logged after it (wbflow.wandb_resume_plan)."""
    return wbflow.checkpoint_state(state, config=config, wandb_last_act=last_act, driver="train_flow")


def stop_run(stop, state, config, argv, where=""):
    """SIGTERM or Ctrl-C: last.pt of where the run stands, the command that resumes it, exit 128 + signal."""
    wbflow.exit_stopped(stop, checkpoint(state, config, last_act=True), Path(config["data"]["out_dir"]) / "last.pt",
                        script=__file__, argv=argv,
                        where=f" at step {state['global_step']} (epoch {state['epoch']}){where}")


def training_loader(images_uint8, noise_seed, labels, training, device, channels_last):
    """Batches of the images, or with a noise seed of the reflow pairs (with their labels), each rank its share."""
    rank, world_size = wbflow.rank_and_world_size()
    batch_size = training["batch_size"] // world_size
    loader = (wbflow.DeviceImageLoader(images_uint8, batch_size, device=device, seed=training["seed"], rank=rank,
                                       world_size=world_size, channels_last=channels_last, labels=labels)
              if noise_seed is None else
              wbflow.ReflowPairLoader(images_uint8, noise_seed, batch_size, device=device, seed=training["seed"],
                                      rank=rank, world_size=world_size, labels=labels))
    if len(loader) == 0:
        raise SystemExit(f"train_flow.py: {len(images_uint8)} {'images' if noise_seed is None else 'pairs'} make "
                         f"no batch of {batch_size} per rank")
    return loader


def load_images(data, seed, synthetic):
    """The training images as one uint8 tensor and their labels, the same count on every rank."""
    if synthetic:
        images_uint8 = wbflow.synthetic_images(data["max_images"], seed=seed)
        labels = torch.arange(len(images_uint8)) % len(wbflow.CIFAR10_CLASSES)  # stand-ins for CIFAR-10's
        say(f"smoke: {len(images_uint8)} synthetic images (pass --data-dir to use CIFAR-10)")
    else:
        images_uint8, labels = (part[:data["max_images"]] for part in wbflow.load_cifar10(data["data_dir"]))
        say(f"CIFAR-10: {len(images_uint8)} training images from {data['data_dir']}")
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        wbflow.check_same_on_every_rank({"training images": len(images_uint8)})
    return images_uint8, labels


def load_resume(resume, config, state, device):
    """Load --resume into `state` and this rank's RNG once it fits this run; a new W&B run's resumed_from, or None."""
    fixed = {**RESUME_FIXED, "training": RESUME_FIXED["training"] + ("label_dropout",) * bool(config["class_names"])}
    logging = config["logging"]
    saved, (run_id, resumed_from, plan) = wbflow.resume_from(
        resume, state, program="train_flow.py", driver="train_flow", step_key="global_step", device=device,
        project=logging["project_name"], entity=logging["entity"], required=("config",),
        expected={**flow_config.model_settings(config), "world_size": wbflow.rank_and_world_size()[1],
                  **{section: {key: config[section][key] for key in keys} for section, keys in fixed.items()},
                  **({"meanflow": config["meanflow"]} if config["training"]["objective"] == "meanflow" else {})},
        hints={"model": ": pass the --config/--set (and --smoke, training.objective) of the run it came from",
               "class_names": ": pass the model.num_classes of the run it came from",
               **dict.fromkeys(RESUME_FIXED, ": a resumed run keeps the settings it trained with (only "
                                             "training.epochs and the intervals may change)"),
               "data": ": a resumed run trains on the images it trained on (the same data.max_images images of a "
                       "CIFAR-10 folder, or --smoke's synthetic ones)",
               "reflow": ": a resumed run trains on what it trained on: the pairs of the --reflow teacher it came "
                         "from, with its reflow.* settings, or images without --reflow",
               "world_size": " processes (each rank resumes its own batches and RNG: resume with the same number)"})
    place = (f"batch {saved['train_state']['batches']}" if saved["train_state"] else
             "before its end" if not saved["ended"] else "after its end")
    say(f"resumed from {resume} at epoch {saved['epoch']} ({place}), step {saved['global_step']}")
    if not logging["use_wandb"]:  # the run id stays in the checkpoints, for a resume with W&B
        return None
    state["wandb_run_id"] = run_id
    say(f"W&B: {plan}")
    return resumed_from


def train_one_epoch(epoch, state, train_model, loader, loss_fn, run, stop, training, amp_dtype):
    """Train `epoch` on from where `state` stands; its last window's row waits in state for the epoch's end."""
    logged = []

    def log_window(step, window):
        state["skipped_steps"] += window["skipped"]
        row = {"train/loss": window["loss"], "train/learning_rate": window["learning_rate"],
               "train/grad_norm": window["grad_norm"], "train/epoch": window["epoch"],
               "train/skipped_steps": state["skipped_steps"]}
        if window["batch"] < len(loader) - 1:
            logged.append(run.log(row, step=step))
        else:
            state["last_window"] = row

    loader.set_epoch(epoch, skip_batches=state["train_state"]["batches"] if state["train_state"] else 0)
    stats = wbflow.train_epoch(train_model, loader, state["optimizer"], loss_fn, resume=state["train_state"],
                               scheduler=state["scheduler"], ema_model=state["ema"], scaler=state["scaler"],
                               grad_clip=training["gradient_clip"], amp_dtype=amp_dtype, step=state["global_step"],
                               epoch=epoch, stop=stop, log_every=training["log_interval"], on_log=log_window,
                               progress=wbflow.rank_and_world_size()[0] == 0)
    state.update(epoch=epoch, ended=False, train_state=stats["state"], global_step=stats["step"])
    if stats["stopped"]:
        return
    if logged:  # its windows are on disk before last.pt (flush_run commits; with nothing logged it adds a row)
        wbflow.flush_run(run)
    loss = stats["loss"]  # over all ranks already, as the sample count
    state.update(epoch_loss=loss, images_per_second=stats["samples"] / stats["seconds"])
    if not math.isnan(loss) and (state["best_loss"] is None or loss < state["best_loss"]):
        state.update(best_loss=loss, best_epoch=epoch)
    say(f"epoch {epoch}: loss {loss:.4f}, {state['images_per_second']:.0f} images/s, step {stats['step']}")


def epoch_end(epoch, ema_module, statistics, config, stop, amp_dtype):
    """`epoch`'s due FID, grid and solver-table rows; it logs nothing: a stopped end (None) is redone from last.pt."""
    training, logging, evaluation, sampling = (config[key] for key in ("training", "logging", "eval", "sampling"))
    rank, device = wbflow.rank_and_world_size()[0], next(ema_module.parameters()).device
    solver, nfe, tolerance = sampling["solver"], sampling["nfe"], sampling["rk45_tolerance"]
    end = {"metrics": {}, "grid": None, "caption": None, "rows": []}
    ema_module.eval()  # the velocity every sampler below calls, without dropout
    if evaluation["fid_interval"] and epoch % evaluation["fid_interval"] == 0:  # every rank samples a share
        scored = flow_config.sample_and_score(ema_module, evaluation["fid_num_samples"], statistics, config, stop,
                                              seed=sampling["seed"] + 1)
        if scored is None:
            return None
        end["metrics"] = scored[0]
    # the same seeded noise every epoch, so eval/generated_samples show progress, not new noise
    noise = torch.randn(sampling["num_images"], 3, 32, 32,
                        generator=torch.Generator().manual_seed(sampling["seed"])).to(device)
    stopped = rank == 0 and stop.is_set()
    if rank == 0 and not stopped and epoch % logging["log_images_interval"] == 0:
        if config["class_names"]:  # one row per class, each from the same noise
            end["grid"], rows, used = wbflow.class_grid(
                ema_module, noise[:max(1, len(noise) // len(config["class_names"]))], config["class_names"],
                guidance=sampling["guidance"], solver=solver, nfe=nfe, tolerance=tolerance, amp_dtype=amp_dtype)
            end["caption"] = f"epoch {epoch}, EMA, {solver} NFE {used}, guidance {sampling['guidance']:g}; {rows}"
        else:
            samples, used = wbflow.sample_flow(ema_module, noise, solver, 1 if solver == "meanflow" else nfe,  # MeanFlow:
                                               tolerance=tolerance, amp_dtype=amp_dtype)  # its grid is one step
            end["grid"], end["caption"] = wbflow.sample_grid(samples), f"epoch {epoch}, EMA, {solver} NFE {used}"
        wbflow.save_png(end["grid"], Path(config["data"]["out_dir"]) / "samples" / f"epoch_{epoch:04d}.png")
    if rank == 0 and not stopped and (epoch % training["sample_interval"] == 0 or epoch == training["epochs"]):
        straightness = wbflow.straightness(flow_config.velocity(ema_module, sampling["guidance"]), noise, nfe,
                                           amp_dtype=amp_dtype)
        for scale in sampling["table_guidance"] if config["class_names"] else [None]:  # solver x NFE (x guidance)
            compared = wbflow.compare_solvers(flow_config.velocity(ema_module, scale), noise,
                                              solvers=sampling["table_solvers"], nfes=sampling["table_nfes"],
                                              tolerance=tolerance, amp_dtype=amp_dtype, stop=stop.is_set)
            stopped = compared is None
            if stopped:
                break
            end["rows"] += wbflow.samples_table_rows(compared, epoch, config["data"]["out_dir"], guidance=scale,
                                                     straightness=straightness if scale in (None, sampling["guidance"])
                                                     else None)  # measured at sampling.guidance
        if not stopped:
            end["metrics"]["eval/straightness"] = straightness
    return None if wbflow.gather_from_ranks(stopped)[0] else end


def log_epoch(run, epoch, state, end, config):
    """Log `epoch`'s one W&B row: its last window, loss, speed, what its end measured and drew, the samples table."""
    step, fid = state["global_step"], end["metrics"].get("eval/fid_score")
    table_rows = state["table_rows"] + end["rows"]
    row = {**state["last_window"], "train/epoch_loss": state["epoch_loss"],
           "train/images_per_second": state["images_per_second"], **end["metrics"]}
    if epoch == config["training"]["epochs"]:  # every epoch's rows, their grids read from the PNGs
        row["eval/samples_table"] = wbflow.samples_table(table_rows, root=config["data"]["out_dir"])
    run.log(row, step=step)
    if end["grid"] is not None:
        wbflow.log_image_grid(run, "eval/generated_samples", end["grid"], step=step, caption=end["caption"])
    if fid is not None:
        state["last_fid"] = {"epoch": epoch, "fid": fid, "samples": config["eval"]["fid_num_samples"]}
        say(f"epoch {epoch}: FID {fid:.2f} on {state['last_fid']['samples']} samples")
    state.update(ended=True, last_window=None, table_rows=table_rows)


def save_epoch(run, epoch, state, config):
    """After `epoch`'s row: checkpoint_epoch_N.pt when due, a version of the run's model artifact, then last.pt."""
    training, logging, out_dir = config["training"], config["logging"], Path(config["data"]["out_dir"])
    last, lowest, loss = epoch == training["epochs"], state["best_checkpoint"], state["epoch_loss"]
    saved = epoch % training["save_interval"] == 0 or epoch % logging["log_model_interval"] == 0 or last
    if saved and not math.isnan(loss) and (lowest is None or loss < lowest["epoch_loss"]):
        state["best_checkpoint"] = {"path": f"checkpoint_epoch_{epoch}.pt", "epoch": epoch, "epoch_loss": loss}
    ended = checkpoint(state, config, last_act=last)  # after the last epoch: a resume may continue the W&B run
    if wbflow.rank_and_world_size()[0] > 0:
        return
    wbflow.flush_run(run)  # what the epoch logged is on disk before the checkpoints a resume starts from
    if saved:
        path = wbflow.save_checkpoint(ended, out_dir / f"checkpoint_epoch_{epoch}.pt")
        wbflow.rotate_checkpoints(out_dir, keep=training["keep_checkpoints"])
        print(f"saved {path}")
        if epoch % logging["log_model_interval"] == 0:
            wbflow.log_artifact(run, path, f"model-{run.id}", aliases=["latest", f"epoch-{epoch}"] + ["best"] * (
                state["best_epoch"] == epoch), metadata={"epoch": epoch, "global_step": state["global_step"],
                                                         "class_names": config["class_names"], "config": config})
    wbflow.save_checkpoint(ended, out_dir / "last.pt")


def headline(out_dir, state):
    best, fid, lowest = state["best_loss"], state["last_fid"], state["best_checkpoint"]
    best = f"best epoch loss {best:.4f} (epoch {state['best_epoch']})" if best is not None else "no finite epoch loss"
    fid = f", last FID {fid['fid']:.2f} (epoch {fid['epoch']}, {fid['samples']} samples)" if fid else ""
    lowest = (f"; the lowest-loss checkpoint: {out_dir / lowest['path']} (epoch {lowest['epoch']})" if lowest else "")
    return f"done at step {state['global_step']}: {best}{fid}\n  last checkpoint: {out_dir / 'last.pt'}{lowest}"


def reflow_pairs(teacher_checkpoint, config, state, amp_dtype, *, new, overwrite=False):
    """--reflow's pairs, which a new student makes from its teacher's EMA: (images, noise seed), (folder, artifact)."""
    logging, reflow, (rank, world_size) = config["logging"], config["reflow"], wbflow.rank_and_world_size()
    (path, teacher_state), tolerance = teacher_checkpoint, config["sampling"]["rk45_tolerance"]
    folder = Path(config["data"]["out_dir"]) / "reflow_pairs"
    teacher_name = teacher_state.get("wandb_run_id") or path.stem
    made_by = {"teacher_sha256": reflow["teacher_sha256"], "solver": reflow["solver"], "nfe": reflow["nfe"],
               **({"rk45_tolerance": tolerance} if reflow["solver"] == "rk45" else {}),
               **({"guidance": config["sampling"]["guidance"]} if config["class_names"] else {})}
    if new:
        state["ema"].load_state_dict(teacher_state["ema"])
        state["model"].load_state_dict(state["ema"].module.state_dict())
        teacher = state["ema"].module.eval()  # the teacher's velocity, without dropout
        goes_on = f"the same command goes on at the next shard of {folder}"
        with wbflow.exit_when_stopped("train_flow.py", "pair generation", goes_on) as stop, \
                wbflow.exit_on_error("train_flow.py", (ValueError,)):
            if wbflow.generate_reflow_pairs(  # a class-conditional teacher's pair i is of class i % 10
                lambda noise, labels=None: wbflow.images_to_uint8(wbflow.sample_flow(
                    flow_config.velocity(teacher, made_by.get("guidance"), labels), noise, reflow["solver"],
                    reflow["nfe"], amp_dtype=amp_dtype, tolerance=tolerance)[0]), folder, reflow["num_pairs"],
                settings=made_by, shard_size=reflow["shard_size"], seed=reflow["seed"], num_classes=teacher.num_classes,
                stop=stop.is_set, overwrite=overwrite, rank=rank, world_size=world_size,
                device=next(teacher.parameters()).device) is None:
                raise KeyboardInterrupt  # stopped before a shard: the shards written are kept
        with wbflow.wandb_run({"teacher": reflow["teacher"], "reflow": reflow}, project=logging["project_name"],
                              entity=logging["entity"], enabled=logging["use_wandb"], job_type="reflow-pairs") as run:
            wbflow.use_artifact(run, path, f"model-{teacher_name}", metadata={"epoch": teacher_state.get("epoch")})
            wbflow.log_artifact(run, folder, f"reflow-pairs-{teacher_name}", type="dataset", metadata=reflow)
    with wbflow.exit_on_error("train_flow.py", (ValueError,)):
        pairs = wbflow.load_reflow_pairs(folder, reflow["num_pairs"], {**made_by, "seed": reflow["seed"]})
    say(f"reflow: {len(pairs[0])} pairs of {reflow['teacher']} in {folder}")
    return pairs, (folder, f"reflow-pairs-{teacher_name}")


if __name__ == "__main__":
    main()

"""FID and Inception Score of a train_flow.py checkpoint's EMA model, logged to W&B the way seed 000 evaluates.

  python evaluate_flow.py --checkpoint runs/flow/checkpoint_epoch_1020.pt --num-samples 10000 --metric both \\
      --solver euler --nfe 100 --use-wandb --wandb-project flow_matching_cifar10_eval
  python evaluate_flow.py --checkpoint model-<run id>:latest                 # a W&B model artifact of the run
  python evaluate_flow.py --checkpoint runs/flow/last.pt --guidance 1.0,1.5,2.0,3.0   # FID against the scale
  python evaluate_flow.py --smoke --checkpoint runs/flow-smoke/last.pt --num-samples 64   # CPU, offline

Recipe: config (train_flow.py's: data, sampling, eval) -> every check (checkpoint, solver, output, FID weights,
CIFAR-10) -> the real images' FID statistics -> sample and score at each guidance scale -> print, grid, W&B.
"""
import os
from pathlib import Path

import torch

import flow_config
import wbflow


def parse_args(argv=None):
    parser, add, defaults = flow_config.config_parser(
        "evaluate_flow.py", __doc__.splitlines()[0],
        {"--data-dir": flow_config.CONFIG_FLAGS["--data-dir"],
         "--out-dir": ("data.out_dir", "its sample grid goes to samples/, the real images' FID statistics to "
                                       "fid_stats/ (or eval.stats_dir)")},
        "configs/smoke_overrides.txt's sampling and eval settings, CPU, W&B offline, --out-dir runs/flow-smoke")
    add("--checkpoint", metavar="PATH|ARTIFACT", help="the train_flow checkpoint file or W&B model artifact to score "
                                                     "(required; default: none)")
    add("--num-samples", type=int, default=10000, help="images to sample (default: %(default)s)")
    add("--metric", choices=("fid", "is", "both"), default="both", help="default: %(default)s")
    add("--solver", choices=flow_config.SOLVERS + ("meanflow",),
        help=f"default: sampling.solver, {defaults['sampling']['solver']}; a MeanFlow checkpoint's: meanflow (jumps)")
    add("--nfe", type=int, help=f"model evaluations per sample (default: sampling.nfe, {defaults['sampling']['nfe']})")
    add("--guidance", type=lambda text: [float(scale) for scale in text.split(",")], metavar="S[,S...]",
        help=f"a class-conditional checkpoint's guidance scales, FID and IS at each (default: sampling.guidance, "
             f"{defaults['sampling']['guidance']})")
    add("--use-wandb", type=wbflow.str2bool, default=False, help="log the scores to W&B (default: off)")
    add("--wandb-project", help=f"default: {defaults['logging']['project_name']}_eval")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    config = flow_config.load_config(args, "evaluate_flow.py")
    real, fid = config["eval"]["num_real_images"], args.metric != "is"
    with wbflow.exit_on_error("evaluate_flow.py", (ValueError,)):
        flow_config.check_config(config, {"--num-samples": args.num_samples, "--nfe": args.nfe}, more_refusals=[
            (fid and args.num_samples < 2, f"--num-samples is {args.num_samples}: FID needs at least two samples"),
            (fid and real is not None and real < 2, f"eval.num_real_images is {real}: FID needs at least two real "
                                                    f"images"),
            (not args.checkpoint, "--checkpoint PATH|ARTIFACT is needed: the checkpoint to score"),
            (int(os.environ.get("WORLD_SIZE", 1)) > 1, "it runs in one process: launch it with python, not torchrun"),
            (args.checkpoint and os.path.isdir(args.checkpoint),
             f"--checkpoint {args.checkpoint} is a folder, not a checkpoint file")])
    if args.smoke:
        os.environ.setdefault("WANDB_MODE", "offline")
    with wbflow.exit_on_error("evaluate_flow.py"):  # missing data, checkpoint or weights; a full disk
        return evaluate(args, config)


def evaluate(args, config):
    """FID and/or IS of --checkpoint's EMA model (--solver, --nfe), logged to a run in --wandb-project."""
    data, sampling, evaluation, metric = config["data"], config["sampling"], config["eval"], args.metric
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    # everything the scores need is checked first: sampling can take hours
    path, state = flow_config.load_checked(
        "evaluate_flow.py", "--checkpoint", args.checkpoint, config, device,
        required=("ema", "config", "epoch", "global_step"),
        hints={"ema": " (not a train_flow checkpoint: every one holds the EMA weights)"})
    meanflow = state["config"]["model"].get("second_time", False)  # a MeanFlow model: sampled by jumps
    sampling.update(solver=args.solver or ("meanflow" if meanflow else sampling["solver"]),
                    nfe=sampling["nfe"] if args.nfe is None else args.nfe)
    grid_png = Path(data["out_dir"]) / "samples" / f"eval_epoch_{state['epoch']:04d}.png"
    with wbflow.exit_on_error("evaluate_flow.py", (ValueError,)):
        if sampling["solver"] == "meanflow" and not meanflow:
            raise ValueError(f"--solver meanflow samples a MeanFlow checkpoint; {path} is a rectified flow")
        if args.guidance and not state["config"].get("class_names"):
            raise ValueError(f"--guidance needs a class-conditional checkpoint; {path} holds a model for t alone")
        wbflow.check_outputs({"the sample grid": grid_png}, {"--checkpoint": path})
        flow_config.check_fid_files(config, reads_cifar10=metric != "is")  # the Inception weights IS needs too
    # the images the statistics are of (their hash names the cache a training run fills too); downloads, or says where
    real_images = None if metric == "is" else wbflow.load_cifar10(data["data_dir"])[0][:evaluation["num_real_images"]]
    ema_model = wbflow.make_ema(wbflow.FlowUNet(**state["config"]["model"]).to(device))
    ema_model.load_state_dict(state["ema"])
    # SIGTERM or Ctrl-C stops between sampling batches or after the Inception pass, saving nothing
    with wbflow.exit_when_stopped("evaluate_flow.py", "the evaluation") as stop:
        with wbflow.exit_on_error("evaluate_flow.py", (ValueError,)):  # before sampling: nothing fails after it
            statistics = None if metric == "is" else flow_config.fid_statistics(real_images, config, device,
                                                                                progress=True)
        scored = {scale: flow_config.sample_and_score(ema_model.module.eval(), args.num_samples, statistics, config,
                                                     stop, seed=sampling["seed"], scale=scale, progress=True)
                  for scale in args.guidance or [sampling["guidance"]]}
        if None in scored.values():  # a stop, between sampling batches
            raise KeyboardInterrupt
    return log_eval(args, config, path, state, scored, grid_png)


def log_eval(args, config, path, state, scored, grid_png):
    """The scores at the best guidance scale (FID's lowest) printed and logged to a run in --wandb-project, with its
    sample grid (saved to `grid_png`); the scores against the scale too when --guidance names them."""
    sampling, logging, metric, scales = config["sampling"], config["logging"], args.metric, list(scored)
    classes = state["config"].get("class_names")
    scores = [{"guidance": scale, **metrics} for scale, (metrics, _, _) in scored.items()]
    best = wbflow.log_guidance_sweep(None, scores) or scores[0]  # the lowest FID's scale (the first without FID)
    metrics, samples_uint8, used = scored[best["guidance"]]
    print(f"sampled {len(samples_uint8)} images a scale from {path} (epoch {state['epoch']}) with "
          f"{sampling['solver']}, NFE {used}" + (f", guidance {', '.join(map(str, scales))}" if classes else ""))
    metrics = {key: value for key, value in metrics.items()  # --metric fid, is or both
               if value is not None and (metric != "fid" or key == "eval/fid_score")}
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()) + (
        f" (guidance {best['guidance']:g}, the best of {len(scales)})" if classes else ""))
    grid = wbflow.sample_grid(samples_uint8[:100 if classes else 64], nrow=len(classes) if classes else None)
    wbflow.save_png(grid, grid_png)
    eval_config = {"checkpoint": str(args.checkpoint), "epoch": state["epoch"], "global_step": state["global_step"],
                   "num_samples": args.num_samples, "metric": metric, "solver": sampling["solver"], "nfe": used,
                   "model": state["config"]["model"], "class_names": classes, "guidance": scales if classes else None,
                   "fid_reference": wbflow.fid_reference()}
    with wbflow.wandb_run(eval_config, project=args.wandb_project or f"{logging['project_name']}_eval",
                          enabled=args.use_wandb, entity=logging["entity"], job_type="eval") as run:
        run.log(metrics)
        if args.guidance:  # FID and IS against the scale: eval/guidance_table, eval/fid_vs_guidance, the best
            wbflow.log_guidance_sweep(run, scores)
        wbflow.log_image_grid(run, "eval/sample_images", grid, caption=f"{sampling['solver']} NFE {used}, epoch "
                              f"{state['epoch']}" + (f", guidance {best['guidance']:g}; columns: {', '.join(classes)}"
                                                     if classes else ""))
    return metrics


if __name__ == "__main__":
    main()

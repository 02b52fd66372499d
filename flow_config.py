"""What train_flow.py and evaluate_flow.py share: their YAML config, the flags that set its keys, the rules every
value is checked against before any data, process group, W&B run or sampling, and the wbflow calls both make with it
(a checkpoint checked against the config, --reflow's teacher among them; the real images' FID statistics; sampling
and scoring at a guidance scale).

  parser, add, defaults = config_parser("my_flow.py", "what it does", {"--out-dir": CONFIG_FLAGS["--out-dir"]}, "CPU")
  config = load_config(parser.parse_args(), "my_flow.py")    # the YAML, --smoke's overrides, --set, then the flags
  check_config(config)                                       # a ValueError naming the first bad setting
"""
import argparse
import functools
from pathlib import Path

import torch

import wbflow

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "cifar10_rectified_flow.yaml"
# --smoke: a tiny UNet on a few hundred images, every interval one epoch (a --set override a line)
SMOKE_OVERRIDES = HERE / "configs" / "smoke_overrides.txt"
CONFIG_FLAGS = {"--data-dir": ("data.data_dir", "folder holding cifar-10-batches-py/"),  # flags that set a config key
                "--out-dir": ("data.out_dir", "checkpoints and sample PNGs; a new run refuses one holding checkpoints"),
                "--epochs": ("training.epochs", "epochs to train"),
                "--batch-size": ("training.batch_size", "global, over all ranks")}
# the rules of the settings, checked before anything runs (check_config)
POSITIVE = {"model": ("base_channels", "head_channels"), "logging": ("log_images_interval", "log_model_interval"),
            "training": ("epochs", "batch_size", "learning_rate", "log_interval", "save_interval", "sample_interval"),
            "sampling": ("num_images", "nfe", "rk45_tolerance"), "reflow": ("num_pairs", "shard_size", "nfe"),
            "eval": ("sample_batch_size", "inception_batch_size", "fid_num_samples"),
            "meanflow": ("norm_eps", "std_t", "std_r")}
NOT_NEGATIVE = {"model": ("num_res_blocks",), "training": ("warmup_steps", "gradient_clip", "keep_checkpoints"),
                "eval": ("fid_interval",), "meanflow": ("norm_p",)}
FRACTIONS = {"training": ("ema_decay", "label_dropout"), "model": ("dropout",), "meanflow": ("equal_share",)}  # [0, 1)
TEXT_OR_NULL = {"logging": ("entity", "run_name"), "eval": ("stats_dir", "fid_weights")}  # null in the YAML: any type
SOLVERS, COUPLINGS, OBJECTIVES = ("euler", "heun", "rk45"), ("independent", "ot"), ("rectified_flow", "meanflow")
SOLVER_SETTINGS = {"sampling": ("solver", "table_solvers"), "reflow": ("solver",)}


def config_parser(program, description, flags, smoke_help):
    """(parser, its add, the default config) with what load_config reads: --config, --set, `flags` (a few of
    CONFIG_FLAGS, their help) and --smoke (`smoke_help` says what it does): train_flow.py's and evaluate_flow.py's."""
    if not DEFAULT_CONFIG.is_file():  # copied scripts without their configs/
        raise SystemExit(f"{program}: its default config {DEFAULT_CONFIG} is missing (copy configs/ beside it)")
    defaults = wbflow.load_yaml_config(DEFAULT_CONFIG)  # for the defaults --help shows
    parser = argparse.ArgumentParser(prog=program, description=description)
    add = functools.partial(wbflow.add_sweep_argument, parser)  # --out-dir and the seed's --out_dir
    add("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: %(default)s)")
    add("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override any config key, e.g. --set training.gradient_clip=0.5 (default: none)")
    for flag, (key, text) in flags.items():
        section, name = key.split(".")
        add(flag, type=type(defaults[section][name]), help=f"{text} (default: {key}, {defaults[section][name]})")
    add("--smoke", type=wbflow.str2bool, default=False, help=f"{smoke_help} (default: off)")
    return parser, add, defaults


def smoke_overrides(program):
    try:
        lines = [line.strip() for line in SMOKE_OVERRIDES.read_text(encoding="utf-8").splitlines()]
    except OSError as error:
        raise SystemExit(f"{program}: --smoke reads its settings from {SMOKE_OVERRIDES}, which could not be read "
                         f"({error.strerror or error})") from None
    return [line for line in lines if line and not line.startswith("#")]


def load_config(args, program):
    """The config of these `args` (config_parser's): the YAML, --smoke's overrides, --set, then the flags given."""
    given = vars(args)  # evaluate_flow.py's flags are a few of train_flow.py's
    with wbflow.exit_on_error(program, (OSError, KeyError, ValueError)):  # no file, no such key, a wrong type
        config = wbflow.load_yaml_config(args.config, (smoke_overrides(program) if args.smoke else []) + args.set,
                                         reference=DEFAULT_CONFIG)
    for flag, (key, _) in CONFIG_FLAGS.items():  # as given (argparse typed it): a path is not parsed as YAML
        section, name = key.split(".")
        value = given.get(flag[2:].replace("-", "_"))
        config[section][name] = config[section][name] if value is None else value
    if given.get("reflow") and not args.out_dir:  # the teacher's folder holds its checkpoints
        config["data"]["out_dir"] += "-reflow"
    if given.get("no_wandb"):
        config["logging"]["use_wandb"] = False
    if config["training"]["objective"] == "meanflow":  # a FlowUNet with a second time, sampled by jumps
        config["model"]["second_time"] = True
        config["sampling"].update(solver="meanflow", table_solvers=["meanflow"])
    config["class_names"] = list(wbflow.CIFAR10_CLASSES) if config["model"]["num_classes"] else None  # in checkpoints
    return config


def check_config(config, positive_flags=None, more_refusals=()):
    """A ValueError naming the first bad setting, or flag of `positive_flags` ({flag: value}; None: unset) that is not
    positive, or the first of `more_refusals` [(refused, message)], the caller's own: the rules both scripts share."""
    data, training = config["data"], config["training"]
    optional = {**(positive_flags or {}), "data.max_images": data["max_images"],
                "eval.num_real_images": config["eval"]["num_real_images"]}  # None: unset
    wbflow.check_numbers({**settings(config, POSITIVE), **{name: value for name, value in optional.items()
                                                            if value is not None}},
                         settings(config, NOT_NEGATIVE), settings(config, FRACTIONS))
    wbflow.check_choices("coupling", COUPLINGS, {"training.coupling": training["coupling"]})
    wbflow.check_choices("objective", OBJECTIVES, {"training.objective": training["objective"]})
    meanflow = training["objective"] == "meanflow"
    wbflow.check_choices("solver", SOLVERS + (("meanflow",) if meanflow else ()), settings(config, SOLVER_SETTINGS))
    refusals = [
        *[(value is not None and not isinstance(value, str), f"{name} must be text or null, not {value!r}")
          for name, value in settings(config, TEXT_OR_NULL).items()],
        (config["model"]["num_classes"] not in (0, 10), f"model.num_classes must be 0 (unconditional) or 10 "
                                                        f"(CIFAR-10's classes), not {config['model']['num_classes']}"),
        *[(data[key[5:]] == "", f"{flag} ({key}) is empty: name a folder")
          for flag, (key, _) in CONFIG_FLAGS.items() if key.startswith("data.")],
        (meanflow and training["coupling"] != "independent", "training.coupling ot is rectified flow's: "
                                                             "meanflow_loss pairs noise and images independently"),
        (meanflow and config["model"]["num_classes"], "model.num_classes is rectified flow's: meanflow_loss trains "
                                                      "without labels"),
        *more_refusals]
    for message in [message for refused, message in refusals if refused][:1]:
        raise ValueError(message)


def check_model(model_config):
    """A ValueError unless these settings build a FlowUNet that keeps a CIFAR batch's shape (on the meta device)."""
    try:
        with torch.device("meta"):
            wbflow.FlowUNet(**model_config)(torch.zeros(1, 3, 32, 32), torch.zeros(1))
    except (RuntimeError, ValueError, TypeError, ArithmeticError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"the model settings {model_config} make no FlowUNet ({reason})") from None


def check_fid_files(config, reads_cifar10, word_missing_weights=str):
    """A ValueError if the FID weights are missing (`word_missing_weights(error)` says so), naming CIFAR-10 too when it
    is read and missing as well, so that an offline first run learns of both."""
    try:
        wbflow.fid_weights_path(config["eval"]["fid_weights"], pass_as="--set eval.fid_weights=PATH")
        return
    except FileNotFoundError as error:
        missing = [word_missing_weights(error)]
    if reads_cifar10:
        try:
            wbflow.load_cifar10(config["data"]["data_dir"], download=False)
        except (FileNotFoundError, ValueError) as error:
            missing.append(str(error))
    raise ValueError("; and ".join(missing))


def settings(config, names):  # {"section.key": value} for names {section: keys}
    return {f"{section}.{key}": config[section][key] for section, keys in names.items() for key in keys}


def load_checked(program, flag, reference, config, device="cpu", **check):  # wbflow's, with the run's W&B project
    return wbflow.load_checked(reference, program=program, flag=flag, driver="train_flow", device=device,
                               project=config["logging"]["project_name"], entity=config["logging"]["entity"], **check)


def model_settings(config):
    """What a checkpoint's model must share with this run's; num_classes as class_names, None when unconditional,
    and second_time None when not MeanFlow's (as in checkpoints written before these keys)."""
    return {"model": {"second_time": None, **{key: value for key, value in config["model"].items()
                                              if key != "num_classes"}}, "class_names": config["class_names"]}


def load_teacher(teacher, config):
    """--reflow's checkpoint of this FlowUNet, (path, state) or None; reflow.teacher_sha256 is its file's hash, which
    a resume checks, so train_flow loads the teacher before a resume."""
    config["reflow"].update(teacher=None, teacher_sha256=None)  # a run on images
    if not teacher:
        return None
    path, state = load_checked(
        "train_flow.py", "--reflow", teacher, config, required=("ema", "config"), expected=model_settings(config),
        hints=dict.fromkeys(("model", "class_names"), ": the student is the teacher's FlowUNet: pass its "
                                                      "--config/--set"))
    config["reflow"].update(teacher=str(teacher), teacher_sha256=wbflow.file_sha256(path))
    return path, state


def velocity(ema_module, scale, labels=None):
    """What the samplers call: the EMA model, or a class-conditional one guided at `scale` (class-balanced labels)."""
    if not ema_module.num_classes:
        return ema_module
    return wbflow.guided_velocity(ema_module, torch.arange(ema_module.num_classes) if labels is None else labels, scale)


def sample_and_score(ema_module, count, statistics, config, stop, *, seed, scale=None, progress=False):
    """eval/fid_score and eval/inception_score_* of `count` samples (guided at `scale`, else sampling.guidance, when
    class-conditional): (metrics, samples, NFE), or None after a stop."""
    evaluation, sampling = config["eval"], config["sampling"]
    scored = wbflow.sample_and_score(
        velocity(ema_module, sampling["guidance"] if scale is None else scale), count, statistics,
        device=next(ema_module.parameters()).device, solver=sampling["solver"],
        nfe=sampling["nfe"], tolerance=sampling["rk45_tolerance"], batch_size=evaluation["sample_batch_size"],
        seed=seed, inception_batch_size=evaluation["inception_batch_size"], weights_path=evaluation["fid_weights"],
        stop=stop.is_set, progress=progress)
    if scored is None:
        return None
    (fid, (is_mean, is_std)), samples_uint8, used = scored
    return ({"eval/fid_score": fid, "eval/inception_score_mean": is_mean, "eval/inception_score_std": is_std},
            samples_uint8, used)


def fid_statistics(images_uint8, config, device, synthetic=False, progress=False):
    """The FID statistics of these images, cached in eval.stats_dir, else <out_dir>/fid_stats (training and
    evaluate_flow.py)."""
    evaluation = config["eval"]
    return wbflow.cached_statistics(
        images_uint8, evaluation["stats_dir"] or Path(config["data"]["out_dir"]) / "fid_stats",
        "synthetic" if synthetic else "cifar10-train", what="the FID statistics file (eval.stats_dir)", device=device,
        batch_size=evaluation["inception_batch_size"], weights_path=evaluation["fid_weights"], progress=progress)

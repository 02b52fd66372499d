"""wbflow: a minimal PyTorch + Weights & Biases training kit of plain, copyable functions.

Sections, in data-flow order:
  device & data   default_device, to_device, setup_distributed, is_main_process
  losses          classification_loss
  training        autocast_dtype, make_scaler, make_ema, train_epoch, validate
  W&B             wandb_run, log_metrics, define_epoch_metrics, watch_model, log_artifact
  checkpoints     save_checkpoint, load_checkpoint, save_best

Every public function takes what it needs as arguments and imports wandb lazily, so it keeps
working when pasted alone (with its imports) into another project.
"""
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- device & data

def default_device():
    """The best available device: CUDA when present, else CPU.

    Usage: device = default_device()
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(batch, device):
    """Move a tensor, or a (nested) tuple / list / dict of tensors, to `device` without blocking.

    Usage: images, labels = to_device(batch, torch.device("cuda"))
    """
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def is_main_process():
    """True on rank 0 of a torch.distributed group, and always when not distributed.

    Usage: if is_main_process(): print("only once")
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def setup_distributed():
    """Join the torchrun process group when launched by torchrun; returns (rank, world_size, device).

    nccl on CUDA (one GPU per local rank), gloo on CPU; (0, 1, default_device()) when not under torchrun.
    Usage: rank, world_size, device = setup_distributed()
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, default_device()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _batch_size(batch):
    """Number of samples in a batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        return batch.shape[0]
    if isinstance(batch, dict):
        batch = list(batch.values())
    return _batch_size(batch[0])


# ----------------------------------------------------------------------------- losses

def classification_loss(criterion):
    """Wrap a criterion (e.g. nn.CrossEntropyLoss()) into a `loss_fn(model, batch)` for train_epoch.

    The returned function reads batch = (images, labels) and returns (loss, n_correct, n_samples).
    Usage: train_epoch(model, loader, optimizer, classification_loss(nn.CrossEntropyLoss()))
    """
    def loss_fn(model, batch):
        images, labels = batch[0], batch[1]
        logits = model(images)
        n_correct = (logits.argmax(dim=1) == labels).sum()
        return criterion(logits, labels), n_correct, labels.shape[0]
    return loss_fn


def _split_loss_output(output, batch):
    """A loss_fn returns a loss, or (loss, n_correct, n_samples); return the triple (n_correct None when unknown)."""
    if torch.is_tensor(output):
        return output, None, _batch_size(batch)
    loss, n_correct, n_samples = output
    return loss, n_correct, n_samples


# ----------------------------------------------------------------------------- training

def autocast_dtype(device, amp=None):
    """The autocast dtype for `device`, or None for full precision.

    amp=None means on for CUDA (bf16 where supported, otherwise fp16) and off on CPU; amp=True on
    CPU uses bf16; amp=False is always off.
    Usage: dtype = autocast_dtype(torch.device("cuda"))  # torch.bfloat16 on an A100
    """
    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def make_scaler(device, amp=None):
    """A GradScaler that is enabled only when autocast runs in fp16 (bf16 and fp32 need none).

    A disabled scaler passes scale/step/update straight through, so the training loop has no branch.
    Usage: scaler = make_scaler(device); train_epoch(..., scaler=scaler)
    """
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, amp) == torch.float16)


def make_ema(model, decay=0.9999):
    """An exponential moving average of `model`'s weights and buffers (torch.optim.swa_utils).

    train_epoch updates it after each optimiser step; evaluate or sample with ema_model.module.
    Usage: ema_model = make_ema(model, decay=0.9999)
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema_model.update_parameters(model)  # the first update copies, so later ones can skip that check
    return ema_model


def _update_ema(ema_model, model):
    """ema_model.update_parameters(model) without its two host reads of the step counter per step.

    For an EMA (multi_avg_fn, buffers averaged, already initialised) the counter changes nothing,
    so this calls the same swa_utils update on each (device, dtype) group directly.
    """
    import itertools
    if ema_model.multi_avg_fn is None or not ema_model.use_buffers:
        ema_model.update_parameters(model)
        return
    groups = {}
    for ema_tensor, tensor in zip(itertools.chain(ema_model.module.parameters(), ema_model.module.buffers()),
                                  itertools.chain(model.parameters(), model.buffers())):
        ema_group, group = groups.setdefault((ema_tensor.device, ema_tensor.dtype), ([], []))
        ema_group.append(ema_tensor.detach())
        group.append(tensor.detach().to(ema_tensor.device, non_blocking=True))
    for ema_group, group in groups.values():
        ema_model.multi_avg_fn(ema_group, group, ema_model.n_averaged)
    ema_model.n_averaged += 1


def train_epoch(model, loader, optimizer, loss_fn, *, device=None, scheduler=None, ema_model=None,
                grad_clip=None, amp=None, scaler=None, run=None, step=0, epoch=0, log_every=10,
                log_keys=None, progress=True):
    """Train `model` for one pass over `loader`; returns the epoch means and the new global step.

    loss_fn(model, batch) returns a loss tensor, or (loss, n_correct, n_samples) for accuracy.
    Each step: batch to device (non-blocking), autocast (see autocast_dtype), backward, the pre-clip
    global L2 gradient norm (clipped to `grad_clip` when given), optimiser step, per-step
    `scheduler.step()`, the EMA update of `ema_model` (make_ema). A step whose loss or gradients are not
    finite is skipped and counted. Loss, counts and norms accumulate on the device and are read only
    every `log_every` steps and at the end, so the step path never waits for the GPU, except where
    torch itself must: an fp16 GradScaler, or skipping a bad step with an optimiser that cannot take
    a device-side skip flag (pass fused=True to Adam/AdamW/SGD to avoid it).
    Every `log_every` steps, `run.log` receives, at W&B step = global step, the means over the steps
    since the last log under `log_keys` (roles loss, learning_rate, grad_norm, epoch, and optionally
    accuracy (percent), batch, skipped_steps) — by default train/loss, train/learning_rate,
    train/grad_norm, train/epoch. Under torch.distributed the returned means (loss, accuracy,
    grad_norm) and counts are all-reduced over ranks; the logged ones are rank 0's.
    Usage: stats = train_epoch(model, loader, opt, loss_fn, run=run, step=step); step = stats["step"]
    """
    from tqdm.auto import tqdm
    if log_keys is None:
        log_keys = {"loss": "train/loss", "learning_rate": "train/learning_rate",
                    "grad_norm": "train/grad_norm", "epoch": "train/epoch"}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    device_skip = getattr(optimizer, "_step_supports_amp_scaling", False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    zero = torch.zeros((), dtype=torch.float64, device=device)
    # Running sums on the device: loss, n_correct, grad_norm, finite steps, skipped steps.
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    logged, n_samples_total, logged_samples, start_step = [0.0] * 5, 0, 0, step
    has_accuracy = False
    model.train()
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch_index, batch in enumerate(bar):
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, n_correct, n_samples = _split_loss_output(loss_fn(model, batch), batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        _optimizer_step(optimizer, scaler, finite, device_skip)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema_model is not None:
            _update_ema(ema_model, model)
        has_accuracy = n_correct is not None
        correct = n_correct.detach().double() if torch.is_tensor(n_correct) else zero + (n_correct or 0)
        totals += torch.stack([torch.where(finite, loss.detach().double(), zero), correct,
                               torch.where(finite, grad_norm.detach().double(), zero),
                               finite.double(), (~finite).double()])
        n_samples_total += int(n_samples)
        step += 1
        if step % log_every == 0:
            current = totals.tolist()  # the one host-device sync, at log points only
            window = _window_means([c - p for c, p in zip(current, logged)],
                                   n_samples_total - logged_samples, has_accuracy)
            logged, logged_samples = current, n_samples_total
            row = {"loss": window["loss"], "learning_rate": float(optimizer.param_groups[0]["lr"]),
                   "grad_norm": window["grad_norm"], "epoch": epoch, "accuracy": window["accuracy"],
                   "batch": batch_index, "skipped_steps": int(current[4])}
            if run is not None:
                run.log({key: row[role] for role, key in log_keys.items()
                         if row.get(role) is not None}, step=step)
            bar.set_postfix(loss=f"{window['loss']:.4f}", grad_norm=f"{window['grad_norm']:.3f}")
    bar.close()
    sums = torch.cat([totals, zero.view(1) + n_samples_total])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)  # every rank returns the means over all ranks
    *current, n_samples_total = sums.tolist()
    return {**_window_means(current, n_samples_total, has_accuracy), "steps": step - start_step,
            "skipped": int(current[4]), "samples": int(n_samples_total), "step": step,
            "seconds": time.perf_counter() - started}


def _optimizer_step(optimizer, scaler, finite, device_skip):
    """Step unless `finite` is false: an enabled GradScaler skips by itself, fused optimisers take a
    device-side found_inf flag, and any other optimiser needs the flag on the host (one sync)."""
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif device_skip:
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif finite:
        optimizer.step()


def _window_means(sums, n_samples, has_accuracy):
    """Turn accumulated [loss, n_correct, grad_norm, finite steps, skipped steps] sums into means."""
    loss_sum, n_correct, grad_norm_sum, n_finite, _ = sums
    return {"loss": loss_sum / n_finite if n_finite else math.nan,
            "accuracy": 100.0 * n_correct / n_samples if has_accuracy and n_samples else None,
            "grad_norm": grad_norm_sum / n_finite if n_finite else math.nan}


def validate(model, loader, loss_fn, *, device=None, amp=None, progress=False):
    """Evaluate `model` on `loader` in inference mode; returns {"loss", "accuracy", "samples"}.

    loss_fn as in train_epoch; the loss is the per-sample mean, accuracy is percent (None when
    loss_fn gives no counts). Under torch.distributed the sums are all-reduced, so every rank
    returns the metrics of the whole (sharded) validation set. The model's train/eval mode is restored.
    Usage: metrics = validate(model, val_loader, classification_loss(nn.CrossEntropyLoss()))
    """
    from tqdm.auto import tqdm
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(device, amp)
    was_training = model.training
    model.eval()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss * n_samples, n_correct
    n_samples_total, has_accuracy = 0, False
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validate", disable=not progress, leave=False):
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, n_correct, n_samples = _split_loss_output(loss_fn(model, batch), batch)
            has_accuracy = n_correct is not None
            correct = n_correct.double() if torch.is_tensor(n_correct) else zero + (n_correct or 0)
            totals += torch.stack([loss.double() * int(n_samples), correct])
            n_samples_total += int(n_samples)
    model.train(was_training)
    totals = torch.cat([totals, zero.view(1) + n_samples_total])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, n_correct, n_samples = totals.tolist()
    return {"loss": loss_sum / n_samples if n_samples else math.nan,
            "accuracy": 100.0 * n_correct / n_samples if has_accuracy and n_samples else None,
            "samples": int(n_samples)}


# ----------------------------------------------------------------------------- W&B

@contextlib.contextmanager
def wandb_run(config=None, project="wbflow", *, enabled=True, run_id=None, **init_kwargs):
    """Open a W&B run for a `with` block and always finish it; yields the run, or None when off.

    Never prompts and never crashes training: W&B is off (one line says why) when `enabled` is
    false, WANDB_MODE=disabled, wandb is not installed, or wandb.init fails; without credentials
    and with WANDB_MODE unset it logs offline and says how to sync. Only rank 0 of a
    torch.distributed group opens a run. `run_id` resumes that run (resume="allow"). WANDB_DIR and
    WANDB_MODE are honoured; other keyword arguments go to wandb.init (entity, name, tags, notes...).
    The run is finished with exit code 1 if the block raises (Ctrl-C included).
    Usage: with wandb_run({"lr": 2e-4}, project="flow") as run: log_metrics(run, {"loss": 0.1}, step=1)
    """
    run = _init_wandb(config, project, enabled, run_id, init_kwargs) if is_main_process() else None
    try:
        yield run
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish()


def _init_wandb(config, project, enabled, run_id, init_kwargs):
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wbflow: wandb is not installed, so W&B logging is off (pip install wandb)", file=sys.stderr)
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not _has_wandb_credentials():
        mode = "offline"
        print("wbflow: no W&B credentials (WANDB_API_KEY or `wandb login`), logging offline; "
              "upload later with: wandb sync wandb/offline-run-*", file=sys.stderr)
    # WANDB_DIR is read here, not left to wandb, which caches settings for the life of the process.
    init_kwargs.setdefault("dir", os.environ.get("WANDB_DIR"))
    try:
        return wandb.init(project=project, config=config, mode=mode, id=run_id,
                          resume="allow" if run_id else None, **init_kwargs)
    except Exception as error:  # noqa: BLE001 - W&B trouble must never stop training
        print(f"wbflow: wandb.init failed ({type(error).__name__}: {error}); W&B logging is off",
              file=sys.stderr)
        return None


def _has_wandb_credentials():
    """True when an API key is in the environment or in the netrc file `wandb login` writes."""
    import netrc
    from urllib.parse import urlparse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    netrc_path = os.environ.get("NETRC", os.path.join(os.path.expanduser("~"), ".netrc"))
    try:
        return netrc.netrc(netrc_path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def log_metrics(run, metrics, step=None):
    """run.log(metrics, step=step), or nothing when `run` is None (W&B off, or not rank 0).

    Usage: log_metrics(run, {"train/epoch_loss": 0.12}, step=global_step)
    """
    if run is not None:
        run.log(metrics, step=step)


def define_epoch_metrics(run, names, epoch_key="epoch"):
    """Plot `names` (globs allowed, e.g. "val/*") against `epoch_key` instead of the global step.

    Usage: define_epoch_metrics(run, ["train/epoch_loss", "val/*"], epoch_key="train/epoch")
    """
    if run is None:
        return
    run.define_metric(epoch_key)
    for name in names:
        run.define_metric(name, step_metric=epoch_key)


def watch_model(run, model, log="gradients", log_freq=100):
    """wandb.watch `model` (gradient / parameter histograms) every `log_freq` >= 100 steps.

    Histograms are costly: more often than every 100 steps slows training, so that is refused.
    Usage: watch_model(run, model, log="all", log_freq=100)
    """
    if log_freq < 100:
        raise ValueError(f"watch_model: log_freq={log_freq} would slow training; use 100 or more")
    if run is not None:
        run.watch(model, log=log, log_freq=log_freq)


def log_artifact(run, path, name, type="model", aliases=("latest",), metadata=None):
    """Upload the file or folder at `path` as a W&B artifact; a no-op returning None without a run.

    Usage: log_artifact(run, "checkpoints/best.pt", "model-epoch-10", aliases=("latest", "best"),
                        metadata={"epoch": 10})
    """
    if run is None:
        return None
    import wandb
    artifact = wandb.Artifact(name, type=type, metadata=dict(metadata or {}))
    if os.path.isdir(path):
        artifact.add_dir(str(path))
    else:
        artifact.add_file(str(path))
    return run.log_artifact(artifact, aliases=list(aliases))


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically: written to a temporary file in the same folder,
    flushed to disk, then renamed over `path`, so a crash never leaves a truncated checkpoint.

    Usage: save_checkpoint({"model": model.state_dict(), "step": step}, "checkpoints/last.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            torch.save(state, temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        raise
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with torch.load(weights_only=True): tensors, numbers, strings and plain
    containers only, so a file carrying code is refused before anything runs.

    Raises FileNotFoundError, or ValueError naming the file when it is not a loadable checkpoint.
    Usage: state = load_checkpoint("checkpoints/last.pt"); model.load_state_dict(state["model"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - a malformed file can fail anywhere in the unpickler
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a loadable checkpoint (torch.load with weights_only=True "
                         f"refused it: {reason[:300]})") from None


def save_best(state, metric, best, path, *, mode="max", name="val_acc", run=None,
              artifact_name=None, metadata=None):
    """Save `state` to `path` only when `metric` beats `best`; returns (new_best, improved).

    mode="max" (accuracy) or "min" (loss); best=None means nothing saved yet; a NaN metric never
    improves. On improvement the file is written atomically (save_checkpoint), `best_<name>` goes
    to run.summary, and the file is uploaded with log_artifact under `artifact_name` (default: the
    file's stem) with aliases "best" and "latest" and metadata {name: metric, **metadata}. Under
    torch.distributed only rank 0 writes; every rank gets the same return value.
    Usage: best_acc, improved = save_best(state, val_acc, best_acc, "checkpoints/best_model.pth", run=run)
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    metric = float(metric)
    improved = not math.isnan(metric) and (
        best is None or math.isnan(best) or (metric > best if mode == "max" else metric < best))
    if not improved:
        return best, False
    if is_main_process():
        save_checkpoint(state, path)
        if run is not None:
            run.summary[f"best_{name}"] = metric
            log_artifact(run, path, artifact_name or Path(path).stem, aliases=("best", "latest"),
                         metadata={name: metric, **(metadata or {})})
    return metric, True

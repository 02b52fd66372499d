"""wbflow: a minimal PyTorch + Weights & Biases training kit of plain, copyable functions.

Sections, in data-flow order:
  device & data     to_device, is_main_process, setup_distributed,
                    CIFAR10_URL, load_cifar10, synthetic_images, DeviceImageLoader (CIFAR-10 on the device),
                    find_image_samples, stratified_split, drop_unreadable_images, ImageSamples,
                    image_transforms, classifier_loaders (image folders / CSV)
  models            FlowUNet, CLASSIFIER_NAMES, build_classifier, build_optimizer
  losses            classification_loss, focal_loss, class_balanced_weights, rectified_flow_loss
  training          autocast_dtype, make_scaler, make_ema, train_epoch, validate, stop_on_signals,
                    capture_rng_state, restore_rng_state, predict_dataset
  sampling          euler_sample, rk45_sample, compare_solvers
  metrics           FIDInceptionV3, fid_weights_path, load_fid_inception, file_sha256, fid_reference,
                    inception_features, feature_statistics, frechet_distance, fid, save_statistics,
                    inception_score, per_class_precision_recall
  images & W&B      wandb_run, log_metrics, define_epoch_metrics, watch_model, log_artifact,
                    images_to_uint8, sample_grid, save_png, log_image_grid, samples_table, log_classification_report
  checkpoints       save_checkpoint, load_checkpoint, save_best, fetch_checkpoint
  config            load_yaml_config, str2bool, add_sweep_argument

Every public function takes what it needs as arguments and imports wandb, scipy, PIL and yaml
lazily, so it keeps working when pasted alone (with its imports) into another project.
"""

import argparse
import concurrent.futures
import contextlib
import copy
import csv
import hashlib
import itertools
import math
import os
import pickle
import random
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ----------------------------------------------------------------------------- device & data

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

    nccl on CUDA (one GPU per local rank), gloo on CPU; (0, 1, CUDA if present else CPU) when not under torchrun.
    Usage: rank, world_size, device = setup_distributed()
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def load_cifar10(data_dir, train=True, download=True):
    """CIFAR-10 from `data_dir`/cifar-10-batches-py as (images_uint8 (N, 3, 32, 32), labels int64), on the CPU.

    Reads the python-pickle batches directly (data_batch_1..5, or test_batch). When they are absent
    and `download` is true, torchvision downloads and extracts the archive into `data_dir` (it also
    extracts a cifar-10-python.tar.gz already placed there, offline). If that fails, the
    FileNotFoundError says which archive to put where.
    Usage: images_uint8, labels = load_cifar10("data")
    """
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # CIFAR10_URL, repeated to paste alone

    class CifarUnpickler(pickle.Unpickler):
        """Unpickles CIFAR-10's batches (dicts of numpy arrays, lists, strings) and refuses any other
        global, so a tampered file cannot run code (the format is a pickle, as torchvision reads it)."""

        def find_class(self, module, name):
            module = module.replace("numpy.core.", "numpy._core.")  # numpy 1 pickles, numpy >= 1.26 names
            if (module, name) in (("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                                  ("numpy", "dtype"), ("_codecs", "encode")):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")

    folder = Path(data_dir) / "cifar-10-batches-py"
    names = [f"data_batch_{index}" for index in range(1, 6)] if train else ["test_batch"]
    if download and not all((folder / name).is_file() for name in names):
        try:
            torchvision.datasets.CIFAR10(str(data_dir), train=train, download=True)
        except Exception as error:  # noqa: BLE001 - any download failure gets the same instructions
            raise FileNotFoundError(
                f"CIFAR-10 is not in {folder} and could not be downloaded ({type(error).__name__}: "
                f"{error}). Download {url} and put cifar-10-python.tar.gz in {Path(data_dir)}/ "
                f"(it is extracted on the next run), or extract it so that {folder}/data_batch_1 exists."
            ) from None
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 batches {missing} are missing from {folder}; put "
                                f"{url} (extracted) there")
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as file:
            try:
                batch = CifarUnpickler(file, encoding="latin1").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as error:
                raise ValueError(f"{folder / name} is not a CIFAR-10 batch ({error})") from None
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch.get("labels", batch.get("fine_labels", [])))
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def synthetic_images(count, size=32, seed=0):
    """`count` uint8 (count, 3, size, size) images of coloured discs on colour gradients: a small
    learnable stand-in for CIFAR-10 when no data is at hand (smoke runs, benchmarks).

    Usage: images_uint8 = synthetic_images(256)
    """
    generator = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    background = torch.rand(count, 3, 2, generator=generator)
    images = background[..., :1, None] * (1 + x) / 2 + background[..., 1:, None] * (1 - x) / 2
    centre = torch.rand(count, 2, 1, 1, generator=generator) - 0.5
    radius = 0.2 + 0.3 * torch.rand(count, 1, 1, generator=generator)
    disc = ((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2 < radius ** 2).unsqueeze(1)
    images = torch.where(disc, torch.rand(count, 3, 1, 1, generator=generator), images)
    return (images * 255).round().to(torch.uint8)


class DeviceImageLoader:
    """Batches of images held as one uint8 tensor on the training device: a seeded randperm per
    epoch, index_select slices, random horizontal flips, scaled to [-1, 1] float32. No workers, no
    per-image Python, no host-device copy per batch.

    Flips pick, per image and epoch, between the image and a mirrored copy made once on the device
    (twice the uint8 memory, 300 MB for CIFAR-10), so a batch is one gather and its scaling.
    Under DDP each rank takes every world_size-th index of the same permutation (pass the per-rank
    batch size). The order depends only on (seed, epoch): call set_epoch(epoch) before iterating,
    and a resumed run sees the same batches; set_epoch(epoch, skip_batches=k) starts that epoch at
    its batch k (continuing an epoch that a stop interrupted).
    Usage: loader = DeviceImageLoader(images_uint8, 128, device="cuda"); loader.set_epoch(1); for x in loader: ...
    """

    def __init__(self, images_uint8, batch_size, *, device="cpu", shuffle=True, flip=True, drop_last=True,
                 seed=0, rank=0, world_size=1, channels_last=False):
        self.device = torch.device(device)
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        self.count = images_uint8.shape[0]
        self.images_and_mirrors = torch.cat([images_uint8, images_uint8.flip(3)]) if flip else images_uint8
        self.batch_size, self.shuffle, self.flip, self.drop_last = batch_size, shuffle, flip, drop_last
        self.seed, self.rank, self.world_size, self.channels_last = seed, rank, world_size, channels_last
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self):
        shard_size = self.count // self.world_size  # equal on every rank, or DDP would wait forever
        return shard_size // self.batch_size if self.drop_last else math.ceil(shard_size / self.batch_size)

    def __iter__(self):
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        order = (torch.randperm(self.count, generator=generator, device=self.device) if self.shuffle
                 else torch.arange(self.count, device=self.device))
        if self.flip:  # an index past count selects the mirrored copy
            order = order + self.count * (torch.rand(self.count, generator=generator, device=self.device) < 0.5)
        order = order[self.rank:self.count // self.world_size * self.world_size:self.world_size]
        for start in range(self.skip_batches * self.batch_size, len(self) * self.batch_size, self.batch_size):
            images = self.images_and_mirrors.index_select(0, order[start:start + self.batch_size])
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images.float().div_(127.5).sub_(1.0)


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def find_image_samples(data, *, class_names=None, val_split=0.2, seed=0):
    """Train and validation samples, lists of (path, label index), and the class names.

    `data` is one of: a folder with train/<class>/* and val/<class>/*; a folder of class folders
    (or train/ alone), split per class by stratified_split(val_split, seed); a CSV file of
    `path,label` rows (an optional header, paths relative to the CSV), split the same way.
    Class names are the sorted folder names / CSV labels; `class_names` fixes which and their order.
    Unreadable images are dropped with one warning that counts them (drop_unreadable_images).
    A missing folder or file raises FileNotFoundError; no images or an empty class, ValueError.
    Usage: train_samples, val_samples, class_names = find_image_samples("data", val_split=0.2)
    """
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data not found: {data} (expected a folder of class folders, "
                                f"train/ and val/ folders of class folders, or a CSV of path,label)")
    if data.is_file():
        samples, class_names = _csv_samples(data, class_names)
        roots = [data.parent]
    else:
        train_root = data / "train" if (data / "train").is_dir() else data
        samples, class_names = _folder_samples(train_root, class_names)
        roots = [train_root]
        if (data / "val").is_dir() and train_root != data:
            val_samples, _ = _folder_samples(data / "val", class_names)
            roots.append(data / "val")
            good = set(drop_unreadable_images(samples + val_samples))
            train_samples = [s for s in samples if s in good]
            val_samples = [s for s in val_samples if s in good]
            for root, split in zip(roots, (train_samples, val_samples)):
                _check_every_class_has_images(split, class_names, root)
            return train_samples, val_samples, class_names
    samples = drop_unreadable_images(samples)
    _check_every_class_has_images(samples, class_names, roots[0])
    if not 0 < val_split < 1:
        raise ValueError(f"val_split must be between 0 and 1 when {data} has no val/ folder, not {val_split}")
    train_index, val_index = stratified_split([label for _, label in samples], val_split, seed=seed)
    return [samples[i] for i in train_index], [samples[i] for i in val_index], class_names


def _folder_samples(root, class_names):
    """(path, label) for the image files in root/<class>/ (recursively), and the class names."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = folders
    missing = [name for name in class_names if name not in folders]
    if missing:
        raise FileNotFoundError(f"class folder(s) not found in {root}: {', '.join(missing)}")
    if not class_names:
        raise ValueError(f"no class folders in {root}: expected {root}/<class name>/<images>")
    samples = [(str(path), label) for label, name in enumerate(class_names)
               for path in sorted((root / name).rglob("*"))
               if path.suffix.lower() in _IMAGE_EXTENSIONS and path.is_file()]
    return samples, list(class_names)


def _csv_samples(csv_path, class_names):
    """(path, label) rows of a `path,label` CSV (header optional), and the class names."""
    with open(csv_path, newline="", encoding="utf-8-sig") as csv_file:
        rows = [row for row in csv.reader(csv_file) if row and any(cell.strip() for cell in row)]
    if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if any(len(row) < 2 for row in rows):
        raise ValueError(f"{csv_path}: every row must be path,label")
    labels = [row[1].strip() for row in rows]
    class_names = list(class_names) if class_names is not None else sorted(set(labels))
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise ValueError(f"{csv_path}: labels not in the class names: {', '.join(unknown)}")
    label_index = {name: index for index, name in enumerate(class_names)}
    return [(str(csv_path.parent / row[0].strip()), label_index[label])
            for row, label in zip(rows, labels)], class_names


def _check_every_class_has_images(samples, class_names, root):
    counts = np.bincount([label for _, label in samples], minlength=len(class_names))
    if not len(samples):
        raise ValueError(f"no readable images found in {root} (extensions: {' '.join(_IMAGE_EXTENSIONS)})")
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if empty:
        raise ValueError(f"class(es) with no readable images in {root}: {', '.join(empty)}")


def stratified_split(labels, val_fraction, seed=0):
    """Sorted index lists (train, val) holding `val_fraction` of every class in val.

    Each class is shuffled by its own generator seeded with (seed, label), so a class's split does
    not depend on the other classes. Every class keeps at least one sample in train, and one in val
    when it has two or more.
    Usage: train_index, val_index = stratified_split([0, 0, 0, 1, 1, 1], 1 / 3, seed=0)
    """
    labels = np.asarray(labels)
    train_index, val_index = [], []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        np.random.default_rng([seed, int(label)]).shuffle(index)
        n_val = min(max(int(round(val_fraction * len(index))), 1), len(index) - 1) if val_fraction > 0 else 0
        val_index += index[:n_val].tolist()
        train_index += index[n_val:].tolist()
    return sorted(train_index), sorted(val_index)


def drop_unreadable_images(samples, max_workers=8):
    """The (path, label) samples whose image decodes; the others are skipped with one warning that counts them.

    Each file is fully decoded (JPEGs at 1/8 scale via PIL's draft mode, which still reads every
    byte), so truncated files are caught here, not mid-epoch. Decoding runs in threads.
    Usage: samples = drop_unreadable_images([("a.jpg", 0), ("broken.jpg", 1)])
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        readable = list(pool.map(_is_readable_image, [path for path, _ in samples]))
    bad = [path for (path, _), ok in zip(samples, readable) if not ok]
    if bad:
        examples = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): {examples}", stacklevel=2)
    return [sample for sample, ok in zip(samples, readable) if ok]


def _is_readable_image(path):
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for broken files; all mean unreadable
        return False


class ImageSamples(torch.utils.data.Dataset):
    """(transformed image, label) for a list of (path, label); images are opened with PIL as RGB.

    A file that fails to load mid-epoch (changed after find_image_samples checked it) is replaced
    by the next sample, with a warning, so one file never stops an epoch.
    dataset[(index, seed, epoch)], as classifier_loaders' sampler asks, runs the transform on the
    CPU generator seeded by exactly those three (then restored): a sample's augmentation is the
    same whatever the worker count, the rank, or where a run was stopped and resumed.
    Usage: dataset = ImageSamples(train_samples, image_transforms(256, train=True))
    """
    seeded_augmentation = True  # classifier_loaders' sampler sends (index, seed, epoch) keys

    def __init__(self, samples, transform=None):
        self.samples, self.transform = list(samples), transform

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        return [label for _, label in self.samples]

    def __getitem__(self, index):
        from PIL import Image
        key = None
        if isinstance(index, tuple):
            key, index = index, index[0]
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except Exception as error:  # noqa: BLE001 - see the class docstring
                warnings.warn(f"could not read {path} ({error}); using the next image instead")
                continue
            if self.transform is None:
                return image, label
            if key is None:
                return self.transform(image), label
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
                return self.transform(image), label
        raise RuntimeError("no readable image left in the dataset")


def image_transforms(image_size, *, train, normalize=True, crop_scale=(0.25, 1.0)):
    """Training: random resized crop (area `crop_scale`) and horizontal flip; validation: resize to
    image_size * 256/224 and center crop. Then a float tensor with ImageNet normalisation, or with
    normalize=False the cropped PIL image (for display). crop_scale is milder than ImageNet's
    (0.08, 1) because a hazard may sit anywhere in a corridor photo and must stay in the crop.
    Usage: transform = image_transforms(256, train=True)
    """
    from torchvision.transforms import v2
    if train:
        steps = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    if normalize:
        steps = [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)]
    return v2.Compose(steps)


def classifier_loaders(train_set, val_set, batch_size, *, num_workers=0, device="cpu", seed=0,
                       rank=0, world_size=1):
    """(train_loader, val_loader) for one process of `world_size`.

    Training batches come from a seeded DistributedSampler (also when world_size is 1, so the order
    is reproducible: call train_loader.sampler.set_epoch(epoch) each epoch, or
    set_epoch(epoch, skip_batches=k) to start that epoch at its batch k when resuming); a last batch
    smaller than batch_size is dropped when there is more than one batch (BatchNorm cannot train on
    one image). A dataset with seeded_augmentation = True (ImageSamples) is asked for
    (index, seed, epoch) keys, so its augmentation does not depend on workers or resumes.
    Validation is sharded by rank without padding, so all-reduced sums count every image once.
    Pinned memory on CUDA; workers persist across epochs. The loaders draw their worker seeds from
    their own generators, not from torch's global one.
    Usage: train_loader, val_loader = classifier_loaders(train_set, val_set, 32, num_workers=4)
    """
    class EpochSampler(torch.utils.data.DistributedSampler):
        """set_epoch(epoch, skip_batches) and, for a seeded_augmentation dataset, (index, seed, epoch) keys."""

        def set_epoch(self, epoch, skip_batches=0):
            super().set_epoch(epoch)
            self.skip_batches = skip_batches

        def __iter__(self):
            indices = list(super().__iter__())[getattr(self, "skip_batches", 0) * batch_size:]
            keys = getattr(train_set, "seeded_augmentation", False)
            return iter([(index, self.seed, self.epoch) for index in indices] if keys else indices)

    sampler = EpochSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    options = {"num_workers": num_workers, "pin_memory": torch.device(device).type == "cuda",
               "persistent_workers": num_workers > 0}
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler,
                                               drop_last=len(sampler) > batch_size,
                                               generator=torch.Generator().manual_seed(seed + rank), **options)
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=batch_size, shuffle=False,
                                             generator=torch.Generator().manual_seed(seed + rank), **options)
    return train_loader, val_loader



# ----------------------------------------------------------------------------- models

def _timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t (N,) as in guided-diffusion / torchcfm (t used as given, in [0, 1])."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def _group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)


class _FlowResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, embed_dim, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(_group_norm(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels))
        self.out_layers = nn.Sequential(_group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)  # each block starts as the identity
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, embedding):
        h = self.in_layers(x) + self.embed(embedding)[:, :, None, None].to(x.dtype)
        return self.skip(x) + self.out_layers(h)


class _FlowAttention(nn.Module):
    def __init__(self, channels, head_channels):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, embedding=None):
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, height * width)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (batch, heads, positions, head_channels)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(batch, channels, height, width))


class _FlowDown(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, embedding=None):
        return self.conv(x)


class _FlowUp(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, embedding=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FlowUNet(nn.Module):
    """A time-conditioned UNet for velocity fields, called as model(x, t) with t (N,) in [0, 1].

    The architecture of guided-diffusion's UNet as torchcfm's CIFAR-10 example configures it:
    residual blocks with the time embedding added, self-attention at the resolutions listed (and in
    the middle), strided-conv down / nearest+conv up, skip connections. The defaults are that recipe
    (128 channels, multipliers 1,2,2,2, two blocks per level, attention at 16x16 with 64-channel
    heads, dropout 0.1): about 35.7M parameters.
    Usage: model = FlowUNet(); velocity = model(x, torch.rand(x.shape[0]))
    Copy with: _timestep_embedding, _group_norm, _FlowResBlock, _FlowAttention, _FlowDown, _FlowUp
    """

    def __init__(self, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), head_channels=64, dropout=0.1, image_size=32):
        super().__init__()
        self.base_channels = base_channels
        embed_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, embed_dim), nn.SiLU(),
                                        nn.Linear(embed_dim, embed_dim))
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, channels, resolution = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                layers = [_FlowResBlock(channels, base_channels * mult, embed_dim, dropout)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(_FlowAttention(channels, head_channels))
                self.down.append(nn.ModuleList(layers))
                skip_channels.append(channels)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([_FlowDown(channels)]))
                skip_channels.append(channels)
                resolution //= 2
        self.middle = nn.ModuleList([_FlowResBlock(channels, channels, embed_dim, dropout),
                                     _FlowAttention(channels, head_channels),
                                     _FlowResBlock(channels, channels, embed_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for index in range(num_res_blocks + 1):
                layers = [_FlowResBlock(channels + skip_channels.pop(), base_channels * mult, embed_dim, dropout)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(_FlowAttention(channels, head_channels))
                if level and index == num_res_blocks:
                    layers.append(_FlowUp(channels))
                    resolution *= 2
                self.up.append(nn.ModuleList(layers))
        self.output = nn.Sequential(_group_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        embedding = self.time_embed(_timestep_embedding(t, self.base_channels).to(self.input_conv.weight.dtype))
        h = self.input_conv(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, embedding)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, embedding)
        for layers in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                h = layer(h, embedding)
        return self.output(h)


CLASSIFIER_NAMES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "efficientnet_b4")


def build_classifier(name, num_classes, weights="none"):
    """A torchvision `name` (see CLASSIFIER_NAMES) with its last layer replaced for `num_classes`.

    weights="imagenet" loads torchvision's default ImageNet weights from the torch hub cache
    ($TORCH_HOME/hub/checkpoints, ~/.cache/torch by default), downloading them there when missing;
    when that fails, FileNotFoundError says which file to put where, or to pass --weights none.
    weights="none" (or None) starts from random weights.
    Usage: model = build_classifier("resnet50", num_classes=5, weights="imagenet")
    """
    names = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "efficientnet_b4")  # CLASSIFIER_NAMES, to paste alone
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(names)}")
    if weights not in ("imagenet", "none", None):
        raise ValueError(f"weights must be 'imagenet' or 'none', not {weights!r}")
    model = torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(name))
    if hasattr(model, "fc"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def _imagenet_state_dict(name):
    """torchvision's default ImageNet weights for `name`, from the hub cache (downloaded there when
    missing), loaded with torch.load(weights_only=True) through load_checkpoint."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return load_checkpoint(_hub_cached_file(url, f"the ImageNet weights for {name}",
                                            "pass --weights none to train from scratch", check_hash=True))


def _hub_cached_file(url, what, alternative, check_hash=False):
    """The file of `url` in the torch hub checkpoints folder, downloaded there when missing; when that
    fails, FileNotFoundError says which file to put where, or `alternative`."""
    from urllib.parse import urlparse
    file_name = os.path.basename(urlparse(url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if not os.path.isfile(path):
        hash_match = torch.hub.HASH_REGEX.search(file_name) if check_hash else None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_match.group(1) if hash_match else None, progress=False)
        except Exception as error:  # noqa: BLE001 - no network, proxy, disk: the advice is the same
            raise FileNotFoundError(
                f"could not download {what} ({type(error).__name__}: {error}).\n  Download {url}\n"
                f"  and put it at {path}\n  (the torch hub checkpoints folder; set TORCH_HOME to move it),"
                f" or {alternative}.") from None
    return path


def build_optimizer(name, parameters, learning_rate, *, weight_decay=0.0, momentum=0.9, fused=None):
    """torch.optim.Adam ("adam"), AdamW ("adamw") or SGD with Nesterov momentum ("sgd").

    fused=True (CUDA) lets train_epoch skip a bad Adam/AdamW step without a host sync; SGD is never
    fused, since torch's fused SGD corrupts its momentum buffer on a skipped first step.
    Usage: optimizer = build_optimizer("adamw", model.parameters(), 3e-4, weight_decay=0.05)
    """
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum, nesterov=True,
                               weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")


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


def rectified_flow_loss(model, batch):
    """Rectified-flow (flow-matching) loss: x_t = t*x1 + (1-t)*x0 with x0 ~ N(0, I), t ~ U(0, 1),
    regressing model(x_t, t) onto the velocity x1 - x0 (mean squared error, float32).

    `batch` is data x1 of any shape (N, ...) or an (x1, labels) pair; fits train_epoch's loss_fn.
    Usage: stats = wbflow.train_epoch(model, loader, optimizer, rectified_flow_loss)
    """
    data = batch[0] if isinstance(batch, (tuple, list)) else batch
    noise = torch.randn_like(data)
    t = torch.rand(data.shape[0], device=data.device, dtype=data.dtype)
    t_data = t.view(-1, *([1] * (data.dim() - 1)))
    velocity = model(t_data * data + (1 - t_data) * noise, t)
    return F.mse_loss(velocity.float(), (data - noise).float())


def focal_loss(logits, targets, *, gamma=2.0, alpha=None, reduction="mean"):
    """Multi-class focal loss (Lin et al. 2017): -alpha[y] * (1 - p_y)^gamma * log p_y.

    alpha: per-class weights (num_classes values) or None for all ones. "mean" divides by the sum of
    alpha[y] over the batch, as F.cross_entropy(weight=alpha) does, so gamma=0 is exactly weighted
    cross-entropy; "sum" and "none" as usual. Computed in float32 even under autocast.
    Usage: criterion = functools.partial(focal_loss, gamma=2.0, alpha=class_weights)
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    loss = -(1 - log_p.exp()).clamp(min=0).pow(gamma) * log_p
    weight = (torch.ones_like(loss) if alpha is None
              else torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)[targets])
    loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weight.sum()


def class_balanced_weights(labels, num_classes):
    """Per-class weights n / (num_classes * count[c]) ("balanced"): rare classes weigh more; mean weight
    over the samples is 1. A class with no samples gets weight 0.
    Usage: nn.CrossEntropyLoss(weight=class_balanced_weights(train_set.labels, 5))
    """
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), 0.0)
    return weights.float()


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
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def make_scaler(device, amp=None):
    """A GradScaler that is enabled only when autocast runs in fp16 (bf16 and fp32 need none): on CUDA
    with amp on (amp=None means on for CUDA) where bf16 is not supported.

    A disabled scaler passes scale/step/update straight through, so the training loop has no branch.
    Usage: scaler = make_scaler(device); train_epoch(..., scaler=scaler)
    """
    device = torch.device(device)
    fp16 = (device.type == "cuda" and amp is not False
            and not torch.cuda.is_bf16_supported(including_emulation=False))
    return torch.amp.GradScaler(device.type, enabled=fp16)


def make_ema(model, decay=0.9999):
    """An exponential moving average of `model`'s weights and buffers (torch.optim.swa_utils), on the
    model's device with its update counter on the CPU.

    train_epoch updates it after each optimiser step; evaluate or sample with ema_model.module.
    Usage: ema_model = make_ema(model, decay=0.9999)
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    ema_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema_model.update_parameters(model)  # the first update copies the weights
    return ema_model


def train_epoch(model, loader, optimizer, loss_fn, *, device=None, scheduler=None, ema_model=None,
                grad_clip=None, amp=None, scaler=None, step=0, epoch=0, log_every=10, on_log=None,
                stop=None, resume=None, progress=True):
    """Train `model` for one pass over `loader`; returns the epoch means, the new global step and,
    when `stop` ended the epoch early, the state to finish it with.

    loss_fn(model, batch) returns a loss tensor, or (loss, n_correct, n_samples) for accuracy.
    Each step: batch to device (non-blocking), autocast (bf16 on CUDA, fp16 where bf16 is missing,
    off on CPU unless amp=True), backward, the pre-clip global L2 gradient norm (clipped to
    `grad_clip` when given), optimiser step, per-step `scheduler.step()`, the EMA update of
    `ema_model` (make_ema). A step whose loss or gradients are not finite is skipped and counted.
    Sums stay on the device and are read only at log points, so the step path never waits for the
    GPU, except where torch itself must: an fp16 GradScaler, or skipping a bad step with an
    optimiser that cannot take a device-side skip flag (pass fused=True to Adam/AdamW to avoid it).

    Logging: every optimiser step lands in exactly one window. A window closes when the global
    step is a multiple of `log_every`, and at the end of the epoch (a shorter window); then
    on_log(step, window) gets plain floats: loss and grad_norm (means over the window's finite
    steps), accuracy (percent, only when loss_fn counts), learning_rate (the rate the window's LAST
    step used, read before scheduler.step()), steps and skipped (counts in the window), batch (the
    epoch's 0-based index of the last batch) and epoch. The caller names the W&B keys.

    Stopping: `stop` (a threading.Event or a callable returning bool; see stop_on_signals) is checked
    after every step with no host sync (under torch.distributed at log points, where the ranks agree);
    when set, the epoch returns at that step boundary with stopped=True and a `state` of tensors and
    plain numbers (loads with weights_only=True). Pass it back as `resume=` with a loader that skips
    the state["batches"] batches already done, and the epoch continues exactly: the same windows,
    the same epoch means. `state` is None when the epoch ran to its end.
    Pass the fp16 `scaler` (make_scaler) to keep its loss scale across epochs. Under
    torch.distributed the returned means and counts are all-reduced over ranks; each rank's
    on_log sees its own windows.
    Usage: stats = train_epoch(model, loader, opt, loss_fn, step=step, on_log=lambda s, w: print(s, w))
    """
    from tqdm.auto import tqdm
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp is None:
        amp = device.type == "cuda"
    dtype = None if not amp else (torch.float16 if device.type == "cuda" and not
                                  torch.cuda.is_bf16_supported(including_emulation=False) else torch.bfloat16)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ema_groups = {}  # swa_utils' own EMA update per (device, dtype), minus update_parameters' host read of its counter
    if ema_model is not None and ema_model.multi_avg_fn is not None and ema_model.use_buffers:
        for ema_tensor, tensor in zip(itertools.chain(ema_model.module.parameters(), ema_model.module.buffers()),
                                      itertools.chain(model.parameters(), model.buffers())):
            ema_group, group = ema_groups.setdefault((ema_tensor.device, ema_tensor.dtype), ([], []))
            ema_group.append(ema_tensor.detach())
            group.append(tensor.detach())
        if any(tensor.device != ema_tensor.device for ema_group, group in ema_groups.values()
               for ema_tensor, tensor in zip(ema_group, group)):
            ema_groups = {}  # an EMA kept on another device: update_parameters copies each step

    def to_device(batch):
        if torch.is_tensor(batch):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(to_device(item) for item in batch)
        if isinstance(batch, dict):
            return {key: to_device(value) for key, value in batch.items()}
        return batch

    def stop_requested():
        return stop is not None and (stop.is_set() if hasattr(stop, "is_set") else bool(stop()))

    zero = torch.zeros((), dtype=torch.float64, device=device)
    # Running sums on the device: loss, n_correct, grad_norm, finite steps, skipped steps, samples;
    # `logged` is their value at the last log point (host), so a window is totals - logged.
    totals, logged, batch_index = torch.zeros(6, dtype=torch.float64, device=device), [0.0] * 6, -1
    has_accuracy, learning_rate, start_step = False, float(optimizer.param_groups[0]["lr"]), step
    if resume is not None:
        totals = resume["totals"][rank].to(device=device, dtype=torch.float64)
        logged, batch_index = resume["logged"][rank].tolist(), resume["batches"] - 1
        has_accuracy, learning_rate = resume["has_accuracy"], resume["learning_rate"]

    def emit(current):
        window = [c - p for c, p in zip(current, logged)]
        loss_sum, n_correct, grad_norm_sum, n_finite, n_skipped, n_samples = window
        if on_log is None or n_finite + n_skipped == 0:
            return
        values = {"loss": loss_sum / n_finite if n_finite else math.nan,
                  "grad_norm": grad_norm_sum / n_finite if n_finite else math.nan,
                  "learning_rate": float(learning_rate), "steps": int(n_finite + n_skipped),
                  "skipped": int(n_skipped), "batch": batch_index, "epoch": epoch}
        if has_accuracy:
            values["accuracy"] = 100.0 * n_correct / n_samples if n_samples else math.nan
        on_log(step, values)

    model.train()
    started = time.perf_counter() - (resume["seconds"] if resume is not None else 0.0)
    stopped = not distributed and stop_requested()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in ([] if stopped else bar):
        batch = to_device(batch)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            output = loss_fn(model, batch)
        loss, n_correct, n_samples = (output, None, None) if torch.is_tensor(output) else output
        if n_samples is None:  # the first dimension of the batch's first tensor
            first = batch
            while not torch.is_tensor(first):
                first = next(iter(first.values())) if isinstance(first, dict) else first[0]
            n_samples = first.shape[0]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step uses, before scheduler.step()
        if scaler.is_enabled():  # an enabled GradScaler skips a non-finite step by itself
            scaler.step(optimizer)
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused Adam/AdamW take the skip flag on the device, as GradScaler passes it: through the
            # optimiser attributes grad_scale / found_inf, read by their step(). torch has no public
            # argument for this; test_fused_optimizer_still_reads_found_inf fails if that changes.
            optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif finite:  # any other optimiser: one host read, only to skip
            optimizer.step()
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        for ema_group, group in ema_groups.values():
            ema_model.multi_avg_fn(ema_group, group, ema_model.n_averaged)
        if ema_model is not None:
            if ema_groups:
                ema_model.n_averaged += 1
            else:
                ema_model.update_parameters(model)
        has_accuracy = n_correct is not None
        correct = n_correct.detach().double() if torch.is_tensor(n_correct) else zero + (n_correct or 0)
        totals += torch.stack([torch.where(finite, loss.detach().double(), zero), correct,
                               torch.where(finite, grad_norm.detach().double(), zero),
                               finite.double(), (~finite).double(), zero + n_samples])
        step, batch_index = step + 1, batch_index + 1
        at_log_point = step % log_every == 0
        if at_log_point:
            current = totals.tolist()  # the one host-device sync, at log points only
            emit(current)
            logged = current
            bar.set_postfix(loss=f"{current[0] / max(current[3], 1):.4f}")  # the epoch's running mean
        if distributed:
            if at_log_point:  # every rank must stop at the same step, or the next collective hangs
                flag = torch.tensor(float(stop_requested()), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopped = flag.item() > 0
        else:
            stopped = stop_requested()
        if stopped:
            break
    bar.close()
    current = totals.tolist()
    state = None
    if stopped:
        sums = torch.stack([totals, torch.tensor(logged, dtype=torch.float64, device=device)])
        if distributed:
            gathered = [torch.zeros_like(sums) for _ in range(world_size)]
            dist.all_gather(gathered, sums)
            sums = torch.stack(gathered)
        else:
            sums = sums[None]
        state = {"totals": sums[:, 0].cpu(), "logged": sums[:, 1].cpu(), "batches": batch_index + 1,
                 "has_accuracy": has_accuracy, "learning_rate": float(learning_rate),
                 "seconds": time.perf_counter() - started}
    else:
        emit(current)  # the epoch's last, partial window
    if distributed:  # every rank returns the means over all ranks
        epoch_sums = torch.tensor(current, dtype=torch.float64, device=device)
        dist.all_reduce(epoch_sums)
        current = epoch_sums.tolist()
    loss_sum, n_correct, grad_norm_sum, n_finite, n_skipped, n_samples = current
    return {"loss": loss_sum / n_finite if n_finite else math.nan,
            "accuracy": 100.0 * n_correct / n_samples if has_accuracy and n_samples else None,
            "grad_norm": grad_norm_sum / n_finite if n_finite else math.nan,
            "steps": step - start_step, "skipped": int(n_skipped), "samples": int(n_samples), "step": step,
            "seconds": time.perf_counter() - started, "stopped": stopped, "state": state}


def validate(model, loader, loss_fn, *, device=None, amp=None, progress=False):
    """Evaluate `model` on `loader` in inference mode; returns {"loss", "accuracy", "samples"}.

    loss_fn as in train_epoch; the loss is the per-sample mean, accuracy is percent (None when
    loss_fn gives no counts). Under torch.distributed the sums are all-reduced, so every rank
    returns the metrics of the whole (sharded) validation set. The model's train/eval mode is restored.
    Usage: metrics = validate(model, val_loader, classification_loss(nn.CrossEntropyLoss()))
    """
    from tqdm.auto import tqdm
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if amp is None:
        amp = device.type == "cuda"
    dtype = None if not amp else (torch.float16 if device.type == "cuda" and not
                                  torch.cuda.is_bf16_supported(including_emulation=False) else torch.bfloat16)

    def to_device(batch):
        if torch.is_tensor(batch):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(to_device(item) for item in batch)
        if isinstance(batch, dict):
            return {key: to_device(value) for key, value in batch.items()}
        return batch

    was_training = model.training
    model.eval()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n_samples, n_correct, n_samples
    has_accuracy = False
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validate", disable=not progress, leave=False):
            batch = to_device(batch)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                output = loss_fn(model, batch)
            loss, n_correct, n_samples = (output, None, None) if torch.is_tensor(output) else output
            if n_samples is None:  # the first dimension of the batch's first tensor
                first = batch
                while not torch.is_tensor(first):
                    first = next(iter(first.values())) if isinstance(first, dict) else first[0]
                n_samples = first.shape[0]
            has_accuracy = n_correct is not None
            correct = n_correct.double() if torch.is_tensor(n_correct) else zero + (n_correct or 0)
            totals += torch.stack([loss.double() * n_samples, correct, zero + n_samples])
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, n_correct, n_samples = totals.tolist()
    return {"loss": loss_sum / n_samples if n_samples else math.nan,
            "accuracy": 100.0 * n_correct / n_samples if has_accuracy and n_samples else None,
            "samples": int(n_samples)}


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """For a `with` block, turn SIGINT (Ctrl-C) and SIGTERM (what schedulers send before preemption)
    into a request to stop: yields a threading.Event that the first signal sets, with the signal's
    number in event.signal (None until then), for train_epoch(stop=...) to end the epoch at the next
    step boundary. A second signal raises KeyboardInterrupt, for a stop that will not wait. The
    previous handlers are restored on exit; outside the main thread nothing is installed.
    Usage: with stop_on_signals() as stop: stats = train_epoch(..., stop=stop); if stop.is_set(): save, exit
    """
    stop = threading.Event()
    stop.signal = None

    def request_stop(number, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.signal = number
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {number: signal.signal(number, request_stop) for number in signals}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def capture_rng_state():
    """The torch (CPU and every CUDA device), numpy and python RNG states as tensors and plain values,
    so they go into a checkpoint that loads with weights_only=True.

    Usage: state["rng"] = capture_rng_state(); ...; restore_rng_state(state["rng"])
    """
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_state, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_keys.astype(np.int64)), "pos": int(numpy_pos),
                       "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_gauss)},
             "python": {"version": python_version, "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss_next": python_gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Put back RNG states taken by capture_rng_state (CUDA states only when the device count matches).

    Usage: restore_rng_state(load_checkpoint("last.pt")["rng"])
    """
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].cpu().tolist()), python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in cuda_states])


def predict_dataset(model, dataset, *, device="cpu", batch_size=64, num_workers=0):
    """Class probabilities [N, K] (float32, CPU) and labels [N] for every (image, label) in `dataset`,
    in order, with the model in eval mode (its mode is restored).
    Usage: probs, labels = predict_dataset(model, val_set, device="cuda")
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    probs, labels = [], []
    with torch.inference_mode():
        for images, batch_labels in loader:
            probs.append(model(images.to(device)).float().softmax(dim=1).cpu())
            labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


# ----------------------------------------------------------------------------- sampling

def euler_sample(model, noise, steps, *, heun=False, dtype=None):
    """Integrate dx/dt = model(x, t) from t=0 (noise) to t=1 (data) in `steps` equal steps: Euler
    (one model evaluation a step) or, with heun=True, Heun's second-order method (two). Runs in
    inference mode and eval mode (the model's mode is restored); `dtype` is an autocast dtype
    (e.g. wbflow.autocast_dtype(device)) or None for float32. Returns float32 samples.

    Usage: images = euler_sample(ema_model.module, torch.randn(64, 3, 32, 32), steps=100)
    """
    was_training = model.training
    model.eval()
    x = noise.float().clone()
    times = torch.linspace(0.0, 1.0, steps + 1).tolist()
    t = torch.empty(x.shape[0], device=x.device)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=dtype or torch.float32,
                                                enabled=dtype is not None):
        for t_now, t_next in zip(times[:-1], times[1:]):
            dt = t_next - t_now
            velocity = model(x, t.fill_(t_now))
            if heun:
                velocity = (velocity + model(x + dt * velocity, t.fill_(t_next))) / 2
            x.add_(velocity, alpha=dt)
    model.train(was_training)
    return x


def rk45_sample(model, noise, *, tolerance=1e-5, dtype=None):
    """Integrate the flow ODE from t=0 to 1 with adaptive RK45 (scipy.integrate.solve_ivp, float64
    state, rtol = atol = `tolerance`); returns (samples float32, number of model evaluations used).

    Usage: images, nfe = rk45_sample(ema_model.module, torch.randn(64, 3, 32, 32), tolerance=1e-5)
    """
    from scipy.integrate import solve_ivp
    was_training = model.training
    model.eval()
    shape, device = noise.shape, noise.device

    def velocity(t_now, x_flat):
        x = torch.from_numpy(x_flat).to(device=device, dtype=torch.float32).reshape(shape)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            v = model(x, torch.full((shape[0],), t_now, device=device))
        return v.float().cpu().numpy().reshape(-1).astype(np.float64)

    solution = solve_ivp(velocity, (0.0, 1.0), noise.detach().cpu().double().numpy().reshape(-1),
                         method="RK45", rtol=tolerance, atol=tolerance, t_eval=[1.0])
    model.train(was_training)
    if not solution.success:
        raise RuntimeError(f"RK45 failed: {solution.message}")
    samples = torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device=device, dtype=torch.float32)
    return samples, int(solution.nfev)


def compare_solvers(model, noise, *, solvers=("euler", "heun", "rk45"), nfes=(1, 2, 4, 10, 50, 100),
                    tolerance=1e-5, dtype=None):
    """Sample the same noise with every solver at every NFE budget; returns a list of rows
    {"solver", "nfe" (evaluations used), "seconds", "images"}. Heun takes the even budgets (2 per
    step), RK45 runs once at `tolerance` and reports the evaluations it needed.

    Usage: rows = compare_solvers(ema_model.module, fixed_noise, nfes=(1, 2, 4, 10, 50, 100))
    Copy with: euler_sample, rk45_sample
    """
    rows = []
    for solver in solvers:
        budgets = {"euler": list(nfes), "heun": [n for n in nfes if n >= 2 and n % 2 == 0], "rk45": [None]}[solver]
        for budget in budgets:
            started = time.perf_counter()
            if solver == "rk45":
                images, used = rk45_sample(model, noise, tolerance=tolerance, dtype=dtype)
            else:
                steps = budget // 2 if solver == "heun" else budget
                images, used = euler_sample(model, noise, steps, heun=solver == "heun", dtype=dtype), budget
            rows.append({"solver": solver, "nfe": used, "seconds": time.perf_counter() - started, "images": images})
    return rows


# ----------------------------------------------------------------------------- metrics

def per_class_precision_recall(y_true, y_pred, num_classes):
    """(precision, recall, support) lists, one value per class; a class never predicted (or absent)
    has precision (recall) 0.0.
    Usage: precision, recall, support = per_class_precision_recall([0, 1, 1], [0, 1, 0], 2)
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, support = [], [], []
    for label in range(num_classes):
        true_positive = int(np.sum((y_pred == label) & (y_true == label)))
        n_predicted, n_true = int(np.sum(y_pred == label)), int(np.sum(y_true == label))
        precision.append(true_positive / n_predicted if n_predicted else 0.0)
        recall.append(true_positive / n_true if n_true else 0.0)
        support.append(n_true)
    return precision, recall, support


FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)


FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


FID_WEIGHTS_ENV = "WBFLOW_FID_WEIGHTS"


class _FIDInceptionA(torchvision.models.inception.InceptionA):
    def forward(self, x):
        branch_pool = self.branch_pool(_avg_pool_valid_only(x))
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class _FIDInceptionC(torchvision.models.inception.InceptionC):
    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_valid_only(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class _FIDInceptionE(torchvision.models.inception.InceptionE):
    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = self.branch_pool(self._pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], 1)

    def _pool(self, x):
        return _avg_pool_valid_only(x)


class _FIDInceptionEMaxPool(_FIDInceptionE):
    # The TF graph's last block max-pools here, unlike the paper; the published numbers use it.
    def _pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _avg_pool_valid_only(x):
    # TensorFlow's average pool ignores the zero padding at borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionV3(torchvision.models.inception.Inception3):
    """Inception v3 as in the FID TensorFlow graph; state_dict keys match pytorch-fid's weights.

    Input: (N, 3, 299, 299) floats in [-1, 1]. Output: (pool features (N, 2048), logits without
    the fc bias (N, 1008)) from one pass; the unbiased logits are what the original IS code used.
    Usage: features, logits_unbiased = FIDInceptionV3()(images_minus1_to_1)
    """

    def __init__(self):
        blocks = [torchvision.models.inception.BasicConv2d, _FIDInceptionA,
                  torchvision.models.inception.InceptionB, _FIDInceptionC,
                  torchvision.models.inception.InceptionD, _FIDInceptionE,
                  torchvision.models.inception.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, inception_blocks=blocks,
                         init_weights=False)
        self.Mixed_7c = _FIDInceptionEMaxPool(2048)

    def forward(self, x):
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = layer(x)
        pool_features = x.mean(dim=(2, 3))
        return pool_features, pool_features @ self.fc.weight.T


def fid_weights_path(weights_path=None):
    """Path of the FID Inception weights: argument, then $WBFLOW_FID_WEIGHTS, then the torch hub
    cache, downloading pytorch-fid's release file there once when online.
    Usage: path = fid_weights_path()  # e.g. ~/.cache/torch/hub/checkpoints/pt_inception-...pth
    """
    path = weights_path or os.environ.get(FID_WEIGHTS_ENV)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights file {path!r} does not exist; expected "
                                    f"pytorch-fid's {FID_WEIGHTS_FILE} from {FID_WEIGHTS_URL}")
        return str(path)
    return _hub_cached_file(FID_WEIGHTS_URL, "the FID Inception weights",
                            f"pass weights_path=... or set ${FID_WEIGHTS_ENV}")


def _load_state_dict(path):
    state_dict = load_checkpoint(path)
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(value) for value in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state_dict


def _fuse_batchnorm_into_conv(model):
    # Inference-only speed-up: conv -> BN(eval) is one conv with scaled weights and a bias.
    for module in model.modules():
        if isinstance(module, torchvision.models.inception.BasicConv2d):
            scale = module.bn.weight / torch.sqrt(module.bn.running_var + module.bn.eps)
            fused_conv = copy.deepcopy(module.conv)
            fused_conv.weight = nn.Parameter(module.conv.weight * scale[:, None, None, None])
            fused_conv.bias = nn.Parameter(module.bn.bias - module.bn.running_mean * scale)
            module.conv, module.bn = fused_conv, nn.Identity()
    return model


def load_fid_inception(weights_path=None, device="cpu", fuse=True):
    """Load the FID Inception v3 in eval mode (strict keys, weights_only=True).

    fuse=True folds BatchNorm into the convolutions and uses channels_last: faster, same features
    within float32 rounding, but its state_dict no longer matches the weights file.
    Usage: inception = load_fid_inception("pt_inception-2015-12-05-6726825d.pth", device="cuda")
    """
    path = fid_weights_path(weights_path)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(_load_state_dict(path), strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not have the keys and shapes of pytorch-fid's "
                         f"{FID_WEIGHTS_FILE}: {error}") from None
    model = model.eval().requires_grad_(False)
    if fuse:
        with torch.no_grad():
            model = _fuse_batchnorm_into_conv(model).to(memory_format=torch.channels_last)
    return model.to(device)


def file_sha256(path):
    """Hex SHA-256 of a file, read in chunks; keys statistics caches to the weights used.
    Usage: key = file_sha256(fid_weights_path())[:12]
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensorflow_resize_matrix(in_size, out_size, device):
    # TF 1.x legacy bilinear: source = destination * in/out (no half-pixel offset), coordinates
    # in float32 as torch-fidelity computes them; rows of the matrix hold the two lerp weights.
    source = torch.arange(out_size, dtype=torch.float32) * torch.tensor(in_size / out_size)
    low = source.long()
    high = (low + 1).clamp_max(in_size - 1)
    frac = source - low.float()
    rows = torch.arange(out_size)
    matrix = torch.zeros(out_size, in_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix.to(device)


def _preprocess(images, resize, size=299):
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    is_uint8 = images.dtype == torch.uint8
    if not is_uint8 and images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("float images must be in [0, 1] (model outputs in [-1, 1]: images_to_uint8 first)")
    if resize == "tensorflow":
        images_255 = images.float() if is_uint8 else images.float() * 255
        rows = _tensorflow_resize_matrix(images.shape[2], size, images.device)
        cols = _tensorflow_resize_matrix(images.shape[3], size, images.device)
        return (rows @ images_255 @ cols.T - 128) / 128
    if resize == "pytorch-fid":
        images_01 = images.float() / 255 if is_uint8 else images.float()
        resized = F.interpolate(images_01, size=(size, size), mode="bilinear", align_corners=False)
        return 2 * resized - 1
    raise ValueError(f"resize must be 'tensorflow' or 'pytorch-fid', not {resize!r}")


def fid_reference(resize="tensorflow"):
    """Which published implementation a number computed with this resize mode reproduces.
    Usage: wandb.log({"fid": fid(real, fake), "fid_reference": fid_reference()})
    """
    return {"tensorflow": "TensorFlow FID / torch-fidelity 0.4.0 inception-v3-compat",
            "pytorch-fid": "pytorch-fid 0.3.0 InceptionV3"}[resize]


def _image_batches(images, batch_size, num_images):
    if torch.is_tensor(images):
        images = images[:num_images]
        yield from images.split(batch_size)
        return
    remaining = float("inf") if num_images is None else num_images
    for batch in images:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        if remaining <= 0:
            return
        yield batch[:remaining] if remaining < len(batch) else batch
        remaining -= len(batch)


def _gather_across_ranks(rows):
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return rows
    world_size = distributed.get_world_size()
    if distributed.get_backend() == "nccl":
        rows = rows.to(torch.cuda.current_device())
    # all_gather needs equal shapes: pad every rank to the largest count, then trim.
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    distributed.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    distributed.all_gather(gathered, padded)
    return torch.cat([part[:n] for part, n in zip(gathered, counts)])


def inception_features(images, inception=None, *, resize="tensorflow", batch_size=50,
                       num_images=None, weights_path=None, device="cpu"):
    """One Inception pass per batch -> (pool features (N, 2048), unbiased logits (N, 1008)), float32
    on the CPU, gathered over all ranks under torch.distributed (rank order).

    images: (N, 3, H, W) uint8 in 0..255 or float in [0, 1], or an iterable of such batches or
    of (images, labels) pairs.
    Usage: features, logits = inception_features(images_uint8, load_fid_inception(device="cuda"))
    """
    if inception is None:
        inception = load_fid_inception(weights_path, device)
    model_device = next(inception.parameters()).device
    feature_batches, logit_batches = [], []
    # TF32 convolutions or matmuls would move features by ~1e-3, past the references' agreement.
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(), torch.backends.cudnn.flags(
                enabled=True, benchmark=torch.backends.cudnn.benchmark,
                deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            for batch in _image_batches(images, batch_size, num_images):
                batch = _preprocess(batch.to(model_device), resize)
                features, logits = inception(batch.contiguous(memory_format=torch.channels_last))
                feature_batches.append(features.float())
                logit_batches.append(logits.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    if not feature_batches:
        raise ValueError("no images to compute Inception features from")
    features = _gather_across_ranks(torch.cat(feature_batches))
    logits = _gather_across_ranks(torch.cat(logit_batches))
    return features.cpu(), logits.cpu()


def feature_statistics(features):
    """Mean and unbiased covariance (float64 numpy) of (N, D) features, as pytorch-fid stores them.
    Usage: mu, sigma = feature_statistics(features)
    """
    features = torch.as_tensor(features).double()
    mu = features.mean(dim=0)
    centered = features - mu
    sigma = centered.T @ centered / (features.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def _drop_rounding_noise(eigenvalues):
    # Eigenvalues that are zero in exact arithmetic come out as +-1e-16 * largest; their square
    # roots (1e-8 each, thousands of them) would add a visible bias when covariances are singular.
    noise_floor = np.abs(eigenvalues).max() * eigenvalues.size * np.finfo(eigenvalues.dtype).eps
    return np.where(eigenvalues > noise_floor, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, without sqrtm.

    tr sqrt(S1 S2) = sum sqrt(eig(L^T S2 L)) with S1 = L L^T (Cholesky; a symmetric eigensolve of a
    PSD matrix, so no complex parts); a singular S1 (fewer samples than dims) uses sqrt(S1) for L.
    Usage: distance = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    """
    import scipy.linalg
    from scipy.linalg import blas
    mu1, sigma1, mu2, sigma2 = (np.asarray(value, dtype=np.float64) for value in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape} vs {mu2.shape}")
    try:
        factor = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
        # L^T (S2 L) as two triangular products (BLAS trmm): half the work of general matmuls
        product = blas.dtrmm(1.0, factor, blas.dtrmm(1.0, factor, sigma2, side=1, lower=1), lower=1, trans_a=1)
    except np.linalg.LinAlgError:
        eigenvalues, eigenvectors = scipy.linalg.eigh(sigma1, check_finite=False)
        root = (eigenvectors * np.sqrt(_drop_rounding_noise(eigenvalues))) @ eigenvectors.T
        product = root @ sigma2 @ root
    eigenvalues = scipy.linalg.eigh((product + product.T) / 2, eigvals_only=True, driver="evr", check_finite=False)
    trace_sqrt_product = np.sqrt(_drop_rounding_noise(eigenvalues)).sum()
    mean_term = np.square(mu1 - mu2).sum()
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def _is_statistics(source):
    return (isinstance(source, (tuple, list)) and len(source) == 2
            and all(hasattr(part, "shape") for part in source)
            and len(source[0].shape) == 1 and len(source[1].shape) == 2)


def _statistics_of(source, load_inception, **feature_options):
    if isinstance(source, (str, os.PathLike)):
        with np.load(source, allow_pickle=False) as stored:
            return stored["mu"], stored["sigma"]
    if _is_statistics(source):
        return tuple(torch.as_tensor(np.asarray(part)).double().numpy() for part in source)
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if torch.is_tensor(source) and source.dim() == 2:
        return feature_statistics(source)
    features, _ = inception_features(source, load_inception(), **feature_options)
    return feature_statistics(features)


def fid(real, fake, *, resize="tensorflow", batch_size=50, device="cpu", num_images=None,
        weights_path=None, inception=None):
    """Fréchet Inception Distance between two image sets; resize picks the reference it reproduces:
    "tensorflow" (TF original, torch-fidelity 0.4.0: the CIFAR-10 numbers in papers) or
    "pytorch-fid" (pytorch-fid 0.3.0).

    Each side: images (N, 3, H, W) uint8 0..255 or float [0, 1]; an iterable/DataLoader of such
    batches or (images, labels) pairs; features (N, D); (mu, sigma); or an .npz path with mu/sigma.
    num_images caps the images read from each side. Under torch.distributed each rank passes its
    shard of images and every rank gets the FID over all of them; features and statistics are
    taken as given.
    Usage: score = fid("stats/cifar10-train-tensorflow-6726825d.npz", samples_uint8, device="cuda")
    """
    loaded = []

    def load_inception():
        if not loaded:
            loaded.append(load_fid_inception(weights_path, device) if inception is None
                          else inception)
        return loaded[0]

    feature_options = dict(resize=resize, batch_size=batch_size, num_images=num_images)
    real_statistics = _statistics_of(real, load_inception, **feature_options)
    fake_statistics = _statistics_of(fake, load_inception, **feature_options)
    return frechet_distance(*real_statistics, *fake_statistics)


def save_statistics(images, cache_dir, name="statistics", *, resize="tensorflow", batch_size=50,
                    device="cpu", num_images=None, weights_path=None, overwrite=False):
    """Compute mu/sigma once and save them as pytorch-fid's .npz format; the file name carries the
    resize mode and the weights file's hash, so a cached file is reused only for the same network.
    Usage: cifar10_statistics = save_statistics(train_images_uint8, "stats", "cifar10-train"); score = fid(cifar10_statistics, samples_uint8)
    """
    weights_path = fid_weights_path(weights_path)
    weights_hash = file_sha256(weights_path)
    path = os.path.join(cache_dir, f"{name}-{resize}-{weights_hash[:12]}.npz")
    if os.path.isfile(path) and not overwrite:
        return path
    features, _ = inception_features(images, load_fid_inception(weights_path, device),
                                     resize=resize, batch_size=batch_size, num_images=num_images)
    mu, sigma = feature_statistics(features)
    distributed = torch.distributed
    is_distributed = distributed.is_available() and distributed.is_initialized()
    if not is_distributed or distributed.get_rank() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        handle, partial_path = tempfile.mkstemp(prefix=".statistics.", suffix=".npz", dir=cache_dir)
        try:
            with os.fdopen(handle, "wb") as partial_file:
                np.savez(partial_file, mu=mu, sigma=sigma, weights_sha256=weights_hash, resize=resize,
                         num_images=len(features))
                partial_file.flush()
                os.fsync(partial_file.fileno())
            os.replace(partial_path, path)  # atomic: a crash never leaves a truncated cache entry
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial_path)
            raise
    if is_distributed:
        distributed.barrier()
    return path


def _inception_score_of_logits(logits, splits, seed):
    count = logits.shape[0]
    # torch-fidelity shuffles with this generator before splitting; same order, same numbers.
    shuffled = torch.as_tensor(logits)[np.random.RandomState(seed).permutation(count)].double()
    probabilities = shuffled.softmax(dim=1)
    log_probabilities = shuffled.log_softmax(dim=1)
    scores = []
    for split in range(splits):
        rows = slice(split * count // splits, (split + 1) * count // splits)
        p = probabilities[rows]
        log_marginal = p.mean(dim=0, keepdim=True).log()
        kl = (p * (log_probabilities[rows] - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(images, *, splits=10, resize="tensorflow", batch_size=50, device="cpu",
                    num_images=None, weights_path=None, inception=None, seed=2020):
    """Inception Score (mean, population std over splits), equal to torch-fidelity 0.4.0's ISC:
    logits without the fc bias, shuffled with numpy RandomState(2020), KL in float64.

    images: as for fid, or precomputed unbiased logits (N, 1008).
    Usage: is_mean, is_std = inception_score(samples_uint8, device="cuda")
    """
    if torch.is_tensor(images) and images.dim() == 2:
        return _inception_score_of_logits(images, splits, seed)
    _, logits = inception_features(images, inception, weights_path=weights_path, device=device,
                                   resize=resize, batch_size=batch_size,
                                   num_images=num_images)
    return _inception_score_of_logits(logits, splits, seed)


# ----------------------------------------------------------------------------- images & W&B

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


def images_to_uint8(images):
    """Model-space images in [-1, 1] -> uint8 0..255 (clamped, rounded), same shape and device.

    Usage: samples_uint8 = images_to_uint8(euler_sample(model, noise, 100))
    """
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def sample_grid(images, nrow=None):
    """A grid of images (N, C, H, W), floats in [-1, 1] or uint8, as a uint8 numpy array (H', W', C),
    ready for wandb.Image or a PNG; nrow defaults to a square layout.

    Usage: grid = sample_grid(samples[:64])  # 8 x 8 images
    """
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    images_uint8 = images if images.dtype == torch.uint8 else images_to_uint8(images)
    grid = torchvision.utils.make_grid(images_uint8.cpu(), nrow=nrow, padding=2)
    return grid.permute(1, 2, 0).numpy()


def save_png(grid_uint8, path):
    """Write a uint8 (H, W, C) array as a PNG (PIL), creating the folder; returns the path.

    Usage: save_png(sample_grid(samples), "checkpoints/samples/epoch_0010.png")
    """
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_uint8).save(path)
    return path


def log_image_grid(run, key, grid_uint8, *, step=None, caption=None):
    """run.log({key: wandb.Image(grid, caption)}, step=step), or nothing without a run.

    Usage: log_image_grid(run, "eval/generated_samples", sample_grid(samples), step=global_step)
    """
    if run is not None:
        import wandb
        run.log({key: wandb.Image(grid_uint8, caption=caption)}, step=step)


def samples_table(rows):
    """A wandb.Table with columns epoch, solver, nfe, seconds, samples from rows holding those keys,
    "samples" being a PNG path or a uint8 grid, so solvers and NFEs compare side by side.

    Usage: run.log({"eval/samples_table": samples_table(rows)})
    """
    import wandb
    columns = ["epoch", "solver", "nfe", "seconds", "samples"]
    data = [[row["epoch"], row["solver"], row["nfe"], round(row["seconds"], 3),
             wandb.Image(row["samples"], caption=f"epoch {row['epoch']} {row['solver']} NFE {row['nfe']}")]
            for row in rows]
    return wandb.Table(columns=columns, data=data)


def log_classification_report(run, probs, labels, class_names, *, images=None, table_rows=32, step=None):
    """Log a classifier's results on a labelled set; returns {"precision", "recall", "support"}.

    W&B keys: `predictions`, a table (image, true, predicted, confidence) of `table_rows` samples
    spread evenly over the set (always the same ones); `confusion_matrix` (wandb.plot.confusion_matrix);
    `per_class_metrics`, a table (class, precision, recall, support); and precision/<class>,
    recall/<class> in the summary. images[i][0] (or images[i]) is the display image of sample i,
    e.g. an ImageSamples with image_transforms(..., normalize=False); without it the table has no
    image column. Nothing is logged when `run` is None.
    Usage: log_classification_report(run, probs, labels, ["高风险", "中风险"], images=display_set)
    """
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    confidence, predicted = probs.max(dim=1)
    precision, recall, support = per_class_precision_recall(labels.tolist(), predicted.tolist(), len(class_names))
    report = {"precision": precision, "recall": recall, "support": support}
    if run is None:
        return report
    import wandb
    columns = (["image"] if images is not None else []) + ["true", "predicted", "confidence"]
    predictions = wandb.Table(columns=columns)
    for index in np.unique(np.linspace(0, len(labels) - 1, min(table_rows, len(labels))).round().astype(int)):
        row = [class_names[int(labels[index])], class_names[int(predicted[index])], float(confidence[index])]
        if images is not None:
            image = images[int(index)]
            row.insert(0, wandb.Image(image[0] if isinstance(image, tuple) else image))
        predictions.add_data(*row)
    per_class = wandb.Table(columns=["class", "precision", "recall", "support"],
                            data=[list(row) for row in zip(class_names, precision, recall, support)])
    confusion = wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=predicted.tolist(),
                                            class_names=list(class_names))
    run.log({"predictions": predictions, "confusion_matrix": confusion, "per_class_metrics": per_class}, step=step)
    for name, class_precision, class_recall in zip(class_names, precision, recall):
        run.summary[f"precision/{name}"] = class_precision
        run.summary[f"recall/{name}"] = class_recall
    return report


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


def fetch_checkpoint(reference, *, project=None, entity=None, root=None):
    """The local path of a checkpoint given as a file path or as a W&B model artifact
    ("model-epoch-10:latest", "entity/project/model-epoch-10:best"), downloading the artifact.

    Raises FileNotFoundError saying why when it is neither.
    Usage: state = wbflow.load_checkpoint(fetch_checkpoint("model-epoch-10:best", project="flow"))
    """
    reference = str(reference)
    if os.path.isfile(reference):
        return Path(reference)
    if reference.endswith((".pt", ".pth")):  # a path with a typo: no W&B lookup (which may prompt)
        raise FileNotFoundError(f"checkpoint not found: {reference}")
    try:
        import wandb
        api = wandb.Api()
        name = reference if ":" in reference else f"{reference}:latest"
        parts = name.split("/")
        if len(parts) < 3:  # "name:alias" or "project/name:alias" -> "entity/project/name:alias"
            name = "/".join([entity or api.default_entity, project][:3 - len(parts)] + parts)
        directory = Path(api.artifact(name, type="model").download(root=root))
    except Exception as error:  # noqa: BLE001 - offline, unknown artifact, no credentials: one message
        raise FileNotFoundError(f"{reference} is neither a checkpoint file nor a W&B model artifact that "
                                f"could be downloaded ({type(error).__name__}: {error})") from None
    files = sorted([*directory.glob("*.pt"), *directory.glob("*.pth")])
    if len(files) != 1:
        raise FileNotFoundError(f"artifact {name} should hold one .pt/.pth checkpoint, found {[f.name for f in files]}")
    return files[0]


# ----------------------------------------------------------------------------- config & command line

def _parse_override_value(text):
    import yaml
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_yaml_config(path, overrides=()):
    """A YAML config as nested dicts, with "section.key=value" overrides applied (values parsed as
    YAML: numbers, lists [1, 2], true/false, null). Overriding a key the file lacks is an error.

    Usage: config = load_yaml_config("configs/cifar10_rectified_flow.yaml", ["training.gradient_clip=0.5"])
    """
    import yaml
    with open(path, encoding="utf-8") as file:
        config = yaml.safe_load(file) or {}
    for override in overrides:
        dotted, separator, text = override.partition("=")
        if not separator:
            raise ValueError(f"override {override!r} is not of the form section.key=value")
        *parents, key = dotted.strip().split(".")
        section = config
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key not in section:
            raise KeyError(f"{dotted!r} is not a key of {path}")
        section[key] = _parse_override_value(text)
    return config


def str2bool(value):
    """argparse type for booleans written as a W&B sweep agent does: --flag=False, --flag=true, 0/1,
    yes/no, on/off (argparse's type=bool reads "False" as true).
    Usage: parser.add_argument("--watch", type=str2bool, nargs="?", const=True, default=False)
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1", "on"):
        return True
    if text in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), not {value!r}")


def add_sweep_argument(parser, flag, **kwargs):
    """parser.add_argument for `flag` in both spellings, --batch-size and --batch_size (the sweep
    agent writes the config key). With type=str2bool the flag also works bare (--watch means true).
    Usage: add_sweep_argument(parser, "--batch-size", type=int, default=32)
    """
    name = flag.lstrip("-")
    spellings = dict.fromkeys([flag, "--" + name.replace("_", "-"), "--" + name.replace("-", "_")])
    if kwargs.get("type") is str2bool:
        kwargs = {"nargs": "?", "const": True, **kwargs}
    return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)

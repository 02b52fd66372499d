"""wbflow: a minimal PyTorch + Weights & Biases training kit of plain, copyable functions.

Sections, in data-flow order:
  device & data     rank_and_world_size, setup_distributed,
                    CIFAR10_URL, CIFAR10_CLASSES, load_cifar10, synthetic_images,
                    DeviceImageLoader (CIFAR-10 on the device),
                    write_pattern_dataset (generated images in a competition's layout), list_images,
                    find_image_samples, stratified_split, stratified_folds,
                    drop_unreadable_images, ImageSamples, IMAGENET_MEAN_STD, image_transforms, mix_batches,
                    classifier_loaders, check_same_on_every_rank
                    (image folders, name<TAB>label / path,label lists, a competition's train.txt)
  models            FlowUNet, build_classifier (any torchvision classification model), build_optimizer
  losses            classification_loss, focal_loss, class_balanced_weights, ot_pairs, rectified_flow_loss,
                    drop_labels, meanflow_times, meanflow_target, meanflow_loss
  training          autocast_dtype, make_scaler, make_ema, warmup_cosine_schedule, train_step, RunningSums,
                    train_epoch, validate, stop_on_signals, exit_stopped, exit_when_stopped, capture_rng_state,
                    restore_rng_state, gather_from_ranks, predict_logits, evaluate_classifier, predict_images (a model or an
                    ensemble), predict_submission, apply_class_offsets, write_submission, write_probability_csv,
                    read_probability_csv
  sampling          euler_sample, rk45_sample, sample_flow, sample_images, compare_solvers, straightness,
                    guided_velocity, class_grid, meanflow_velocity
  reflow            reflow_shards, generate_reflow_pairs, load_reflow_pairs, ReflowPairLoader
  metrics           FIDInceptionV3, fid_weights_path, load_fid_inception, file_sha256, images_sha256, fid_reference,
                    inception_features, feature_statistics, frechet_distance, fid, kid, statistics_path,
                    save_statistics, cached_statistics, inception_score, fid_and_inception_score, sample_and_score,
                    per_class_precision_recall, f1_scores, weighted_f1_score (a competition's score),
                    weights_by_name, classification_scores, fit_class_offsets, warn_of_absent_classes
  images & W&B      wandb_run, define_metrics, flush_run, watch_model, log_model_graph, log_artifact, use_artifact,
                    images_to_uint8, sample_grid, save_png, log_image_grid, samples_table, samples_table_rows,
                    log_guidance_sweep, log_classification_report
  checkpoints       write_atomically, save_checkpoint, load_checkpoint, check_outputs, prepare_out_dir,
                    rotate_checkpoints, save_best, checkpoint_state, restore_state, check_checkpoint, resume_command,
                    wandb_resume_plan, fetch_checkpoint, load_checked, load_checkpoints, resume_from, write_ensemble,
                    read_ensemble, fit_ensemble
  config            load_yaml_config, str2bool, name_values, output_file, DefaultsHelpFormatter, add_sweep_argument,
                    check_numbers, check_choices, exit_on_error
  command line      python wbflow.py fid (or python -m wbflow fid) DIR_OR_NPZ DIR_OR_NPZ: pytorch-fid's CLI;
                    python wbflow.py copy NAME [NAME ...]: NAME's source, ready to paste

Copying: a public definition takes what it needs as arguments and calls the module's helpers rather
than repeating them. `python wbflow.py copy NAME` prints what to paste into a file of your own: the
import lines NAME's code uses, then every definition and constant of this module that it reaches, in
the module's order, then NAME; it is computed from the code, so nothing lists it by hand. wandb, scipy,
PIL, yaml and torchviz are imported inside the functions that use them. test_copy.py runs every public
definition, pasted from that output into a fresh namespace, on a tiny real input.
"""

import argparse
import ast
import collections
import concurrent.futures
import contextlib
import csv
import difflib
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import numbers
import os
import pickle
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# ----------------------------------------------------------------------------- device & data

def rank_and_world_size():
    """(rank, world size) of this process in its torch.distributed group; (0, 1) when not distributed.

    Usage: rank, world_size = rank_and_world_size(); if rank == 0: print("only once")
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed():
    """Join the torchrun process group when launched by torchrun; returns (rank, world_size, device).

    nccl on CUDA (one GPU per local rank), gloo on CPU; (0, 1, CUDA if present else CPU) when not under torchrun.
    A group already joined is kept (several runs in one launch share it).
    Usage: rank, world_size, device = setup_distributed()
    """
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# CIFAR-10's class names in the order of its labels 0..9 (batches.meta)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar10(data_dir, train=True, download=True):
    """CIFAR-10 from `data_dir`/cifar-10-batches-py as (images_uint8 (N, 3, 32, 32), labels int64), on the CPU.

    Reads the python-pickle batches directly (data_batch_1..5, or test_batch). When they are absent
    and `download` is true, torchvision downloads and extracts the archive into `data_dir` (it also
    extracts a cifar-10-python.tar.gz already placed there, offline). If that fails, the
    FileNotFoundError says which archive to put where. Under torch.distributed rank 0 downloads
    while the other ranks wait (a barrier), then they read its files.
    Usage: images_uint8, labels = load_cifar10("data")
    """
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
    download_failure, (rank, world_size) = "", rank_and_world_size()
    if download and rank > 0:  # rank 0 downloads first
        dist.barrier()
    try:
        if download and rank == 0 and not all((folder / name).is_file() for name in names):
            torchvision.datasets.CIFAR10(str(data_dir), train=train, download=True)
    except Exception as error:  # noqa: BLE001 - any download failure gets the same instructions
        download_failure = f" and could not be downloaded ({type(error).__name__}: {error})"
    finally:
        if download and rank == 0 and world_size > 1:
            dist.barrier()
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 is not in {folder} (missing {', '.join(missing)}){download_failure}: put "
                                f"{CIFAR10_URL} in {Path(data_dir)}/ (it is extracted on the next run), or extract it")
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
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
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
    its batch k (continuing an epoch that a stop interrupted). With `labels` (N,) it yields (images, labels)
    batches, the labels on the device too (for a class-conditional model).
    Usage: loader = DeviceImageLoader(images_uint8, 128, device="cuda"); loader.set_epoch(1); for x in loader: ...
    """

    def __init__(self, images_uint8, batch_size, *, device="cpu", shuffle=True, flip=True, drop_last=True,
                 seed=0, rank=0, world_size=1, channels_last=False, labels=None):
        self.device = torch.device(device)
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        self.count = images_uint8.shape[0]
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).to(self.device)
        if self.labels is not None and self.labels.shape != (self.count,):
            raise ValueError(f"DeviceImageLoader: {tuple(self.labels.shape)} labels for {self.count} images")
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
            index = order[start:start + self.batch_size]
            images = self.images_and_mirrors.index_select(0, index)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            images = images.float().div_(127.5).sub_(1.0)
            yield images if self.labels is None else (images, self.labels.index_select(0, index % self.count))


def write_pattern_dataset(folder, class_counts, *, test_images=0, size=32, seed=0):
    """Write a small learnable image dataset in a competition's layout into `folder`: train/ of JPEGs named
    like hashes and train.txt of `name<TAB>label` lines (shuffled, UTF-8, no header), class_counts[name]
    images of each class (at most 6 classes); with test_images, A/ and A.txt of names alone, their classes
    drawn in the same proportions. A class is a shape, not a colour, and survives flips and crops:
    horizontal stripes, vertical stripes, a checkerboard, diagonal stripes, rings, or none, in random
    bright-on-dark colours with noise, each image of its own size (size to 2 * size a side). Returns
    ({training name: class name}, {test name: class name}).
    Usage: labelled, test = write_pattern_dataset("data/smoke", {"高风险": 8, "无风险": 24}, test_images=10)
    """
    from PIL import Image
    classes, counts = list(class_counts), np.array(list(class_counts.values()))
    if not 2 <= len(classes) <= 6:
        raise ValueError(f"write_pattern_dataset makes 2 to 6 classes, not {len(classes)}")
    folder, rng = Path(folder), np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    width = max(2, size // 8)  # of a stripe

    def image(label):
        shift_y, shift_x = rng.integers(0, 2 * width, 2)
        rows, cols = (y + shift_y) // width % 2, (x + shift_x) // width % 2
        rings = np.hypot(y - size / 2 + shift_y / 2, x - size / 2 + shift_x / 2).astype(int) // width % 2
        on = [rows, cols, rows ^ cols, (x + y + shift_x) // width % 2, rings, np.zeros_like(x)][label]
        bright, dark = rng.integers(150, 256, 3), rng.integers(0, 90, 3)
        pixels = np.where(on[..., None] == 1, bright, dark) + rng.normal(0, 10, (size, size, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize(tuple(rng.integers(size, 2 * size, 2)))

    def write(subfolder, labels):
        (folder / subfolder).mkdir(parents=True, exist_ok=True)
        names = [f"{rng.bytes(16).hex()}.jpg" for _ in labels]
        for name, label in zip(names, labels):
            image(label).save(folder / subfolder / name, quality=90)
        return {name: classes[label] for name, label in zip(names, labels)}
    train = write("train", np.repeat(np.arange(len(classes)), counts).tolist())
    lines = [f"{name}\t{label}\n" for name, label in train.items()]
    rng.shuffle(lines)
    (folder / "train.txt").write_text("".join(lines), encoding="utf-8")
    test = write("A", rng.choice(len(classes), test_images, p=counts / counts.sum()).tolist()) if test_images else {}
    if test_images:
        (folder / "A.txt").write_text("".join(f"{name}\n" for name in test), encoding="utf-8")
    return train, test


@contextlib.contextmanager
def _no_pixel_limit():
    """Lift PIL's decompression-bomb limit (an error above 179 megapixels) while a `with` block runs;
    PIL keeps it in a module global, so it is restored on exit. The limit guards against files from
    strangers, and training data is the user's own (a 196-megapixel photo is an image, not an attack)."""
    from PIL import Image
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def list_images(source, class_names=None, *, strict=True):
    """(rows, class names): a row (name, path, label index or None) for each image that a list file or
    a folder names, in its order.

    A list file has one `name<TAB>label` or `name,label` line per image (tab-separated when its first
    line holds a tab; a test list has no labels), UTF-8 with or without BOM (else GBK), with or without a header.
    The first line is a header only when its first cell is no file where its name would be looked up, and is
    a usual column name (name, filename, file, path, image, image_name, image_id, img, id; any case) or lacks
    the file suffix that a later name has; so a list of names without suffixes keeps its first row (an
    unknown header word is kept as a row too: a file that does not exist, never a lost image). A name is looked up
    in the folder named like the list (train.txt -> train/) when that folder exists, unless the file is
    only beside the list. A folder: its image files, also in subfolders, sorted, without labels.
    Class names are the sorted labels unless `class_names` fixes them. Refused in one line that names
    how many and the first few: an empty list file, labels outside `class_names` (ValueError); with
    strict=True (training data) also rows without a label (ValueError), listed files that do not exist
    (FileNotFoundError) and a file listed with two labels (ValueError), and a row repeating an earlier
    one is dropped with one warning that counts them; with strict=False (a test list, whose submission
    has a line per name) a list whose non-empty lines are not one name each, as when a name opens a
    quote that swallows the lines after it (ValueError), and a header it drops is printed.
    Usage: rows, class_names = list_images("data/fire/train.txt"); names, paths, labels = zip(*rows)
    """
    source, extensions = Path(source), (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
    folder = source if source.is_dir() else source.with_suffix("")
    has_folder = folder.is_dir()

    def refuse_any(items, error, problem):  # one line: how many, and the first few
        if items:
            more = ", ..." if len(items) > 3 else ""
            raise error(f"{source}: {len(items)} {problem}: {', '.join(items[:3])}{more}")

    def find(name):  # in the folder named like the list; beside the list only when the file is there alone
        inside, beside = folder / name, source.parent / name
        return os.path.normpath(inside if has_folder and (inside.is_file() or not beside.is_file()) else beside)

    if source.is_dir():
        rows = [[str(path.relative_to(source))] for path in sorted(source.rglob("*"))
                if path.suffix.lower() in extensions and path.is_file()]
    else:
        try:
            text = source.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:  # a list saved on a Chinese Windows machine: GBK, which GB18030 extends
            try:
                text = source.read_text(encoding="gb18030")
            except UnicodeDecodeError:
                raise ValueError(f"{source} is neither UTF-8 nor GBK / GB18030 text") from None
        lines = csv.reader(text.splitlines(), delimiter="\t" if "\t" in text.partition("\n")[0] else ",")
        rows = [[cell.strip() for cell in row] for row in lines if any(cell.strip() for cell in row)]
        first = rows[0][0] if rows else ""
        column_names = ("name", "filename", "file", "path", "image", "image_name", "image_id", "img", "id")
        header = not os.path.isfile(find(first)) and (first.lower() in column_names or not Path(first).suffix and any(
            Path(row[0]).suffix for row in rows[1:]))  # a header: never a name that is a file there
        rows, lines = rows[header:], [line for line in text.splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{source} lists no images")
        if not strict and len(lines) != len(rows) + header:
            raise ValueError(f"{source} has {len(lines)} lines, but {len(rows)} names were read from them: the "
                             f"submission would not match the list line for line")
        if not strict and header:
            print(f"{source}: its first line is a header, not an image: {lines[0]}")
    labels = [row[1] if len(row) > 1 and row[1] else None for row in rows]
    if strict:
        refuse_any([row[0] for row, label in zip(rows, labels) if label is None], ValueError,
                   "row(s) that are not path,label")
    named = {label for label in labels if label is not None}
    class_names = sorted(named) if class_names is None else list(class_names)
    refuse_any(sorted(named - set(class_names)), ValueError, "label(s) not in the class names")
    listed = [(row[0], find(row[0]), None if label is None else class_names.index(label))
              for row, label in zip(rows, labels)]
    if not strict:
        return listed, class_names
    refuse_any([path for path in dict.fromkeys(path for _, path, _ in listed) if not os.path.isfile(path)],
               FileNotFoundError, "listed file(s) do not exist")
    unique, labels_of = {}, {}
    for name, path, label in listed:
        unique.setdefault((path, label), (name, path, label))
        labels_of.setdefault(path, set()).add(class_names[label])
    refuse_any([f"{path} ({' and '.join(sorted(names))})" for path, names in labels_of.items() if len(names) > 1],
               ValueError, "file(s) listed with two labels")
    if len(unique) < len(listed):  # the same image in train and val would inflate val_acc
        warnings.warn(f"{source}: dropped {len(listed) - len(unique)} row(s) repeating an earlier one", stacklevel=3)
    return list(unique.values()), class_names


def find_image_samples(data, *, class_names=None, val_split=0.2, seed=0, fold=None):
    """Train and validation samples, lists of (path, label index), and the class names.

    `data` is one of: a folder with train/<class>/* and val/<class>/*; a folder of class folders
    (or train/ alone), split per class by stratified_split(val_split, seed); a list file of
    `name<TAB>label` or `path,label` rows (list_images), or a folder holding one as train.txt (a
    competition's download: train.txt and a flat train/ folder), split the same way.
    fold=(k, K): the validation samples are fold k of stratified_folds(labels, K, seed) over every
    labelled sample (train/ and val/ folders pooled), the training samples the other folds; val_split
    is then unused. Each list keeps the order in which the samples were found.
    Class names are the sorted folder names / labels; `class_names` fixes which and their order (each
    once). Names that differ only by whitespace ('无 风险', '无风险') are separate classes, with one warning naming them.
    Unreadable images are dropped by drop_unreadable_images (one warning that counts them; images of
    any size are read). A list row repeating an earlier one is dropped with one warning that counts them.
    A missing folder, or list rows naming files that do not exist (their count and the first few), raise
    FileNotFoundError; an empty list, rows without a label or with one outside `class_names`, fewer than
    two classes, a class without readable images, a file listed with two labels or (without
    `class_names`) a val/ class folder that train/ lacks, ValueError.
    Usage: train_samples, val_samples, class_names = find_image_samples("data", val_split=0.2)
    """
    def class_folders(root):
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def folder_samples(root):
        folders = class_folders(root)
        missing = [name for name in class_names if name not in folders]
        if missing:
            raise FileNotFoundError(f"class folder(s) not found in {root}: {', '.join(missing)}")
        return [(path, label) for label, name in enumerate(class_names)
                for _, path, _ in list_images(root / name, strict=False)[0]]

    data, given_names = Path(data), class_names
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise ValueError(f"the class names repeat a name: {','.join(class_names)}")
    if not data.exists():
        raise FileNotFoundError(f"data not found: {data} (expected a folder of class folders, train/ and val/ "
                                f"folders of class folders, a list of name<TAB>label or a folder with train.txt)")
    data = data / "train.txt" if (data / "train.txt").is_file() else data
    train_root = data / "train" if (data / "train").is_dir() else data
    if data.is_file():
        rows, class_names = list_images(data, class_names)
        splits, roots = [[(path, label) for _, path, label in rows]], [data.parent]
    else:
        roots = [train_root] + ([data / "val"] if train_root != data and (data / "val").is_dir() else [])
        class_names = class_folders(train_root) if class_names is None else list(class_names)
        splits = [folder_samples(root) for root in roots]  # train, and val when there is a val/ folder
    if len(class_names) < 2:
        raise ValueError(f"a classifier needs at least two classes; {train_root} has {len(class_names)}"
                         f"{': ' + ', '.join(class_names) if class_names else ''}")
    spellings = {}
    for name in class_names:  # '无 风险' beside '无风险' makes two classes where the user meant one
        spellings.setdefault("".join(name.split()), []).append(repr(name))
    alike = [" and ".join(names) for names in spellings.values() if len(names) > 1]
    if alike:
        warnings.warn(f"{data}: classes that differ only by whitespace: {'; '.join(alike)}", stacklevel=2)
    only_in_val = sorted(set(class_folders(roots[1])) - set(class_names)) if roots[1:] and not given_names else []
    if only_in_val:
        raise ValueError(f"class folder(s) in {roots[1]} that {train_root} lacks: {', '.join(only_in_val)}")
    readable = set(drop_unreadable_images(sum(splits, [])))
    splits = [[sample for sample in split if sample in readable] for split in splits]
    for split, root in zip(splits, roots):
        empty = [name for label, name in enumerate(class_names) if label not in {label for _, label in split}]
        if empty:
            raise ValueError(f"no readable images in {root} for class(es): {', '.join(empty)}")
    if fold is not None:
        samples, (index, folds) = sum(splits, []), fold
        val_index = set(stratified_folds([label for _, label in samples], folds, seed)[index])
        return ([sample for i, sample in enumerate(samples) if i not in val_index],
                [samples[i] for i in sorted(val_index)], class_names)
    if len(splits) == 2:
        return splits[0], splits[1], class_names
    if not 0 < val_split < 1:
        raise ValueError(f"val_split must be between 0 and 1 when {data} has no val/ folder, not {val_split}")
    train_index, val_index = stratified_split([label for _, label in splits[0]], val_split, seed)
    return [splits[0][i] for i in train_index], [splits[0][i] for i in val_index], class_names


def _shuffled_classes(labels, seed):
    # each class's indices, shuffled by a generator seeded with (seed, label): a class's order does not depend
    # on the other classes
    labels = np.asarray(labels)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        np.random.default_rng([seed, int(label)]).shuffle(index)
        yield index


def stratified_split(labels, val_fraction, seed=0):
    """Sorted index lists (train, val) holding `val_fraction` of every class in val.

    Each class is shuffled by its own generator seeded with (seed, label), so a class's split does
    not depend on the other classes. Every class keeps at least one sample in train, and one in val
    when it has two or more.
    Usage: train_index, val_index = stratified_split([0, 0, 0, 1, 1, 1], 1 / 3, seed=0)
    """
    train_index, val_index = [], []
    for index in _shuffled_classes(labels, seed):
        n_val = min(max(int(round(val_fraction * len(index))), 1), len(index) - 1) if val_fraction > 0 else 0
        val_index += index[:n_val].tolist()
        train_index += index[n_val:].tolist()
    return sorted(train_index), sorted(val_index)


def stratified_folds(labels, folds, seed=0):
    """`folds` sorted index lists, disjoint and covering every sample, fold k being the validation set of
    the k-th of `folds` runs (k-fold cross-validation). Every fold holds an equal share of every class:
    each class is shuffled as stratified_split shuffles it, and the classes' indices, one class after
    another, are dealt to the folds in turn, so a class's counts in two folds, and two folds' sizes,
    differ by at most one. ValueError unless 2 <= folds <= len(labels).
    Usage: val_index = stratified_folds([0, 0, 0, 1, 1, 1], 3, seed=0)[k]; train: every other index
    """
    if not 2 <= folds <= len(labels):
        raise ValueError(f"{len(labels)} samples cannot make {folds} folds: choose 2 to {len(labels)}")
    dealt = np.concatenate(list(_shuffled_classes(labels, seed))).tolist()
    return [sorted(dealt[fold::folds]) for fold in range(folds)]


def drop_unreadable_images(samples, max_workers=8):
    """The (path, label) samples whose image decodes; the others are skipped with one warning that counts them.

    Each file is fully decoded (JPEGs at 1/8 scale via PIL's draft mode, which still reads every
    byte), so truncated files are caught here, not mid-epoch. Decoding runs in threads. Images of
    any size count as readable (PIL's pixel limit is lifted while they are checked). Only regular
    files are read: a FIFO or device (which could block forever) is skipped as unreadable.
    Usage: samples = drop_unreadable_images([("a.jpg", 0), ("broken.jpg", 1)])
    """
    from PIL import Image

    def readable(path):
        if not os.path.isfile(path):  # a FIFO or device: opening it could wait forever
            return False
        try:
            with Image.open(path) as image:
                image.draft("RGB", (64, 64))  # JPEGs decode at 1/8 scale, still reading every byte
                image.load()
            return True
        except Exception:  # noqa: BLE001 - PIL raises many types for broken files; all mean unreadable
            return False

    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool, _no_pixel_limit():
        is_readable = list(pool.map(readable, [path for path, _ in samples]))
    bad = [path for (path, _), ok in zip(samples, is_readable) if not ok]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s): {', '.join(bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}", stacklevel=2)
    return [sample for sample, ok in zip(samples, is_readable) if ok]


class ImageSamples(torch.utils.data.Dataset):
    """(transformed image, label) for a list of (path, label); images of any size are opened with PIL
    as RGB (16-bit grayscale scaled to 8 bits, keeping its contrast).

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
        key, index = (index, index[0]) if isinstance(index, tuple) else (None, index)
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                if not os.path.isfile(path):  # a FIFO or device: opening it could wait forever
                    raise OSError("not a regular file")
                with _no_pixel_limit(), Image.open(path) as image:
                    if image.mode.startswith("I"):  # 16-bit: scale to 8 bits, rounded (convert would clip)
                        image = image.point(lambda value: value / 257 + 0.5).convert("L")
                    image = image.convert("RGB")
            except Exception as error:  # noqa: BLE001 - see the class docstring
                warnings.warn(f"could not read {path} ({error}); using the next image instead")
                continue
            with torch.random.fork_rng(devices=[], enabled=key is not None):
                if key is not None:
                    torch.default_generator.manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))
                return (self.transform(image) if self.transform else image), label
        raise RuntimeError("no readable image left in the dataset")


IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def image_transforms(image_size, *, train, normalize=True, crop_scale=(0.25, 1.0), mean_std=None, augment="none",
                     random_erase=0.0):
    """Training: random resized crop (area `crop_scale`) and horizontal flip, then, as torchvision's
    classification recipe adds them, the `augment` policy ("trivialaugment": TrivialAugmentWide,
    "randaugment": RandAugment, "none") and, on the normalised tensor, random erasing with probability
    `random_erase`; validation: resize to image_size * 256/224 and center crop. Then a float tensor
    normalised with `mean_std` ((mean, std); None: IMAGENET_MEAN_STD, which pretrained weights expect), or
    with normalize=False the PIL image (for display). crop_scale is milder than ImageNet's (0.08, 1)
    because a hazard may sit anywhere in a corridor photo and must stay in the crop.
    Usage: transform = image_transforms(256, train=True, augment="trivialaugment", random_erase=0.1)
    """
    from torchvision.transforms import v2
    policies = {"none": [], "trivialaugment": [v2.TrivialAugmentWide()], "randaugment": [v2.RandAugment()]}
    if augment not in policies:
        raise ValueError(f"augment must be one of {', '.join(policies)}, not {augment!r}")
    if train:
        steps = [v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True), v2.RandomHorizontalFlip(),
                 *policies[augment]]
    else:
        steps = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    if normalize:
        erase = [v2.RandomErasing(random_erase)] if train and random_erase else []
        steps = [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                 v2.Normalize(*(mean_std or IMAGENET_MEAN_STD)), *erase]
    return v2.Compose(steps)


def mix_batches(num_classes, *, mixup=0.0, cutmix=0.0):
    """torchvision's MixUp (Beta(mixup, mixup) shares) and CutMix (alpha `cutmix`) of a training batch, as
    its classification recipe uses them: a transform (images, labels) -> (mixed images, soft labels
    [N, num_classes]) that applies one of them per batch (each half the time when both alphas are set),
    or None when both are 0. Give it to classifier_loaders(batch_transform=...); nn.CrossEntropyLoss takes
    soft labels, and classification_loss counts a prediction correct when it is the larger share's class.
    Usage: train_loader, _ = classifier_loaders(train_set, val_set, 32, batch_transform=mix_batches(5, cutmix=1.0))
    """
    from torchvision.transforms import v2
    mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
    return v2.RandomChoice(mixers) if len(mixers) > 1 else next(iter(mixers), None)


def _leave_stop_signals_to_main(worker_id):
    """A DataLoader worker_init_fn: Ctrl-C, `timeout` and SLURM signal the whole process group, and
    a worker they killed would end the run in a RuntimeError before the main process could save its
    stop checkpoint; the worker exits when the main process shuts it down. At module level, so that
    spawn and forkserver workers can unpickle it."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def default_num_workers(most=4):
    """Loader workers for each process: `most`, but never more than this process's share (LOCAL_WORLD_SIZE
    processes on the node) of the cores it may use.
    Usage: train_loader, val_loader = classifier_loaders(train_set, val_set, 32, num_workers=default_num_workers())
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(most, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class _KeyedSamples(torch.utils.data.Dataset):
    # classifier_loaders' training set under a batch_transform: each sample comes with the sampler's key, for
    # _transformed_batch to seed the batch's transform with
    def __init__(self, dataset):
        self.dataset, self.seeded_augmentation = dataset, getattr(dataset, "seeded_augmentation", False)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        return key, self.dataset[key]


def _transformed_batch(batch_transform, keyed_samples):
    # collate, then batch_transform(images, labels) on torch's CPU generator seeded by the samples' keys (index,
    # seed, epoch): a batch is mixed the same way in any worker, and after a resume (a module-level function, so
    # that spawned workers can unpickle it)
    keys, samples = zip(*keyed_samples)
    images, labels = torch.utils.data.default_collate(list(samples))
    seed = np.random.SeedSequence([int(number) for key in keys for number in np.atleast_1d(key)]).generate_state(1)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return batch_transform(images, labels)


def classifier_loaders(train_set, val_set, batch_size, *, num_workers=0, device="cpu", seed=0,
                       rank=0, world_size=1, sample_weights=None, batch_transform=None):
    """(train_loader, val_loader) for one process of `world_size`.

    Training batches come from a seeded DistributedSampler (also when world_size is 1, so the order
    is reproducible: call train_loader.sampler.set_epoch(epoch) each epoch, or
    set_epoch(epoch, skip_batches=k) to start that epoch at its batch k when resuming); a last batch
    smaller than batch_size is dropped when there is more than one batch (BatchNorm cannot train on
    one image). With `sample_weights` (one per training sample, e.g. class_balanced_weights(labels,
    K)[labels] for class-balanced batches) each epoch instead draws len(train_set) samples with
    replacement in proportion to them (torch.multinomial, seeded by seed + epoch as the shuffle is),
    every rank its share of the same draw. A dataset with seeded_augmentation = True (ImageSamples) is asked for
    (index, seed, epoch) keys, so its augmentation does not depend on workers or resumes.
    `batch_transform` (e.g. mix_batches' MixUp / CutMix) turns each collated training batch (images,
    labels) into another, in the loader's workers, on torch's CPU generator seeded by the keys of the
    batch's samples: the same batch of an epoch is transformed the same way whatever the worker count,
    and when a resumed run skips to it.
    Validation is sharded by rank without padding, so all-reduced sums count every image once.
    Pinned memory on CUDA; workers persist across epochs and ignore SIGINT and SIGTERM, which the
    main process handles (see stop_on_signals). The loaders draw their worker seeds from their own
    generators, not from torch's global one.
    Usage: train_loader, val_loader = classifier_loaders(train_set, val_set, 32, num_workers=4)
    """
    class EpochSampler(torch.utils.data.DistributedSampler):
        """set_epoch(epoch, skip_batches) and, for a seeded_augmentation dataset, (index, seed, epoch) keys."""

        def set_epoch(self, epoch, skip_batches=0):
            super().set_epoch(epoch)
            self.skip_batches = skip_batches

        def __iter__(self):
            if sample_weights is None:
                indices = list(super().__iter__())
            else:
                generator = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler's shuffle
                drawn = torch.multinomial(torch.as_tensor(sample_weights, dtype=torch.float64), self.total_size,
                                          replacement=True, generator=generator)
                indices = drawn[self.rank:self.total_size:self.num_replicas].tolist()
            indices = indices[getattr(self, "skip_batches", 0) * batch_size:]
            keys = getattr(train_set, "seeded_augmentation", False)
            return iter([(index, self.seed, self.epoch) for index in indices] if keys else indices)

    keyed = train_set if batch_transform is None else _KeyedSamples(train_set)
    sampler = EpochSampler(keyed, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    options = {"num_workers": num_workers, "pin_memory": torch.device(device).type == "cuda",
               "persistent_workers": num_workers > 0, "worker_init_fn": _leave_stop_signals_to_main,
               "generator": torch.Generator().manual_seed(seed + rank)}  # worker seeds: not from torch's global RNG
    collate = None if batch_transform is None else functools.partial(_transformed_batch, batch_transform)
    train_loader = torch.utils.data.DataLoader(keyed, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                               drop_last=len(sampler) > batch_size, **options)
    val_shard = torch.utils.data.Subset(val_set, range(rank, len(val_set), world_size))
    val_loader = torch.utils.data.DataLoader(val_shard, batch_size=batch_size, shuffle=False, **options)
    return train_loader, val_loader


def check_same_on_every_rank(counts, class_names=None):
    """Raise ValueError naming every rank's counts (and class names) when the ranks of a
    torch.distributed group do not see the same `counts` (a dict such as {"training images": 900}) and
    `class_names`, e.g. a node holding a partial or another copy of the data, which would otherwise
    hang at the first collective or train one model on two labellings. Does nothing outside DDP.
    Usage: check_same_on_every_rank({"training images": len(train_set)}, class_names=["cat", "dog"])
    """
    if rank_and_world_size()[1] == 1:
        return
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, (dict(counts), class_names and list(class_names)))
    if any(seen != every_rank[0] for seen in every_rank):
        raise ValueError("the ranks see different data: " + "; ".join(
            f"rank {rank}: " + ", ".join([f"{value} {name}" for name, value in rank_counts.items()]
                                         + ([f"classes {' '.join(names)}"] if names else []))
            for rank, (rank_counts, names) in enumerate(every_rank)))


# ----------------------------------------------------------------------------- models

def _group_norm(channels):
    # torchcfm's GroupNorm(32, c) where each group holds at least 4 channels; fewer groups below that,
    # since a group of one channel normalises away the time embedding's per-channel shift exactly
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


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


class _FlowResample(nn.Module):
    def __init__(self, channels, up):
        super().__init__()
        self.up = up  # nearest-neighbour x2 then a conv; else a stride-2 conv
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, embedding=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class FlowUNet(nn.Module):
    """A time-conditioned UNet for velocity fields, called as model(x, t) with t (N,) in [0, 1] (a velocity
    callable for the samplers), or model(x, t, r=None, labels=None): `embed` turns (t, r, labels) into the one
    embedding every block adds; a second time r and class labels are for a model built for them, and one built
    without them refuses them (a ValueError). With second_time=True, model(x, t, r=r) is the average velocity
    of the jump from t to r >= t (meanflow_loss), r=None the instantaneous velocity (r = t); the jump's length
    r - t gets its own embedding (`interval_embed`), added to the time's.

    num_classes=C adds a class embedding to the time embedding (flow_matching's and py-meanflow's
    Embedding(C + 1), its last row, index C, the null class that label dropout trains and classifier-free
    guidance subtracts); labels=None is the null class then. num_classes=None (or 0) and second_time=False build
    the model for t alone, with exactly the state_dict it always had.

    The architecture of guided-diffusion's UNet as torchcfm's CIFAR-10 example configures it:
    residual blocks with the time embedding added, self-attention at the resolutions listed (and in
    the middle), strided-conv down / nearest+conv up, skip connections. The defaults are that recipe
    (128 channels, multipliers 1,2,2,2, two blocks per level, attention at 16x16 with 64-channel
    heads, dropout 0.1): about 35.7M parameters.
    Usage: model = FlowUNet(); velocity = model(x, torch.rand(x.shape[0]))
    """

    def __init__(self, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), head_channels=64, dropout=0.1, image_size=32, second_time=False,
                 num_classes=None):
        super().__init__()
        embed_dim = 4 * base_channels
        def embedding_mlp():  # sinusoidal features -> the embedding
            return nn.Sequential(nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.time_embed = embedding_mlp()
        self.interval_embed = embedding_mlp() if second_time else None
        self.num_classes = num_classes or None
        self.label_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes else None  # row C: the null class
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(in_channels, out_channels):  # a residual block, with attention at the listed resolutions
            layers = [_FlowResBlock(in_channels, out_channels, embed_dim, dropout)]
            if resolution in attention_resolutions:
                layers.append(_FlowAttention(out_channels, head_channels))
            return layers

        self.down = nn.ModuleList()
        skip_channels, channels, resolution = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList(block(channels, base_channels * mult)))
                channels = base_channels * mult
                skip_channels.append(channels)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([_FlowResample(channels, up=False)]))
                skip_channels.append(channels)
                resolution //= 2
        middle = [_FlowResBlock(channels, channels, embed_dim, dropout), _FlowAttention(channels, head_channels)]
        self.middle = nn.ModuleList(middle + [_FlowResBlock(channels, channels, embed_dim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for index in range(num_res_blocks + 1):
                layers = block(channels + skip_channels.pop(), base_channels * mult)
                channels = base_channels * mult
                if level and index == num_res_blocks:
                    layers.append(_FlowResample(channels, up=True))
                    resolution *= 2
                self.up.append(nn.ModuleList(layers))
        self.output = nn.Sequential(_group_norm(channels), nn.SiLU(), nn.Conv2d(channels, in_channels, 3, padding=1))
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    def embed(self, t, r=None, labels=None):
        """The embedding the blocks add, of the time t (N,) and of what else the model was built to take."""
        for name, value, module in (("r", r, self.interval_embed), ("labels", labels, self.label_embed)):
            if value is not None and module is None:
                raise ValueError(f"FlowUNet: {name} given, but this model was built for the time t alone")
        embedding = self.time_embed(self._sinusoid(t))
        if self.interval_embed is not None:  # the jump's length, 0 for the instantaneous velocity
            embedding = embedding + self.interval_embed(self._sinusoid(t - t if r is None else r - t))
        if self.label_embed is not None:  # no labels: the null class, the unconditional velocity
            labels = torch.full_like(t, self.num_classes, dtype=torch.long) if labels is None else labels
            embedding = embedding + self.label_embed(torch.as_tensor(labels, device=t.device))
        return embedding

    def _sinusoid(self, t):
        half = self.time_embed[0].in_features // 2  # sinusoidal features of t as guided-diffusion's (t as given)
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * frequencies
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(self.input_conv.weight.dtype)

    def forward(self, x, t, r=None, labels=None):
        def per_sample(time):  # a number or an (N,) tensor -> (N,)
            return torch.as_tensor(time, device=x.device).expand(x.shape[0])
        embedding = self.embed(per_sample(t), None if r is None else per_sample(r), labels)
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


def build_classifier(name, num_classes, weights="none", state_dict=None, image_size=None):
    """torchvision's classification model `name` (any of torchvision.models.list_models(module=
    torchvision.models): resnet50, convnext_tiny, efficientnet_v2_s, regnet_y_1_6gf, swin_t, vit_b_16, ...)
    with its ImageNet head (the last layer with 1000 outputs: a Linear, or SqueezeNet's 1x1 convolution)
    replaced by a new one for `num_classes`. Inception v3 and GoogLeNet keep their main head only.

    weights="imagenet" loads the weights of the model's own weights enum (its DEFAULT) from the torch hub
    cache ($TORCH_HOME/hub/checkpoints, ~/.cache/torch by default), downloading them there when missing
    (hash-checked); when that fails, FileNotFoundError says which file to put where, or to pass
    --weights none; a damaged cached file is a ValueError naming it. weights="none" (or None) starts
    from random weights; `state_dict` (a trained model's) is then loaded into it. An unknown name is a
    ValueError naming the close ones; so is, with `image_size`, a model that cannot take images of that
    side (ViT's fixed 224, a side too small for the network's strides), found by one forward on the CPU.
    Usage: model = build_classifier("convnext_tiny", num_classes=5, weights="imagenet")
    """
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        raise ValueError(f"unknown model {name!r}: not a torchvision classification model"
                         + (f" (did you mean {', '.join(close)}?)" if close else
                            " (see torchvision.models.list_models(module=torchvision.models))"))
    if weights not in ("imagenet", "none", None):
        raise ValueError(f"weights must be 'imagenet' or 'none', not {weights!r}")
    enum = torchvision.models.get_model_weights(name).DEFAULT if weights == "imagenet" else None
    if enum is not None:  # torchvision loads the cached file; first, our download and a weights_only check of it
        load_checkpoint(_hub_cached_file(enum.url, f"the ImageNet weights for {name}",
                                         "pass --weights none to train from scratch", check_hash=True))
    model = torchvision.models.get_model(name, weights=enum)
    if getattr(model, "aux_logits", False):  # Inception v3, GoogLeNet: their auxiliary heads would be unused
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    head_name, head = [(path, layer) for path, layer in model.named_modules()
                       if getattr(layer, "out_features", getattr(layer, "out_channels", None)) == 1000][-1]
    new_head = (nn.Linear(head.in_features, num_classes) if isinstance(head, nn.Linear)
                else nn.Conv2d(head.in_channels, num_classes, kernel_size=1))
    parent, _, attribute = head_name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, new_head)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    if image_size:  # refused here, not at the first training step
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, AssertionError, ValueError) as error:
            raise ValueError(f"{name} does not take {image_size}x{image_size} images ({type(error).__name__}: "
                             f"{str(error).splitlines()[0]})") from None
    return model.train()


def _hub_cached_file(url, what, alternative, check_hash=False):
    """The file of `url` in the torch hub checkpoints folder, downloaded there when missing; when that
    fails, FileNotFoundError says which file to put where, or `alternative`."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
    if not os.path.isfile(path):
        hash_match = torch.hub.HASH_REGEX.search(os.path.basename(path)) if check_hash else None
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
    if name == "sgd":
        return torch.optim.SGD(parameters, learning_rate, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name not in ("adam", "adamw"):
        raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw or sgd")
    adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return adam(parameters, lr=learning_rate, weight_decay=weight_decay, fused=fused)


# ----------------------------------------------------------------------------- losses

def classification_loss(criterion):
    """Wrap a criterion (e.g. nn.CrossEntropyLoss()) into a `loss_fn(model, batch)` for train_epoch.

    The returned function reads batch = (images, labels) and returns (loss, n_correct, n_samples). Labels
    are class indices, or soft labels [N, K] (mix_batches' MixUp / CutMix), where a prediction counts as
    correct when it is the class of the larger share.
    Usage: train_epoch(model, loader, optimizer, classification_loss(nn.CrossEntropyLoss()))
    """
    def loss_fn(model, batch):
        logits, labels = model(batch[0]), batch[1]
        dominant = labels.argmax(dim=1) if labels.dim() > 1 else labels  # soft labels (MixUp): the larger share
        return criterion(logits, labels), (logits.argmax(dim=1) == dominant).sum(), labels.shape[0]
    return loss_fn


def ot_pairs(noise, data, labels=None):
    """`noise` reordered so that the pairs (noise[i], data[i]) have the least total squared Euclidean
    distance: the exact optimal transport plan of two equal batches with uniform weights, a
    permutation (scipy's linear_sum_assignment on the flattened float64 costs; no resampling). With
    `labels` (N,) the plan is made within each class (C2OT): the noise at the positions of class c is
    paired optimally with the data of class c, so a pair keeps its data's label. Under DDP each rank pairs
    its own batch.

    Usage: x0 = ot_pairs(torch.randn_like(x1), x1, labels)
    """
    from scipy.optimize import linear_sum_assignment
    if noise.shape != data.shape:
        raise ValueError(f"ot_pairs needs batches of one shape, not {tuple(noise.shape)} and {tuple(data.shape)}")
    x0, x1 = noise.detach().flatten(1).double(), data.detach().flatten(1).double()
    order = torch.arange(len(data))
    groups = [order] if labels is None else [order[labels.cpu() == label] for label in labels.cpu().unique()]
    for group in groups:
        on_device = group.to(x0.device)
        a, b = x0[on_device], x1[on_device]
        cost = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).cpu().numpy()
        noise_index, data_index = linear_sum_assignment(cost)
        order[group[data_index]] = group[noise_index]  # data[j] gets noise[order[j]]
    return noise[order.to(noise.device)]


def rectified_flow_loss(model, batch, *, coupling="independent"):
    """Rectified-flow (flow-matching) loss: x_t = t*x1 + (1-t)*x0 with t ~ U(0, 1), regressing
    model(x_t, t) onto the velocity x1 - x0 (mean squared error, float32).

    `batch` is data x1 of any shape (N, ...), with noise x0 ~ N(0, I) paired independently or, with
    coupling="ot", by ot_pairs; or an (x1, labels) pair for a class-conditional model, called as
    model(x_t, t, labels=labels), its OT plan made within each class; or {"noise": x0, "data": x1} (and
    "labels"), fixed pairs (reflow). Label dropout for classifier-free guidance wraps it: drop_labels.
    Usage: stats = wbflow.train_epoch(model, loader, optimizer, rectified_flow_loss)
    """
    if isinstance(batch, dict):
        noise, data, labels = batch["noise"], batch["data"], batch.get("labels")
    else:
        data, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        noise = torch.randn_like(data)
        noise = ot_pairs(noise, data, labels) if coupling == "ot" else noise
    t = torch.rand(data.shape[0], device=data.device, dtype=data.dtype)
    t_data = t.view(-1, *([1] * (data.dim() - 1)))
    x_t = t_data * data + (1 - t_data) * noise
    velocity = model(x_t, t) if labels is None else model(x_t, t, labels=labels)
    return F.mse_loss(velocity.float(), (data - noise).float())


def drop_labels(loss_fn, rate, null_label):
    """`loss_fn` (e.g. rectified_flow_loss) trained for classifier-free guidance: each sample's label of an
    (x1, labels) batch (or a {"labels": ...} batch) is replaced by `null_label` (a model's num_classes: its
    null class) with probability `rate`, independently per sample (flow_matching drops a whole batch at once).
    Dropped before the loss pairs noise and data, so coupling="ot" pairs the dropped samples among themselves
    (an unconditional batch) and every other class within itself.

    Usage: loss_fn = drop_labels(functools.partial(rectified_flow_loss, coupling="ot"), 0.1, null_label=10)
    """
    def dropped(model, batch):
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        labels = torch.where(torch.rand(labels.shape, device=labels.device) < rate, null_label, labels)
        return loss_fn(model, {**batch, "labels": labels} if isinstance(batch, dict) else (batch[0], labels))
    return dropped


def meanflow_times(count, *, device="cpu", mean_t=0.6, std_t=1.6, mean_r=4.0, std_r=1.6, equal_share=0.25):
    """(t, r), each (count,), for meanflow_loss: t and r logit-normal (sigmoid of a normal of that mean and
    std), then r = t for a random `equal_share` of the samples (there the target is the velocity itself), then
    r = max(t, r). The defaults are py-meanflow's CIFAR-10 recipe (its v1 sampler, P_mean_t -0.6, P_mean_r -4.0,
    std 1.6, ratio 0.75) in wbflow's time: there noise is at 1, here at 0, and 1 - sigmoid(x) = sigmoid(-x)
    flips the sign of each mean. Draws from the global RNG, in py-meanflow's order and mirrored, so that the
    same seed gives 1 - its times.

    Usage: t, r = meanflow_times(256, device="cuda")
    """
    t = torch.sigmoid(mean_t - std_t * torch.randn(count, device=device))
    r = torch.sigmoid(mean_r - std_r * torch.randn(count, device=device))
    r = torch.where(torch.rand(count, device=device) < equal_share, t, r)
    return t, torch.maximum(t, r)


def meanflow_target(model, z, t, r, velocity):
    """MeanFlow's regression target for the average velocity model(z, t, r=r) of the jump from t to r >= t, at
    z on the path whose velocity at t is `velocity`: velocity - (t - r) * du/dt, with du/dt = d/dt model(z_t,
    t, r) along the path (z moving at `velocity`, t at 1, r fixed). du/dt is one torch.func.jvp along
    (velocity, 1, 0), in float32 (autocast off), with the math attention kernel (the fused ones have no
    forward-mode derivative), without a graph: the target is a constant to the optimiser. `model` is the bare
    module (torch.func cannot pass through DistributedDataParallel). Returns float32, z's shape.

    Usage: target = meanflow_target(model, z, t, r, data - noise)
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    z, t, r, velocity = z.float(), t.float(), r.float(), velocity.float()
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(lambda z, t: model(z, t, r=r), (z, t), (velocity, torch.ones_like(t)))
    return velocity - (t - r).view(-1, *([1] * (z.dim() - 1))) * du_dt.float()


def _bare_module(model):
    # the module under torch.compile's and DistributedDataParallel's wrappers
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def meanflow_loss(model, batch, *, times=meanflow_times, norm_p=0.75, norm_eps=1e-3):
    """MeanFlow's loss (Geng et al. 2025) for one-step generation from scratch: model(z, t, r=r) regresses
    the average velocity of the jump from t to r >= t onto meanflow_target, per sample the squared error
    summed over its elements, L, weighted adaptively as L / (L + norm_eps)^norm_p (the weight detached),
    averaged over the batch. z = t*x1 + (1-t)*x0 and the velocity x1 - x0 as in rectified_flow_loss; (t, r)
    from times(count, device=...) (meanflow_times: py-meanflow's CIFAR-10 recipe). `batch` is data x1, an
    (x1, labels) pair, or {"noise": x0, "data": x1}. Sample in one step with x = noise + model(noise, 0, r=1),
    or in k with euler_sample(meanflow_velocity(model, k), noise, k).

    Convention: wbflow has noise at t=0 and data at t=1; the paper and py-meanflow data at 0, noise at 1.
    With their time s = 1 - t: their z_s = (1-s)x + s*e is our z_t (e = x0, x = x1); their v = e - x is minus
    ours; their u(z, r_p, t_p), the jump from t_p down to r_p, is -model(z, 1 - t_p, r=1 - r_p); their target
    v - (t_p - r_p) du/dt_p is minus ours, v - (t - r) du/dt; their one step z_0 = z_1 - u(z_1, 0, 1) is ours.

    Under DistributedDataParallel, torch.compile and autocast: the prediction goes through `model` as given
    (so DDP all-reduces its gradients and a compiled model runs compiled, under the caller's autocast); the
    target's JVP runs on the bare module, in float32, drawing the prediction's dropout masks (the same RNG
    state; under torch.compile the compiled forward draws its own). A non-finite loss is returned as it is,
    for train_step to skip the step.
    Usage: train_epoch(model, loader, optimizer, meanflow_loss)  # model = FlowUNet(second_time=True)
    """
    if isinstance(batch, dict):
        noise, data = batch["noise"], batch["data"]
    else:
        data = batch[0] if isinstance(batch, (tuple, list)) else batch
        noise = torch.randn_like(data)
    t, r = times(data.shape[0], device=data.device)
    t_data = t.view(-1, *([1] * (data.dim() - 1)))
    z, velocity = t_data * data + (1 - t_data) * noise, data - noise
    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        prediction = model(z, t, r=r)  # the RNG comes back to where it was: the JVP draws the same masks
    target = meanflow_target(_bare_module(model), z, t, r, velocity)
    squared_error = (prediction.float() - target).square().flatten(1).sum(1)
    return (squared_error / (squared_error.detach() + norm_eps).pow(norm_p)).mean()


def focal_loss(logits, targets, *, gamma=2.0, alpha=None, reduction="mean"):
    """Multi-class focal loss (Lin et al. 2017): -alpha[y] * (1 - p_y)^gamma * log p_y.

    alpha: per-class weights (num_classes values) or None for all ones. "mean" divides by the sum of
    alpha[y] over the batch, as F.cross_entropy(weight=alpha) does, so gamma=0 is exactly weighted
    cross-entropy; "sum" and "none" as usual. Computed in float32 even under autocast.
    Usage: criterion = functools.partial(focal_loss, gamma=2.0, alpha=class_weights)
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
    weight = (torch.ones_like(log_p) if alpha is None
              else torch.as_tensor(alpha, dtype=log_p.dtype, device=log_p.device)[targets])
    loss = -(1 - log_p.exp()).clamp(min=0).pow(gamma) * log_p * weight
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / weight.sum()


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
    CPU uses bf16; amp=False is always off. train_step, train_epoch, validate and the samplers take its
    answer as amp_dtype.
    Usage: amp_dtype = autocast_dtype(torch.device("cuda"))  # torch.bfloat16 on an A100
    """
    device = torch.device(device)
    if not (device.type == "cuda" if amp is None else amp):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def make_scaler(device, amp=None):
    """A GradScaler enabled only when autocast_dtype(device, amp) is float16 (bf16 and float32 need none).

    A disabled scaler passes scale/step/update straight through, so the training step has no branch.
    Usage: scaler = make_scaler(device); train_epoch(..., amp_dtype=autocast_dtype(device), scaler=scaler)
    """
    return _grad_scaler(device, autocast_dtype(device, amp))


def _grad_scaler(device, amp_dtype):
    # the one scaler policy, for make_scaler and for train_step / train_epoch when not given one:
    # loss scaling only for float16 autocast
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)


class _EMAModel(torch.optim.swa_utils.AveragedModel):
    # AveragedModel.update_parameters copies its CPU counter to the device every step (a host sync) and
    # visits every tensor in Python; this runs swa_utils' own EMA once per (device, dtype) group instead.
    def update_parameters(self, model):
        groups = {}
        for ema_tensor, tensor in zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                                      itertools.chain(model.parameters(), model.buffers())):
            ema_group, group = groups.setdefault((ema_tensor.device, tensor.device, ema_tensor.dtype), ([], []))
            ema_group.append(ema_tensor.detach())
            group.append(tensor.detach())
        if any(ema_device != device for ema_device, device, _ in groups):
            return super().update_parameters(model)  # an EMA kept on another device: copy each tensor
        for ema_group, group in groups.values():
            self.multi_avg_fn(ema_group, group, self.n_averaged)
        self.n_averaged += 1


def make_ema(model, decay=0.9999):
    """An exponential moving average of `model`'s weights and buffers: torch.optim.swa_utils'
    AveragedModel with its EMA update (get_ema_multi_avg_fn), on the model's device.

    train_step updates it after each optimiser step, without a host sync; evaluate or sample with
    ema_model.module. Its state_dict is AveragedModel's.
    Usage: ema_model = make_ema(model, decay=0.9999)
    """
    ema_model = _EMAModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
    torch.optim.swa_utils.AveragedModel.update_parameters(ema_model, model)  # the first update copies the weights
    return ema_model


def warmup_cosine_schedule(optimizer, total_steps, warmup_steps=0):
    """A per-step learning-rate schedule: a linear warm-up over `warmup_steps` steps (from 1 / (warmup_steps
    + 1) of the rate up to it), then a cosine decay over the remaining steps (torch's LinearLR and
    CosineAnnealingLR in a SequentialLR); without warm-up, CosineAnnealingLR over all of them.
    Usage: scheduler = warmup_cosine_schedule(optimizer, epochs * len(loader), 2 * len(loader)); scheduler.step()
    """
    schedulers = torch.optim.lr_scheduler
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"the warm-up ({warmup_steps} steps) must be shorter than the run ({total_steps} steps)")
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps)
    if not warmup_steps:
        return cosine
    warmup = schedulers.LinearLR(optimizer, 1 / (warmup_steps + 1), 1.0, total_iters=warmup_steps)
    return schedulers.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def _to_device(batch, device):
    # a tensor, or a nested list / tuple / dict of them, to `device` (non-blocking); anything else as it is
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(part, device) for part in batch)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _forward(model, batch, loss_fn, amp_dtype, device=None):
    # the forward train_step and validate share: the batch to `device` (the model's by default), loss_fn
    # under autocast -> (loss, n_correct or None, n_samples)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batch = _to_device(batch, device)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = loss_fn(model, batch)
    loss, n_correct, n_samples = (output, None, None) if torch.is_tensor(output) else output
    if n_samples is None:  # the first dimension of the batch's first tensor
        first = batch
        while not torch.is_tensor(first):
            first = next(iter(first.values())) if isinstance(first, dict) else first[0]
        n_samples = first.shape[0]
    return loss, n_correct, n_samples


def train_step(model, batch, optimizer, loss_fn, *, amp_dtype=None, scaler=None, scheduler=None, ema_model=None,
               grad_clip=None, device=None):
    """One optimiser step on `batch`; returns device tensors, so that nothing waits for the GPU.

    loss_fn(model, batch) returns a loss tensor, or (loss, n_correct, n_samples) for accuracy. The step:
    the batch (a tensor or a nested list / tuple / dict of them) to `device` (the model's by default;
    non-blocking), the forward under autocast in `amp_dtype` (what autocast_dtype decides; None is
    float32), backward, unscale, the global L2 gradient norm before clipping (clipped to `grad_clip`
    when given), the optimiser step, scheduler.step(), and the EMA update of `ema_model` (make_ema).
    A step whose loss or gradients are not finite is skipped on the device by an fp16 `scaler`
    (make_scaler) or a fused Adam/AdamW (fused=True); any other optimiser needs one host read to skip it.
    Returns {"loss", "grad_norm", "finite", "n_correct" (None without counts), "n_samples",
    "learning_rate" (the float this step used, read before scheduler.step())}.
    Usage: result = train_step(model, images, optimizer, rectified_flow_loss, grad_clip=1.0)
    """
    loss, n_correct, n_samples = _forward(model, batch, loss_fn, amp_dtype, device)
    scaler = scaler or _grad_scaler(loss.device, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf, foreach=True)  # inf: the norm alone
    finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    learning_rate = float(optimizer.param_groups[0]["lr"])
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
    if ema_model is not None:
        ema_model.update_parameters(model)
    return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "finite": finite, "n_correct": n_correct,
            "n_samples": n_samples, "learning_rate": learning_rate}


class RunningSums:
    """An epoch's sums, kept on the device so that adding a step never waits for it: the loss and the
    gradient norm over finite steps, correct predictions, finite and skipped steps, samples.

    close_window() reads them (the one host-device sync) and returns the means since the last close;
    means() returns the epoch's, over every rank under torch.distributed. state_dict() (every rank's
    sums, gathered; tensors and plain numbers) and load_state_dict(state, rank) carry an unfinished
    epoch into a resumed run.
    Usage: sums = RunningSums(device); sums.add(train_step(...)); if step % 100 == 0: print(sums.close_window())
    """

    def __init__(self, device):
        self.totals = torch.zeros(6, dtype=torch.float64, device=device)
        self.logged = [0.0] * 6  # the totals when the last window closed, on the host
        self.batches, self.has_accuracy, self.learning_rate = 0, False, None

    def add(self, step_result):
        finite, zero, n_correct = step_result["finite"], self.totals.new_zeros(()), step_result["n_correct"]
        self.totals += torch.stack([torch.where(finite, step_result["loss"].double(), zero),
                                    zero + (0 if n_correct is None else n_correct),
                                    torch.where(finite, step_result["grad_norm"].double(), zero),
                                    finite.double(), (~finite).double(), zero + step_result["n_samples"]])
        self.batches, self.has_accuracy = self.batches + 1, n_correct is not None
        self.learning_rate = step_result["learning_rate"]

    def close_window(self):
        """The means of the steps added since the last close (None when there were none)."""
        current = self.totals.tolist()  # the one host-device sync
        window, self.logged = [now - before for now, before in zip(current, self.logged)], current
        return self._means(window) if window[3] + window[4] else None

    def means(self):
        totals = self.totals.clone()
        if rank_and_world_size()[1] > 1:
            dist.all_reduce(totals)
        return self._means(totals.tolist())

    def _means(self, sums):
        loss, n_correct, grad_norm, n_finite, n_skipped, n_samples = sums
        return {"loss": loss / n_finite if n_finite else math.nan,
                "grad_norm": grad_norm / n_finite if n_finite else math.nan,
                "accuracy": 100.0 * n_correct / n_samples if self.has_accuracy and n_samples else None,
                "steps": int(n_finite + n_skipped), "skipped": int(n_skipped), "samples": int(n_samples)}

    def state_dict(self):
        sums = torch.stack([self.totals, torch.tensor(self.logged, dtype=torch.float64, device=self.totals.device)])
        every_rank = [sums] + [torch.zeros_like(sums) for _ in range(rank_and_world_size()[1] - 1)]
        if len(every_rank) > 1:  # every rank's sums: each resumes its own
            dist.all_gather(every_rank, sums)
        sums = torch.stack(every_rank)
        return {"totals": sums[:, 0].cpu(), "logged": sums[:, 1].cpu(), "batches": self.batches,
                "has_accuracy": self.has_accuracy, "learning_rate": self.learning_rate}

    def load_state_dict(self, state, rank=0):
        self.totals = state["totals"][rank].to(self.totals)
        self.logged = state["logged"][rank].tolist()
        self.batches, self.has_accuracy, self.learning_rate = (state["batches"], state["has_accuracy"],
                                                               state["learning_rate"])


def train_epoch(model, loader, optimizer, loss_fn, *, device=None, scheduler=None, ema_model=None,
                grad_clip=None, amp_dtype=None, scaler=None, step=0, epoch=0, log_every=10, on_log=None,
                stop=None, resume=None, progress=True):
    """Train `model` for one pass over `loader` with train_step; returns the epoch means, the new global
    step and, when `stop` ended the epoch early, the state to finish it with.

    loss_fn, scheduler, ema_model, grad_clip, amp_dtype and scaler as in train_step: autocast in
    `amp_dtype` (None trains in float32; pass amp_dtype=autocast_dtype(device) for mixed precision);
    batches go to `device` (the model's by default). Pass the fp16 `scaler` (make_scaler) to keep its
    loss scale across epochs. Nothing waits for the GPU except at log points.

    Logging: every optimiser step lands in exactly one window. A window closes when the global step is
    a multiple of `log_every`, and at the end of the epoch (a shorter window); then on_log(step, window)
    gets plain floats: loss and grad_norm (means over the window's finite steps), accuracy (percent,
    only when loss_fn counts), learning_rate (the rate the window's last step used), steps and skipped
    (counts in the window), batch (the epoch's 0-based index of the last batch) and epoch. The caller
    names the W&B keys.

    Stopping: `stop` (a threading.Event or a callable returning bool; see stop_on_signals) is checked
    after every step with no host sync (under torch.distributed at log points, where the ranks agree);
    when set, the epoch returns at that step boundary with stopped=True and a `state` that loads with
    weights_only=True. Pass it back as `resume=` with a loader that skips the state["batches"] batches
    already done, and the epoch continues exactly: the same windows, the same epoch means. `state` is
    None when the epoch ran to its end. Under torch.distributed the returned means and counts are over
    all ranks; each rank's on_log sees its own windows.
    Usage: stats = train_epoch(model, loader, opt, loss_fn, step=step, on_log=lambda s, w: print(s, w))
    """
    from tqdm.auto import tqdm
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world_size = rank_and_world_size()
    scaler = scaler or _grad_scaler(device, amp_dtype)
    sums, start_step = RunningSums(device), step
    if resume is not None:
        sums.load_state_dict(resume, rank)
    stop_requested = getattr(stop, "is_set", stop) or (lambda: False)  # an Event's is_set, or the callable

    def log(window):
        if on_log is not None and window is not None:
            window = {key: value for key, value in window.items() if value is not None and key != "samples"}
            on_log(step, {**window, "learning_rate": sums.learning_rate, "batch": sums.batches - 1, "epoch": epoch})

    model.train()
    started = time.perf_counter() - (resume["seconds"] if resume is not None else 0.0)
    stopped = world_size == 1 and stop_requested()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in ([] if stopped else bar):
        sums.add(train_step(model, batch, optimizer, loss_fn, amp_dtype=amp_dtype, scaler=scaler, device=device,
                            scheduler=scheduler, ema_model=ema_model, grad_clip=grad_clip))
        step += 1
        at_log_point = step % log_every == 0
        if at_log_point:
            log(sums.close_window())
            bar.set_postfix(loss=f"{sums.logged[0] / max(sums.logged[3], 1):.4f}")  # the epoch's running mean
        if world_size == 1:
            stopped = stop_requested()
        elif at_log_point:  # every rank must stop at the same step, or the next collective hangs
            flag = torch.tensor(float(stop_requested()), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopped = flag.item() > 0
        if stopped:
            break
    bar.close()
    if not stopped:
        log(sums.close_window())  # the epoch's last, partial window
    seconds = time.perf_counter() - started
    return {**sums.means(), "steps": step - start_step, "step": step, "seconds": seconds, "stopped": stopped,
            "state": {**sums.state_dict(), "seconds": seconds} if stopped else None}


def validate(model, loader, loss_fn, *, device=None, amp_dtype=None, progress=False):
    """Evaluate `model` on `loader` in inference mode; returns {"loss", "accuracy", "samples"}.

    loss_fn and amp_dtype as in train_epoch (None evaluates in float32; pass amp_dtype=autocast_dtype(device)
    for mixed precision); the loss is the per-sample mean, accuracy is percent (None when loss_fn gives no
    counts). Under torch.distributed the sums are all-reduced, so every rank returns the metrics of the
    whole (sharded) validation set. The model's train/eval mode is restored.
    Usage: metrics = validate(model, val_loader, classification_loss(nn.CrossEntropyLoss()))
    """
    from tqdm.auto import tqdm
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    totals, has_accuracy = torch.zeros(3, dtype=torch.float64, device=device), False  # loss * n, n_correct, n
    with torch.inference_mode():
        for batch in tqdm(loader, desc="validate", disable=not progress, leave=False):
            loss, n_correct, n_samples = _forward(model, batch, loss_fn, amp_dtype, device)
            has_accuracy = n_correct is not None
            totals += torch.stack([loss.double() * n_samples, zero + (0 if n_correct is None else n_correct),
                                   zero + n_samples])
    model.train(was_training)
    if rank_and_world_size()[1] > 1:
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

    previous = ({number: signal.signal(number, request_stop) for number in signals}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_stopped(stop, state, path, *, script, argv, where=""):
    """End a run that `stop` (stop_on_signals) has stopped: rank 0 saves `state` to `path` and prints
    the command that continues from it (resume_command); every rank exits with 128 + the signal's
    number, as a shell reports a process ended by that signal (143 for SIGTERM, 130 for Ctrl-C).
    Usage: if stats["stopped"]: exit_stopped(stop, state, "runs/flow/last.pt", script=__file__, argv=sys.argv[1:])
    """
    rank, world_size = rank_and_world_size()
    if rank == 0:
        save_checkpoint(state, path)
        print(f"stopped{where}; continue with:\n  {resume_command(script, argv, path, world_size)}", flush=True)
    raise SystemExit(128 + (stop.signal or signal.SIGTERM))


@contextlib.contextmanager
def exit_when_stopped(program, what, then="nothing was saved"):
    """stop_on_signals for work that keeps nothing when stopped (an evaluation): yields the stop event; when the
    block raises KeyboardInterrupt (it saw a stop, or a second signal came) or ends with the stop set, the program
    ends with one line on stderr, "PROGRAM: WHAT stopped by SIGTERM; THEN", and exit code 128 + the signal's
    number (SIGINT's when no handler caught it).
    Usage: with exit_when_stopped("eval.py", "--eval") as stop: scores = sample_and_score(..., stop=stop.is_set)
    """
    stop = None
    try:
        with stop_on_signals() as stop:
            yield stop
            if stop.is_set():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        number = getattr(stop, "signal", None) or signal.SIGINT
        print(f"{program}: {what} stopped by {signal.Signals(number).name}; {then}", file=sys.stderr)
        raise SystemExit(128 + number) from None


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
    numpy_state, python_state = state["numpy"], state["python"]
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate((python_state["version"], tuple(python_state["state"].cpu().tolist()), python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in cuda_states])


def gather_from_ranks(value):
    """Every rank's `value` as a list indexed by rank (torch.distributed.all_gather_object), or
    [value] when not distributed; every rank must call it.

    Usage: state["rng"] = gather_from_ranks(capture_rng_state()); ...; restore_rng_state(state["rng"][rank])
    """
    values = [value] * rank_and_world_size()[1]
    if len(values) > 1:
        dist.all_gather_object(values, value)
    return values


def predict_logits(model, dataset, *, device=None, amp_dtype=None, batch_size=64, num_workers=0, tta=False,
                   progress=False):
    """(logits [N, K] float32, labels [N]) on the CPU for every (image, label) of `dataset`, row i being
    sample i: the model in eval mode (its mode is restored) on `device` (None: the model's), under autocast
    in amp_dtype (None: float32).
    softmax(logits) are the class probabilities; tta=True averages the probabilities of each image and of
    its horizontal flip, the logits being the log of that mean. Under torch.distributed every rank
    predicts every world_size-th sample and all ranks get the whole set, in order: every rank calls it,
    with the unwrapped model (DDP's forward would sync buffers over shards of different lengths).
    progress=True shows a bar over this rank's images.
    Usage: logits, labels = predict_logits(model, val_set, amp_dtype=autocast_dtype(device)); probs = logits.softmax(1)
    """
    from tqdm.auto import tqdm
    rank, world_size = rank_and_world_size()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=_leave_stop_signals_to_main)
    was_training, logits, labels = model.training, [], []
    model.eval()
    with torch.inference_mode(), tqdm(total=len(shard), desc="predict", unit="image", disable=not progress) as bar, \
            torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for images, batch_labels in loader:
            images = images.to(device, non_blocking=True)
            batch_logits = model(images).float()
            if tta:  # log((p + p_flipped) / 2), without leaving log space
                flipped = model(images.flip(3)).float()
                batch_logits = torch.stack([batch_logits.log_softmax(1), flipped.log_softmax(1)]).logsumexp(0)
                batch_logits -= math.log(2)
            logits.append(batch_logits.cpu())
            labels.append(torch.as_tensor(batch_labels))
            bar.update(len(images))
    model.train(was_training)
    parts = gather_from_ranks((torch.cat(logits), torch.cat(labels)) if labels else None)  # None: no sample here
    if not any(parts):
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    # rank r predicted samples r, r + world_size, ...: each row goes back to its sample's place
    samples = [index for part_rank in range(world_size) for index in range(part_rank, len(dataset), world_size)]
    order = torch.tensor(samples).argsort()
    return tuple(torch.cat([part[which] for part in parts if part])[order] for which in (0, 1))


def evaluate_classifier(model, dataset, criterion, weights, *, device=None, amp_dtype=None, batch_size=64,
                        num_workers=0):
    """(scores, probabilities [N, K], labels [N]) of `model` on every (image, label) of `dataset` (predict_logits:
    eval mode, DDP-aware, every rank gets them all): scores are "loss" (criterion on all the logits) and
    classification_scores' "acc", "macro_f1", "score" (weighted_f1_score with `weights`) and "f1". For the
    weights' EMA (make_ema), pass ema_model.module.
    Usage: scores, probs, labels = evaluate_classifier(model, val_set, nn.CrossEntropyLoss(), [2.0, 1.0, 1.0])
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    logits, labels = predict_logits(model, dataset, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                    num_workers=num_workers)
    loss = float(criterion(logits.to(device), labels.to(device)))
    return {"loss": loss, **classification_scores(labels, logits.argmax(dim=1), weights)}, logits.softmax(dim=1), labels


def predict_images(model, paths, transform, *, device=None, amp_dtype=None, batch_size=64, num_workers=0, tta=False,
                   progress=False):
    """Class probabilities [N, K] (float32, CPU) of the image files `paths`, in order: each through
    `transform` (e.g. image_transforms(256, train=False)) and predict_logits (amp_dtype, tta, progress as
    there). `model` may be a list or an iterable of models, an ensemble: the mean of their probabilities,
    the models predicting one after another (a generator that builds each model holds one at a time). A
    file that cannot be read gets a row of NaN, and one warning names them (drop_unreadable_images);
    ValueError when none can be read.
    Usage: probs = predict_images(model, ["a.jpg", "b.jpg"], image_transforms(256, train=False))
    """
    readable = {path for path, _ in drop_unreadable_images([(path, 0) for path in paths])}
    kept = [index for index, path in enumerate(paths) if path in readable]
    if not kept:
        raise ValueError(f"none of the {len(paths)} image file(s) can be read")
    dataset = ImageSamples([(paths[index], 0) for index in kept], transform)
    members = [model] if isinstance(model, nn.Module) else model
    kept_probs = torch.stack([predict_logits(member, dataset, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                                             num_workers=num_workers, tta=tta, progress=progress)[0].softmax(dim=1)
                              for member in members]).mean(dim=0)
    probs = kept_probs.new_full((len(paths), kept_probs.shape[1]), math.nan)
    probs[kept] = kept_probs
    return probs


def predict_submission(states, names, paths, submission, *, offsets=None, device="cpu", amp_dtype=None, batch_size=64,
                       num_workers=0, tta=False, progress=False):
    """Predict the image files `paths` (named `names` in the submission) with the classifier(s) of checkpoint
    `states` and write `submission` (write_submission, with `offsets`). Each state holds "model" (a state dict)
    and a "config" naming the build_classifier "model", its "classes", "image_size" and "mean_std", and its
    training set's "class_counts" (train_fire.py's best_model.pth; the first's preprocessing serves all).
    Several states are an ensemble: the mean of their probabilities (predict_images), each model built in its
    turn. An unreadable image gets the training set's most frequent class (without class_counts: the most
    frequent prediction). Returns (probabilities [N, K], predicted class indices, that fallback class).
    Usage: probs, predicted, _ = predict_submission([load_checkpoint("best_model.pth")], ["a"], ["A/a.jpg"], "s.txt")
    """
    config = states[0]["config"]
    models = (build_classifier(state["config"]["model"], len(state["config"]["classes"]),
                               state_dict=state["model"]).to(device) for state in states)
    transform = image_transforms(config["image_size"], train=False, mean_std=config.get("mean_std"))
    probs = predict_images(models, paths, transform, device=device, amp_dtype=amp_dtype, batch_size=batch_size,
                           num_workers=num_workers, tta=tta, progress=progress)
    read = ~probs.isnan().any(dim=1)
    counts = config.get("class_counts") or torch.bincount(probs[read].argmax(1), minlength=probs.shape[1]).tolist()
    fallback = max(range(len(counts)), key=counts.__getitem__)
    return probs, write_submission(submission, names, probs, config["classes"], fallback, offsets), fallback


def apply_class_offsets(probs, offsets=None):
    """The predicted class of each row of `probs` [N, K]: argmax(log p + offsets), in float64 (offsets:
    one per class, fit_class_offsets'), or argmax p without offsets.
    Usage: predicted = apply_class_offsets(probs, [0.4, 0.2, 0.0, -0.1, 0.0])
    """
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return (probs if offsets is None else probs.log() + torch.as_tensor(offsets, dtype=torch.float64)).argmax(dim=1)


def write_submission(path, names, probs, class_names, fallback=0, offsets=None):
    """Write a competition's submission to `path`: one `name<TAB>label` line per image of `names`, in
    order (UTF-8, no header), the label being the most probable class (with `offsets`, apply_class_offsets'
    class), or class `fallback` for a row of NaN (an image predict_images could not read); and
    predictions.csv beside it (write_probability_csv). Both through write_atomically. Returns the label indices.
    Usage: predicted = write_submission("submission.txt", ["a.jpg"], torch.tensor([[0.2, 0.8]]), ["cat", "dog"])
    """
    unread = probs.isnan().any(dim=1)
    predicted = torch.where(unread, fallback, apply_class_offsets(probs.nan_to_num(0.5), offsets)).tolist()
    lines = [f"{name}\t{class_names[label]}\n" for name, label in zip(names, predicted)]
    write_atomically(path, lambda file: file.write("".join(lines).encode()))
    write_probability_csv(Path(path).with_name("predictions.csv"), names, probs, class_names)
    return predicted


def write_probability_csv(path, names, probs, class_names, labels=None):
    """Write `path` atomically (UTF-8, the csv module's quoting): a name column, with `labels` (class indices)
    a label column of class names, then one probability column per class (6 decimals; empty for NaN), as
    predictions.csv and out-of-fold predictions (oof.csv) are. read_probability_csv reads it back.
    Usage: write_probability_csv("oof.csv", ["a.jpg"], torch.tensor([[0.2, 0.8]]), ["cat", "dog"], labels=[1])
    """
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")  # quotes a name with a comma or a quote in it
    writer.writerow(["name", *(["label"] if labels is not None else []), *class_names])
    for index, (name, row) in enumerate(zip(names, torch.as_tensor(probs).tolist())):
        label = [] if labels is None else [class_names[int(labels[index])]]
        writer.writerow([name, *label, *(f"{p:.6f}" if p == p else "" for p in row)])
    return write_atomically(path, lambda file: file.write(table.getvalue().encode()))


def read_probability_csv(*paths):
    """(names, probabilities [N, K] float64, label indices or None, class names) of files that
    write_probability_csv wrote, one after another (a K-fold run's out-of-fold files). ValueError naming the
    file when one is not such a table, when two name other classes or when a name repeats.
    Usage: names, probs, labels, class_names = read_probability_csv("runs/cv/fold0/oof.csv", "runs/cv/fold1/oof.csv")
    """
    names, probs, labels, class_names, first_column = [], [], [], None, None
    for path in paths:
        with open(path, newline="", encoding="utf-8") as file:
            rows = [row for row in csv.reader(file) if row]
        header = rows[0] if rows else []
        first = 2 if header[1:2] == ["label"] else 1  # of the probabilities
        if header[:1] != ["name"] or len(header) < first + 2 or any(len(row) != len(header) for row in rows):
            raise ValueError(f"{path} is not a table of names, labels and class probabilities")
        if class_names is not None and (header[first:], first) != (class_names, first_column):
            raise ValueError(f"{path} has other columns than {paths[0]}: {','.join(header)}")
        class_names, first_column = header[first:], first
        try:
            probs.append(torch.tensor([[float(cell) if cell else math.nan for cell in row[first:]] for row in rows[1:]],
                                      dtype=torch.float64).reshape(-1, len(class_names)))
            labels += [class_names.index(row[1]) for row in rows[1:]] if first == 2 else []
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        names += [row[0] for row in rows[1:]]
    repeated = [name for name, count in collections.Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} name(s) appear twice in {', '.join(map(str, paths))}: "
                         f"{', '.join(repeated[:3])}")
    return names, torch.cat(probs), labels if first_column == 2 else None, class_names


# ----------------------------------------------------------------------------- sampling

def euler_sample(velocity, noise, steps, *, heun=False, amp_dtype=None):
    """Integrate dx/dt = velocity(x, t) from t=0 (noise) to t=1 (data) in `steps` equal steps: Euler (one
    evaluation a step) or, with heun=True, Heun's second-order method (two). `velocity` is any callable of
    (x, t) with t an (N,) tensor: a model (put in eval mode by the caller; the mode is left as it is) or a
    closure around one. Runs in inference mode, under autocast in `amp_dtype` (e.g.
    wbflow.autocast_dtype(device); None for float32). Returns float32 samples.

    Usage: images = euler_sample(ema_model.module.eval(), torch.randn(64, 3, 32, 32), steps=100)
    """
    x, times = noise.float().clone(), torch.linspace(0.0, 1.0, steps + 1).tolist()
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=amp_dtype or torch.float32,
                                                enabled=amp_dtype is not None):
        for t_now, t_next in zip(times[:-1], times[1:]):
            dt = t_next - t_now
            v = velocity(x, torch.full((x.shape[0],), t_now, device=x.device))
            if heun:
                v = (v + velocity(x + dt * v, torch.full((x.shape[0],), t_next, device=x.device))) / 2
            x.add_(v, alpha=dt)
    return x


def rk45_sample(velocity, noise, *, tolerance=1e-5, amp_dtype=None):
    """Integrate dx/dt = velocity(x, t) (as in euler_sample) from t=0 to 1 with adaptive RK45
    (scipy.integrate.solve_ivp, float64 state, rtol = atol = `tolerance`); returns (samples float32, number of
    velocity evaluations used).

    Usage: images, nfe = rk45_sample(ema_model.module.eval(), torch.randn(64, 3, 32, 32), tolerance=1e-5)
    """
    from scipy.integrate import solve_ivp
    shape, device = noise.shape, noise.device

    def flat_velocity(t_now, x_flat):
        x = torch.from_numpy(x_flat).to(device=device, dtype=torch.float32).reshape(shape)
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                    enabled=amp_dtype is not None):
            v = velocity(x, torch.full((shape[0],), t_now, device=device))
        return v.float().cpu().numpy().reshape(-1).astype(np.float64)

    solution = solve_ivp(flat_velocity, (0.0, 1.0), noise.detach().cpu().double().numpy().reshape(-1),
                         method="RK45", rtol=tolerance, atol=tolerance, t_eval=[1.0])
    if not solution.success:
        raise RuntimeError(f"RK45 failed: {solution.message}")
    samples = torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device=device, dtype=torch.float32)
    return samples, int(solution.nfev)


def meanflow_velocity(model, steps):
    """The velocity callable for `steps` Euler steps of a MeanFlow model (meanflow_loss): at time t, the
    average velocity of the jump to t + 1/steps, so euler_sample(meanflow_velocity(model, k), noise, k) makes
    k jumps, and k = 1 is the one step noise + model(noise, 0, r=1).

    Usage: images = euler_sample(meanflow_velocity(ema_model.module.eval(), 1), torch.randn(64, 3, 32, 32), 1)
    """
    return lambda x, t: model(x, t, r=t + 1 / steps)


def sample_flow(velocity, noise, solver="euler", nfe=100, *, tolerance=1e-5, amp_dtype=None):
    """Samples of the velocity callable from `noise` with solver "euler" (nfe steps), "heun" (nfe // 2 steps of
    two evaluations) or "rk45" (adaptive at `tolerance`; nfe unused), or "meanflow": nfe jumps of a MeanFlow
    model (`velocity` is the model; Euler on meanflow_velocity); returns (samples float32, evaluations used).

    Usage: images, nfe_used = sample_flow(ema_model.module.eval(), torch.randn(64, 3, 32, 32), "heun", 100)
    """
    if solver == "rk45":
        return rk45_sample(velocity, noise, tolerance=tolerance, amp_dtype=amp_dtype)
    steps = max(1, nfe // 2) if solver == "heun" else nfe
    velocity = meanflow_velocity(velocity, steps) if solver == "meanflow" else velocity
    samples = euler_sample(velocity, noise, steps, heun=solver == "heun", amp_dtype=amp_dtype)
    return samples, steps * (1 + (solver == "heun"))


def sample_images(velocity, count, *, device="cpu", solver="euler", nfe=100, tolerance=1e-5, amp_dtype=None,
                  shape=(3, 32, 32), batch_size=500, seed=0, stop=None, progress=False):
    """`count` samples of the velocity callable (solver, nfe, tolerance and amp_dtype as in sample_flow; float32
    by default, as published FIDs sample) as uint8 images on the CPU, drawn in batches from seeded noise of their
    own generator (the global RNG is left as it was) moved to `device`, and the evaluations one used:
    (images_uint8, nfe_used). `stop` (a callable) is checked before each batch; when it returns True, the
    result is (None, None).

    Usage: images_uint8, nfe_used = sample_images(ema_model.module.eval(), 10000, device="cuda", nfe=100)
    """
    from tqdm.auto import tqdm
    generator, batches, used = torch.Generator().manual_seed(seed), [], None
    for start in tqdm(range(0, count, batch_size), desc="sampling", unit="batch", disable=not progress, leave=False):
        if stop is not None and stop():
            return None, None
        noise = torch.randn(min(batch_size, count - start), *shape, generator=generator).to(device)
        samples, used = sample_flow(velocity, noise, solver, nfe, tolerance=tolerance, amp_dtype=amp_dtype)
        batches.append(images_to_uint8(samples).cpu())
    return torch.cat(batches), used


def compare_solvers(velocity, noise, *, solvers=("euler", "heun", "rk45"), nfes=(1, 2, 4, 10, 50, 100),
                    tolerance=1e-5, amp_dtype=None, stop=None):
    """Sample the same noise with every solver at every NFE budget; returns a list of rows
    {"solver", "nfe" (evaluations used), "seconds", "images"}. Heun takes the even budgets (2 per
    step), RK45 runs once at `tolerance` and reports the evaluations it needed; "meanflow" (sample_flow) takes
    each budget as that many jumps of a MeanFlow model. `stop` (a callable, e.g.
    stop_on_signals()'s event.is_set) is checked before each row: when it returns True, the result is None.

    Usage: rows = compare_solvers(ema_model.module.eval(), fixed_noise, nfes=(1, 2, 4, 10, 50, 100))
    """
    rows = []
    for solver in solvers:
        for budget in {"euler": nfes, "meanflow": nfes, "heun": [n for n in nfes if n >= 2 and n % 2 == 0],
                       "rk45": [None]}[solver]:
            if stop is not None and stop():
                return None
            started = time.perf_counter()
            images, used = sample_flow(velocity, noise, solver, budget, tolerance=tolerance, amp_dtype=amp_dtype)
            rows.append({"solver": solver, "nfe": used, "seconds": time.perf_counter() - started, "images": images})
    return rows


def straightness(velocity, noise, steps=100, *, amp_dtype=None):
    """RectifiedFlow's straightness S of the velocity callable's own Euler trajectory from `noise` (`steps`
    steps): the mean over steps of the per-dimension mean of ((x_1 - x_0) - v(x_t, t))^2; 0 for a straight
    flow. Since x_1 - x_0 is the mean velocity, this is mean(v^2) - (x_1 - x_0)^2, in one pass.

    Usage: eval_straightness = straightness(ema_model.module.eval(), fixed_noise, steps=100)
    """
    total = squares = 0.0  # of the velocities, in float64

    def summed_velocity(x, t):
        nonlocal total, squares
        v = velocity(x, t)
        total, squares = total + v.double(), squares + v.double().square()
        return v

    euler_sample(summed_velocity, noise, steps, amp_dtype=amp_dtype)
    return (squares / steps - (total / steps).square()).mean().clamp(min=0).item()


def guided_velocity(model, labels, scale, interval=None):
    """The velocity callable v(x, t) of classifier-free guidance for the samplers: v_uncond + scale * (v_cond -
    v_uncond), with v_cond = model(x, t, labels=labels) and v_uncond the model's at the null class (index
    model.num_classes; FlowUNet(num_classes=...)), both in one batched forward of 2N rows. scale = 1 is the
    conditional velocity (one forward of N rows); flow_matching's guidance weight w is scale = 1 + w, since its
    (1 + w) * cond - w * uncond is the same sum. interval=(t_lo, t_hi) guides only where t_lo <= t <= t_hi
    (Kynkäänniemi et al. 2024: guidance mid-way helps, at high noise it hurts) and gives the conditional velocity
    elsewhere. `labels` (class indices) are the batch's, a shorter tensor repeated along it: torch.arange(C)
    draws class-balanced batches (sample i of a batch is class i % C) for any batch size.

    Usage: images = euler_sample(guided_velocity(ema_model.module.eval(), torch.arange(10), 2.0), noise, 100)
    """
    null_label = getattr(model, "num_classes", None)
    if not null_label:
        raise ValueError("guided_velocity needs a model built with num_classes (its null class is index num_classes)")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()

    def velocity(x, t):
        batch, t = x.shape[0], torch.as_tensor(t, device=x.device).expand(x.shape[0])
        conditional = labels.to(x.device).repeat(-(-batch // len(labels)))[:batch]
        if scale == 1:
            return model(x, t, labels=conditional)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat(
            [conditional, torch.full_like(conditional, null_label)])).float().chunk(2)
        guided = v_uncond + scale * (v_cond - v_uncond)
        if interval is None:
            return guided
        inside = (t >= interval[0]) & (t <= interval[1])  # on the device: no host read a step
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), guided, v_cond)
    return velocity


def class_grid(model, noise, class_names, *, guidance=1.0, interval=None, solver="euler", nfe=100, tolerance=1e-5,
               amp_dtype=None):
    """A class-conditional model's grid with one row per class: row c is class c drawn from each row of `noise`,
    the same noise in every row (a column shows what the label changes; the same noise every epoch shows
    training's progress), with guided_velocity at `guidance` and `interval`, sampled by sample_flow (solver, nfe,
    tolerance, amp_dtype). Returns (grid_uint8, a caption naming the rows' classes, evaluations a sample used).

    Usage: grid, caption, nfe_used = class_grid(ema_model.module.eval(), fixed_noise[:8], CIFAR10_CLASSES)
    """
    if len(class_names) != getattr(model, "num_classes", None):
        raise ValueError(f"class_grid: {len(class_names)} class names for a model of "
                         f"{getattr(model, 'num_classes', None)} classes")
    labels = torch.arange(len(class_names)).repeat_interleave(len(noise))
    samples, used = sample_flow(guided_velocity(model, labels, guidance, interval),
                                noise.repeat(len(class_names), *[1] * (noise.dim() - 1)), solver, nfe,
                                tolerance=tolerance, amp_dtype=amp_dtype)
    return sample_grid(samples, nrow=len(noise)), "rows: " + ", ".join(class_names), used


# ----------------------------------------------------------------------------- reflow

def _pair_noise(indices, seed, shape):
    # pair i's noise, from its own seed: any pair is regenerated alone, so a shard stores only samples
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 2**32 + int(i)))
                        for i in indices])


def reflow_shards(folder, num_pairs, *, shard_size=1000, shape=(3, 32, 32), seed=0, settings=None, num_classes=None):
    """One generation of reflow pairs, and what in `folder` is not of it: (the metadata each shard pairs_00000.pt,
    ... of the generation holds besides its samples, {path: why} for every file pairs_*.pt in `folder` that is no
    shard of it). A generation is keyed by `settings` (what makes the samples: e.g. the teacher's file hash, the
    solver and NFE), the noise seed, the sample shape, the pair count, the shard size and the classes of a
    class-conditional teacher (None: unconditional), so pairs of another teacher or settings are never mixed into
    it: refuse such files, or delete them and generate again. The files are read with mmap, so their samples stay
    on disk.

    Usage: plan, others = reflow_shards("out/pairs", 10_000, settings={"teacher_sha256": file_sha256("teacher.pt")})
    """
    key = {**(settings or {}), "num_pairs": num_pairs, "shard_size": shard_size, "seed": seed, "shape": list(shape),
           "num_classes": num_classes}  # a shard written before num_classes existed reads as None: unconditional
    plan = [{**key, "first": first, "count": min(shard_size, num_pairs - first)}
            for first in range(0, num_pairs, shard_size)]
    names, others = {f"pairs_{index:05d}.pt": meta for index, meta in enumerate(plan)}, {}
    for path in sorted(Path(folder).glob("pairs_*.pt")):
        expected = names.get(path.name)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found = {name: saved.get(name) for name in expected or key}
        except Exception as error:  # noqa: BLE001 - a damaged file is no shard of this generation either
            others[path] = f"not a readable shard: {type(error).__name__}"
            continue
        if expected is None:
            others[path] = f"not one of the {len(plan)} shards of {num_pairs} pairs"
        elif found != expected:
            name = next(name for name in expected if found[name] != expected[name])
            others[path] = f"{name} {found[name]!r} there, {expected[name]!r} here"
    return plan, others


def generate_reflow_pairs(sample, folder, num_pairs, *, shard_size=1000, shape=(3, 32, 32), seed=0, settings=None,
                          num_classes=None, device="cpu", rank=0, world_size=1, stop=None, overwrite=False):
    """Write `num_pairs` (noise, sample) pairs into `folder` as shards pairs_00000.pt, ... of
    `shard_size` pairs: sample(noise) (a trained flow's uint8 samples, 3 KB a CIFAR pair) and what
    regenerates the noise (pair i's own seed). Each shard is written atomically and a shard already
    there is kept, so a killed generation resumes at the next shard. The shards are keyed by
    `settings` (what makes the samples: pass the teacher's file hash, the solver, ...) and the other
    arguments (reflow_shards): a folder holding any file pairs_*.pt of another generation is a
    ValueError before anything is written, or with overwrite=True those files are deleted first. Under
    DDP pass rank and world_size: each writes every world_size-th shard, rank 0 deletes, and every rank
    returns once all shards are written. `stop` is checked before each shard: the result is then
    None, else this rank's shard paths. With `num_classes` (a class-conditional teacher) pair i is made for
    class i % num_classes, by sample(noise, labels), and its shard keeps the labels, so the student trains
    every pair with the label it was generated for.

    Usage: generate_reflow_pairs(lambda x0: images_to_uint8(sample_flow(ema, x0)[0]), "out/pairs", 10_000)
    """
    plan, others = reflow_shards(folder, num_pairs, shard_size=shard_size, shape=shape, seed=seed, settings=settings,
                                 num_classes=num_classes)
    for path, why in list(others.items())[:1] if not overwrite else ():
        more = f" and {len(others) - 1} more files hold" if len(others) > 1 else " holds"
        raise ValueError(f"{path}{more} pairs of another generation ({why}): pass --overwrite to delete them and "
                         f"make these pairs (overwrite=True), or use another folder")
    for path in others if overwrite and rank == 0 else ():
        path.unlink(missing_ok=True)
    if overwrite and world_size > 1:
        dist.barrier()  # gone before any rank writes into the folder
    paths = []
    for shard in range(rank, len(plan), world_size):
        path, meta = Path(folder) / f"pairs_{shard:05d}.pt", plan[shard]
        if not path.is_file():
            if stop is not None and stop():
                return None
            indices = torch.arange(meta["first"], meta["first"] + meta["count"])
            noise = _pair_noise(indices, seed, shape).to(device)
            if num_classes is None:
                save_checkpoint({**meta, "images_uint8": sample(noise).cpu()}, path)
            else:
                labels = indices % num_classes
                images_uint8 = sample(noise, labels.to(device)).cpu()
                save_checkpoint({**meta, "images_uint8": images_uint8, "labels": labels}, path)
        paths.append(path)
    if world_size > 1:
        dist.barrier()  # every rank's shards are written
    return paths


def load_reflow_pairs(folder, num_pairs, settings=None):
    """The samples of generate_reflow_pairs' shards in `folder`, in pair order, their noise seed and the labels they
    were made for (None for an unconditional teacher's): (images_uint8, seed, labels). Missing pairs, shards of two
    generations (another teacher or settings), or shards whose metadata differs from `settings` ({key: value}, e.g.
    the teacher's hash) are a ValueError.

    Usage: images_uint8, seed, labels = load_reflow_pairs("out/pairs", 100_000, {"teacher_sha256": teacher_hash})
    """
    paths = sorted(Path(folder).glob("pairs_*.pt"))
    shards = [load_checkpoint(path) for path in paths]
    keys = [{"num_classes": None, **{name: value for name, value in shard.items()  # num_classes: None in older shards
                                     if name not in ("first", "count", "images_uint8", "labels")}} for shard in shards]
    for path, key in [(path, key) for path, key in zip(paths, keys) if key != keys[0]][:1]:
        name = next(name for name in sorted(key.keys() | keys[0].keys()) if key.get(name) != keys[0].get(name))
        raise ValueError(f"{folder} mixes pairs of two generations: {name} {keys[0].get(name)!r} in {paths[0].name}, "
                         f"{key.get(name)!r} in {path.name}")
    for name in [name for name in settings or {} if keys and keys[0].get(name) != settings[name]][:1]:
        raise ValueError(f"{folder} holds pairs of another generation ({name} {keys[0].get(name)!r} there, "
                         f"{settings[name]!r} here)")
    firsts = [shard["first"] for shard in shards]
    if firsts != sorted(firsts) or sum(shard["count"] for shard in shards) != num_pairs or any(
            a["first"] + a["count"] != b["first"] for a, b in zip(shards, shards[1:])):
        raise ValueError(f"{folder} does not hold the {num_pairs} pairs of one generation "
                         f"({len(shards)} shards, {sum(shard['count'] for shard in shards)} pairs)")
    labels = torch.cat([shard["labels"] for shard in shards]) if keys[0]["num_classes"] else None
    return torch.cat([shard["images_uint8"] for shard in shards]), shards[0]["seed"], labels


class ReflowPairLoader:
    """Batches {"noise": x0, "data": x1} of reflow pairs (load_reflow_pairs' images and seed) for
    rectified_flow_loss: the samples stay one uint8 tensor on the device, the noise is regenerated
    per pair. Order, DDP shares and resume as DeviceImageLoader: set_epoch(epoch, skip_batches=k).
    With `labels` (a class-conditional teacher's pairs) each batch holds the pairs' "labels" too.

    Usage: images_uint8, seed, labels = load_reflow_pairs("out/pairs", 100_000)
           loader = ReflowPairLoader(images_uint8, seed, 128, labels=labels, device="cuda")
    """

    def __init__(self, images_uint8, noise_seed, batch_size, *, device="cpu", seed=0, rank=0, world_size=1,
                 labels=None):
        self.device = torch.device(device)
        self.images_uint8 = images_uint8.to(self.device, non_blocking=True)
        self.labels = None if labels is None else labels.to(self.device, non_blocking=True)
        self.noise_seed, self.batch_size, self.seed, self.rank, self.world_size = (
            noise_seed, batch_size, seed, rank, world_size)
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self):
        return len(self.images_uint8) // self.world_size // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.images_uint8), generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch))[self.rank::self.world_size]
        for batch in range(self.skip_batches, len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            noise = _pair_noise(index.tolist(), self.noise_seed, self.images_uint8.shape[1:])
            index = index.to(self.device)
            batch = {"noise": noise.to(self.device, non_blocking=True),
                     "data": self.images_uint8[index].float().div_(127.5).sub_(1.0)}
            yield batch if self.labels is None else {**batch, "labels": self.labels[index]}


# ----------------------------------------------------------------------------- metrics

def per_class_precision_recall(y_true, y_pred, num_classes):
    """(precision, recall, support) lists, one value per class; a class never predicted (or absent)
    has precision (recall) 0.0.
    Usage: precision, recall, support = per_class_precision_recall([0, 1, 1], [0, 1, 0], 2)
    """
    confusion = np.bincount(np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64),
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    true_positive, n_predicted, n_true = confusion.diagonal(), confusion.sum(axis=0), confusion.sum(axis=1)
    precision = (true_positive / np.maximum(n_predicted, 1)).tolist()
    recall = (true_positive / np.maximum(n_true, 1)).tolist()
    return precision, recall, n_true.tolist()


def f1_scores(y_true, y_pred, num_classes):
    """(per-class F1 list, macro-F1), from per_class_precision_recall. A class that occurs in neither y_true nor
    y_pred has no F1 (NaN) and is left out of macro-F1, the mean over the classes that occur in either: a class
    without images then neither scores 0 nor caps the mean. That is sklearn's f1_score(average="macro",
    zero_division=0) on the labels it finds, and torchmetrics' MulticlassF1Score(average="macro"); its
    average=None gives 0.0 where this gives NaN. A class with precision and recall 0 (predicted but absent,
    or never found) has F1 0.0 and counts. Macro-F1 of no labels at all is NaN.
    Usage: f1, macro_f1 = f1_scores([0, 1, 1], [0, 1, 0], 3)  # [0.667, 0.667, nan], 0.667
    """
    precision, recall, _ = per_class_precision_recall(y_true, y_pred, num_classes)
    occurring = set(np.asarray(y_true, dtype=np.int64).tolist()) | set(np.asarray(y_pred, dtype=np.int64).tolist())
    f1 = [(2 * p * r / (p + r) if p + r else 0.0) if label in occurring else math.nan
          for label, (p, r) in enumerate(zip(precision, recall))]
    present = [value for value in f1 if value == value]
    return f1, sum(present) / len(present) if present else math.nan


def weighted_f1_score(y_true, y_pred, weights):
    """A competition's score: sum over the classes of weights[c] * F1_c (f1_scores' per-class F1, one weight
    per class), so its maximum is sum(weights). A class that occurs in neither y_true nor y_pred, which has
    no F1 there, counts 0 here, as in torchmetrics' MulticlassF1Score(average=None); so does a class that is
    never found or only wrongly predicted.
    Usage: score = weighted_f1_score([0, 1, 2, 2], [0, 1, 2, 1], [2.0, 1.5, 1.0])  # 2 * 1 + 1.5 * 2/3 + 1 * 2/3
    """
    f1, _ = f1_scores(y_true, y_pred, len(weights))
    return float(sum(weight * value for weight, value in zip(weights, f1) if value == value))


def weights_by_name(weights, class_names, default=1.0):
    """One weight per class of `class_names`, from {class name: weight}; a class not named gets `default`.
    ValueError names the keys that are no class.
    Usage: weights = weights_by_name({"高风险": 2.0, "中风险": 1.5}, class_names)  # a score's class weights
    """
    unknown = sorted(set(weights) - set(class_names))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: no class of {', '.join(class_names)}")
    return [float(weights.get(name, default)) for name in class_names]


def classification_scores(y_true, y_pred, weights):
    """{"acc": accuracy in percent, "macro_f1", "score": weighted_f1_score with `weights` (one per class), "f1":
    f1_scores' per-class list (NaN: a class in neither)} of class indices.
    Usage: scores = classification_scores(labels, logits.argmax(dim=1), [2.0, 1.5, 1.0]); print(scores["score"])
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    f1, macro_f1 = f1_scores(y_true, y_pred, len(weights))
    return {"acc": 100.0 * float((y_true == y_pred).mean()) if len(y_true) else math.nan, "macro_f1": macro_f1,
            "score": weighted_f1_score(y_true, y_pred, weights), "f1": f1}


def fit_class_offsets(probs, labels, weights, *, grid=None, rounds=10):
    """Per-class offsets b on the log-probabilities that raise weighted_f1_score(labels, argmax(log probs + b),
    weights) on held-out (out-of-fold) predictions: a coordinate search from b = 0, setting one class's
    offset at a time to the best value of `grid` (default -3 to 3 in steps of 0.05) with the others fixed,
    a change kept only when it raises the score, until a round over the classes changes nothing (at most
    `rounds`). So the score never falls. Returns (offsets as a list of floats, score before, score after);
    apply_class_offsets(probs, offsets) predicts with them.
    Usage: offsets, before, after = fit_class_offsets(oof_probs, oof_labels, [2.0, 1.5, 1.0, 1.0, 1.0])
    """
    labels = np.asarray(labels, dtype=np.int64)
    grid = np.arange(-60, 61) / 20 if grid is None else np.asarray(grid, dtype=np.float64)
    offsets = [0.0] * len(weights)

    def score(trial):
        return weighted_f1_score(labels, apply_class_offsets(probs, trial).numpy(), weights)
    before = best = score(offsets)
    for _ in range(rounds):
        changed = False
        for label in range(len(weights)):
            for value in grid.tolist():
                trial = offsets[:label] + [value] + offsets[label + 1:]
                trial_score = score(trial)
                if trial_score > best:
                    best, offsets, changed = trial_score, trial, True
        if not changed:
            break
    return offsets, before, best


def warn_of_absent_classes(labels, class_names, where, metric):
    """One warning naming the classes without an image in `labels` (class indices): `metric` averages
    the others (f1_scores), and a class in neither labels nor predictions has no F1.
    Usage: warn_of_absent_classes(val_set.labels, ["cat", "dog"], "the validation set", "val_macro_f1")
    """
    present = set(labels)
    absent = [repr(name) for index, name in enumerate(class_names) if index not in present]
    if absent:
        warnings.warn(f"{where} has no image of class(es) {', '.join(absent)}: {metric} is the mean over the classes "
                      f"that occur in its labels or predictions, and a class in neither has no F1", stacklevel=2)


FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_WEIGHTS_ENV = "WBFLOW_FID_WEIGHTS"


def _avg_pool_valid_only(x):
    # TensorFlow's average pool ignores the zero padding at borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(torchvision.models.inception.InceptionA):
    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_valid_only(x))], 1)


class _FIDInceptionC(torchvision.models.inception.InceptionC):
    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = nn.Sequential(*(getattr(self, f"branch7x7dbl_{index}") for index in range(1, 6)))(x)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_valid_only(x))], 1)


class _FIDInceptionE(torchvision.models.inception.InceptionE):
    pool = staticmethod(_avg_pool_valid_only)  # FIDInceptionV3's last one max-pools instead

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))], 1)


class FIDInceptionV3(torchvision.models.inception.Inception3):
    """Inception v3 as in the FID TensorFlow graph; state_dict keys match pytorch-fid's weights.

    Input: (N, 3, 299, 299) floats in [-1, 1]. Output: (pool features (N, 2048), logits without
    the fc bias (N, 1008)) from one pass; the unbiased logits are what the original IS code used.
    Usage: features, logits_unbiased = FIDInceptionV3()(images_minus1_to_1)
    """

    def __init__(self):
        inception = torchvision.models.inception
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False, inception_blocks=[
            inception.BasicConv2d, _FIDInceptionA, inception.InceptionB, _FIDInceptionC, inception.InceptionD,
            _FIDInceptionE, inception.InceptionAux])
        # The TF graph's last block max-pools here, unlike the paper; the published numbers use it.
        self.Mixed_7c.pool = lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        for block in list(self.children())[:-3]:  # from Conv2d_1a_3x3 to Mixed_7c: not avgpool, dropout, fc
            x = block(x)
        pool_features = x.mean(dim=(2, 3))
        return pool_features, pool_features @ self.fc.weight.T


def fid_weights_path(weights_path=None, *, pass_as="weights_path=PATH"):
    """Path of the FID Inception weights: argument, then $WBFLOW_FID_WEIGHTS, then the torch hub
    cache, downloading pytorch-fid's release file there once when online. Else one FileNotFoundError
    says where to put the file, or to pass it as `pass_as` (how your program names the setting).
    Usage: path = fid_weights_path()  # e.g. ~/.cache/torch/hub/checkpoints/pt_inception-...pth
    """
    path = weights_path or os.environ.get(FID_WEIGHTS_ENV)
    if path and os.path.isfile(path):
        return str(path)
    try:
        if not path:
            return _hub_cached_file(FID_WEIGHTS_URL, "the FID Inception weights", "")
        found = f"file {path} does not exist"
    except FileNotFoundError:
        found = "could not be downloaded"
    hub_path = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)
    raise FileNotFoundError(f"the FID Inception weights {found}: download {FID_WEIGHTS_URL} to {hub_path}, or "
                            f"anywhere and pass {pass_as} (or set ${FID_WEIGHTS_ENV})")


def load_fid_inception(weights_path=None, device="cpu", fuse=True):
    """Load the FID Inception v3 in eval mode (strict keys, weights_only=True). It is built on the
    meta device, so loading it draws nothing from the global random generator.

    fuse=True folds BatchNorm into the convolutions (torch.nn.utils.fuse_conv_bn_eval): faster, same
    features within float32 rounding, but its state_dict no longer matches the weights file. Either
    way the model is channels_last.
    Usage: inception = load_fid_inception("pt_inception-2015-12-05-6726825d.pth", device="cuda")
    """
    path = fid_weights_path(weights_path)
    with torch.device("meta"):
        model = FIDInceptionV3()
    try:
        model.load_state_dict(load_checkpoint(path), strict=True, assign=True)
    except (RuntimeError, TypeError) as error:  # other keys or shapes, or no dict of tensors
        raise ValueError(f"{path} does not have the keys and shapes of pytorch-fid's {FID_WEIGHTS_FILE}: "
                         f"{error}") from None
    model.eval()
    if fuse:
        for module in model.modules():
            if isinstance(module, torchvision.models.inception.BasicConv2d):
                module.conv, module.bn = torch.nn.utils.fuse_conv_bn_eval(module.conv, module.bn), nn.Identity()
    return model.requires_grad_(False).to(device, memory_format=torch.channels_last)


def file_sha256(path):
    """Hex SHA-256 of a file, read in 1 MiB chunks; keys statistics caches to the weights used.
    Usage: key = file_sha256(fid_weights_path())[:12]
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):  # hashlib.file_digest does this from Python 3.11 on
            digest.update(chunk)
    return digest.hexdigest()


def images_sha256(images):
    """Hex SHA-256 of a tensor's bytes: says which images a run trains on, or FID statistics were computed from.
    Usage: config["data"]["images_sha256"] = images_sha256(train_images_uint8)
    """
    return hashlib.sha256(images.detach().cpu().contiguous().numpy()).hexdigest()


def _resize_like_tensorflow(images, size):
    # torch-fidelity 0.4.0's interpolate_bilinear_2d_like_tensorflow1x (align_corners=False, "slow"):
    # TF 1.x's legacy bilinear (source = destination * in/out, no half-pixel offset), with the same
    # float32 operations in the same order, so the resized pixels are bit-identical to its.
    def taps(in_size):
        source = (torch.arange(size, dtype=torch.float32, device=images.device)
                  * torch.tensor(in_size / size, dtype=torch.float32))
        low = source.long()
        return low, (low + 1).clamp_max(in_size - 1), source - low.float()

    row_low, row_high, row_fraction = taps(images.shape[2])
    column_low, column_high, column_fraction = taps(images.shape[3])
    top, bottom = images[:, :, row_low], images[:, :, row_high]
    top_left, bottom_left = top[:, :, :, column_low], bottom[:, :, :, column_low]
    top = top_left + (top[:, :, :, column_high] - top_left) * column_fraction
    bottom = bottom_left + (bottom[:, :, :, column_high] - bottom_left) * column_fraction
    return top + (bottom - top) * row_fraction[:, None]


def _preprocess(images, resize, quantize=True, size=299):
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("float images must be in [0, 1] (model outputs in [-1, 1]: images_to_uint8 first)")
        if quantize:  # what saving a PNG keeps: torchvision.utils.save_image's rounding
            images = (images.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    images_255 = images.expand(-1, 3, -1, -1).float() * (1 if images.dtype == torch.uint8 else 255)
    if resize == "tensorflow":
        return (_resize_like_tensorflow(images_255, size) - 128) / 128
    if resize == "pytorch-fid":
        return 2 * F.interpolate(images_255 / 255, size=(size, size), mode="bilinear", align_corners=False) - 1
    raise ValueError(f"resize must be 'tensorflow' or 'pytorch-fid', not {resize!r}")


def fid_reference(resize="tensorflow"):
    """Which published implementation a number computed with this resize mode reproduces.
    Usage: wandb.log({"fid": fid(real, fake), "fid_reference": fid_reference()})
    """
    return {"tensorflow": "TensorFlow FID / torch-fidelity 0.4.0 inception-v3-compat",
            "pytorch-fid": "pytorch-fid 0.3.0 InceptionV3"}[resize]


def _image_batches(images, batch_size, num_images):
    # batches of a tensor, of an iterable of batches or (images, labels), or of a folder, num_images at most
    if isinstance(images, (str, os.PathLike)):
        images = _folder_batches(images, batch_size)
    if torch.is_tensor(images):
        images = images[:num_images].split(batch_size)
    remaining = float("inf") if num_images is None else num_images
    for batch in images:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        if remaining <= 0:
            return
        yield batch[:remaining] if remaining < len(batch) else batch
        remaining -= len(batch)


def _folder_batches(folder, batch_size):
    # pytorch-fid's file types, its sorted order and its PIL .convert("RGB") (gray, palette and
    # 16-bit images become 8-bit RGB); consecutive images of one size share a batch. pytorch-fid reads
    # every such name and fails on one that does not decode, so a number is only ever over the files it
    # reads: one that does not decode (truncated, a folder, a FIFO that would block) is refused, with
    # their count and the first few, not skipped. Checked at the call, so a caller can check each folder
    # before the Inception runs on any.
    from PIL import Image
    extensions = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is neither a folder of images nor an .npz of statistics")
    paths = sorted(path for path in Path(folder).iterdir() if path.suffix.lower() in extensions)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(extensions))}) in {folder}")
    with warnings.catch_warnings():  # its "skipped" warning: these are refused instead
        warnings.simplefilter("ignore")
        readable = {path for path, _ in drop_unreadable_images([(str(path), None) for path in paths])}
    bad = [path.name for path in paths if str(path) not in readable]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} of its {len(paths)} image file(s) cannot be read (not a regular "
                         f"file, or truncated or damaged): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
                         f"remove or replace them")

    def batches():
        batch = []
        for path in paths:
            with Image.open(path) as image:
                image_uint8 = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            if batch and (len(batch) == batch_size or batch[0].shape != image_uint8.shape):
                yield torch.stack(batch)
                batch = []
            batch.append(image_uint8)
        yield torch.stack(batch)
    return batches()


def inception_features(images, inception=None, *, resize="tensorflow", batch_size=50,
                       num_images=None, weights_path=None, device="cpu", quantize=True, progress=False):
    """One Inception pass per batch -> (pool features (N, 2048), unbiased logits (N, 1008)), float32
    on the CPU, gathered over all ranks under torch.distributed (rank order).

    images: (N, 3, H, W) or (N, 1, H, W) uint8 in 0..255 or float in [0, 1]; an iterable of such
    batches or of (images, labels) pairs; or a folder of image files (png, jpg, jpeg, bmp, ppm, pgm,
    tif, tiff, webp; read as pytorch-fid reads them; like pytorch-fid it refuses a file of these that
    does not decode, here in one ValueError naming them before the first batch: a truncated or damaged
    image, a FIFO, a folder; nothing is skipped, so a number is over every file). Float images are
    rounded to uint8 first, as saving them to PNG does, so a number is the same as for the saved
    files; quantize=False feeds the unrounded floats instead. progress=True shows a tqdm bar of the batches.
    Usage: features, logits = inception_features(images_uint8, load_fid_inception(device="cuda"))
    """
    from tqdm.auto import tqdm
    inception = inception or load_fid_inception(weights_path, device)
    model_device = next(inception.parameters()).device
    outputs = []
    batches = tqdm(_image_batches(images, batch_size, num_images), desc="Inception", unit="batch", leave=False,
                   disable=not progress, dynamic_ncols=True,
                   total=math.ceil(len(images[:num_images]) / batch_size) if torch.is_tensor(images) else None)
    # TF32 convolutions or matmuls would move features by ~1e-3, past the references' agreement.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = _preprocess(batch.to(model_device), resize, quantize)
                features, logits = inception(batch.contiguous(memory_format=torch.channels_last))
                outputs.append((features.float(), logits.float()))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if not outputs:
        raise ValueError("no images to compute Inception features from")
    per_rank = gather_from_ranks([torch.cat(parts).cpu() for parts in zip(*outputs)])
    return tuple(torch.cat(parts) for parts in zip(*per_rank))  # (features, logits)


def feature_statistics(features):
    """Mean and unbiased covariance (float64 numpy) of (N, D) features, as pytorch-fid stores them;
    ValueError for fewer than two rows (FID needs at least two images per side).
    Usage: mu, sigma = feature_statistics(features)
    """
    features = torch.as_tensor(features).double()
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least two images per side to estimate a covariance, got {features.shape[0]}")
    return features.mean(dim=0).numpy(), torch.cov(features.T).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, without sqrtm.

    tr sqrt(S1 S2) = sum sqrt(eig(L^T S2 L)) with S1 = L L^T (Cholesky; a symmetric eigensolve of a
    PSD matrix, so no complex parts); a singular S1 (fewer samples than dims) uses L = V sqrt(Λ) of its
    eigendecomposition, restricted to its rank, so the product to solve is rank x rank.
    Raises ValueError for statistics that are no Gaussian: mismatched shapes, NaN or inf, or a
    covariance that is not symmetric or has a negative eigenvalue beyond the rounding of its dtype.
    Usage: distance = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    """
    import scipy.linalg
    from scipy.linalg import blas
    given = {"mu1": mu1, "sigma1": sigma1, "mu2": mu2, "sigma2": sigma2}
    # rounding allowed for (the coarser of) the dtypes given, e.g. float32 statistics files
    epsilon = max(np.finfo(np.float64).eps, *(np.finfo(np.asarray(value).dtype).eps for value in given.values()
                                              if np.issubdtype(np.asarray(value).dtype, np.floating)))
    mu1, sigma1, mu2, sigma2 = (np.asarray(value, dtype=np.float64) for value in given.values())
    if not (mu1.ndim == 1 and mu2.shape == mu1.shape and sigma1.shape == sigma2.shape == mu1.shape * 2):
        raise ValueError(f"statistics must be mu (D,) and sigma (D, D) on both sides; got mu1 {mu1.shape}, "
                         f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    for name, value in zip(given, (mu1, sigma1, mu2, sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} holds NaN or inf")
        if value.ndim == 2 and np.abs(value - value.T).max() > np.sqrt(epsilon) * np.abs(value).max():
            raise ValueError(f"{name} is not symmetric, so it is no covariance matrix")

    def positive_part(eigenvalues, name):
        # Eigenvalues that are zero in exact arithmetic come out as +-eps * largest, and more when the covariance
        # carries the rounding of its own computation from the data (a constant feature next to large means);
        # their square roots (thousands of them) would add a visible bias when covariances are singular, so
        # they count as 0. A negative eigenvalue beyond sqrt(eps) of the largest is no rounding: no covariance.
        largest = np.abs(eigenvalues).max(initial=0.0)
        if eigenvalues.min(initial=0.0) < -np.sqrt(epsilon) * largest:
            raise ValueError(f"{name} is not positive semi-definite (eigenvalue {eigenvalues.min():.3g})")
        return np.where(eigenvalues > largest * eigenvalues.size * epsilon, eigenvalues, 0.0)

    try:
        factor = scipy.linalg.cholesky(sigma1, lower=True, check_finite=False)
        # L^T (S2 L) as two triangular products (BLAS trmm): half the work of general matmuls. L is
        # invertible, so the product has the signs of S2's eigenvalues (Sylvester's law of inertia).
        product = blas.dtrmm(1.0, factor, blas.dtrmm(1.0, factor, sigma2, side=1, lower=1), lower=1, trans_a=1)
    except np.linalg.LinAlgError:  # S1 singular: S1 = L L^T with L = V sqrt(eigenvalues), only its rank's columns
        eigenvalues, eigenvectors = scipy.linalg.eigh(sigma1, check_finite=False)
        positive = positive_part(eigenvalues, "sigma1")
        factor = eigenvectors[:, positive > 0] * np.sqrt(positive[positive > 0])
        # L^T S2 L (rank x rank) sees S2 only on the range of S1, so S2's signs are checked on their own
        positive_part(scipy.linalg.eigh(sigma2, eigvals_only=True, driver="evr", check_finite=False), "sigma2")
        product = factor.T @ sigma2 @ factor
    eigenvalues = scipy.linalg.eigh((product + product.T) / 2, eigvals_only=True, driver="evr", check_finite=False)
    trace_sqrt_product = np.sqrt(positive_part(eigenvalues, "sigma2")).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product)


def _npz_statistics(path):
    # [mu, sigma] of an .npz as save_statistics and pytorch-fid write it; anything else is a ValueError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path}")
    if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
        raise ValueError(f"{path} is not an .npz file (no zip archive), so it holds no FID statistics")
    try:
        with np.load(path, allow_pickle=False) as stored:
            if not {"mu", "sigma"} <= set(stored.files):
                raise ValueError(f"{path} holds {', '.join(stored.files) or 'no arrays'}, not the FID statistics "
                                 f"mu and sigma")
            return [stored["mu"], stored["sigma"]]
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is a damaged .npz file ({error})") from None


def _metric_inputs(sources, need, inception, weights_path, device, **options):
    # fid's, kid's and inception_score's inputs as `need`: "statistics" [mu, sigma], "features" (N, D) or "logits"
    # (N, 1008). An .npz path or (mu, sigma) is statistics and a 2-d array features or logits, as given; anything
    # else is images (a tensor, batches, a folder) for the Inception, loaded once and only for them; every
    # folder is checked before the Inception runs on any.
    sources = [_folder_batches(source, options["batch_size"]) if isinstance(source, (str, os.PathLike))
               and not str(source).endswith(".npz") else source for source in sources]
    results = []
    for source in sources:
        npz = isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz")
        mu_sigma = isinstance(source, (tuple, list)) and [len(getattr(part, "shape", ())) for part in source] == [1, 2]
        if (npz or mu_sigma) and need != "statistics":
            raise ValueError(f"mu and sigma hold no {need}: pass the images or their {need}")
        if npz or mu_sigma:
            results.append(_npz_statistics(source) if npz else list(source))
            continue
        if not (hasattr(source, "shape") and len(source.shape) == 2):
            if inception is None:
                inception = load_fid_inception(weights_path, device)
            features, logits = inception_features(source, inception, **options)
            source = logits if need == "logits" else features
        values = np.asarray(source.cpu() if torch.is_tensor(source) else source)
        results.append(feature_statistics(values) if need == "statistics" else values)
    return results


def fid(real, fake, *, resize="tensorflow", batch_size=50, device="cpu", num_images=None,
        weights_path=None, inception=None, quantize=True):
    """Fréchet Inception Distance between two image sets; resize picks the reference it reproduces:
    "tensorflow" (TF original, torch-fidelity 0.4.0: the CIFAR-10 numbers in papers) or
    "pytorch-fid" (pytorch-fid 0.3.0).

    Each side: images (N, 3, H, W) or (N, 1, H, W), uint8 0..255 or float [0, 1]; an
    iterable/DataLoader of such batches or (images, labels) pairs; a folder of image files;
    features (N, D); (mu, sigma); or an .npz path with mu/sigma. Float images are rounded to uint8
    first, as saving them to PNG does (quantize=False skips that). num_images caps the images read
    from each side. Under torch.distributed each rank passes its shard of images and every rank
    gets the FID over all of them; features and statistics are taken as given. Fewer than two
    images on a side, an .npz that holds no mu and sigma, or a folder with a file that does not
    decode (inception_features: refused as pytorch-fid does, not skipped) is a ValueError.
    Usage: score = fid("stats/cifar10-train-tensorflow-6726825d.npz", samples_uint8, device="cuda")
    """
    (mu1, sigma1), (mu2, sigma2) = _metric_inputs((real, fake), "statistics", inception, weights_path, device,
                                                  resize=resize, batch_size=batch_size, num_images=num_images,
                                                  quantize=quantize)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def kid(real, fake, *, subsets=100, subset_size=1000, degree=3, gamma=None, coef0=1, seed=2020,
        resize="tensorflow", batch_size=50, device="cpu", num_images=None, weights_path=None,
        inception=None, quantize=True):
    """Kernel Inception Distance (mean, population std over `subsets` random subsets): the unbiased
    MMD² between `subset_size` features of each side under the kernel (x·y gamma + coef0)^degree,
    gamma = 1/D when None. Equal to torch-fidelity 0.4.0's kernel_inception_distance_mean/_std for
    the same features and settings: the same numpy RandomState(seed) draws, in the features' dtype.

    Each side: features (N, D), or images / batches / a folder as for fid (float images rounded to
    uint8 first unless quantize=False), which need the network.
    Usage: kid_mean, kid_std = kid(real_uint8, samples_uint8, subset_size=100)
    """
    if subset_size < 2 or subsets < 1:  # the unbiased MMD divides by subset_size * (subset_size - 1)
        raise ValueError(f"KID needs subsets >= 1 of subset_size >= 2 images, got subsets={subsets}, "
                         f"subset_size={subset_size}")
    real_features, fake_features = _metric_inputs((real, fake), "features", inception, weights_path, device,
                                                  resize=resize, batch_size=batch_size, num_images=num_images,
                                                  quantize=quantize)
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"features differ in width: {real_features.shape[1]} vs {fake_features.shape[1]}")
    if min(len(real_features), len(fake_features)) < subset_size:
        raise ValueError(f"KID subsets of {subset_size} need at least that many images on each side, got "
                         f"{len(real_features)} and {len(fake_features)}; pass a smaller subset_size")
    gamma = 1.0 / real_features.shape[1] if gamma is None else gamma
    m, random_state = subset_size, np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for subset in range(subsets):
        x = real_features[random_state.choice(len(real_features), m, replace=False)]
        y = fake_features[random_state.choice(len(fake_features), m, replace=False)]
        # torch-fidelity's kernel_poly and mmd2 (unbiased), expression for expression
        kernel_xx, kernel_yy, kernel_xy = ((np.matmul(a, b.T) * gamma + coef0) ** degree
                                           for a, b in ((x, x), (y, y), (x, y)))
        sum_xx = (kernel_xx.sum(axis=1) - np.diagonal(kernel_xx)).sum()
        sum_yy = (kernel_yy.sum(axis=1) - np.diagonal(kernel_yy)).sum()
        mmds[subset] = (sum_xx + sum_yy) / (m * (m - 1)) - 2 * kernel_xy.sum(axis=0).sum() / (m * m)
    return float(np.mean(mmds)), float(np.std(mmds))


def statistics_path(cache_dir, name, weights_sha256, resize="tensorflow"):
    """The file save_statistics caches `name`'s statistics in: its name carries the resize mode and the FID
    weights file's hash (file_sha256), so a cached file is reused only for the same network.
    Usage: cached = os.path.isfile(statistics_path("stats", "cifar10-train", file_sha256(fid_weights_path())))
    """
    return os.path.join(cache_dir, f"{name}-{resize}-{weights_sha256[:12]}.npz")


def save_statistics(images, cache_dir, name="statistics", *, resize="tensorflow", batch_size=50,
                    device="cpu", num_images=None, weights_path=None, overwrite=False, quantize=True, progress=False):
    """Compute mu/sigma once and save them as pytorch-fid's .npz format in statistics_path(cache_dir, name, the
    weights file's hash, resize), reused from there when it exists (images=None: that file only, else a
    FileNotFoundError). `name` must say which images they are of (e.g. with a hash of their bytes): a file of
    that name is reused for any images. A damaged file there is computed again (images=None: a ValueError).
    Float images are rounded to uint8 first, as for fid (quantize=False skips that); progress=True shows a bar
    of the Inception batches.
    Usage: cifar10_statistics = save_statistics(train_images_uint8, "stats", "cifar10-train")
           score = fid(cifar10_statistics, samples_uint8)
    """
    weights_path = fid_weights_path(weights_path)
    weights_hash = file_sha256(weights_path)
    path = statistics_path(cache_dir, name, weights_hash, resize)
    if os.path.isfile(path) and not overwrite:
        try:
            _npz_statistics(path)  # a damaged or truncated copy is no cache
            return path
        except ValueError:
            if images is None:
                raise
    if images is None:  # only the cached file was wanted
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    features, _ = inception_features(images, None, weights_path=weights_path, device=device, resize=resize,
                                     batch_size=batch_size, num_images=num_images, quantize=quantize, progress=progress)
    mu, sigma = feature_statistics(features)
    rank, world_size = rank_and_world_size()
    if rank == 0:
        write_atomically(path, lambda file: np.savez(file, mu=mu, sigma=sigma, weights_sha256=weights_hash,
                                                     resize=resize, num_images=len(features)))
    if world_size > 1:
        dist.barrier()
    return path


def cached_statistics(images, cache_dir, source="images", *, what="the FID statistics file", batch_size=50,
                      device="cpu", weights_path=None, progress=False):
    """save_statistics of `images`, cached in `cache_dir` under a name that says what they were computed from:
    `source`, the count and the images' hash (images_sha256; statistics_path adds the FID network), so a folder
    shared by runs or data folders never hands one set's statistics to another. Under torch.distributed every rank
    passes all the images and computes a share. Before the Inception pass, a cache file that cannot be written is a
    ValueError naming it as `what` (check_outputs), and missing FID weights a FileNotFoundError (fid_weights_path).
    Usage: statistics = cached_statistics(cifar10_train_uint8, "fid_stats", "cifar10-train", device="cuda")
           score = fid(statistics, samples_uint8)
    """
    rank, world_size = rank_and_world_size()
    name = f"{source}-{len(images)}-{images_sha256(images)[:16]}"
    path = statistics_path(cache_dir, name, file_sha256(fid_weights_path(weights_path)))
    if not os.path.isfile(path):
        check_outputs({what: path})
    return save_statistics(images[rank::world_size], cache_dir, name, batch_size=batch_size, device=device,
                           weights_path=weights_path, progress=progress)


def inception_score(images, *, splits=10, resize="tensorflow", batch_size=50, device="cpu",
                    num_images=None, weights_path=None, inception=None, seed=2020, quantize=True):
    """Inception Score (mean, population std over splits), equal to torch-fidelity 0.4.0's ISC:
    logits without the fc bias, shuffled with numpy RandomState(2020), KL in float64.

    images: as for fid (float images rounded to uint8 first unless quantize=False; a folder too),
    or precomputed unbiased logits (N, 1008), which need no network.
    Usage: is_mean, is_std = inception_score(samples_uint8, device="cuda")
    """
    [logits] = _metric_inputs((images,), "logits", inception, weights_path, device, resize=resize,
                              batch_size=batch_size, num_images=num_images, quantize=quantize)
    count = logits.shape[0]
    # torch-fidelity shuffles with this generator before splitting; same order, same numbers.
    shuffled = torch.as_tensor(logits)[np.random.RandomState(seed).permutation(count)].double()
    probabilities = shuffled.softmax(dim=1)
    log_probabilities = shuffled.log_softmax(dim=1)
    scores = []
    for split in range(splits):
        rows = slice(split * count // splits, (split + 1) * count // splits)
        log_marginal = probabilities[rows].mean(dim=0, keepdim=True).log()
        kl = (probabilities[rows] * (log_probabilities[rows] - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def fid_and_inception_score(images, statistics=None, *, inception=None, splits=10, batch_size=50, device="cpu",
                            weights_path=None, progress=False):
    """FID against `statistics` (any side fid takes: a save_statistics file, (mu, sigma), features; None: no
    FID) and the Inception Score (mean, std; at most one split per image) of `images`, from one Inception
    pass (inception_features): (fid or None, (is_mean, is_std)). Under torch.distributed each rank passes
    its share of the images and every rank gets the scores over all of them.
    Usage: fid_score, (is_mean, is_std) = fid_and_inception_score(samples_uint8, "stats/cifar10-train.npz")
    """
    features, logits = inception_features(images, inception, batch_size=batch_size, device=device,
                                          weights_path=weights_path, progress=progress)
    score = None if statistics is None else fid(statistics, features)
    return score, inception_score(logits, splits=min(splits, len(logits)))


def sample_and_score(velocity, count, statistics=None, *, device="cpu", solver="euler", nfe=100, tolerance=1e-5,
                     amp_dtype=None, batch_size=500, seed=0, inception_batch_size=50, weights_path=None, stop=None,
                     progress=False):
    """FID against `statistics` (None: no FID) and the Inception Score of `count` samples of the velocity callable,
    for the FID curve during training and a checkpoint's evaluation alike: sample_images' samples (solver, nfe,
    tolerance, amp_dtype, batch_size as there), then one Inception pass (fid_and_inception_score). Under
    torch.distributed every rank calls it: each samples its share from its own seeded noise (seed + rank), `stop`
    (a callable) is checked between batches and a stop on any rank stops them all, and every rank gets the scores
    over all samples. Returns ((fid or None, (is_mean, is_std)), this rank's samples uint8, the evaluations a
    sample used), or None after a stop.

    Usage: (fid_score, (is_mean, is_std)), samples_uint8, nfe_used = sample_and_score(ema.module.eval(), 10_000, stats)
    """
    rank, world_size = rank_and_world_size()
    samples_uint8, used = sample_images(  # as many batches on every rank, so as many stop checks
        velocity, -(-count // world_size), device=device, solver=solver, nfe=nfe, tolerance=tolerance,
        amp_dtype=amp_dtype, batch_size=batch_size, seed=seed + rank, progress=progress,
        stop=None if stop is None else lambda: any(gather_from_ranks(bool(stop()))))
    if samples_uint8 is None:
        return None
    samples_uint8 = samples_uint8[:len(range(rank, count, world_size))]  # count in all, in rank order
    scores = fid_and_inception_score(samples_uint8, statistics, inception=load_fid_inception(weights_path, device),
                                     batch_size=inception_batch_size, progress=progress)
    return scores, samples_uint8, used


# ----------------------------------------------------------------------------- images & W&B

class _GuardedRun:
    """Calls on `target` (a wandb Run, its summary, its methods, ...) that warn once instead of raising;
    falsy, and doing nothing, when `target` is None."""

    def __init__(self, target, failures):
        self._target, self._failures = target, failures

    def __bool__(self):
        return self._target is not None

    def __call__(self, *args, **kwargs):
        if self._target is None:
            return None
        try:
            return self._target(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - W&B trouble must never stop training
            if not self._failures:
                print(f"wbflow: W&B {getattr(self._target, '__name__', 'call')} failed ({type(error).__name__}: "
                      f"{error}); training goes on, further W&B errors are not shown", file=sys.stderr)
            self._failures.append(error)

    def __setitem__(self, key, value):  # run.summary[key] = value
        self.__getattr__("__setitem__")(key, value)

    def __getattr__(self, name):
        if self._target is None:
            return self
        value = getattr(self._target, name)  # plain values (run.id, settings.mode) as they are
        return (_GuardedRun(value, self._failures) if callable(value) or type(value).__module__.startswith("wandb")
                else value)


def _open_run(init_timeout, init_kwargs):
    """wandb.init(**init_kwargs), offline without credentials (WANDB_MODE unset) or when the server does not answer."""
    import wandb
    # wandb has no public call that says whether wandb.init finds credentials without prompting:
    # wandb.login(prompt=False) asks the server whom the key belongs to, wandb.Api() prompts. read_netrc_auth is
    # private API, named here only; test_a_netrc_entry_for_the_configured_host_counts_as_credentials fails if it moves
    from wandb.sdk.lib.wbauth import read_netrc_auth
    settings = wandb.setup().settings  # what wandb.init reads: settings files and WANDB_* variables
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
                             or settings.api_key or read_netrc_auth(host=settings.base_url)):
        mode = "offline"
        print(f"wbflow: no W&B credentials for {settings.base_url} (WANDB_API_KEY or `wandb login`), "
              "logging offline", file=sys.stderr)
    # WANDB_DIR is read here, not left to wandb, which caches settings for the life of the process.
    # wandb-core writes the record to disk every x_transaction_log_flush_interval seconds (an experimental
    # setting of wandb >= 0.31; 15 by default) and when the run finishes: 0.1 lets flush_run wait for it at an
    # epoch's end. test_flush_run_puts_the_pending_row_on_disk_while_the_run_goes_on fails if wandb drops it.
    flush_every = "x_transaction_log_flush_interval"
    flush = {flush_every: 0.1} if flush_every in wandb.Settings.model_fields else {}
    init_kwargs = {"dir": os.environ.get("WANDB_DIR"), "settings": wandb.Settings(init_timeout=init_timeout, **flush),
                   **init_kwargs}
    runs_dir = Path(init_kwargs["dir"] or settings.root_dir) / "wandb"
    records_before = set(runs_dir.glob("run-*/*.wandb"))
    try:
        run = wandb.init(mode=mode, **init_kwargs)
    except wandb.errors.CommError as error:  # a key but no server: keep the whole record offline
        for record in set(runs_dir.glob("run-*/*.wandb")) - records_before:  # the failed attempt's: nothing to
            record.unlink(missing_ok=True)  # sync; its logs stay, which wandb names at exit
        print(f"wbflow: W&B server {settings.base_url} did not answer ({str(error).splitlines()[0]}), "
              "logging offline", file=sys.stderr)
        run = wandb.init(mode="offline", **init_kwargs)
    if run.offline:
        print(f"wbflow: W&B is offline; upload this run later with: wandb sync {run.settings.sync_dir}",
              file=sys.stderr)
    return run


@contextlib.contextmanager
def wandb_run(config=None, project="wbflow", *, enabled=True, run_id=None, init_timeout=10, **init_kwargs):
    """Open a W&B run for a `with` block and always finish it; yields the run behind a guard.

    The guard never lets W&B stop training: a failing call (log, log_artifact, summary[...] = ...)
    prints one warning, returns None, and later failures are silent. When W&B is off the guard is
    falsy and every call on it does nothing, so `run.log({...})` needs no `if`. W&B is off (one line
    says why) when `enabled` is false, WANDB_MODE=disabled, wandb is not installed, wandb.init fails,
    or on a torch.distributed rank other than 0. Without credentials for the configured server
    (wandb's own settings, WANDB_API_KEY, or the netrc entry `wandb login` wrote) and with WANDB_MODE
    unset, it logs offline; when the server does not answer within `init_timeout` seconds it logs
    offline too (the failed attempt leaves its logs, no record to sync). Either way a line gives the
    `wandb sync` command for the run's folder. The record is written to disk every 0.1 s (wandb >= 0.31),
    which flush_run waits for. `run_id` resumes that run (resume="allow"). WANDB_DIR is honoured; other
    keyword arguments go to wandb.init (entity, name, tags, notes...). The run finishes with exit code 1
    if the block raises.
    Usage: with wandb_run({"lr": 2e-4}, project="flow") as run: run.log({"loss": 0.1}, step=1)
    """
    run = None
    if enabled and rank_and_world_size()[0] == 0 and os.environ.get("WANDB_MODE") != "disabled":
        try:
            run = _open_run(init_timeout, {"project": project, "config": config, "id": run_id,
                                           "resume": "allow" if run_id else None, **init_kwargs})
        except Exception as error:  # noqa: BLE001 - W&B trouble must never stop training
            missing = isinstance(error, ModuleNotFoundError) and error.name == "wandb"
            why = ("wandb is not installed (pip install wandb)" if missing
                   else f"wandb.init failed ({type(error).__name__}: {error})")
            print(f"wbflow: {why}; W&B logging is off", file=sys.stderr)
    guarded = _GuardedRun(run, [])
    try:
        yield guarded
    except BaseException:
        guarded.finish(exit_code=1)
        raise
    guarded.finish()


def define_metrics(run, summaries, step_metric, *, global_step=()):
    """Declare a run's metrics: each key (or glob) of `summaries` plotted against `step_metric`, or against
    W&B's global step when it starts with one of `global_step` (per-step series), its summary holding
    summaries[key] ("min", "max", "last" or None) rather than the last value. Nothing without a run.
    Usage: define_metrics(run, {"train_loss": "min", "val_acc": "max"}, "epoch", global_step=("train_",))
    """
    if run:
        run.define_metric(step_metric)
        for key, summary in summaries.items():
            run.define_metric(key, step_metric=None if key.startswith(tuple(global_step)) else step_metric,
                              summary=summary)


def flush_run(run, timeout=2.0):
    """Commit the run's pending history row and wait (at most `timeout` seconds) until W&B's service has
    written the run's record (run-*.wandb) to disk, so that a process killed after it (kill -9, the OOM
    killer) keeps all it logged before; a no-op without a run.

    Why it takes this: W&B holds the row of step s until a later step or a commit, and its service process
    buffers the record, writing it every x_transaction_log_flush_interval seconds (wandb_run sets 0.1 where
    wandb has the setting) and when the run finishes; when the training process dies, the service exits
    at once without writing what it buffered. Call it after the last log of an epoch's step, right before
    that epoch's checkpoint: W&B drops a later log at the same step.
    Usage: run.log({"train/epoch_loss": loss}, step=step); flush_run(run); save_checkpoint(state, "out/last.pt")
    """
    if not run:
        return
    interval = getattr(run.settings, "x_transaction_log_flush_interval", 0)  # wandb_run's setting
    record = Path(run.settings.sync_file)
    run.log({}, commit=True)
    run.summary.keys()  # a round trip to the service, which has now turned the committed row into a record
    if not interval or not record.is_file():  # no periodic writes to wait for
        return
    size, deadline = record.stat().st_size, time.monotonic() + timeout
    while record.stat().st_size == size and time.monotonic() < deadline:
        time.sleep(0.01)


def watch_model(run, model, log="gradients", log_freq=100, log_graph=False):
    """wandb.watch `model` (gradient / parameter histograms, and W&B's graph with log_graph=True)
    every `log_freq` >= 100 steps; nothing without a run.

    Histograms are costly: more often than every 100 steps slows training, so that is refused.
    Usage: watch_model(run, model, log="all", log_freq=100)
    """
    if log_freq < 100:
        raise ValueError(f"watch_model: log_freq={log_freq} would slow training; use 100 or more")
    if run:
        run.watch(model, log=log, log_freq=log_freq, log_graph=log_graph)


def log_model_graph(run, model, example_input, step=None):
    """Log the autograd graph of model(example_input) as the image `model_graph` (torchviz, Graphviz
    `dot`), as seed 003 does; returns False, saying what to install, when either is missing.

    Usage: if not log_model_graph(run, model, images[:1]): watch_model(run, model, log_graph=True)
    """
    import importlib.util
    if importlib.util.find_spec("torchviz") is None or shutil.which("dot") is None:
        print("log_model_graph draws the graph with torchviz and Graphviz (pip install torchviz; "
              "apt-get install graphviz); logging W&B's own graph instead")
        return False
    import wandb
    from torchviz import make_dot
    was_training = model.training
    dot = make_dot(model.eval()(example_input), params=dict(model.named_parameters()))
    model.train(was_training)
    with tempfile.TemporaryDirectory() as folder:
        png = dot.render(Path(folder) / "model_graph", format="png")
        run.log({"model_graph": wandb.Image(png)}, step=step)
    return True


def log_artifact(run, path, name, type="model", aliases=("latest",), metadata=None, policy="immutable"):
    """Upload the file or folder at `path` as a new version of the W&B artifact `name`; a no-op
    returning None without a run.

    W&B moves an alias to the newest version that carries it, so with one name per run
    (f"model-{run.id}", as Lightning's WandbLogger) "name:latest" and "name:best" find the latest and
    the best model. The file is uploaded from where it is (policy="immutable"), not copied into W&B's
    staging folder (~/.local/share/wandb/artifacts/staging) for every version, so it must stay
    unchanged until uploaded (offline: until `wandb sync`); pass policy="mutable" for a file that
    will be overwritten before then.
    Usage: log_artifact(run, "checkpoints/checkpoint_epoch_10.pt", f"model-{run.id}",
                        aliases=("latest", "best", "epoch-10"), metadata={"epoch": 10})
    """
    if not run:
        return None
    import wandb
    artifact = wandb.Artifact(name, type=type, metadata=dict(metadata or {}))
    (artifact.add_dir if os.path.isdir(path) else artifact.add_file)(str(path), policy=policy)
    return run.log_artifact(artifact, aliases=list(aliases))


def use_artifact(run, path, name, type="model", metadata=None):
    """Mark the file or folder at `path` as an input of `run`: artifact `name` of `type` (W&B keeps
    one version of equal contents, so the artifact another run logged from the same files is the one
    used). Offline runs record the use as well (an artifact record to use once committed), where
    run.use_artifact refuses; wandb sync makes it the lineage.

    Usage: use_artifact(run, "runs/flow/checkpoint_epoch_100.pt", "model-1a2b3c4d")
    """
    if not run:
        return None
    import wandb
    artifact = wandb.Artifact(name, type=type, metadata=metadata)
    (artifact.add_dir if Path(path).is_dir() else artifact.add_file)(str(path))
    if not run.offline:
        return run.use_artifact(artifact)
    # private API, here only: what run.use_artifact does online with a new artifact; offline it raises instead.
    # test_smoke_reflow_logs_pairs_that_use_the_teacher_... reads the use back from the record, so a move fails it
    return run._log_artifact(artifact, is_user_created=True, use_after_commit=True)


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
    images = images if images.dtype == torch.uint8 else images_to_uint8(images)
    grid = torchvision.utils.make_grid(images.cpu(), nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2)
    return grid.permute(1, 2, 0).numpy()


def save_png(grid_uint8, path):
    """Write a uint8 (H, W, C) array as a PNG (PIL) atomically (write_atomically), creating the folder;
    returns the path as a Path.

    Usage: save_png(sample_grid(samples), "checkpoints/samples/epoch_0010.png")
    """
    from PIL import Image
    return write_atomically(path, lambda file: Image.fromarray(grid_uint8).save(file, format="PNG"))


def log_image_grid(run, key, grid_uint8, *, step=None, caption=None):
    """run.log({key: wandb.Image(grid, caption)}, step=step), or nothing without a run.

    Usage: log_image_grid(run, "eval/generated_samples", sample_grid(samples), step=global_step)
    """
    if run:
        import wandb
        run.log({key: wandb.Image(grid_uint8, caption=caption)}, step=step)


def samples_table(rows, root="."):
    """A wandb.Table with columns epoch, solver, nfe, guidance (only when rows hold one: a class-conditional
    model's, solver x NFE x guidance scale), seconds, straightness (None where a row has none), samples from rows
    holding those keys, "samples" being a uint8 grid or a PNG path relative to `root`, so solvers and NFEs compare
    side by side. Relative paths keep rows saved in a checkpoint valid when the folder moves.

    Usage: run.log({"eval/samples_table": samples_table(rows, root="checkpoints")})
    """
    import wandb
    guided = any("guidance" in row for row in rows)
    columns = ["epoch", "solver", "nfe", *["guidance"] * guided, "seconds", "straightness", "samples"]
    data = [[row["epoch"], row["solver"], row["nfe"], *[row.get("guidance")] * guided, round(row["seconds"], 3),
             row.get("straightness"),
             wandb.Image(row["samples"] if not isinstance(row["samples"], (str, os.PathLike))
                         else str(Path(root) / row["samples"]),
                         caption=f"epoch {row['epoch']} {row['solver']} NFE {row['nfe']}"
                                 + (f" guidance {row['guidance']}" if row.get("guidance") is not None else ""))]
            for row in rows]
    return wandb.Table(columns=columns, data=data)


def samples_table_rows(compared, epoch, root, *, folder="samples", straightness=None, guidance=None):
    """compare_solvers' rows as samples_table rows of `epoch` (with `straightness` in each, and the `guidance`
    scale they were sampled at for a class-conditional model): every row's images saved as a grid PNG in
    root/folder (epoch_0001_euler_nfe001.png, epoch_0001_euler_nfe001_guidance1.5.png) and named relative to
    `root`, so rows kept in a checkpoint stay valid when `root` moves.
    Usage: rows = samples_table_rows(compare_solvers(ema_model.module, noise), 10, "runs/flow")
    """
    scale = {} if guidance is None else {"guidance": guidance}
    return [{"epoch": epoch, "solver": row["solver"], "nfe": row["nfe"], **scale, "seconds": row["seconds"],
             "straightness": straightness, "samples": str(save_png(sample_grid(row["images"]), Path(root) / folder / (
                 f"epoch_{epoch:04d}_{row['solver']}_nfe{row['nfe']:03d}"
                 + (f"_guidance{guidance:g}" if scale else "") + ".png")).relative_to(root))}
            for row in compared]


def log_guidance_sweep(run, scores, *, metric="eval/fid_score", step=None):
    """Log scores against the guidance scale: `scores` is one row per scale, {"guidance": scale, name: value, ...}
    (e.g. eval/fid_score, eval/inception_score_mean; None where not computed). W&B keys: eval/guidance_table (a
    wandb.Table of the rows, by scale), eval/fid_vs_guidance (the line plot of `metric` against the scale) and in
    the summary eval/best_guidance and eval/best_<metric's name> (the lowest `metric`'s scale and value; lower is
    better, as for FID). Returns that best row (None when no row has `metric`); logs nothing without a run.

    Usage: log_guidance_sweep(run, [{"guidance": scale, **metrics} for scale, metrics in scored.items()])
    """
    rows = sorted(scores, key=lambda row: row["guidance"])
    best = min([row for row in rows if row.get(metric) is not None], key=lambda row: row[metric], default=None)
    if run:
        import wandb
        columns = list(dict.fromkeys(name for row in rows for name in row))
        table = wandb.Table(columns=columns, data=[[row.get(column) for column in columns] for row in rows])
        run.log({"eval/guidance_table": table, **({"eval/fid_vs_guidance": wandb.plot.line(
            table, "guidance", metric, title=f"{metric} against the guidance scale")} if best else {})}, step=step)
        if best:
            run.summary["eval/best_guidance"] = best["guidance"]
            run.summary[f"eval/best_{metric.rsplit('/', 1)[-1]}"] = best[metric]
    return best


def log_classification_report(run, probs, labels, class_names, *, images=None, table_rows=32, step=None):
    """Log a classifier's predictions on a set of images; returns {"precision", "recall", "support"}.

    W&B keys: `predictions`, a table (image, true, predicted, confidence) of `table_rows` samples
    spread evenly over the set (always the same ones); with labels, `confusion_matrix`
    (wandb.plot.confusion_matrix), `per_class_metrics`, a table (class, precision, recall, support), and
    precision/<class>, recall/<class> in the summary. labels=None (a test list) logs the table alone,
    without its `true` column, and returns {}. images[i][0] (or images[i]: a PIL image or a file's path)
    is the display image of sample i, e.g. an ImageSamples with image_transforms(..., normalize=False);
    without it the table has no image column. Nothing is logged when `run` is None.
    Usage: log_classification_report(run, probs, labels, ["高风险", "中风险"], images=display_set)
    """
    probs = torch.as_tensor(probs)
    confidence, predicted = probs.max(dim=1)
    labels = None if labels is None else torch.as_tensor(labels)
    precision, recall, support = (([], [], []) if labels is None else
                                  per_class_precision_recall(labels.numpy(), predicted.numpy(), len(class_names)))
    report = {} if labels is None else {"precision": precision, "recall": recall, "support": support}
    if not run:
        return report
    import wandb
    columns = (["image"] if images is not None else []) + (["true"] if labels is not None else [])
    predictions = wandb.Table(columns=columns + ["predicted", "confidence"])
    for index in np.unique(np.linspace(0, len(probs) - 1, min(table_rows, len(probs))).round().astype(int)):
        row = [class_names[int(predicted[index])], float(confidence[index])]
        if labels is not None:
            row.insert(0, class_names[int(labels[index])])
        if images is not None:
            image = images[int(index)]
            row.insert(0, wandb.Image(image[0] if isinstance(image, tuple) else image))
        predictions.add_data(*row)
    logged = {"predictions": predictions}
    if labels is not None:
        logged["confusion_matrix"] = wandb.plot.confusion_matrix(y_true=labels.tolist(), preds=predicted.tolist(),
                                                                 class_names=list(class_names))
        logged["per_class_metrics"] = wandb.Table(columns=["class", "precision", "recall", "support"],
                                                  data=[list(row) for row in zip(class_names, *report.values())])
    run.log(logged, step=step)
    for name, class_precision, class_recall in zip(class_names, precision, recall):
        run.summary[f"precision/{name}"] = class_precision
        run.summary[f"recall/{name}"] = class_recall
    return report


# ----------------------------------------------------------------------------- checkpoints

def write_atomically(path, write):
    """Create `path` through write(file) on a temporary `.NAME.*.tmp` file beside it (binary), flushed
    to disk and then renamed over `path`: a crash never leaves a truncated file, and a failed write
    leaves the previous file as it was. The file gets the permissions of the user's umask, like any
    file Python opens. A full disk is one OSError(ENOSPC), "no space left ..." (also when torch's zip
    writer turns it into a RuntimeError of its own). Returns `path` as a Path.
    Usage: write_atomically("runs/fire/submission.txt", lambda file: file.write("a.jpg\t无风险\n".encode()))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        # os.open applies the umask to 0o666 (tempfile.mkstemp would leave the file 0600); O_BINARY: Windows
        # opens a descriptor in text mode otherwise, and would write each b"\n" of a checkpoint as b"\r\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(temp_path, flags, 0o666), "wb") as temp_file:
            write(temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException as error:
        temp_path.unlink(missing_ok=True)
        if any(isinstance(each, OSError) and each.errno == errno.ENOSPC for each in (error, error.__context__)):
            raise OSError(errno.ENOSPC, f"no space left on the device while saving {path}; "
                                        f"the previous file there is unchanged") from None
        raise
    return path


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically (write_atomically): a crash or a full disk never leaves
    a truncated checkpoint, and the previous file stays as it was until the new one is complete.
    Usage: save_checkpoint({"model": model.state_dict(), "step": step}, "checkpoints/last.pt")
    """
    return write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with torch.load(weights_only=True): tensors, numbers, strings and plain
    containers only, so a file carrying code is refused before anything runs.

    Raises FileNotFoundError, or ValueError naming the file when it is not a loadable checkpoint (also a
    cut-off or damaged one); an error reading the disk (permission, I/O) surfaces as itself.
    Usage: state = load_checkpoint("checkpoints/last.pt"); model.load_state_dict(state["model"])
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a FIFO / device that reading would hang on
        raise ValueError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as error:
        if error.errno != errno.EINVAL:  # permission, I/O: the disk's fault, not the file's
            raise
        # the zip reader's seek before the file's start: the archive's offsets point outside a cut-off file
        reason = f"its offsets point outside the file's {path.stat().st_size} bytes: cut off or damaged"
    except Exception as error:  # noqa: BLE001 - a malformed file can fail anywhere in the unpickler
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"{path} is not a loadable checkpoint (torch.load with weights_only=True "
                     f"refused it: {reason[:300]})")


def check_outputs(outputs, inputs=None):
    """Refuse, before a command does any work, an output that would destroy something: a ValueError names the
    first file of `outputs` ({what: path or list of paths}) that is also a file of `inputs` (the same form) or
    of another output ("--submission data/A.txt would overwrite an input of this command (--predict
    data/A.txt)"), that is a folder, or that cannot be written: its folder (or, before it is made, the nearest
    one that exists) is not a writable folder. Paths are compared resolved (symlinks, `./` and `..`
    spellings) and by device and inode (hard links); None is skipped, and an input that is not a local file
    (a W&B artifact name) matches nothing.
    Usage: check_outputs({"--submission": "runs/fire/submission.txt"}, {"--predict": "data/fire/A.txt"})
    """
    def named(paths):  # (what, path) pairs, each once
        return list(dict.fromkeys((what, os.fspath(path)) for what, value in (paths or {}).items()
                                  for path in (value if isinstance(value, (list, tuple)) else [value])
                                  if path is not None))

    def keys(path):  # what makes two spellings one file
        try:
            status = os.stat(path)
            return {os.path.realpath(path), (status.st_dev, status.st_ino)}
        except OSError:
            return {os.path.realpath(path)}

    seen = {key: ("an input", what, path) for what, path in named(inputs) for key in keys(path)}
    for what, path in named(outputs):
        clash = next((seen[key] for key in keys(path) if key in seen), None)
        if clash:
            raise ValueError(f"{what} {path} would overwrite {clash[0]} of this command ({clash[1]} {clash[2]})")
        seen.update({key: ("another output", what, path) for key in keys(path)})
        if os.path.isdir(path):
            raise ValueError(f"{what} {path} is a folder, not a file")
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):  # made by the writer: the nearest folder that exists must take it
            folder = os.path.dirname(folder)
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise ValueError(f"{what} {path} cannot be written ({folder}: {error.strerror or error})") from None


def _lock_out_dir(out_dir):
    # rank 0's lock on out_dir/.lock, held while this process lives (a ValueError when another process holds it)
    try:
        import fcntl
    except ImportError:  # Windows: no POSIX locks; the run goes on unlocked, as on a filesystem without them
        warnings.warn(f"--out-dir {out_dir} is not locked on this system (no fcntl): make sure no other run "
                      f"writes there", stacklevel=3)
        return
    lock = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:  # a POSIX lock: this process's (not its forked loader workers'), freed by the kernel when it ends
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # another process holds it
        holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(lock)
        raise ValueError(f"--out-dir {out_dir} is in use by another run (process {holder}): wait for it to end, "
                         f"or pass another --out-dir") from None
    except OSError:  # a filesystem without locks (e.g. Lustre mounted without flock): unlocked, as before
        os.close(lock)
    else:  # never closed (closing any descriptor of the file would free the lock): held while this process lives
        os.ftruncate(lock, 0)
        os.write(lock, str(os.getpid()).encode())


def prepare_out_dir(out_dir, *, resume=None, overwrite=False,
                    patterns=("best_model.pth", "last.pth", "last.pt", "checkpoint_epoch_*.pt")):
    """Make `out_dir` ready for a run without ever replacing an earlier run's checkpoints; returns
    (out_dir as a Path, the earlier run's checkpoints that this run replaces).

    Refuses (ValueError, one line) when out_dir is a file or not writable; when another process's run
    holds it (rank 0 locks `out_dir/.lock` for as long as its process lives, and the kernel frees the
    lock when it ends, kill -9 included; the same process may prepare it again, as a notebook does;
    without fcntl, as on Windows, one warning says the lock is off); and when it already holds
    checkpoints matching `patterns`,
    unless `resume` is a file inside it (the same run goes on) or overwrite=True. Those are returned,
    not deleted: delete them right before the first write, once every other check has passed, so that
    a typo in another setting leaves them. Stale `.*.tmp` files that a kill during save_checkpoint left
    behind are removed.
    Usage: out_dir, earlier_run = prepare_out_dir("checkpoints", resume=args.resume, overwrite=args.overwrite)
           # ... data, model and resume checks ..., then: for path in earlier_run: path.unlink(missing_ok=True)
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # can this process write there?
    except OSError as error:
        raise ValueError(f"--out-dir {out_dir} is not writable ({error.strerror or error})") from None
    # torchrun's RANK: the drivers prepare the out-dir before the process group starts
    if int(os.environ.get("RANK", rank_and_world_size()[0])) == 0:  # the run's lock; the other ranks run under it
        _lock_out_dir(out_dir)
        for stale in out_dir.glob(".*.tmp"):  # only once locked: a running save's temporary file is not stale
            stale.unlink(missing_ok=True)
    earlier = sorted({path for pattern in patterns for path in out_dir.glob(pattern)})
    if not earlier or (resume and os.path.isfile(resume) and Path(resume).resolve().parent == out_dir.resolve()):
        return out_dir, []
    if overwrite:
        return out_dir, earlier
    resumable = [path for path in earlier if not path.name.startswith("best")]
    resume_hint = f"--resume {max(resumable, key=os.path.getmtime)} to continue it, " if resumable else ""
    raise ValueError(f"--out-dir {out_dir} holds an earlier run's checkpoints ({', '.join(p.name for p in earlier[:4])}"
                     f"{', ...' if len(earlier) > 4 else ''}): pass {resume_hint}another --out-dir, "
                     f"or --overwrite to delete them")


def rotate_checkpoints(folder, keep=3, *, pattern="checkpoint_epoch_*.pt", metric="epoch_loss", mode="min"):
    """Delete all but the newest `keep` checkpoints matching `pattern` (numbered: the last number in
    the name orders them), never the best one by state[metric] (mode "min" or "max"), so at most
    keep + 1 files remain and the best survives every rotation. keep=0 keeps all. The metric is
    read with torch.load(weights_only=True, mmap=True), which leaves the tensors on disk.
    Returns the deleted paths.
    Usage: rotate_checkpoints("checkpoints", keep=3)  # after each save_checkpoint(..., "checkpoint_epoch_N.pt")
    """
    import re
    paths = sorted(Path(folder).glob(pattern), key=lambda path: int(re.findall(r"\d+", path.name)[-1]))
    if keep <= 0 or len(paths) <= keep:
        return []
    scores = {}
    for path in paths:
        try:
            value = float(torch.load(path, map_location="cpu", weights_only=True, mmap=True)[metric])
        except Exception:  # noqa: BLE001 - a file without the metric cannot be the best
            continue
        if not math.isnan(value):
            scores[path] = value if mode == "min" else -value
    best = min(scores, key=scores.get) if scores else None
    deleted = [path for path in paths[:-keep] if path != best]
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def save_best(state, metric, best, path, *, mode="max", name="val_acc", run=None,
              artifact_name=None, aliases=(), metadata=None):
    """Save `state` to `path` only when `metric` beats `best`; returns (new_best, improved).

    mode="max" (accuracy) or "min" (loss); best=None means nothing saved yet; a NaN metric never
    improves. On improvement the file is replaced atomically (save_checkpoint), `best_<name>` goes
    to run.summary, and the file becomes a new version of the model artifact `artifact_name`
    (default f"model-{run.id}", one collection per run; log_artifact) with aliases "best", "latest"
    and `aliases` (e.g. f"epoch-{epoch}"), metadata {name: metric, **metadata}. Online it is
    uploaded from `path`; an offline run keeps a copy per version for `wandb sync` (policy="mutable"),
    since `path` is overwritten by the next best. Under torch.distributed only rank 0 writes; every rank
    gets the same return value.
    Usage: best_acc, improved = save_best(state, val_acc, best_acc, "checkpoints/best_model.pth", run=run,
                                          aliases=(f"epoch-{epoch}",), metadata={"epoch": epoch})
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    metric = float(metric)
    improved = not math.isnan(metric) and (
        best is None or math.isnan(best) or (metric > best if mode == "max" else metric < best))
    if not improved:
        return best, False
    if rank_and_world_size()[0] == 0:
        save_checkpoint(state, path)
        if run:
            run.summary[f"best_{name}"] = metric
            log_artifact(run, path, artifact_name or f"model-{run.id}", aliases=("best", "latest", *aliases),
                         metadata={name: metric, **(metadata or {})}, policy="mutable" if run.offline else "immutable")
    return metric, True


def checkpoint_state(state, **extra):
    """A run's `state` ({name: value}) as a checkpoint: each value that has a state_dict() (model, EMA,
    optimiser, scheduler, GradScaler) as that state dict, the others as they are, every rank's RNG states
    under "rng" (gather_from_ranks(capture_rng_state()): every rank must call it), and `extra`.
    restore_state loads it back.
    Usage: save_checkpoint(checkpoint_state({"model": model, "optimizer": optimizer, "epoch": 3}), "last.pt")
    """
    return {**{name: value.state_dict() if hasattr(value, "state_dict") else value for name, value in state.items()},
            "rng": gather_from_ranks(capture_rng_state()), **extra}


def restore_state(state, checkpoint):
    """Load checkpoint_state's `checkpoint` back into `state`, in place, and return it: each value that has
    a load_state_dict() loads its own (an empty one, as a GradScaler saved while disabled writes, is
    skipped), the others are replaced by the checkpoint's, and this rank's RNG states are restored.
    Usage: restore_state(state, load_checkpoint("last.pt"))
    """
    for name, value in state.items():
        if not hasattr(value, "load_state_dict"):
            state[name] = checkpoint[name]
        elif checkpoint[name]:
            value.load_state_dict(checkpoint[name])
    restore_rng_state(checkpoint["rng"][rank_and_world_size()[0]])
    return state


def check_checkpoint(state, *, driver, required=(), expected=None, hints=None):
    """Refuse a checkpoint that does not fit the run about to use it, with a one-line ValueError that
    reads after "FILE: ": one that is not a dict, whose "driver" field names another driver (a file
    without the field passes), that lacks a key of `required`, or whose state["config"] differs from
    `expected` ({config key: this run's value}; the first difference is named; a dict value is
    compared on its own keys, so it may name a few keys of a config section). `hints` ({key: text})
    are appended when that key is missing or differs.

    Usage: check_checkpoint(state, driver="train", required=("model", "optimizer"), expected={"lr": 0.1})
    """
    hints = hints or {}
    other = state.get("driver", driver) if isinstance(state, dict) else None
    if other != driver:
        raise ValueError(f"not a {driver} checkpoint" + (f" ({other} wrote it)" if other else ""))
    missing = [key for key in required if key not in state]
    if missing:
        hint = next((hints[key] for key in missing if key in hints), "")
        raise ValueError(f"lacks {', '.join(missing)}{hint}")
    saved = state.get("config")
    for key, value in (expected or {}).items():
        old = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, dict) and isinstance(old, dict):
            changed = [f"{name} {old.get(name)!r} there, {new!r} here"
                       for name, new in value.items() if old.get(name) != new]
            if changed:
                raise ValueError(f"holds another {key} ({'; '.join(changed)}){hints.get(key, '')}")
        elif old != value:
            raise ValueError(f"trained with {key} {old}, this run has {value}{hints.get(key, '')}")


def resume_command(script, argv, checkpoint, world_size=1):
    """The command line that continues a run from `checkpoint`: `script` with the same flags and
    --resume replaced, under torchrun when world_size > 1; ready to paste into a shell.

    Usage: print("continue with:", resume_command(__file__, sys.argv[1:], "out/last.pt", world_size))
    """
    flags = [flag for index, flag in enumerate(argv)  # without --resume PATH and --resume=PATH
             if flag != "--resume" and not flag.startswith("--resume=") and argv[index - 1:index] != ["--resume"]]
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={world_size}"] if world_size > 1 else ["python"]
    return shlex.join([*launcher, Path(script).name, *flags, "--resume", str(checkpoint)])


def wandb_resume_plan(run_id, last_act, step, checkpoint):
    """How a run resumed from `checkpoint` (at `step`, of W&B run `run_id` or None) goes on in W&B:
    (run id to continue or None, a new run's config["resumed_from"] or None, a line saying which). Only
    a checkpoint written as the run's last act (a stop, or its end) continues the run: after any other
    the run may have logged past it, and W&B would drop those steps.

    Usage: run_id, resumed_from, plan = wandb_resume_plan(state["wandb_run_id"], True, 700, "out/last.pt")
    """
    if last_act and run_id:
        return run_id, None, f"continuing run {run_id} from step {step}"
    why = f"run {run_id} may have logged past this checkpoint" if run_id else "the run it came from logged no W&B"
    return None, {"run_id": run_id, "step": step, "checkpoint": str(checkpoint)}, (
        f"a new run (config resumed_from: run {run_id}, step {step}), since {why}")


def fetch_checkpoint(reference, *, project=None, entity=None, root=None):
    """The local path of a checkpoint given as a file path or as a W&B model artifact
    ("model-1a2b3c4d:best", "entity/project/model-1a2b3c4d:epoch-10"; no alias means :latest),
    downloading the artifact.

    Raises FileNotFoundError saying why when it is neither.
    Usage: state = load_checkpoint(fetch_checkpoint("model-1a2b3c4d:best", project="flow"))
    """
    reference = str(reference)
    if os.path.exists(reference):  # a local file (or a folder, which load_checkpoint refuses), not an artifact
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


def load_checked(reference, *, program, flag, driver, device="cpu", project=None, entity=None, artifacts=True,
                 **check):
    """The checkpoint `reference` names (a file, or with `artifacts` a W&B model artifact: fetch_checkpoint), loaded
    onto `device` (weights_only) and checked by check_checkpoint(state, driver=driver, **check): (path, state).
    Whatever is wrong ends the program in one line, "PROGRAM: FLAG REFERENCE: why".
    Usage: path, state = load_checked("runs/last.pt", program="train.py", flag="--resume", driver="train")
    """
    with exit_on_error(f"{program}: {flag} {reference}", (FileNotFoundError, ValueError)):
        path = fetch_checkpoint(reference, project=project, entity=entity) if artifacts else Path(reference)
        state = load_checkpoint(path, map_location=device)
        check_checkpoint(state, driver=driver, **check)
    return path, state


def load_checkpoints(references, *, same=(), program, flag, driver, **check):
    """load_checked of each of `references`, as a list of (path, state): the models of an ensemble, each
    holding the first's state["config"] values of the keys `same` (else one line names the first difference).
    Usage: members = load_checkpoints(["a.pth", "b.pth"], same=("classes",), program="p", flag="--model", driver="d")
    """
    first = load_checked(references[0], program=program, flag=flag, driver=driver, **check)
    expected = {**check.pop("expected", {}), **{key: first[1]["config"].get(key) for key in same}}
    hints = {**check.pop("hints", {}), **dict.fromkeys(same, f" (the models of an ensemble share {', '.join(same)}: "
                                                           f"{references[0]}'s)")}
    return [first] + [load_checked(reference, program=program, flag=flag, driver=driver, expected=expected,
                                   hints=hints, **check) for reference in references[1:]]


def resume_from(reference, state, *, program, driver, step_key="step", required=(), expected=None, hints=None,
                missing_hints=None, **load):
    """Continue a run from the checkpoint `reference` names, before any of its state is touched: load_checked
    (weights_only; `load`: device, project, entity, artifacts) requires state's keys, "rng", `required` and what
    W&B's plan reads (`missing_hints`, default `hints`, name what a missing key means), then check_checkpoint
    refuses a config that differs from `expected` (`hints` appended), each in one line "PROGRAM: --resume
    REFERENCE: why"; then restore_state(state, checkpoint) in place (this rank's RNG too). Returns (checkpoint,
    wandb_resume_plan(its run id, its last act, checkpoint[step_key], its path)).
    Usage: saved, (run_id, resumed_from, plan) = resume_from("out/last.pt", state, program="train.py", driver="train")
    """
    required = tuple(dict.fromkeys((*state, "rng", *required, "wandb_run_id", "wandb_last_act", step_key)))
    path, saved = load_checked(reference, program=program, flag="--resume", driver=driver, required=required,
                               hints=hints if missing_hints is None else missing_hints, **load)
    with exit_on_error(f"{program}: --resume {reference}", (ValueError,)):
        check_checkpoint(saved, driver=driver, expected=expected, hints=hints)
    restore_state(state, saved)
    return saved, wandb_resume_plan(saved["wandb_run_id"], saved["wandb_last_act"], saved[step_key], path)


def write_ensemble(path, checkpoints, class_names, offsets=None, **metadata):
    """Write `path`, a JSON file (atomically) naming an ensemble: its model files `checkpoints` (paths relative
    to the file's folder, each with its sha256), the `class_names` they share, per-class decision `offsets`
    (fit_class_offsets'; None: zeros) and `metadata`. read_ensemble reads it back.
    Usage: write_ensemble("runs/cv/ensemble.json", ["runs/cv/fold0/best_model.pth"], ["cat", "dog"], [0.2, 0.0])
    """
    folder = Path(path).resolve().parent
    document = {"checkpoints": [{"path": os.path.relpath(Path(checkpoint).resolve(), folder),
                                 "sha256": file_sha256(checkpoint)} for checkpoint in checkpoints],
                "class_names": list(class_names),
                "offsets": [float(value) for value in offsets or [0] * len(class_names)],
                **metadata}
    return write_atomically(path, lambda file: file.write(json.dumps(document, indent=2, ensure_ascii=False).encode()))


def read_ensemble(path):
    """(checkpoint paths, class names, offsets, the whole document) of write_ensemble's file. ValueError when
    it is not one, when the offsets are not one per class, or when a checkpoint file has changed since it was
    written (its sha256); FileNotFoundError when one is missing.
    Usage: checkpoints, class_names, offsets, document = read_ensemble("runs/cv/ensemble.json")
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        members, class_names, offsets = document["checkpoints"], document["class_names"], document["offsets"]
        paths = [Path(path).parent / member["path"] for member in members]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not an ensemble file ({type(error).__name__}: {error})") from None
    if len(offsets) != len(class_names):
        raise ValueError(f"{path} has {len(offsets)} offsets for {len(class_names)} classes")
    for member, checkpoint in zip(members, paths):
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{path} names {checkpoint}, which does not exist")
        if file_sha256(checkpoint) != member["sha256"]:
            raise ValueError(f"{checkpoint} has changed since {path} was written (its sha256 differs): run --cv again")
    return paths, class_names, offsets, document


def fit_ensemble(oof_paths, checkpoints, class_names, weights, path, *, run=None):
    """Fit the ensemble of a K-fold run on its out-of-fold predictions `oof_paths` (write_probability_csv's
    tables with labels, one per fold; they must name `class_names` and each image once): per-class decision
    offsets (fit_class_offsets) that raise weighted_f1_score with `weights`, written with the folds' model
    files `checkpoints` to `path` (write_ensemble). Logs to `run` oof_score and oof_score_with_offsets (the
    score before and after the offsets), oof_acc, oof_macro_f1, oof_f1/<class> and the confusion matrix
    (log_classification_report). Returns (those scores, the offsets).
    Usage: scores, offsets = fit_ensemble(["cv/fold0/oof.csv", "cv/fold1/oof.csv"], models, ["a", "b"], [2, 1], "e")
    """
    names, probs, labels, found = read_probability_csv(*oof_paths)
    if labels is None or found != list(class_names):
        raise ValueError(f"{oof_paths[0]} holds no labels or other classes than {', '.join(class_names)}")
    offsets, before, after = fit_class_offsets(probs, labels, weights)
    write_ensemble(path, checkpoints, class_names, offsets, score_weights=list(weights), oof_score=before,
                   oof_score_with_offsets=after, oof_images=len(names))
    oof = classification_scores(labels, probs.argmax(dim=1), weights)
    scores = {"oof_score": before, "oof_score_with_offsets": after, "oof_acc": oof["acc"], "oof_macro_f1":
              oof["macro_f1"], **{f"oof_f1/{name}": f1 for name, f1 in zip(class_names, oof["f1"]) if f1 == f1}}
    if run:
        run.log(scores)
        log_classification_report(run, probs, labels, class_names)
    return scores, offsets


# ----------------------------------------------------------------------------- config & command line

def _fit_type(value, default, written):
    # value as default's type (load_yaml_config's rule), else a ValueError naming `written`
    if isinstance(default, float) and (type(value) is int or isinstance(value, str)):
        with contextlib.suppress(ValueError):  # an int is a valid float; YAML 1.1 reads "1e-3" as a string
            value = float(value)
    listed = isinstance(default, list) and default
    if listed and isinstance(value, list):
        with contextlib.suppress(ValueError):  # an item of another type: the whole list is refused below
            return [_fit_type(item, default[0], written) for item in value]
    elif default is None or type(value) is type(default):
        return value
    kind = f"a list of {type(default[0]).__name__}" if listed else type(default).__name__
    raise ValueError(f"{written}: expected {kind} like the config's {default!r}, got {type(value).__name__} {value!r}")


def load_yaml_config(path, overrides=(), reference=None):
    """A YAML config as nested dicts, with "section.key=value" overrides applied (values parsed as
    YAML: numbers, lists [1, 2], true/false, null). Overriding a key the file lacks is a KeyError; a
    value of another type than the file's is a ValueError naming it (an int is a valid float, a list
    takes items of the type of the file's first item, a key that is null in the file takes any value,
    and a string key takes the text as written). With `reference` (the path or dict of the config the
    file stands in for, e.g. the defaults), the file must have exactly its sections and keys, each of
    its type by the same rule. A file that is no YAML, or holds no mapping of settings, is a ValueError,
    and so is a key repeated in a mapping (plain YAML keeps its last value silently), naming both lines.

    Usage: config = load_yaml_config("configs/cifar10_rectified_flow.yaml", ["training.gradient_clip=0.5"])
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):  # YAML keeps a repeated key's last value silently: refuse it
        def construct_mapping(self, node, deep=False):
            first_lines = {}
            for key_node, _ in node.value:
                key = None if key_node.tag.endswith(":merge") else self.construct_object(key_node, deep=deep)
                if key is None or getattr(key, "__hash__", None) is None:
                    continue  # a << merge may repeat keys; an unhashable key is SafeLoader's own error
                if key in first_lines:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key {key!r} of line {first_lines[key]} repeated",
                        problem_mark=key_node.start_mark)
                first_lines[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    def read(path):
        try:
            with open(path, encoding="utf-8") as file:
                config = yaml.load(file, UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path} is not valid YAML ({getattr(error, 'problem', None) or error}{where})") from None
        if not isinstance(config, dict) and (config is not None or reference is not None):
            raise ValueError(f"{path} is {'empty' if config is None else 'a YAML ' + type(config).__name__}, "
                             f"not a mapping of settings")
        return config or {}

    def check(section, expected, prefix=""):  # the file's sections and keys are exactly the reference's
        named = "the reference config" if isinstance(reference, dict) else reference
        for key in sorted(set(section) ^ set(expected), key=str)[:1]:  # the first that the file or the reference lacks
            raise ValueError(f"{prefix}{key} in {path} is not a key of {named}" if key in section else
                             f"{path} lacks {prefix}{key} (every section and key of {named} is needed)")
        for key, default in expected.items():
            if isinstance(default, dict) and not isinstance(section[key], dict):
                raise ValueError(f"{prefix}{key} in {path} is {section[key]!r}, not a section of settings")
            section[key] = (check(section[key], default, f"{prefix}{key}.") if isinstance(default, dict)
                            else _fit_type(section[key], default, f"{prefix}{key}: {section[key]!r} in {path}"))
        return section

    config = read(path)
    if reference is not None:
        check(config, reference if isinstance(reference, dict) else read(reference))
    for override in overrides:
        dotted, separator, text = (part.strip() for part in override.partition("="))
        if not separator:
            raise ValueError(f"override {override!r} is not of the form section.key=value")
        *parents, key = dotted.split(".")
        section = config
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key not in section:
            raise KeyError(f"{dotted!r} is not a key of {path}")
        try:
            value = text if isinstance(section[key], str) else yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{dotted}={text}: not a YAML value "
                             f"({getattr(error, 'problem', None) or error})") from None
        section[key] = _fit_type(value, section[key], f"{dotted}={text}")
    return config


def str2bool(value):
    """argparse type for booleans written as a W&B sweep agent does: --flag=False, --flag=true, 0/1,
    yes/no, on/off (argparse's type=bool reads "False" as true).
    Usage: parser.add_argument("--watch", type=str2bool, nargs="?", const=True, default=False)
    """
    text, true_words = str(value).strip().lower(), ("true", "t", "yes", "y", "1", "on")  # str(True) is "True"
    if text not in true_words + ("false", "f", "no", "n", "0", "off"):
        raise argparse.ArgumentTypeError(f"expected a boolean (true/false), not {value!r}")
    return text in true_words


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends "(default: VALUE)" to each flag's help, except where the default is
    None (that help says what happens then).
    Usage: parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    """
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def name_values(text):
    """argparse type for `NAME=VALUE,NAME=VALUE,...` (numbers), as {name: float}: per-class weights, say.
    Usage: parser.add_argument("--score-weights", type=name_values)  # --score-weights 高风险=2,中风险=1.5
    """
    pairs = [pair.partition("=") for pair in str(text).split(",")]
    try:
        return {name.strip(): float(value) for name, _, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER,NAME=NUMBER,..., not {text!r}") from None


def output_file(path, default_folder, name):
    """The file an output flag names: `path` itself, or `name` in it when it is a folder or ends with a path
    separator (a folder to make); without `path`, `name` in `default_folder`.
    Usage: submission = output_file(args.submission, "runs/fire", "submission.txt")
    """
    folder = path is None or os.path.isdir(path) or str(path).endswith(("/", os.sep))
    return Path(path or default_folder) / name if folder else Path(path)


def add_sweep_argument(parser, flag, **kwargs):
    """parser.add_argument for `flag` in both spellings, --batch-size and --batch_size (the sweep
    agent writes the config key). With type=str2bool the flag also works bare (--watch means true).
    Usage: add_sweep_argument(parser, "--batch-size", type=int, default=32)
    """
    name = flag.lstrip("-")
    spellings = dict.fromkeys([flag, "--" + name.replace("_", "-"), "--" + name.replace("-", "_")])
    if getattr(kwargs.get("type"), "__name__", None) == "str2bool":  # by name: pasted alone, without str2bool
        kwargs = {"nargs": "?", "const": True, **kwargs}
    return parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)


def check_numbers(positive=None, not_negative=None, fractions=None):
    """Raise ValueError naming the first setting of `positive` ({name: value}) that is not above 0, of
    `not_negative` that is below 0, or of `fractions` (a decay, a dropout rate) that is not in [0, 1)
    (NaN, and anything but a number, fail each): "--epochs must be positive, not 0".

    Usage: check_numbers({"--epochs": args.epochs}, {"--num-workers": args.num_workers}, {"--dropout": 0.1})
    """
    for values, holds, rule in ((positive, lambda value: value > 0, "must be positive"),
                                (not_negative, lambda value: value >= 0, "must not be negative"),
                                (fractions, lambda value: 0 <= value < 1, "must be in [0, 1)")):
        for name, value in (values or {}).items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not holds(value):
                raise ValueError(f"{name} {rule}, not {repr(value) if isinstance(value, str) else value}")


def check_choices(kind, allowed, values):
    """Raise ValueError naming the first setting of `values` ({name: value, or a list of values}) that is
    not one of `allowed`: "unknown solver 'rk4' in sampling.table_solvers; choose from euler, heun, rk45".

    Usage: check_choices("solver", ("euler", "heun"), {"--solver": args.solver, "--table-solvers": ["euler"]})
    """
    for name, value in values.items():
        for choice in value if isinstance(value, (list, tuple)) else [value]:
            if choice not in allowed:
                raise ValueError(f"unknown {kind} {choice!r} in {name}; choose from {', '.join(allowed)}")


@contextlib.contextmanager
def exit_on_error(program, errors=(FileNotFoundError,)):
    """For a `with` block: an exception of a type in `errors`, or an OSError for a full disk, ends the
    program with SystemExit("PROGRAM: message"), one line and no traceback (a KeyError's message
    without its quotes); anything else propagates as it is.

    Usage: with exit_on_error("train.py", (FileNotFoundError, ValueError)): data = load(args.data_dir)
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - filtered just below
        full_disk = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if not (full_disk or isinstance(error, errors)):
            raise
        message = error.strerror if full_disk else error.args[0] if isinstance(error, KeyError) else error
        raise SystemExit(f"{program}: {message}") from None


# ----------------------------------------------------------------------------- command line

def _copy_block(names):
    """The paste-ready source of `names` (module-level definitions or constants): the import lines their
    code uses, then every definition and constant they reach, transitively, in the module's order."""
    source = Path(__file__).read_text(encoding="utf-8")
    lines, imports, spans, uses = source.splitlines(), {}, {}, {}
    for node in ast.parse(source).body:
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[first - 1:node.end_lineno])
        if isinstance(node, (ast.Import, ast.ImportFrom)):  # by the name each binds: torch.nn as nn binds nn
            imports.update({(alias.asname or alias.name).split(".")[0]: text for alias in node.names})
        for name in ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                     [target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]):
            spans[name] = text
            uses[name] = {each.id for each in ast.walk(node) if isinstance(each, ast.Name)}
    for name in names:
        if name not in spans:
            close = difflib.get_close_matches(name, spans, n=3)
            raise ValueError(f"wbflow has no {name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(uses[name] & spans.keys())
    used = set().union(*(uses[name] for name in needed))
    import_lines = dict.fromkeys(text for bound, text in imports.items() if bound in used)
    definitions = dict.fromkeys(text for name, text in spans.items() if name in needed)
    return "\n".join(import_lines) + "\n\n\n" + "\n\n\n".join(definitions) + "\n"


def _fid_command(args, prog):
    # `fid`: pytorch-fid's command line on wbflow's FID (prints its number, or saves statistics)
    target = args.path[1] if args.path[1].endswith(".npz") else args.path[1] + ".npz"  # what np.savez writes
    options = dict(resize=args.resize, batch_size=args.batch_size, weights_path=args.weights)
    try:
        check_numbers({"--batch-size": args.batch_size})
        for path in args.path[:1] if args.save_stats else args.path:
            if not os.path.exists(path):
                raise ValueError(f"{path} does not exist")
        if args.save_stats and os.path.exists(target):
            raise ValueError(f"{target} exists already: choose another name or delete it")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device} is no torch device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA devices; "
                             f"pass --device cpu")
        if args.save_stats:
            features, _ = inception_features(args.path[0], device=device, **options)
            mu, sigma = feature_statistics(features)
            write_atomically(target, lambda file: np.savez(file, mu=mu, sigma=sigma))
            print(f"saved the statistics of {len(features)} images to {target}")
            return None
        value = fid(*args.path, device=device, **options)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{prog}: {error}") from None
    print("FID: ", value)
    return value


def _command_line(argv=None, prog="python wbflow.py"):
    """python wbflow.py fid DIR_OR_NPZ DIR_OR_NPZ (or python -m wbflow fid ...): pytorch-fid's command line on
    wbflow's FID; python wbflow.py copy NAME [NAME ...]: NAME's paste-ready source."""
    parser = argparse.ArgumentParser(prog=prog, description="wbflow's command line")
    commands = parser.add_subparsers(dest="command", required=True)
    fid_parser = commands.add_parser(
        "fid", help="FID between two folders of images or .npz statistics (pytorch-fid's command line)",
        description="Prints 'FID:  <value>' as python -m pytorch_fid does (its number with --resize pytorch-fid).")
    fid_parser.add_argument("path", nargs=2, help="folders of images or .npz files with mu/sigma "
                                                  "(with --save-stats: a folder, then the .npz to write)")
    fid_parser.add_argument("--resize", choices=("tensorflow", "pytorch-fid"), default="tensorflow", help="tensorflow: "
                            "TF FID / torch-fidelity numbers; pytorch-fid: pytorch-fid's (default: %(default)s)")
    fid_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the "
                            "Inception runs, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    fid_parser.add_argument("--batch-size", type=int, default=50,
                            help="images per Inception batch (default: %(default)s)")
    fid_parser.add_argument("--weights", help=f"{FID_WEIGHTS_FILE} (default: ${FID_WEIGHTS_ENV}, then the torch "
                                              "hub cache)")
    fid_parser.add_argument("--save-stats", action="store_true", help="write the first path's mu/sigma to the "
                            "second (.npz appended when missing) instead; refuses an existing file (default: off)")
    copy_parser = commands.add_parser(
        "copy", help="print the source of NAME with the imports and definitions it needs, ready to paste",
        description="Prints the import lines NAME's code uses, then every wbflow definition and constant it "
                    "reaches, then NAME, in the module's order: paste it into a file of your own and it runs.")
    copy_parser.add_argument("name", nargs="+", help="a public function, class or constant of wbflow")
    args = parser.parse_args(argv)
    if args.command == "fid":
        return _fid_command(args, fid_parser.prog)
    try:
        block = _copy_block(args.name)
    except ValueError as error:
        raise SystemExit(f"{copy_parser.prog}: {error}") from None
    print(block, end="")
    return block


if __name__ == "__main__":
    _command_line(prog="python -m wbflow" if __spec__ else "python wbflow.py")

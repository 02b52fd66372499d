"""Shared test helpers: one torch thread, offline W&B and reading a run's record back, the FID weights, the data
the tests write, one finished run per driver for the whole session (finished_flow_run, finished_fire_run), and
the helpers several test files use.

Test files import the helpers with `from conftest import RunLog, run_logs, fire_args, refused`."""
import contextlib
import glob
import hashlib
import io
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import torch
import torch.nn as nn
import train_fire
import train_flow
import wbflow


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these tiny models gain little from two, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def wandb_staging_in_the_session_temp_folder(tmp_path_factory):
    """W&B keeps a copy of every artifact file logged with policy="mutable" in ~/.local/share/wandb until it is
    uploaded, which offline is never: gigabytes a suite, left behind. The session's temp folder holds them instead
    (subprocesses inherit it); a test that reads the staging folder sets its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(tmp_path_factory.mktemp("wandb_data")))
        yield


# ----------------------------------------------------------------------------- reading a run back

def read_records(wandb_file):
    """Parse a run-*.wandb file: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2
    data = Path(wandb_file).read_bytes()
    position, pieces, records = 7, b"", []
    while position + 7 <= len(data):
        space_left = 32768 - position % 32768
        if space_left < 7:
            position += space_left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            records.append(pieces + chunk)
    return [wandb_internal_pb2.Record.FromString(record) for record in records]


def _items_to_dict(items):
    """History/summary/config items as a dict; nested keys (e.g. a logged image's fields) nest."""
    result = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        target = result
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return result


class RunLog:
    """What one offline run logged: history rows, the final summary, artifacts, config, exit code, group, job type."""

    def __init__(self, wandb_file):
        self.history, self.summary, self.artifacts, self.config = [], {}, [], {}
        self.metrics, self.exit_code, self.run_id, self.group, self.job_type = [], None, None, None, None
        for record in read_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items_to_dict(record.history.item))
            elif kind == "summary":
                self.summary.update(_items_to_dict(record.summary.update))
            elif kind == "artifact":
                artifact = record.artifact
                self.artifacts.append({"name": artifact.name, "type": artifact.type,
                                       "aliases": list(artifact.aliases), "used": artifact.use_after_commit,
                                       "metadata": json.loads(artifact.metadata or "{}"),
                                       "files": [entry.path for entry in artifact.manifest.contents]})
            elif kind == "config":
                self.config.update(_items_to_dict(record.config.update))
            elif kind == "metric":
                self.metrics.append(record.metric)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code
            elif kind == "run":
                self.run_id, self.group, self.job_type = record.run.run_id, record.run.run_group, record.run.job_type
                self.config.update(_items_to_dict(record.run.config.update))

    def rows_with(self, key):
        return [row for row in self.history if key in row]

    def values(self, key):
        return [row[key] for row in self.rows_with(key)]


def run_logs(wandb_dir, timeout=60):
    """RunLog of every run written under WANDB_DIR, oldest first, once each holds its exit record.

    wandb's service writes the file after run.finish() returns, so wait for the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", "run-*.wandb")), key=os.path.getmtime)
        logs = [RunLog(path) for path in files]
        if all(log.exit_code is not None for log in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.1)


def kill_when_marked(script, marker, settle=0.0, timeout=120):
    """Run `script` (python -c) until it creates the file `marker`, wait `settle` seconds, then SIGKILL it."""
    import signal
    import subprocess
    import sys
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not Path(marker).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Path(marker).exists(), "the child never reached the marked point"
    time.sleep(settle)
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_offline(main, argv, wandb_dir, **environment):
    """main(argv) with W&B offline and silent under `wandb_dir` (and these other environment variables), one torch
    thread and its stdout captured, for a module-scoped fixture's run: (what main returned, what it printed)."""
    import contextlib
    import io
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
                           "WANDB_CONSOLE": "off", **environment}.items():
            patch.setenv(key, value)
        torch.set_num_threads(1)
        try:
            result = main(argv)
        finally:
            torch.set_num_threads(threads)
    return result, printed.getvalue()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline, silent W&B writing under a temp WANDB_DIR; yields that folder."""
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return wandb_dir


# ----------------------------------------------------------------------------- FID Inception weights

def _calibrated_fid_inception():
    # Random weights alone make every image look alike; BatchNorm statistics measured on images
    # (with a positive shift so the ReLUs stay mostly open) give features that differ per image.
    torch.manual_seed(0)
    model = wbflow.FIDInceptionV3().requires_grad_(False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.bias.fill_(1.0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        model.train()(wbflow._preprocess(images, "tensorflow"))
    return model.eval()


@pytest.fixture(scope="session")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / wbflow.FID_WEIGHTS_FILE
    torch.save(_calibrated_fid_inception().state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def inception(weights_path):
    return wbflow.load_fid_inception(weights_path)


@pytest.fixture(scope="session")
def images_uint8():
    return torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- data the tests write

def write_cifar_batches(data_dir, per_batch=40, test_images=20, seed=0):
    """CIFAR-10's python layout (data_batch_1..5, test_batch, batches.meta) with small learnable images."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = wbflow.synthetic_images(5 * per_batch + test_images, seed=seed).numpy().reshape(-1, 3072)
    labels = np.random.RandomState(seed).randint(0, 10, len(images)).tolist()
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for index, name in enumerate(names):
        rows = slice(index * per_batch, index * per_batch + (per_batch if index < 5 else test_images))
        with open(folder / name, "wb") as file:
            pickle.dump({"batch_label": name, "data": images[rows], "labels": labels[rows],
                         "filenames": [f"{i}.png" for i in range(len(images[rows]))]}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch}, file)
    return images.reshape(-1, 3, 32, 32), labels


SEED_CLASSES = ["高风险", "中风险", "低风险", "无风险", "非楼道"]


def pattern_image(label, rng, size=32):
    """A noisy black-and-white pattern whose class is its shape, not its colour: horizontal stripes,
    vertical stripes, a checkerboard, diagonal stripes, or blank."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size]
    shift_y, shift_x = rng.integers(0, 8, 2)
    rows, cols = (y + shift_y) // 4 % 2, (x + shift_x) // 4 % 2
    on = [rows, cols, rows ^ cols, (x + y + shift_x) // 4 % 2, np.zeros_like(x)][label % 5]
    pixels = np.where(on[..., None] == 1, 220, 35) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_pattern_folders(root, per_class, classes=SEED_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pattern_image(label, rng).save(root / name / f"{index}.png")
    return root


# the download's mix, as the competition's (无风险 59%, 低风险 19%, 中风险 14%, 非楼道 5%, 高风险 3%): 高风险's one image
# is for training, so the validation set has none of it
MIX = {"无风险": 20, "低风险": 7, "中风险": 5, "非楼道": 2, "高风险": 1}


def hashed_jpeg(folder, label, rng):
    """A pattern of class `label` (SEED_CLASSES' index) of a random size, saved as <md5 of its bytes>.jpg."""
    image = pattern_image(label, rng, size=32).resize(tuple(int(side) for side in rng.integers(24, 64, 2)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    name = hashlib.md5(buffer.getvalue()).hexdigest() + ".jpg"
    (folder / name).write_bytes(buffer.getvalue())
    return name


def write_download(root, mix=MIX, test_images=6, seed=0):
    """The competition's download: train/ and train.txt (name<TAB>label, shuffled, no header), A/ and A.txt (names
    only, not sorted, one of them a broken file). Returns {name: label} of train.txt and A.txt's names."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "A").mkdir()
    labelled = {hashed_jpeg(root / "train", SEED_CLASSES.index(label), rng): label
                for label, count in mix.items() for _ in range(count)}
    lines = [f"{name}\t{label}" for name, label in labelled.items()]
    rng.shuffle(lines)
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    test_names = [hashed_jpeg(root / "A", index % 5, rng) for index in range(test_images)]
    test_names.insert(2, "0badc0de.jpg")
    (root / "A" / "0badc0de.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "A.txt").write_text("\n".join(test_names) + "\n", encoding="utf-8")
    return labelled, test_names


def fire_args(data_dir, out_dir, *extra):
    """A tiny train_fire run's flags; best_model.pth follows val_acc, as the tests of its keys expect (the default,
    val_score for the competition's classes, has tests of its own in test_train_fire_competition.py)."""
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--model", "resnet18", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--learning-rate", "0.001", "--num-workers", "0",
            "--project", "test", "--best-metric", "val_acc", *extra]


# ----------------------------------------------------------------------------- the finished runs, one per driver

# 48 images of CIFAR-10 files, batch 16: 3 steps an epoch, 9 in all, windows at steps 2, 3 | 4, 6 | 8, 9 (the
# epochs' ends); every epoch has a grid, 4 table rows (Euler NFE 1 and 2, Heun 2, RK45) and a checkpoint
FLOW = ["--smoke", "--epochs", "3", "--set", "data.max_images=48", "--set", "training.batch_size=16",
        "--set", "training.log_interval=2", "--set", "training.warmup_steps=4", "--set", "model.base_channels=8",
        "--set", "model.channel_mults=[1, 2]", "--set", "model.head_channels=8", "--set", "sampling.num_images=4",
        "--set", "sampling.table_nfes=[1, 2]", "--set", "sampling.rk45_tolerance=0.01"]


def uninterrupted_flow_run(root, argv):
    """train_flow.main(argv + --out-dir root/out) on one thread, W&B offline in root (staging in root/staging): argv,
    out dir, RunLog, the W&B folder and what it printed, for a module's tests to read."""
    printed = run_offline(train_flow.main, argv + ["--out-dir", str(root / "out")], root,
                          WANDB_DATA_DIR=str(root / "staging"))[1]
    [log] = run_logs(root)
    return SimpleNamespace(argv=argv, out=root / "out", log=log, root=root, printed=printed)


@pytest.fixture(scope="session")
def finished_flow_run(tmp_path_factory):
    """train_flow's one finished run for the session: FLOW on CIFAR-10 files, W&B offline (uninterrupted_flow_run).
    Tests only read it: its record, its out dir, its checkpoints; a stopped or killed run is compared with it."""
    root = tmp_path_factory.mktemp("whole")
    write_cifar_batches(root / "data", per_batch=10, test_images=2)
    return uninterrupted_flow_run(root, FLOW + ["--data-dir", str(root / "data")])


@pytest.fixture(scope="session")
def finished_fire_run(tmp_path_factory):
    """train_fire's one finished run for the session: 2 epochs without W&B (1 step an epoch): (data, out dir,
    argv, stdout). Tests only read it: its out dir, its checkpoints, what it printed."""
    root = tmp_path_factory.mktemp("fire")
    data = write_pattern_folders(root / "data", per_class=4)  # 15 training images
    argv = fire_args(data, root / "whole", "--epochs", "2", "--no-wandb")
    printed, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_torch_thread sets for each test, which runs after this fixture
    try:
        with contextlib.redirect_stdout(printed):
            train_fire.main(argv)
    finally:
        torch.set_num_threads(threads)
    return data, root / "whole", argv, printed.getvalue()


FLOW_SMOKE = ["--smoke", "--set", "data.max_images=64", "--set", "sampling.table_nfes=[1]",
              "--set", "sampling.table_solvers=[euler]"]


# 64 synthetic images, batch 32: two steps an epoch; every epoch has samples, a one-row table and a checkpoint;
# a UNet of 8 channels that downsamples once, so its attention is at 16x16
SMALL_FLOW = FLOW_SMOKE + ["--set", "training.log_interval=1", "--set", "model.base_channels=8",
                           "--set", "model.head_channels=8", "--set", "sampling.num_images=4"]


# ----------------------------------------------------------------------------- small models and fields

def linear_batches(n_batches=6, batch_size=8, features=4, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, features, generator=generator),
             torch.randint(0, classes, (batch_size,), generator=generator)) for _ in range(n_batches)]


def linear_classifier(features=4, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(features, classes)


CE_LOSS = wbflow.classification_loss(nn.CrossEntropyLoss())


TINY_UNET = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, head_channels=16, dropout=0.0)


TINY = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0)


def randomised(model, seed=0):
    """`model` with every parameter drawn at random: FlowUNet's zero-initialised output layer would hide the rest."""
    torch.manual_seed(seed)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    return model.eval()


def tiny_flow_checkpoint(path):
    """A train_flow checkpoint of an untrained 8-channel FlowUNet, all evaluate_flow.py reads."""
    model_config = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                    "head_channels": 8, "dropout": 0.0}
    ema = wbflow.make_ema(wbflow.FlowUNet(**model_config))
    return wbflow.save_checkpoint({"ema": ema.state_dict(), "config": {"model": model_config}, "epoch": 1,
                                   "global_step": 2, "driver": "train_flow"}, path)


# a FlowUNet with every block kind (residual blocks, the middle attention, skips), for 8x8 images
TINY_MEANFLOW_UNET = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0,
                          image_size=8, second_time=True)


def tiny_meanflow_unet(seed=0, std=0.3):
    """A tiny FlowUNet built for (t, r), every weight random (the zero-initialised output layers too), so that
    its average velocity depends on z, t and r."""
    torch.manual_seed(seed)
    model = wbflow.FlowUNet(**TINY_MEANFLOW_UNET)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=std)
    return model


def jump_times(count, seed=0):
    """(t, r): t in [0, 0.9], r between t and 1, r = t for the first sample."""
    generator = torch.Generator().manual_seed(seed)
    t = 0.9 * torch.rand(count, generator=generator)
    r = t + (1 - t) * torch.rand(count, generator=generator)
    r[0] = t[0]
    return t, r


class Constant(nn.Module):
    def __init__(self, velocity):
        super().__init__()
        self.velocity = nn.Parameter(torch.as_tensor(velocity, dtype=torch.float32))

    def forward(self, x, t):
        return self.velocity.expand_as(x)


# ----------------------------------------------------------------------------- stops, kills and the records they leave

COMPARED = ("train/loss", "train/grad_norm", "train/learning_rate", "train/epoch", "train/skipped_steps",
            "train/epoch_loss", "epoch", "batch", "train_loss", "train_acc", "learning_rate", "val_loss", "val_acc",
            "best_val_acc")


def scalar_rows(*logs):
    """(step, {compared key: value}) of every history row holding one of the compared keys."""
    rows = [(row["_step"], {key: row[key] for key in COMPARED if key in row}) for log in logs for row in log.history]
    return [(step, values) for step, values in rows if values]


def assert_same_history(rows, expected):
    assert [step for step, _ in rows] == [step for step, _ in expected]
    for (step, values), (_, expected_values) in zip(rows, expected):
        assert values.keys() == expected_values.keys(), step
        for key, value in expected_values.items():
            assert values[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def sigterm_after(steps):
    """A loss_fn wrapper that sends this process SIGTERM after `steps` calls, as a scheduler would."""
    calls = []

    def wrap(loss_fn):
        def counted(model, batch):
            calls.append(1)
            if len(calls) == steps:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(model, batch)
        return counted
    return wrap


def signal_on_call(function, on_call, signal_number=signal.SIGTERM):
    """`function` wrapped to send this process `signal_number` (a real signal) during its `on_call`-th call,
    with the calls counted in wrapper.calls."""
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == on_call:
            os.kill(os.getpid(), signal_number)
        return function(*args, **kwargs)
    wrapper.calls = 0
    return wrapper


def read_run(wandb_dir, run_id, ready, timeout=30):
    """The RunLog of run `run_id` under wandb_dir, once ready(log) holds (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        [path] = glob.glob(str(Path(wandb_dir) / "wandb" / f"*run-*{run_id}" / "*.wandb"))
        log = RunLog(path)
        if (log.run_id == run_id and ready(log)) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


_HANG = """
import sys, time
sys.path.insert(0, {here!r})
import train_flow, wbflow
def hang_at(function, call):
    def wrapper(*args, **kwargs):
        wrapper.calls += 1
        if wrapper.calls == call:
            open({marker!r}, "w").close()
            time.sleep(120)
        return function(*args, **kwargs)
    wrapper.calls = 0
    return wrapper
{patch}
train_flow.main({argv!r})
"""


def _table_data(wandb_dir, run_id=""):
    """Columns and rows of the eval/samples_table a run under wandb_dir wrote (the one with run_id)."""
    [path] = glob.glob(str(Path(wandb_dir) / "wandb" / f"*run-*{run_id}" / "files" / "media" / "table" / "eval" /
                           "samples_table_*.table.json"))
    table = json.loads(Path(path).read_text())
    return table["columns"], table["data"]


def table_json(wandb_dir, key):
    [path] = glob.glob(os.path.join(wandb_dir, "wandb", "*run-*", "files", "media", "table", f"{key}_*.table.json"))
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- refusals, help texts and reads that must not hang

def refused(main, argv, match):
    """main(argv) exits with one line matching `match`: a SystemExit whose code is that message, so status 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str), f"exit code {message!r}, not a message and status 1"
    assert "\n" not in message.strip(), message
    assert re.search(match, message), message
    return message


def _help_blocks(main):
    """{option: its help text} from `main(["--help"])`."""
    import contextlib
    import io
    import re
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        main(["--help"])
    blocks, current = {}, None
    for line in text.getvalue().splitlines():
        match = re.match(r"\s{2}(-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {option: re.sub(r"\s+", " ", block) for option, block in blocks.items()}


def within(seconds, function, *args, fifo=None):
    """function(*args), failing the test when it runs longer than `seconds` (a regression that hangs fails
    rather than hanging the suite); a reader blocked on `fifo` is then released by a writer's open and close."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{function.__name__} still ran after {seconds} s (reading a FIFO waits for a writer)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class _Hostile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


# ----------------------------------------------------------------------------- a W&B server that does not answer

def start_clean_python(code, tmp_path, **env):
    """Start `code` in a fresh interpreter with no W&B credentials or mode, HOME in tmp_path: its Popen."""
    base = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "NETRC"))}
    base.update({"HOME": str(tmp_path), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "PYTHONPATH": str(Path(__file__).resolve().parent), "WANDB_DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.Popen([sys.executable, "-c", code], env=base, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket closes


@pytest.fixture(scope="session", autouse=True)
def unreachable_server_process(request, tmp_path_factory):
    """For test_wandb_records: a run with a key whose server does not answer, in a fresh interpreter with wandb's
    own output on, started with the session's first test where a test reads it: it mostly waits (wandb's init
    timeout, its account lookups) while the other tests run. (the Popen, WANDB_DIR, the interpreter's folder)."""
    if not any("unreachable_server_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    tmp_path = tmp_path_factory.mktemp("unreachable")
    code = ("import time, wbflow\n"
            "started = time.monotonic()\n"
            "with wbflow.wandb_run({'lr': 0.1}, project='p') as run:\n"
            "    print('started after', time.monotonic() - started)\n"
            "    for step in range(1, 4):\n"
            "        run.log({'train/loss': 1.0 / step}, step=step)\n")
    wandb_dir = tmp_path / "elsewhere"
    wandb_dir.mkdir()
    process = start_clean_python(code, tmp_path, WANDB_API_KEY="k" * 40, WANDB_DIR=str(wandb_dir),
                                 WANDB_SILENT="false", WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    yield process, wandb_dir, tmp_path
    if process.poll() is None:
        process.terminate()
        process.communicate()


# ----------------------------------------------------------------------------- pytorch-fid's command line

def _write_folder(folder, images_uint8, extensions):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images_uint8):
        array = image.permute(1, 2, 0).numpy()
        extension = extensions[index % len(extensions)]
        if extension == "pgm":
            array = array[:, :, 0]
        Image.fromarray(array).save(folder / f"{index:03d}.{extension}", **({"lossless": True} if extension == "webp" else {}))
    return folder


@pytest.fixture(scope="session", autouse=True)
def pytorch_fid_process(request, tmp_path_factory):
    """For test_metrics: `python -m pytorch_fid` on two small folders of images_uint8, started with the session's
    first test where a test reads it: its sqrtm of a 2048 x 2048 matrix takes one core about 15 s, while the other
    tests run. (the Popen, its two folders)."""
    if not any("pytorch_fid_printed" in item.fixturenames for item in request.session.items):
        yield None
        return
    weights_path, images_uint8 = request.getfixturevalue("weights_path"), request.getfixturevalue("images_uint8")
    root = tmp_path_factory.mktemp("pytorch_fid")
    # pytorch-fid downloads its weights into the torch hub cache; put the same file there instead.
    torch_home = root / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    os.link(weights_path, torch_home / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE)
    first = _write_folder(root / "first", images_uint8[:3], ["png", "jpg"])
    second = _write_folder(root / "second", images_uint8.flip(0)[:2].roll(7, dims=2), ["png", "ppm"])
    process = subprocess.Popen([sys.executable, "-m", "pytorch_fid", str(first), str(second), "--device", "cpu",
                                "--num-workers", "0", "--batch-size", "3"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(torch_home)})
    yield process, first, second
    if process.poll() is None:
        process.kill()
        process.communicate()

"""Shared test helpers: one torch thread, offline W&B, and reading a run's record log back.

Test files import the helpers with `from conftest import RunLog, run_logs, read_records`."""
import glob
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

import wbflow

@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these tiny models gain little from two, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

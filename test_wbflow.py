"""The module as a whole, wherever it runs: off Linux and off Python 3.11 it imports without fcntl (Windows), hashes
files on Python 3.10, writes binary files in binary mode where the system has a text mode, and quotes predictions.csv.
Its functions' own tests are in the files named by unit (test_data, test_model_and_losses, test_training,
test_sampling, test_metrics, test_files, test_wandb_records)."""
import ast
import csv
import hashlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import wbflow

HERE = Path(__file__).resolve().parent


def test_wbflow_imports_and_prepares_an_out_dir_without_fcntl_with_one_warning(tmp_path):
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
        import wbflow
        out = {str(tmp_path / "out")!r}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(wbflow.prepare_out_dir(out) == (wbflow.Path(out), []))
        print(len(caught), caught[0].message)
        wbflow.save_checkpoint({{"epoch": 1}}, wbflow.Path(out) / "last.pt")
        try:  # the rest of the out-dir policy holds without the lock
            wbflow.prepare_out_dir(out)
        except ValueError as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prepared, warning, refusal = result.stdout.splitlines()
    assert prepared == "True"
    assert warning == f"1 --out-dir {tmp_path / 'out'} is not locked on this system (no fcntl): make sure no other " \
                      f"run writes there"
    assert "holds an earlier run's checkpoints (last.pt)" in refusal


def test_the_code_parses_as_the_oldest_python_that_pyproject_allows():
    oldest = re.search(r'requires-python = ">=3\.(\d+)"', (HERE / "pyproject.toml").read_text())
    assert oldest, "pyproject.toml names no requires-python >=3.N"
    for name in ("wbflow.py", "flow_config.py", "train_flow.py", "evaluate_flow.py", "train_fire.py"):
        ast.parse((HERE / name).read_text(encoding="utf-8"), name, feature_version=(3, int(oldest[1])))


def test_file_sha256_needs_no_python_3_11_function(tmp_path, monkeypatch):
    monkeypatch.delattr(hashlib, "file_digest", raising=False)  # Python 3.10 has none
    data = os.urandom(3 << 20)  # several of its read chunks
    (tmp_path / "weights").write_bytes(data)
    assert wbflow.file_sha256(tmp_path / "weights") == hashlib.sha256(data).hexdigest()


def test_write_atomically_opens_its_file_in_binary_mode_where_the_system_has_a_text_mode(tmp_path, monkeypatch):
    # Windows's os.O_BINARY: without it, each b"\n" of a checkpoint would be written as b"\r\n"
    real_open, flags_seen, o_binary = os.open, [], 0x8000
    monkeypatch.setattr(os, "O_BINARY", o_binary, raising=False)

    def open_noting_flags(path, flags, *args, **kwargs):
        flags_seen.append(flags)
        return real_open(path, flags & ~o_binary, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_noting_flags)
    path = wbflow.write_atomically(tmp_path / "c.pt", lambda file: file.write(b"a\nb"))
    assert flags_seen and all(flags & o_binary for flags in flags_seen) and path.read_bytes() == b"a\nb"


def test_predictions_csv_quotes_a_name_with_a_comma_and_a_quote(tmp_path):
    names = ['fire, "stairs" 1.jpg', "plain.jpg"]
    wbflow.write_submission(tmp_path / "submission.txt", names, torch.tensor([[0.25, 0.75], [0.5, 0.5]]), ["x", "y"])
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows == [["name", "x", "y"], [names[0], "0.250000", "0.750000"], ["plain.jpg", "0.500000", "0.500000"]]

"""Issue 15's edges on train_flow's side: last.pt before the epoch's samples, stops honoured inside evaluation,
resumes that must keep the run's settings, resumes without W&B, bad settings in one line (the config's shape,
`python wbflow.py fid`, kid), and a newcomer's first run (the FID weights, default folders, progress, headline)."""
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_fire
import train_flow
import wbflow
from conftest import run_logs
from test_guard import FLOW_SMOKE, refused
from test_training import assert_same_history, read_run, scalar_rows
from test_wbflow import _table_data, weights_path  # noqa: F401

HERE = Path(__file__).resolve().parent


FLOW = FLOW_SMOKE + ["--set", "training.log_interval=1"]


def _config_file(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _default_config(change):
    """The default config's text after change(config)."""
    import yaml
    config = wbflow.load_yaml_config(train_flow.DEFAULT_CONFIG)
    change(config)
    return yaml.safe_dump(config)


@pytest.mark.parametrize("argv, match", [
    (["--set", "model.channel_mults=[1, two]"],
     r"model\.channel_mults=\[1, two\]: expected a list of int like the config's \[1, 2\], got list \[1, 'two'\]"),
    (["--set", "model.channel_mults=[1, 2"], r"model\.channel_mults=\[1, 2: not a YAML value"),
    (["--set", "training.learning_rate=-1"], r"training\.learning_rate must be positive, not -1\.0"),
    (["--set", "training.learning_rate=.nan"], r"training\.learning_rate must be positive, not nan"),
    (["--set", "training.ema_decay=1"], r"training\.ema_decay must be in \[0, 1\), not 1\.0"),
    (["--set", "training.ema_decay=-0.1"], r"training\.ema_decay must be in \[0, 1\), not -0\.1"),
    (["--set", "training.gradient_clip=-1"], r"training\.gradient_clip must not be negative, not -1\.0"),
    (["--set", "eval.num_real_images=many"], r"eval\.num_real_images must be positive, not 'many'"),  # null: any type
    (["--set", "sampling.rk45_tolerance=0"], r"sampling\.rk45_tolerance must be positive, not 0\.0"),
    (["--set", "eval.fid_interval=1", "--set", "eval.fid_num_samples=1"],
     r"eval\.fid_num_samples is 1: FID needs at least two samples"),
    (["--eval", "--checkpoint", "c.pt", "--num-samples", "1"], r"--num-samples is 1: FID needs at least two samples"),
])
def test_train_flow_refuses_a_bad_value_in_one_line(argv, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out")] + argv, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, match", [
    ("- data\n- model\n", r"config\.yaml is a YAML list, not a mapping of settings"),
    ("", r"config\.yaml is empty, not a mapping of settings"),
    ("# only a comment\n", r"config\.yaml is empty"),
    ("data: [unclosed\n", r"config\.yaml is not valid YAML \(.* at line 2, column 1\)"),
    ("data:\n  data_dir: data\n   out_dir: x\n", r"config\.yaml is not valid YAML \(mapping values are not allowed"),
    (_default_config(lambda config: config.pop("sampling")), r"config\.yaml lacks sampling \(every section and key"),
    (_default_config(lambda config: config["training"].pop("ema_decay")), r"config\.yaml lacks training\.ema_decay"),
    (_default_config(lambda config: config["training"].update(sead=1)), r"training\.sead in .*config\.yaml is not a key"),
    (_default_config(lambda config: config["training"].update(epochs="many")),
     r"training\.epochs: 'many' in .*config\.yaml: expected int"),
    (_default_config(lambda config: config.update(model=3)), r"model in .*config\.yaml is 3, not a section"),
])
def test_a_config_file_of_another_shape_is_refused_in_one_line(text, match, tmp_path):
    refused(train_flow.main, FLOW_SMOKE + ["--out-dir", str(tmp_path / "out"), "--config", _config_file(tmp_path, text)],
            match)
    assert not (tmp_path / "out").exists()


def test_a_config_with_every_key_of_the_default_is_accepted(tmp_path):
    text = train_flow.DEFAULT_CONFIG.read_text().replace("learning_rate: 2.0e-4", "learning_rate: 1e-3")
    config = train_flow.load_config(train_flow.parse_args(["--config", _config_file(tmp_path, text)]))
    assert config["training"]["learning_rate"] == 1e-3  # YAML 1.1 reads "1e-3" as a string: a float here


@pytest.mark.parametrize("script, argv", [
    ("train_flow.py", ["--smoke", "--set", "model.channel_mults=[1, two]"]),
    ("train_flow.py", ["--smoke", "--set", "training.gradient_clip=-1"]),
    ("train_flow.py", ["--smoke", "--config", "broken.yaml"]),
    ("train_flow.py", ["--smoke", "--config", "list.yaml"]),
])
def test_a_bad_value_prints_one_line_and_no_traceback(tmp_path, script, argv):
    (tmp_path / "broken.yaml").write_text("data: {unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    result = subprocess.run([sys.executable, str(HERE / script), *argv, "--out-dir", str(tmp_path / "o")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _fid_command(*argv):
    """(exit message, printed) of `python wbflow.py fid ARGV`, run in this process."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exit_info:
        wbflow._command_line(["fid", *argv])
    return str(exit_info.value.code), printed.getvalue()


def _image_folder(folder, count):
    from PIL import Image
    folder.mkdir()
    for index in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * index, dtype=np.uint8)).save(folder / f"{index}.png")
    return str(folder)


def test_fid_command_refuses_statistics_files_that_are_not_statistics_in_one_line(tmp_path, weights_path):  # noqa: F811
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 4)))
    (tmp_path / "pickle.npz").write_bytes(b"not a zip archive at all")
    np.savez(tmp_path / "good.npz", mu=np.zeros(4), sigma=np.eye(4))
    for name, match in (("other.npz", r"other\.npz holds features, not the FID statistics mu and sigma"),
                        ("pickle.npz", r"pickle\.npz is not an \.npz file \(no zip archive\)")):
        message, _ = _fid_command(str(tmp_path / name), str(tmp_path / "good.npz"), "--weights", weights_path)
        assert re.fullmatch(rf"wbflow\.py fid: .*{match}.*", message), message
        with pytest.raises(ValueError, match=match):
            wbflow.fid(str(tmp_path / name), str(tmp_path / "good.npz"))


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], r"--batch-size must be positive, not 0"),
    (["--device", "cuda:99"], r"--device cuda:99: this machine has \d+ CUDA devices?; pass --device cpu"),
    (["--device", "gpu"], r"--device gpu is no torch device"),
])
def test_fid_command_refuses_a_bad_flag_before_any_work(tmp_path, monkeypatch, argv, match):
    monkeypatch.setattr(wbflow, "load_fid_inception", lambda *args, **kwargs: pytest.fail("loaded the Inception"))
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, *argv)
    assert re.fullmatch(rf"wbflow\.py fid: {match}.*", message), message


def test_fid_command_says_cuda_is_missing_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, "--device", "cuda")
    assert message == "wbflow.py fid: --device cuda: this machine has 0 CUDA devices; pass --device cpu"


def test_fid_of_one_image_says_it_needs_two_per_side(tmp_path, weights_path):  # noqa: F811
    one, two = _image_folder(tmp_path / "one", 1), _image_folder(tmp_path / "two", 2)
    message, _ = _fid_command(one, two, "--weights", weights_path, "--device", "cpu")
    assert message == "wbflow.py fid: FID needs at least two images per side to estimate a covariance, got 1"
    with pytest.raises(ValueError, match="FID needs at least two images per side"):
        wbflow.fid(torch.randn(5, 8), torch.randn(1, 8))


def test_save_stats_writes_the_npz_it_names_and_refuses_an_existing_one(tmp_path, weights_path):  # noqa: F811
    folder = _image_folder(tmp_path / "images", 3)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert wbflow._command_line(["fid", folder, str(tmp_path / "stats"), "--save-stats", "--weights", weights_path,
                                     "--device", "cpu"]) is None
    assert printed.getvalue() == f"saved the statistics of 3 images to {tmp_path / 'stats.npz'}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "stats.npz"]
    assert wbflow.fid(str(tmp_path / "stats.npz"), str(tmp_path / "stats.npz")) == pytest.approx(0, abs=1e-6)
    before = (tmp_path / "stats.npz").read_bytes()
    for name in ("stats", "stats.npz"):
        message, _ = _fid_command(folder, str(tmp_path / name), "--save-stats", "--weights", weights_path)
        assert message == f"wbflow.py fid: {tmp_path / 'stats.npz'} exists already: choose another name or delete it"
    assert (tmp_path / "stats.npz").read_bytes() == before


@pytest.mark.parametrize("settings", [dict(subset_size=1), dict(subset_size=0), dict(subsets=0, subset_size=4)])
def test_kid_refuses_subsets_it_cannot_average(settings):
    features = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError, match=r"KID needs subsets >= 1 of subset_size >= 2 images"):
        wbflow.kid(features, features, **settings)


def _help_text(call):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        call()
    return re.sub(r"\s+", " ", text.getvalue())


def test_help_has_no_doubled_defaults_and_every_fid_option_explained():
    for text in (_help_text(lambda: wbflow._command_line(["fid", "--help"])),
                 _help_text(lambda: train_flow.main(["--help"]))):
        assert "(default: None)" not in text and not re.search(r"\(default:[^)]*\) \(default:", text), text
    fid_help = _help_text(lambda: wbflow._command_line(["fid", "--help"]))
    options = fid_help.split("options:")[1]
    for option in ("--device DEVICE", "--batch-size BATCH_SIZE", "--weights WEIGHTS", "--resize", "--save-stats"):
        after = options.split(option, 1)[1].lstrip()
        assert not after.startswith("--"), f"{option} has no help"
    assert "--batch-size BATCH_SIZE images per Inception batch (default: 50)" in fid_help


"""FID, IS and KID against the installed peers (pytorch-fid 0.3.0, torch-fidelity 0.4.0), the
`python wbflow.py fid` command line, FID during training, and the copy rule for the metrics section."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_flow
import wbflow
from conftest import run_logs
from test_wbflow import SMALL, _torch_fidelity_extractor

HERE = Path(__file__).resolve().parent
FEATURE_TOLERANCE = 1e-4  # measured: at most 1.1e-5 on every input kind below


# ----------------------------------------------------------------------------- quantisation

def test_float_images_are_scored_as_the_png_files_they_would_be_saved_as(inception, tmp_path):
    import torchvision.utils
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for index, image in enumerate(images):
        torchvision.utils.save_image(image, tmp_path / f"{index}.png")
    from_floats, _ = wbflow.inception_features(images, inception)
    from_files, _ = wbflow.inception_features(tmp_path, inception)
    assert torch.equal(from_floats, from_files)
    unrounded, _ = wbflow.inception_features(images, inception, quantize=False)
    assert not torch.equal(unrounded, from_files)


def test_fid_and_inception_score_quantise_by_default(inception, images_uint8):
    floats = (images_uint8.float() + 0.4 * torch.sign(127.5 - images_uint8.float())) / 255  # rounds back to the same uint8
    assert wbflow.fid(images_uint8[:5], floats[5:], inception=inception) == wbflow.fid(
        images_uint8[:5], images_uint8[5:], inception=inception)
    assert wbflow.inception_score(floats, splits=2, inception=inception) == wbflow.inception_score(
        images_uint8, splits=2, inception=inception)
    assert wbflow.fid(images_uint8[:5], floats[5:], inception=inception, quantize=False) != wbflow.fid(
        images_uint8[:5], images_uint8[5:], inception=inception)


# ----------------------------------------------------------------------------- invalid statistics

def _statistics(dims=6, samples=40, seed=0):
    return wbflow.feature_statistics(np.random.default_rng(seed).standard_normal((samples, dims)))


@pytest.mark.parametrize("breakage", ["nan mu", "inf sigma", "mu shape", "sigma shape", "not symmetric",
                                      "negative eigenvalue", "negative eigenvalue, singular"])
def test_frechet_distance_refuses_invalid_statistics(breakage):
    (mu1, sigma1), (mu2, sigma2) = _statistics(seed=1), _statistics(seed=2)
    if breakage == "nan mu":
        mu1 = mu1.copy(); mu1[2] = np.nan
    elif breakage == "inf sigma":
        sigma2 = sigma2.copy(); sigma2[0, 0] = np.inf
    elif breakage == "mu shape":
        mu2 = mu2[:-1]
    elif breakage == "sigma shape":
        sigma2 = sigma2[:-1, :-1]
    elif breakage == "not symmetric":
        sigma2 = sigma2.copy(); sigma2[0, 1] += 0.5
    elif breakage == "negative eigenvalue":
        eigenvalues, vectors = np.linalg.eigh(sigma2)
        eigenvalues[0] = -0.05 * eigenvalues.max()
        sigma2 = (vectors * eigenvalues) @ vectors.T
    else:  # sigma1 singular (fewer samples than dims): the sqrt(S1) path must check too
        sigma1 = _statistics(samples=3, seed=3)[1]
        eigenvalues, vectors = np.linalg.eigh(sigma2)
        eigenvalues[0] = -0.05 * eigenvalues.max()
        sigma2 = (vectors * eigenvalues) @ vectors.T
    with pytest.raises(ValueError, match="NaN|inf|shape|mu|symmetric|positive semi-definite"):
        wbflow.frechet_distance(mu1, sigma1, mu2, sigma2)
    with pytest.raises(ValueError):  # fid takes (mu, sigma) as given and refuses them too
        wbflow.fid((mu1, sigma1), (mu2, sigma2))


def test_frechet_distance_accepts_float32_statistics_and_rounding_noise():
    (mu1, sigma1), (mu2, sigma2) = _statistics(64, 20, 1), _statistics(64, 30, 2)  # singular: fewer samples than dims
    exact = wbflow.frechet_distance(mu1, sigma1, mu2, sigma2)
    as_float32 = wbflow.frechet_distance(*(value.astype(np.float32) for value in (mu1, sigma1, mu2, sigma2)))
    assert as_float32 == pytest.approx(exact, rel=1e-5)


# ----------------------------------------------------------------------------- the TensorFlow resize

INPUTS = {"8x8": (3, 3, 8, 8), "32x32": (3, 3, 32, 32), "512x512": (1, 3, 512, 512), "non-square 40x17": (3, 3, 40, 17),
          "grayscale 32x32": (3, 1, 32, 32), "299x299": (2, 3, 299, 299)}


@pytest.mark.parametrize("kind", INPUTS)
def test_tensorflow_resize_is_bit_identical_to_torch_fidelity(kind):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    images_uint8 = torch.randint(0, 256, INPUTS[kind], dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    expected = interpolate_bilinear_2d_like_tensorflow1x(images_uint8.expand(-1, 3, -1, -1).float(), size=(299, 299),
                                                         align_corners=False)
    assert torch.equal(wbflow._preprocess(images_uint8, "tensorflow"), (expected - 128) / 128)


@pytest.mark.parametrize("kind", INPUTS)
def test_features_agree_with_torch_fidelity_and_pytorch_fid_on_every_input_kind(kind, weights_path, inception,
                                                                                  monkeypatch):
    import pytorch_fid.inception as pytorch_fid_inception
    images_uint8 = torch.randint(0, 256, INPUTS[kind], dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    rgb = images_uint8.expand(-1, 3, -1, -1)
    state_dict = torch.load(weights_path, weights_only=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    with torch.no_grad():
        expected_features, expected_logits = _torch_fidelity_extractor(weights_path)(rgb)
        expected_pytorch_fid = pytorch_fid_inception.InceptionV3([3]).eval()(rgb.float() / 255)[0].flatten(1)
    features, logits = wbflow.inception_features(images_uint8, inception)
    assert (features - expected_features).abs().max() < FEATURE_TOLERANCE
    assert (logits - expected_logits).abs().max() < FEATURE_TOLERANCE
    features, _ = wbflow.inception_features(images_uint8, inception, resize="pytorch-fid")
    assert (features - expected_pytorch_fid).abs().max() < FEATURE_TOLERANCE


# ----------------------------------------------------------------------------- folders and the command line

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


def test_a_folder_of_image_files_is_an_input(inception, images_uint8, tmp_path):
    folder = _write_folder(tmp_path / "images", images_uint8, ["png", "ppm", "bmp", "pgm", "tif", "webp"])
    (folder / "notes.txt").write_text("not an image")
    expected = images_uint8.clone()
    expected[3::6] = images_uint8[3::6, :1]  # the .pgm files hold one channel, read back as gray RGB
    features, _ = wbflow.inception_features(folder, inception, batch_size=4)
    assert torch.equal(features, wbflow.inception_features(expected, inception, batch_size=4)[0])
    assert wbflow.fid(folder, expected[:7], inception=inception) == pytest.approx(
        wbflow.fid(expected, expected[:7], inception=inception), rel=1e-9)
    assert wbflow.inception_score(folder, splits=2, inception=inception) == pytest.approx(
        wbflow.inception_score(expected, splits=2, inception=inception))
    features_kid = wbflow.kid(folder, expected, subsets=3, subset_size=5, inception=inception)
    assert features_kid == pytest.approx(wbflow.kid(expected, expected, subsets=3, subset_size=5, inception=inception))


def test_a_folder_of_images_of_different_sizes_is_read(inception, images_uint8, tmp_path):
    folder = _write_folder(tmp_path / "mixed", images_uint8[:3], ["png"])
    _write_folder(tmp_path / "large", torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8), ["png"])
    for index, path in enumerate(sorted((tmp_path / "large").iterdir())):
        path.rename(folder / f"1{index}.png")
    features, _ = wbflow.inception_features(folder, inception)
    assert features.shape == (5, 2048)


def _run(*command, **environment):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **environment}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_command_line_prints_what_pytorch_fids_prints(weights_path, images_uint8, tmp_path):
    # pytorch-fid downloads its weights into the torch hub cache; put the same file there instead.
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    os.link(weights_path, torch_home / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE)
    first = _write_folder(tmp_path / "first", images_uint8[:6], ["png", "jpg"])
    second = _write_folder(tmp_path / "second", images_uint8.flip(0)[:5].roll(7, dims=2), ["png", "ppm"])
    environment = {"TORCH_HOME": str(torch_home)}
    expected = _run("-m", "pytorch_fid", str(first), str(second), "--device", "cpu", "--num-workers", "0",
                    **environment)
    printed = _run("wbflow.py", "fid", str(first), str(second), "--resize", "pytorch-fid", "--device", "cpu",
                   **environment)
    assert printed.startswith("FID:  ") and expected.strip().splitlines()[-1].startswith("FID:  ")
    ours, theirs = float(printed.split()[-1]), float(expected.split()[-1])
    # 11 images in 2048 dims: pytorch-fid's sqrtm is the approximate one here (see README)
    assert ours == pytest.approx(theirs, rel=1e-3)

    statistics = tmp_path / "first.npz"
    _run("wbflow.py", "fid", str(first), str(statistics), "--save-stats", "--resize", "pytorch-fid", **environment)
    from_npz = _run("wbflow.py", "fid", str(statistics), str(second), "--resize", "pytorch-fid", **environment)
    assert float(from_npz.split()[-1]) == pytest.approx(ours, rel=1e-9)


def test_command_line_prints_pytorch_fids_number_for_statistics_of_more_than_2048_samples(weights_path, tmp_path):
    # With full-rank covariances pytorch-fid's sqrtm is accurate, so both print the same number.
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    os.link(weights_path, torch_home / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE)
    generator = np.random.default_rng(0)
    for name, shift in (("real", 0.0), ("fake", 0.3)):
        features = generator.standard_normal((3000, 2048)) @ (np.eye(2048) + 0.01 * generator.standard_normal((2048, 2048)))
        np.savez(tmp_path / f"{name}.npz", mu=features.mean(0) + shift, sigma=np.cov(features, rowvar=False))
    paths = [str(tmp_path / "real.npz"), str(tmp_path / "fake.npz")]
    expected = _run("-m", "pytorch_fid", *paths, "--device", "cpu", TORCH_HOME=str(torch_home))
    printed = _run("wbflow.py", "fid", *paths, "--resize", "pytorch-fid", "--device", "cpu", TORCH_HOME=str(torch_home))
    theirs, ours = expected.strip().splitlines()[-1], printed.strip().splitlines()[-1]
    assert ours.startswith("FID:  ") and theirs.startswith("FID:  ")
    assert float(ours.split()[-1]) == pytest.approx(float(theirs.split()[-1]), rel=1e-9)


def test_command_line_refuses_a_missing_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "wbflow.py", "fid", str(tmp_path / "absent"), str(tmp_path)],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- KID

@pytest.mark.parametrize("settings", [dict(subsets=7, subset_size=20),
                                      dict(subsets=4, subset_size=30, degree=2, gamma=0.01, coef0=0.5, seed=3)])
def test_kid_equals_torch_fidelitys(settings):
    import torch_fidelity.metric_kid as metric_kid
    generator = torch.Generator().manual_seed(4)
    real = torch.randn(50, 64, generator=generator)
    fake = torch.randn(40, 64, generator=generator) * 1.1 + 0.2
    names = {"subsets": "kid_subsets", "subset_size": "kid_subset_size", "degree": "kid_kernel_poly_degree",
             "gamma": "kid_kernel_poly_gamma", "coef0": "kid_kernel_poly_coef0", "seed": "rng_seed"}
    expected = metric_kid.kid_features_to_metric(real, fake, verbose=False,
                                                 **{names[key]: value for key, value in settings.items()})
    assert wbflow.kid(real, fake, **settings) == (expected["kernel_inception_distance_mean"],
                                                  expected["kernel_inception_distance_std"])


def test_kid_of_a_set_against_itself_is_near_zero_and_needs_enough_images():
    features = torch.randn(60, 16, generator=torch.Generator().manual_seed(0))
    mean, std = wbflow.kid(features, features, subsets=5, subset_size=30)
    shifted_mean, _ = wbflow.kid(features, features + 3, subsets=5, subset_size=30)
    assert abs(mean) < 0.1 * shifted_mean and std >= 0
    with pytest.raises(ValueError, match="subset_size"):
        wbflow.kid(features, features, subset_size=100)


# ----------------------------------------------------------------------------- the weights

def test_loading_the_inception_draws_nothing_from_the_global_generator(weights_path):
    torch.manual_seed(0)
    wbflow.load_fid_inception(weights_path)
    after_loading = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_loading, torch.rand(3))


# ----------------------------------------------------------------------------- FID during training

def test_fid_during_training_is_logged_per_epoch_and_leaves_training_unchanged(offline_wandb, weights_path, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    common = ["--smoke", "--epochs", "2", *SMALL, "--set", "sampling.nfe=2", "--set", "sampling.table_nfes=[1]",
              "--set", "training.sample_interval=5", "--set", "logging.log_images_interval=5"]
    train_flow.main(common + ["--out-dir", str(tmp_path / "without")])
    train_flow.main(common + ["--out-dir", str(tmp_path / "with"), "--set", "eval.fid_interval=1",
                              "--set", "eval.fid_num_samples=6", "--set", "eval.inception_batch_size=6"])
    without, with_fid = run_logs(offline_wandb)
    assert without.values("train/loss") == with_fid.values("train/loss") and len(without.values("train/loss")) >= 2
    assert without.rows_with("eval/fid_score") == []
    rows = with_fid.rows_with("eval/fid_score")
    assert [row["train/epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["eval/fid_score"]) and row["eval/inception_score_mean"] >= 1 for row in rows)
    assert len(list((tmp_path / "with" / "fid_stats").glob("synthetic-64-tensorflow-*.npz"))) == 1


def test_fid_during_training_without_weights_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="absent.pth"):
        train_flow.main(["--smoke", "--no-wandb", "--out-dir", str(tmp_path), "--set", "eval.fid_interval=1", *SMALL])

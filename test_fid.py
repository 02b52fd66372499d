"""FID, IS and KID against the installed peers (pytorch-fid 0.3.0, torch-fidelity 0.4.0), the
`python wbflow.py fid` command line, FID during training, and the copy rule for the metrics section."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_flow
import wbflow
from conftest import run_logs
from test_guard import refused
from test_wbflow import SMALL, _torch_fidelity_extractor, tiny_flow_checkpoint, within, write_cifar_batches

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


def test_quantize_false_gives_fid_kid_and_inception_score_the_unrounded_floats(inception, images_uint8, monkeypatch):
    floats = (images_uint8[:2].float() + 0.4 * torch.sign(127.5 - images_uint8[:2].float())) / 255  # rounds back
    features, logits = wbflow.inception_features(images_uint8[:2], inception)
    monkeypatch.setattr(wbflow, "frechet_distance", lambda *statistics: statistics)  # what fid hands the distance
    mu, sigma, _, _ = wbflow.fid(floats, features, inception=inception, quantize=False)
    assert not np.allclose(mu, wbflow.feature_statistics(features)[0], rtol=0, atol=1e-3)
    assert wbflow.kid(floats, features, subsets=1, subset_size=2, inception=inception, quantize=False) != wbflow.kid(
        features, features, subsets=1, subset_size=2)
    assert wbflow.inception_score(floats, splits=1, inception=inception, quantize=False) != wbflow.inception_score(
        logits, splits=1)


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


# ----------------------------------------------------------------------------- every input kind

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


IMAGE_KINDS = ["uint8 tensor", "float tensor", "batches", "(images, labels) batches", "folder"]


@pytest.mark.parametrize("kind", IMAGE_KINDS + ["features", "(mu, sigma)", "npz", "logits"])
def test_fid_kid_and_inception_score_take_every_input_kind(kind, inception, images_uint8, tmp_path, monkeypatch):
    images = images_uint8[:2]
    features, logits = wbflow.inception_features(images, inception)
    mu, sigma = wbflow.feature_statistics(features)
    np.savez(tmp_path / "statistics.npz", mu=mu, sigma=sigma)
    source = {
        "uint8 tensor": images,
        "float tensor": (images.float() + 0.4 * torch.sign(127.5 - images.float())) / 255,  # rounds to `images`
        "batches": torch.utils.data.DataLoader(images, batch_size=1),
        "(images, labels) batches": torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(images, torch.zeros(2)), batch_size=1),
        "folder": _write_folder(tmp_path / "images", images, ["png"]),
        "features": features.numpy(), "(mu, sigma)": (mu, sigma), "npz": str(tmp_path / "statistics.npz"),
        "logits": logits}[kind]
    kid_settings = dict(subsets=1, subset_size=2, inception=inception)
    if kind in IMAGE_KINDS + ["logits"]:
        assert wbflow.inception_score(source, splits=1, inception=inception) == pytest.approx(
            wbflow.inception_score(logits, splits=1), rel=1e-5)
    if kind in IMAGE_KINDS + ["features"]:
        assert wbflow.kid(source, features, **kid_settings) == pytest.approx(
            wbflow.kid(features, features, **kid_settings), abs=1e-5)
    if kind in ("(mu, sigma)", "npz"):
        for metric in (lambda: wbflow.kid(source, features, **kid_settings), lambda: wbflow.inception_score(source)):
            with pytest.raises(ValueError, match="mu and sigma hold no"):
                metric()
    if kind != "logits":
        monkeypatch.setattr(wbflow, "frechet_distance", lambda *statistics: statistics)  # what fid hands the distance
        given_mu, given_sigma, *_ = wbflow.fid(source, features, inception=inception)
        np.testing.assert_allclose(given_mu, mu, rtol=0, atol=1e-4)
        np.testing.assert_allclose(given_sigma, sigma, rtol=0, atol=1e-4 * np.abs(sigma).max())


def test_a_folder_of_image_files_is_read_as_pytorch_fid_reads_it(inception, images_uint8, tmp_path):
    folder = _write_folder(tmp_path / "images", images_uint8[:6], ["png", "ppm", "bmp", "pgm", "tif", "webp"])
    (folder / "notes.txt").write_text("not an image")
    (folder / "005.webp").rename(folder / "005.WEBP")
    expected = images_uint8[:6].clone()
    expected[3] = images_uint8[3, :1]  # the .pgm file holds one channel, read back as gray RGB
    features, _ = wbflow.inception_features(folder, inception, batch_size=4)
    assert torch.equal(features, wbflow.inception_features(expected, inception, batch_size=4)[0])


def test_a_folder_of_images_of_different_sizes_is_read(inception, images_uint8, tmp_path):
    folder = _write_folder(tmp_path / "mixed", images_uint8[:3], ["png"])
    _write_folder(tmp_path / "large", torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8), ["png"])
    for index, path in enumerate(sorted((tmp_path / "large").iterdir())):
        path.rename(folder / f"1{index}.png")
    features, _ = wbflow.inception_features(folder, inception)
    assert features.shape == (5, 2048)


def _truncate(path):
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])


class _InceptionThatMustNotRun:
    def parameters(self):
        raise AssertionError("the Inception ran before every folder was checked")


def test_a_folder_holding_a_fifo_or_a_truncated_image_is_refused_before_any_inception_work(inception, images_uint8,
                                                                                            tmp_path):
    # pytorch-fid reads every image file of a folder and fails on one it cannot decode: refused, not skipped
    good = _write_folder(tmp_path / "good", images_uint8[:3], ["png"])
    with_fifo = _write_folder(tmp_path / "with_fifo", images_uint8[3:6], ["png"])
    os.mkfifo(with_fifo / "pipe.png")
    with pytest.raises(ValueError, match=r"with_fifo: 1 of its 4 image file\(s\) cannot be read .*: pipe\.png;"):
        within(60, lambda: wbflow.fid(with_fifo, good, inception=inception), fifo=with_fifo / "pipe.png")
    truncated = _write_folder(tmp_path / "truncated", images_uint8[3:9], ["png", "jpg"])
    for name in ("001.jpg", "002.png", "003.jpg", "005.jpg"):
        _truncate(truncated / name)
    with pytest.raises(ValueError, match=r"truncated: 4 of its 6 image file\(s\) .*: 001\.jpg, 002\.png, 003\.jpg, \.\.\.;"):
        wbflow.fid(good, truncated, inception=_InceptionThatMustNotRun())


GATHER_ON_RANK = """
import sys, torch, wbflow
rank, init_file, weights, result = int(sys.argv[1]), *sys.argv[2:]
torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
shard = images[:1] if rank == 0 else images[1:]  # uneven: one image on rank 0, two on rank 1
torch.save(wbflow.inception_features(shard, wbflow.load_fid_inception(weights))[0], result)
torch.distributed.destroy_process_group()
"""


def test_inception_features_of_uneven_shards_are_gathered_in_rank_order(inception, weights_path, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", GATHER_ON_RANK, str(rank), str(tmp_path / "init"), weights_path,
                               str(tmp_path / f"rank{rank}.pt")], cwd=HERE, env=environment) for rank in range(2)]
    assert [process.wait(timeout=300) for process in ranks] == [0, 0]
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected, _ = wbflow.inception_features(images, inception)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), expected,
                                   rtol=0, atol=FEATURE_TOLERANCE)


# ----------------------------------------------------------------------------- the command line and the package

def _run(*command, cwd=HERE, **environment):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **environment}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed with pip (no dependencies) into a folder of its own; pip builds in a copy, so
    no build/ or egg-info lands in the repository."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("installed")
    for name in ("pyproject.toml", "README.md", "wbflow.py"):
        (source / name).write_bytes((HERE / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def test_the_installed_package_needs_the_runtime_libraries_and_none_of_the_test_peers(installed):
    from email.parser import Parser
    [metadata] = installed.glob("wbflow-*.dist-info/METADATA")
    requires = {re.split(r"[<>=!~ ;\[]", line)[0].lower()
                for line in Parser().parsestr(metadata.read_text()).get_all("Requires-Dist")}
    assert requires == {"torch", "torchvision", "wandb", "scipy", "numpy", "pyyaml", "tqdm", "pillow"}
    assert (installed / "wbflow.py").read_bytes() == (HERE / "wbflow.py").read_bytes()


def test_python_m_wbflow_from_any_folder_prints_what_pytorch_fids_command_line_prints(installed, weights_path,
                                                                                       images_uint8, tmp_path):
    # pytorch-fid downloads its weights into the torch hub cache; put the same file there instead.
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    os.link(weights_path, torch_home / "hub" / "checkpoints" / wbflow.FID_WEIGHTS_FILE)
    first = _write_folder(tmp_path / "first", images_uint8[:3], ["png", "jpg"])
    second = _write_folder(tmp_path / "second", images_uint8.flip(0)[:2].roll(7, dims=2), ["png", "ppm"])
    expected = _run("-m", "pytorch_fid", str(first), str(second), "--device", "cpu", "--num-workers", "0",
                    "--batch-size", "3", TORCH_HOME=str(torch_home))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    printed = _run("-m", "wbflow", "fid", str(first), str(second), "--resize", "pytorch-fid", "--device", "cpu",
                   "--weights", weights_path, cwd=elsewhere, PYTHONPATH=str(installed))
    assert printed.startswith("FID:  ") and expected.strip().splitlines()[-1].startswith("FID:  ")
    # 5 images in 2048 dims: singular covariances, where pytorch-fid's sqrtm is the approximate one (see README)
    assert float(printed.split()[-1]) == pytest.approx(float(expected.split()[-1]), rel=1e-4)


def test_command_line_prints_pytorch_fids_number_for_full_rank_statistics(tmp_path, capsys):
    # With full-rank covariances (more samples than dims) pytorch-fid's sqrtm is accurate: the same number.
    import pytorch_fid.fid_score as fid_score
    generator = np.random.default_rng(0)
    for name, shift in (("real", 0.0), ("fake", 0.3)):
        features = generator.standard_normal((800, 512)) @ (np.eye(512) + 0.01 * generator.standard_normal((512, 512)))
        np.savez(tmp_path / f"{name}.npz", mu=features.mean(0) + shift, sigma=np.cov(features, rowvar=False))
    paths = [str(tmp_path / "real.npz"), str(tmp_path / "fake.npz")]
    # what `python -m pytorch_fid real.npz fake.npz` computes: it reads .npz files without its network
    (mu1, sigma1), (mu2, sigma2) = (fid_score.compute_statistics_of_path(path, None, 50, 2048, "cpu") for path in paths)
    theirs = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    ours = wbflow._command_line(["fid", *paths, "--device", "cpu"])
    assert capsys.readouterr().out == f"FID:  {ours}\n"
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("command, prog", [(["wbflow.py"], "python wbflow.py"), (["-m", "wbflow"], "python -m wbflow")])
def test_command_line_refuses_a_missing_folder_in_one_line_naming_how_it_was_run(tmp_path, command, prog):
    result = subprocess.run([sys.executable, *command, "fid", str(tmp_path / "absent"), str(tmp_path)],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr == f"{prog} fid: {tmp_path / 'absent'} does not exist\n"


def test_command_line_refuses_a_folder_holding_a_truncated_image_in_one_line_counting_and_naming_it(weights_path,
                                                                                                     images_uint8,
                                                                                                     tmp_path):
    real = _write_folder(tmp_path / "real", images_uint8[:3], ["png"])
    fake = _write_folder(tmp_path / "fake", images_uint8[3:6], ["png", "jpg"])
    _truncate(fake / "001.jpg")
    with pytest.raises(SystemExit) as exit_info:
        wbflow._command_line(["fid", str(real), str(fake), "--device", "cpu", "--weights", weights_path])
    assert exit_info.value.code == (f"python wbflow.py fid: {fake}: 1 of its 3 image file(s) cannot be read (not a "
                                    f"regular file, or truncated or damaged): 001.jpg; remove or replace them")


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
    common = ["--smoke", "--epochs", "2", *SMALL, "--set", "data.max_images=16", "--set", "training.batch_size=8",
              "--set", "sampling.nfe=2", "--set", "sampling.table_nfes=[1]", "--set", "training.sample_interval=5",
              "--set", "logging.log_images_interval=5"]
    train_flow.main(common + ["--out-dir", str(tmp_path / "without")])
    train_flow.main(common + ["--out-dir", str(tmp_path / "with"), "--set", "eval.fid_interval=1",
                              "--set", "eval.fid_num_samples=6", "--set", "eval.inception_batch_size=6"])
    without, with_fid = run_logs(offline_wandb)
    assert without.values("train/loss") == with_fid.values("train/loss") and len(without.values("train/loss")) >= 2
    assert without.rows_with("eval/fid_score") == []
    rows = with_fid.rows_with("eval/fid_score")
    assert [row["train/epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["eval/fid_score"]) and row["eval/inception_score_mean"] >= 1 for row in rows)
    assert len(list((tmp_path / "with" / "fid_stats").glob("synthetic-16-*-tensorflow-*.npz"))) == 1


def test_fid_during_training_without_weights_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "absent.pth"))
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="absent.pth"):
        train_flow.main(["--smoke", "--no-wandb", "--out-dir", str(tmp_path), "--set", "eval.fid_interval=1", *SMALL])


# ----------------------------------------------------------------------------- the statistics cache of train_flow

def test_one_stats_dir_keeps_each_data_folders_statistics_and_a_damaged_one_is_computed_again(
        tmp_path, weights_path):
    """train_flow's one cache key (training and --eval both call fid_statistics): the statistics' file is named by
    what they were computed from, so two data folders sharing eval.stats_dir get their own."""
    stats = tmp_path / "stats"
    config = train_flow.load_config(train_flow.parse_args([
        "--smoke", "--out-dir", str(tmp_path / "out"), "--set", f"eval.stats_dir={stats}",
        "--set", f"eval.fid_weights={weights_path}", "--set", "eval.inception_batch_size=4"]))
    real_images = [torch.from_numpy(write_cifar_batches(tmp_path / name, per_batch=2, test_images=0, seed=seed)[0][:4])
                   for name, seed in (("a", 0), ("b", 1))]  # two data folders' first four images
    paths = [Path(train_flow.fid_statistics(images, config, "cpu", False)) for images in real_images]
    assert paths[0] != paths[1] and sorted(stats.iterdir()) == sorted(paths)
    means = [wbflow.feature_statistics(wbflow.inception_features(images, weights_path=weights_path)[0])[0]
             for images in real_images]
    for path, mu in zip(paths, means):  # each file holds its own images' statistics
        with np.load(path) as stored:
            np.testing.assert_allclose(stored["mu"], mu, rtol=1e-5, atol=1e-5)
    paths[0].write_bytes(paths[0].read_bytes()[:100])  # damaged: computed again, not a traceback after sampling
    assert Path(train_flow.fid_statistics(real_images[0], config, "cpu", False)) == paths[0]
    with np.load(paths[0]) as stored:
        np.testing.assert_allclose(stored["mu"], means[0], rtol=1e-5, atol=1e-5)


def test_an_unwritable_statistics_folder_or_out_dir_is_refused_before_sampling_or_training(
        tmp_path, weights_path, monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    monkeypatch.setattr(wbflow, "sample_images", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("trained before the check"))
    write_cifar_batches(tmp_path / "data", per_batch=2, test_images=0)
    (tmp_path / "file").write_text("a file where a folder would be: not writable, even by root")
    unwritable = tmp_path / "file" / "stats"
    argv = ["--eval", "--smoke", "--checkpoint", str(tiny_flow_checkpoint(tmp_path / "c.pt")), "--num-samples", "2",
            "--data-dir", str(tmp_path / "data"), "--set", "eval.num_real_images=4"]
    refused(train_flow.main, argv + ["--out-dir", str(tmp_path / "out"), "--set", f"eval.stats_dir={unwritable}"],
            rf"the FID statistics file \(eval\.stats_dir\) {re.escape(str(unwritable))}/\S+\.npz cannot be written "
            rf"\({re.escape(str(tmp_path / 'file'))}: Not a directory\)")
    refused(train_flow.main, argv + ["--out-dir", str(unwritable)],
            rf"the sample grid {re.escape(str(unwritable))}/samples/\S+\.png cannot be written")
    refused(train_flow.main, ["--smoke", "--no-wandb", "--out-dir", str(tmp_path / "train"), *SMALL, "--set",
                              "eval.fid_interval=1", "--set", f"eval.stats_dir={unwritable}"],
            r"the FID statistics file \(eval\.stats_dir\) .* cannot be written")

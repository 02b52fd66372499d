"""wbflow's metrics: FID, Inception Score and KID against pytorch-fid and torch-fidelity, the Frechet distance,
statistics files, the fid command line and the package, F1, macro-F1 and the competition's score."""
import contextlib
import io
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import evaluate_flow
import train_fire
import wbflow
from conftest import SEED_CLASSES, _write_folder, within

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- FID and IS: parity with pytorch-fid and torch-fidelity

@pytest.fixture(scope="session")
def tensorflow_outputs(inception, images_uint8):
    return wbflow.inception_features(images_uint8, inception, resize="tensorflow")


def test_state_dict_keys_are_pytorch_fids(weights_path, monkeypatch):
    import pytorch_fid.inception as pytorch_fid_inception
    state_dict = torch.load(weights_path, weights_only=True)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda *args, **kwargs: state_dict)
    reference = pytorch_fid_inception.fid_inception_v3()
    assert set(reference.state_dict()) == set(wbflow.FIDInceptionV3().state_dict())


def test_features_differ_between_images(tensorflow_outputs):
    features, _ = tensorflow_outputs
    assert features.shape == (10, 2048)
    assert features.std(dim=0).mean() > 1000 * FEATURE_TOLERANCE


def _torch_fidelity_extractor(weights_path):
    import torch_fidelity.feature_extractor_inceptionv3 as extractor_module
    return extractor_module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"],
        feature_extractor_weights_path=weights_path)


def test_unfused_model_gives_the_same_features(weights_path, images_uint8, tensorflow_outputs):
    unfused = wbflow.load_fid_inception(weights_path, fuse=False)
    features, _ = wbflow.inception_features(images_uint8, unfused)
    assert (features - tensorflow_outputs[0]).abs().max() < FEATURE_TOLERANCE


def test_inception_score_matches_torch_fidelity_isc(weights_path, inception, images_uint8,
                                                     tensorflow_outputs):
    import torch_fidelity.metric_isc as metric_isc
    _, logits = tensorflow_outputs
    with torch.no_grad():
        _, reference_logits = _torch_fidelity_extractor(weights_path)(images_uint8)
    expected = metric_isc.isc_features_to_metric(reference_logits, splits=5)
    mean, std = wbflow.inception_score(images_uint8, splits=5, inception=inception)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-5)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-3, abs=1e-6)
    assert wbflow.inception_score(logits, splits=5) == pytest.approx((mean, std), rel=1e-5, abs=1e-8)


def test_inception_score_of_logits_equals_torch_fidelity_exactly():
    import torch_fidelity.metric_isc as metric_isc
    logits = torch.randn(200, 1008, generator=torch.Generator().manual_seed(3)) * 3
    expected = metric_isc.isc_features_to_metric(logits)
    assert wbflow.inception_score(logits) == pytest.approx(
        (expected["inception_score_mean"], expected["inception_score_std"]), rel=1e-12)


def _random_statistics(dims, samples, seed):
    features = np.random.default_rng(seed).standard_normal((samples, dims)) @ np.diag(
        np.linspace(0.5, 2, dims))
    return wbflow.feature_statistics(torch.from_numpy(features + seed))


def test_singular_covariances_give_real_distance_equal_to_full_precision_value():
    real, fake = _random_statistics(64, 10, 1), _random_statistics(64, 12, 2)
    distance = wbflow.frechet_distance(*real, *fake)
    import scipy.linalg  # reference: sqrtm of the product, real part, in float64
    covariance_mean = scipy.linalg.sqrtm(real[1] @ fake[1]).real
    expected = (np.sum((real[0] - fake[0]) ** 2) + np.trace(real[1]) + np.trace(fake[1])
                - 2 * np.trace(covariance_mean))
    assert isinstance(distance, float) and np.isfinite(distance)
    assert distance == pytest.approx(expected, rel=1e-6)


feature_sets = arrays(np.float64, st.tuples(st.integers(3, 12), st.integers(2, 6)),
                      elements=st.floats(-10, 10, allow_nan=False, width=32))


@settings(max_examples=40, deadline=None)
@given(features=feature_sets)
@example(features=np.array([[0., -2, -2, -2, -2, -2], [-2, -2, -2, -2, -2, -2], [-2, -2, -2, -2, 1, -2],
                            [-2, -2, 2, -2, -2, -2], [-2, -2, -2, -2, -2, 0], [0, -2, -2, -2, -2, -2],
                            [-2, 2, -2, -2, -2, -2]]))  # a constant feature: its covariance's 0 rounds to -7e-15
def test_fid_of_a_set_with_itself_is_zero(features):
    features = torch.from_numpy(features)
    scale = 1 + features.square().sum().item()
    assert wbflow.fid(features, features) == pytest.approx(0, abs=1e-6 * scale)


@settings(max_examples=40, deadline=None)
@given(real=feature_sets, seed=st.integers(0, 1000))
def test_fid_is_symmetric_and_non_negative(real, seed):
    real = torch.from_numpy(real)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    fake = real * 0.5 + noise
    forward, backward = wbflow.fid(real, fake), wbflow.fid(fake, real)
    scale = 1 + real.square().sum().item() + fake.square().sum().item()
    assert forward == pytest.approx(backward, abs=1e-8 * scale)
    assert forward >= -1e-8 * scale


@settings(max_examples=40, deadline=None)
@given(real=feature_sets, seed=st.integers(0, 1000))
def test_frechet_distance_is_invariant_to_a_common_rotation(real, seed):
    real = torch.from_numpy(real)
    generator = torch.Generator().manual_seed(seed)
    fake = torch.randn(real.shape, generator=generator, dtype=torch.float64) * 2
    rotation, _ = torch.linalg.qr(torch.randn(real.shape[1], real.shape[1], generator=generator,
                                              dtype=torch.float64))
    scale = 1 + real.square().sum().item() + fake.square().sum().item()
    assert wbflow.fid(real @ rotation, fake @ rotation) == pytest.approx(
        wbflow.fid(real, fake), abs=1e-8 * scale)


def test_num_images_caps_each_side(inception, images_uint8):
    batches = torch.utils.data.DataLoader(images_uint8, batch_size=3)
    features, logits = wbflow.inception_features(batches, inception, num_images=4)
    assert features.shape == (4, 2048) and logits.shape == (4, 1008)


def test_save_statistics_writes_pytorch_fid_npz_with_the_umask_and_reuses_it(weights_path, inception, images_uint8,
                                                                             tmp_path, monkeypatch):
    old_umask = os.umask(0o022)
    try:
        path = wbflow.save_statistics(images_uint8[:3], tmp_path, "toy", weights_path=weights_path)
    finally:
        os.umask(old_umask)
    assert os.path.basename(path) == f"toy-tensorflow-{wbflow.file_sha256(weights_path)[:12]}.npz"
    assert os.stat(path).st_mode & 0o777 == 0o644 and os.listdir(tmp_path) == [os.path.basename(path)]
    mu, sigma = wbflow.feature_statistics(wbflow.inception_features(images_uint8[:3], inception)[0])
    with np.load(path) as stored:
        assert np.array_equal(stored["mu"], mu) and np.array_equal(stored["sigma"], sigma)
    monkeypatch.setattr(wbflow, "inception_features", lambda *a, **k: pytest.fail("recomputed"))
    assert wbflow.save_statistics(images_uint8[:3], tmp_path, "toy", weights_path=weights_path) == path


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        wbflow.load_fid_inception(tmp_path / "absent.pth")


def test_weights_path_comes_from_the_argument_then_the_environment_then_the_hub_cache(weights_path, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", weights_path)
    assert wbflow.fid_weights_path() == weights_path
    (tmp_path / "other.pth").write_bytes(b"")
    assert wbflow.fid_weights_path(tmp_path / "other.pth") == str(tmp_path / "other.pth")  # the argument wins
    monkeypatch.setenv("WBFLOW_FID_WEIGHTS", str(tmp_path / "from_env.pth"))
    with pytest.raises(FileNotFoundError, match="from_env.pth"):
        wbflow.fid_weights_path()
    monkeypatch.delenv("WBFLOW_FID_WEIGHTS")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    downloaded = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *args, **kwargs: downloaded.append(url))
    hub_path = os.path.join(str(tmp_path), "checkpoints", "pt_inception-2015-12-05-6726825d.pth")
    assert wbflow.fid_weights_path() == hub_path
    assert downloaded == ["https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                          "pt_inception-2015-12-05-6726825d.pth"]


def test_fid_refuses_images_outside_zero_one_and_wrong_shapes(inception):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        wbflow.inception_features(torch.rand(2, 3, 8, 8) * 2 - 1, inception)
    with pytest.raises(ValueError, match="shape"):
        wbflow.inception_features(torch.rand(2, 8, 8), inception)


def test_offline_without_weights_says_which_file_to_put_where(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.delenv(wbflow.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected_path = os.path.join(str(tmp_path), "checkpoints", wbflow.FID_WEIGHTS_FILE)
    with pytest.raises(FileNotFoundError) as error:
        wbflow.fid_weights_path()
    assert expected_path in str(error.value) and wbflow.FID_WEIGHTS_URL in str(error.value)
    checkpoint = tmp_path / "flow.pt"
    wbflow.save_checkpoint({"config": {"model": {"base_channels": 8, "channel_mults": (1,), "num_res_blocks": 1,
                                                  "attention_resolutions": (), "head_channels": 8}},
                            "ema": wbflow.make_ema(wbflow.FlowUNet(base_channels=8, channel_mults=(1,), num_res_blocks=1,
                                                                   attention_resolutions=(), head_channels=8)).state_dict(),
                            "epoch": 1, "global_step": 2}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:  # the driver ends with the message, not a traceback
        evaluate_flow.main(["--smoke", "--checkpoint", str(checkpoint), "--num-samples", "4", "--nfe", "1",
                            "--data-dir", str(tmp_path)])
    assert expected_path in str(exit_info.value.code)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "hostile.pth"
    with open(path, "wb") as file:
        pickle.dump({"fc.weight": _RunsCodeWhenUnpickled()}, file)
    with pytest.raises(ValueError, match="weights_only"):
        wbflow.load_fid_inception(path)


def test_weights_file_with_other_keys_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="keys"):
        wbflow.load_fid_inception(path)


# ----------------------------------------------------------------------------- F1, macro-F1 and the competition's score

def test_per_class_precision_and_recall():
    precision, recall, support = wbflow.per_class_precision_recall([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert precision == pytest.approx([0.5, 2 / 3, 0.0])
    assert recall == pytest.approx([0.5, 1.0, 0.0])
    assert support == [2, 2, 1]


def test_f1_scores_equal_torchmetrics_per_class_and_macro():
    from torchmetrics.classification import MulticlassF1Score
    generator = torch.Generator().manual_seed(0)
    y_true, y_pred = torch.randint(0, 5, (200,), generator=generator), torch.randint(0, 4, (200,), generator=generator)
    f1, macro_f1 = wbflow.f1_scores(y_true.tolist(), y_pred.tolist(), 5)  # class 4 never predicted: F1 0
    torch.testing.assert_close(torch.tensor(f1, dtype=torch.float32), MulticlassF1Score(5, average=None)(y_pred, y_true))
    assert macro_f1 == pytest.approx(float(MulticlassF1Score(5, average="macro")(y_pred, y_true)))


def test_macro_f1_leaves_out_a_class_in_neither_labels_nor_predictions_and_counts_one_only_predicted():
    # by hand, as sklearn's f1_score(average="macro", zero_division=0) on the labels it finds, 2 tp / (2 tp + fp + fn):
    # class 0 2/3, class 1 4/6, class 2 (no label, predicted once) 0, class 3 (in neither) left out
    f1, macro_f1 = wbflow.f1_scores([0, 0, 1, 1, 1], [0, 1, 1, 1, 2], 4)
    assert f1[:3] == pytest.approx([2 / 3, 4 / 6, 0.0]) and math.isnan(f1[3])
    assert macro_f1 == pytest.approx((2 / 3 + 4 / 6 + 0.0) / 3)  # not / 4: the class in neither caps nothing


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30))
def test_macro_f1_is_torchmetrics_macro_f1_and_per_class_f1_its_per_class_f1_where_a_class_occurs(pairs):
    from torchmetrics.classification import MulticlassF1Score
    y_true, y_pred = (torch.tensor(values) for values in zip(*pairs))
    f1, macro_f1 = wbflow.f1_scores(y_true.tolist(), y_pred.tolist(), 5)
    occurring = set(y_true.tolist()) | set(y_pred.tolist())
    assert [label for label, value in enumerate(f1) if value == value] == sorted(occurring)
    expected = MulticlassF1Score(5, average=None)(y_pred, y_true)
    assert [f1[label] for label in sorted(occurring)] == pytest.approx(expected[sorted(occurring)].tolist(), abs=1e-6)
    assert macro_f1 == pytest.approx(float(MulticlassF1Score(5, average="macro")(y_pred, y_true)), abs=1e-6)


def test_the_score_is_each_classs_f1_weighted_as_the_competition_weighs_them_computed_by_hand():
    weights = [train_fire.COMPETITION_WEIGHTS[name] for name in SEED_CLASSES]
    assert weights == [2.0, 1.5, 1.0, 1.0, 1.0]  # 高风险 2, 中风险 1.5, the others 1
    y_true, y_pred = [0, 0, 1, 1, 2, 3, 4, 4], [0, 1, 1, 1, 2, 3, 4, 0]
    # F1 = 2 tp / (2 tp + fp + fn): 高风险 2/4, 中风险 4/5, 低风险 1, 无风险 1, 非楼道 2/3
    assert wbflow.weighted_f1_score(y_true, y_pred, weights) == pytest.approx(2 * 2 / 4 + 1.5 * 4 / 5 + 1 + 1 + 2 / 3)
    assert wbflow.weighted_f1_score(y_true, y_true, weights) == 6.5  # the maximum
    # a class in neither the labels nor the predictions counts 0, its weight still in the maximum
    assert wbflow.weighted_f1_score([0, 1], [0, 1], [1.0, 1.0, 5.0]) == 2.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30),
       st.lists(st.floats(0, 3), min_size=5, max_size=5))
def test_the_score_is_torchmetrics_per_class_f1_weighted(pairs, weights):
    from torchmetrics.classification import MulticlassF1Score
    y_true, y_pred = (torch.tensor(values) for values in zip(*pairs))
    per_class = MulticlassF1Score(5, average=None)(y_pred, y_true).double()
    expected = float((per_class * torch.tensor(weights, dtype=torch.float64)).sum())
    assert wbflow.weighted_f1_score(y_true.tolist(), y_pred.tolist(), weights) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.integers(4, 40), st.integers(0, 2 ** 16))
def test_fitted_offsets_never_lower_the_weighted_score_and_reproduce_the_score_they_report(classes, images, seed):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(images, classes, generator=generator, dtype=torch.float64).softmax(1)
    labels = torch.randint(0, classes, (images,), generator=generator).tolist()
    weights = (torch.rand(classes, generator=generator, dtype=torch.float64) * 2 + 0.5).tolist()
    offsets, before, after = wbflow.fit_class_offsets(probs, labels, weights)
    assert before == pytest.approx(wbflow.weighted_f1_score(labels, probs.argmax(1), weights))
    assert after >= before
    assert wbflow.weighted_f1_score(labels, wbflow.apply_class_offsets(probs, offsets), weights) == after


# ----------------------------------------------------------------------------- the fid command's refusals

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
        assert re.fullmatch(rf"python wbflow\.py fid: .*{match}.*", message), message
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
    assert re.fullmatch(rf"python wbflow\.py fid: {match}.*", message), message


def test_fid_command_says_cuda_is_missing_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = _image_folder(tmp_path / "images", 2)
    message, _ = _fid_command(folder, folder, "--device", "cuda")
    assert message == "python wbflow.py fid: --device cuda: this machine has 0 CUDA devices; pass --device cpu"


def test_fid_of_one_image_says_it_needs_two_per_side(tmp_path, weights_path):  # noqa: F811
    one, two = _image_folder(tmp_path / "one", 1), _image_folder(tmp_path / "two", 2)
    message, _ = _fid_command(one, two, "--weights", weights_path, "--device", "cpu")
    assert message == "python wbflow.py fid: FID needs at least two images per side to estimate a covariance, got 1"
    with pytest.raises(ValueError, match="FID needs at least two images per side"):
        wbflow.fid(torch.randn(5, 8), torch.randn(1, 8))


def test_save_stats_writes_the_npz_it_names_and_refuses_an_existing_one(tmp_path, weights_path):  # noqa: F811
    folder = _image_folder(tmp_path / "images", 3)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert wbflow._command_line(["fid", folder, str(tmp_path / "stats"), "--save-stats", "--weights", weights_path,
                                     "--device", "cpu"]) is None
    assert printed.getvalue() == f"saved the statistics of 3 images to {tmp_path / 'stats.npz'}\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "stats.npz"]
    mu, sigma = wbflow.feature_statistics(wbflow.inception_features(folder, weights_path=weights_path)[0])
    with np.load(tmp_path / "stats.npz") as stored:
        assert sorted(stored.files) == ["mu", "sigma"] and np.array_equal(stored["mu"], mu)
        assert np.array_equal(stored["sigma"], sigma)
    before = (tmp_path / "stats.npz").read_bytes()
    for name in ("stats", "stats.npz"):
        message, _ = _fid_command(folder, str(tmp_path / name), "--save-stats", "--weights", weights_path)
        assert message == (f"python wbflow.py fid: {tmp_path / 'stats.npz'} exists already: "
                           f"choose another name or delete it")
    assert (tmp_path / "stats.npz").read_bytes() == before


@pytest.mark.parametrize("settings", [dict(subset_size=1), dict(subset_size=0), dict(subsets=0, subset_size=4)])
def test_kid_refuses_subsets_it_cannot_average(settings):
    features = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).numpy()
    with pytest.raises(ValueError, match=r"KID needs subsets >= 1 of subset_size >= 2 images"):
        wbflow.kid(features, features, **settings)


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
def pytorch_fid_printed(pytorch_fid_process):
    """What conftest's pytorch_fid_process printed, once it ended: (its stdout, its two folders)."""
    process, first, second = pytorch_fid_process
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stdout, first, second


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
                                                                                       pytorch_fid_printed, tmp_path):
    expected, first, second = pytorch_fid_printed  # `python -m pytorch_fid first second`
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

"""torchvision's classification recipe in train_fire: TrivialAugment / RandAugment and random erasing, MixUp and
CutMix batches that train and resume exactly, an EMA of the weights, a warm-up, any torchvision model by name with
its preprocessing kept in the checkpoint, and the new flags in the sweep's spelling and the resume checks."""
import signal
import urllib.error

import pytest
import torch
import torchvision

import train_fire
import wbflow
from test_guard import refused
from test_training import sigterm_after
from test_wbflow import SEED_CLASSES, fire_args, write_pattern_folders

RECIPE = ["--augment", "randaugment", "--random-erase", "0.5", "--mixup", "0.2", "--cutmix", "1.0",
          "--ema-decay", "0.8", "--warmup-epochs", "1"]


def test_augment_policies_and_random_erasing_are_torchvisions_and_refuse_other_names():
    from PIL import Image
    image = Image.new("RGB", (24, 24), (200, 40, 90))
    plain = wbflow.image_transforms(16, train=True)
    for augment, policy in (("trivialaugment", "TrivialAugmentWide"), ("randaugment", "RandAugment")):
        steps = [type(step).__name__ for step in wbflow.image_transforms(16, train=True, augment=augment).transforms]
        assert policy in steps and steps.index(policy) > steps.index("RandomHorizontalFlip")
    torch.manual_seed(0)
    erased = wbflow.image_transforms(16, train=True, random_erase=1.0)(image)  # erased to 0: the normalised mean
    assert (erased == 0).all(0).sum() > 0 and not (plain(image) == 0).all(0).any()
    assert "RandomErasing" not in str(wbflow.image_transforms(16, train=False, random_erase=1.0))
    with pytest.raises(ValueError, match="augment must be one of none, trivialaugment, randaugment, not 'auto'"):
        wbflow.image_transforms(16, train=True, augment="auto")


def test_mixup_and_cutmix_batches_are_seeded_by_their_samples_whatever_the_workers_and_a_resume(tmp_path):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b", "c"])
    samples, _, _ = wbflow.find_image_samples(data, val_split=0.25)
    train_set = wbflow.ImageSamples(samples, wbflow.image_transforms(16, train=True, augment="trivialaugment",
                                                                     random_erase=0.5))

    def epoch(number, workers=0, skip_batches=0):
        loader, _ = wbflow.classifier_loaders(train_set, train_set, 3, num_workers=workers, seed=5,
                                              batch_transform=wbflow.mix_batches(3, mixup=0.4, cutmix=1.0))
        loader.sampler.set_epoch(number, skip_batches=skip_batches)
        return list(loader)
    whole = epoch(1)
    assert len(whole) == 3 and all(soft.shape == (3, 3) for _, soft in whole)
    assert any(((soft > 0) & (soft < 1)).any() for _, soft in whole)  # mixed: soft labels
    for workers, skip_batches in ((2, 0), (0, 1), (2, 2)):
        tail = epoch(1, workers, skip_batches)
        assert len(tail) == 3 - skip_batches
        for (images, soft), (expected_images, expected_soft) in zip(tail, whole[skip_batches:]):
            assert torch.equal(images, expected_images) and torch.equal(soft, expected_soft)
    assert not torch.equal(epoch(2)[0][1], whole[0][1])  # another epoch, other mixes


def test_accuracy_on_mixed_batches_counts_the_larger_share():
    loss_fn = wbflow.classification_loss(torch.nn.CrossEntropyLoss())
    model = torch.nn.Flatten()  # logits: the two inputs
    soft = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    _, correct, count = loss_fn(model, (torch.tensor([[2.0, 1.0], [2.0, 1.0], [0.0, 1.0]]), soft))
    assert (int(correct), count) == (1, 3)


def _last(out):
    return wbflow.load_checkpoint(out / "last.pth")


def test_the_recipe_stopped_mid_epoch_and_resumed_trains_exactly_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    # 15 training images, batches of 4: 3 steps an epoch, a warm-up epoch and a cosine one; the stop at step 4
    data = write_pattern_folders(tmp_path / "data", per_class=6, classes=["a", "b", "c"])
    flags = ["--epochs", "2", "--batch-size", "4", "--no-wandb", *RECIPE]
    train_fire.main(fire_args(data, tmp_path / "whole", *flags))
    argv = fire_args(data, tmp_path / "split", *flags)
    real_loss, wraps = wbflow.classification_loss, iter([sigterm_after(4)])
    monkeypatch.setattr(wbflow, "classification_loss", lambda criterion: next(wraps)(real_loss(criterion)))
    with pytest.raises(SystemExit) as stopped:
        train_fire.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _last(tmp_path / "split")["train_state"]["batches"] == 1 and _last(tmp_path / "split")["ema"]
    monkeypatch.setattr(wbflow, "classification_loss", real_loss)
    refused(train_fire.main, [*argv, "--resume", str(tmp_path / "split" / "last.pth"), "--mixup", "0.3"],
            r"trained with mixup 0\.2, this run has 0\.3")
    train_fire.main([*argv, "--resume", str(tmp_path / "split" / "last.pth")])
    assert "resuming epoch 1 at batch 1, step 4" in capsys.readouterr().out
    whole, split = _last(tmp_path / "whole"), _last(tmp_path / "split")
    assert split["step"] == whole["step"] == 6 and split["config"]["scheduler"] == "SequentialLR"
    for key in ("model", "ema"):  # the weights and their EMA, as if never stopped
        for name, tensor in whole[key].items():
            torch.testing.assert_close(split[key][name], tensor, rtol=1e-5, atol=1e-6)
    assert split["best"] == whole["best"]


def test_a_convnext_trains_and_predicts_with_the_preprocessing_its_checkpoint_keeps(tmp_path, monkeypatch):
    data = write_pattern_folders(tmp_path / "data", per_class=4, classes=["a", "b", "c"])
    train_fire.main(fire_args(data, tmp_path / "out", "--model", "convnext_tiny", "--epochs", "1", "--image-size",
                              "40", "--no-wandb"))
    best = wbflow.load_checkpoint(tmp_path / "out" / "best_model.pth")
    assert best["config"]["model"] == "convnext_tiny" and best["model"]["classifier.2.weight"].shape == (3, 768)
    assert (best["config"]["image_size"], best["config"]["mean_std"]) == (40, wbflow.IMAGENET_MEAN_STD)
    used, real = [], wbflow.image_transforms
    monkeypatch.setattr(wbflow, "image_transforms", lambda *args, **kwargs: used.append((args, kwargs)) or real(
        *args, **kwargs))
    train_fire.main(["--predict", str(data / "a"), "--checkpoint", str(tmp_path / "out" / "best_model.pth"),
                     "--num-workers", "0", "--no-wandb"])
    assert used == [((40,), {"train": False, "mean_std": wbflow.IMAGENET_MEAN_STD})]
    assert len((tmp_path / "out" / "submission.txt").read_text().splitlines()) == 4


def test_imagenet_weights_of_any_model_come_through_its_weights_enum_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file_name = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.url.rsplit("/", 1)[1]

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(FileNotFoundError, match=f"(?s)the ImageNet weights for mobilenet_v3_small .*{file_name}.*"
                                                f"--weights none"):
        wbflow.build_classifier("mobilenet_v3_small", 5, weights="imagenet")
    cached = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(cached, tmp_path / "hub" / "checkpoints" / file_name)
    model = wbflow.build_classifier("mobilenet_v3_small", 5, weights="imagenet")
    assert torch.equal(model.features[0][0].weight, cached["features.0.0.weight"])
    assert model.classifier[3].out_features == 5


def _argv(data, *extra):
    return ["--data-dir", str(data), "--num-workers", "0", *extra]


def test_the_competitions_classes_select_on_its_score_by_default_and_others_on_val_acc(tmp_path):
    other = write_pattern_folders(tmp_path / "other", per_class=3, classes=["a", "b"])
    competition = write_pattern_folders(tmp_path / "competition", per_class=3)
    for data, extra, weights, metric in ((other, [], [1.0, 1.0], "val_acc"),
                                         (other, ["--score-weights", "b=3"], [1.0, 3.0], "val_acc"),
                                         (competition, [], None, "val_score")):
        args = train_fire.parse_args(_argv(data, *extra))
        class_names, *_ = train_fire.load_data(args, torch.device("cpu"), 0, 1)
        assert args.best_metric == metric
        assert args.score_weights == (weights or [train_fire.COMPETITION_WEIGHTS[name] for name in class_names])
    assert sorted(class_names) == sorted(SEED_CLASSES) and sum(args.score_weights) == 6.5


def test_the_new_flags_take_the_sweep_agents_spelling_and_a_resume_keeps_them():
    args = train_fire.parse_args(["--random_erase=0.1", "--ema_decay=0.99", "--warmup_epochs=1", "--folds=5",
                                  "--fold=1", "--augment=randaugment", "--mixup=0.2", "--cutmix=1",
                                  "--score_weights=a=2,b=0.5", "--best_metric=val_score"])
    assert (args.random_erase, args.ema_decay, args.warmup_epochs, args.folds, args.fold, args.augment) == (
        0.1, 0.99, 1, 5, 1, "randaugment")
    assert (args.mixup, args.cutmix, args.score_weights, args.best_metric) == (0.2, 1.0, {"a": 2.0, "b": 0.5},
                                                                               "val_score")
    assert {"random_erase", "ema_decay", "warmup_epochs", "folds", "fold", "augment", "mixup", "cutmix",
            "score_weights", "best_metric"} <= set(train_fire.RESUME_SAME)

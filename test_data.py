"""wbflow's data: CIFAR-10 batches and the device loader, image folders, CSV files and the competition's
lists, unreadable images, stratified splits and folds, loaders, samplers and augmentation."""
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import train_fire
import wbflow
from conftest import (SEED_CLASSES, _Hostile, fire_args, hashed_jpeg, pattern_image, within, write_cifar_batches,
                      write_download, write_pattern_folders)

# ----------------------------------------------------------------------------- CIFAR-10 and the device loader

def test_load_cifar10_reads_the_pickle_batches_as_one_uint8_tensor(tmp_path):
    images, labels = write_cifar_batches(tmp_path)
    train_images, train_labels = wbflow.load_cifar10(tmp_path, download=False)
    test_images, _ = wbflow.load_cifar10(tmp_path, train=False, download=False)
    assert train_images.dtype == torch.uint8 and train_images.shape == (200, 3, 32, 32)
    assert torch.equal(train_images, torch.from_numpy(images[:200]))
    assert train_labels.tolist() == labels[:200] and test_images.shape == (20, 3, 32, 32)


def test_load_cifar10_refuses_a_batch_file_that_carries_code(tmp_path):
    write_cifar_batches(tmp_path)
    created = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as file:
        pickle.dump({"data": _Hostile(str(created)), "labels": []}, file)
    with pytest.raises(ValueError, match="data_batch_3"):
        wbflow.load_cifar10(tmp_path, download=False)
    assert not created.exists()


def test_load_cifar10_offline_says_which_archive_to_put_where(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(FileNotFoundError) as error:
        wbflow.load_cifar10(tmp_path / "data")
    message = str(error.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "data") in message
    assert wbflow.CIFAR10_URL in message


@pytest.mark.parametrize("rank", [0, 1])
def test_load_cifar10_under_ddp_downloads_on_rank_0_while_the_other_ranks_wait(tmp_path, rank, monkeypatch):
    events = []

    def download(*args, **kwargs):  # what torchvision's download leaves in the folder
        events.append("download")
        write_cifar_batches(tmp_path)

    def barrier():  # rank 1 waits here while rank 0 downloads
        events.append("barrier")
        if rank == 1:
            download()
    monkeypatch.setattr(wbflow, "rank_and_world_size", lambda: (rank, 2))
    monkeypatch.setattr(wbflow.torchvision.datasets, "CIFAR10", download)
    monkeypatch.setattr(wbflow.dist, "barrier", barrier)
    images, _ = wbflow.load_cifar10(tmp_path)
    assert events == (["download", "barrier"] if rank == 0 else ["barrier", "download"])  # rank 1 never downloads
    assert images.shape == (200, 3, 32, 32)


def _ids_loader(count=100, batch_size=16, **kwargs):
    """Images whose pixel (0, 0, 0) is the index and whose left half is 0, right half 255 (flip visible)."""
    images = torch.zeros(count, 3, 4, 4, dtype=torch.uint8)
    images[:, :, :, 2:] = 255
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    images[:, 0, 0, 3] = torch.arange(count, dtype=torch.uint8)
    return wbflow.DeviceImageLoader(images, batch_size, **kwargs)


def _ids(batch):
    uint8 = ((batch + 1) * 127.5).round().long()
    return uint8[:, 0, 0, 0].tolist(), (uint8[:, 1, 0, 0] == 255).tolist()


def test_device_loader_yields_a_seeded_permutation_in_minus_one_to_one_with_random_flips():
    loader = _ids_loader(seed=3)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and all(b.shape == (16, 3, 4, 4) for b in batches)
    assert all(b.dtype == torch.float32 and b.min() >= -1 and b.max() <= 1 for b in batches)
    ids, flipped = zip(*[_ids(b) for b in batches])
    ids, flipped = sum(ids, []), sum(flipped, [])
    assert len(set(ids)) == 96 and ids != sorted(ids)  # no repeats, shuffled, last partial batch dropped
    assert 25 < sum(flipped) < 71  # about half flipped
    loader.set_epoch(1)
    assert sum([_ids(b)[0] for b in loader], []) == ids  # the order is a function of (seed, epoch)
    loader.set_epoch(2)
    assert sum([_ids(b)[0] for b in loader], []) != ids


def test_device_loader_shards_one_permutation_across_ranks():
    shards = []
    for rank in range(2):
        loader = _ids_loader(count=64, batch_size=8, seed=0, rank=rank, world_size=2, drop_last=False)
        loader.set_epoch(5)
        shards.append(sum([_ids(b)[0] for b in loader], []))
    assert len(shards[0]) == len(shards[1]) == 32 and sorted(shards[0] + shards[1]) == list(range(64))


@pytest.mark.parametrize("count, batch_size, drop_last", [(255, 64, True), (17, 4, False), (9, 2, True)])
def test_device_loader_gives_every_rank_the_same_number_of_batches(count, batch_size, drop_last):
    """Unequal batch counts would leave DDP ranks waiting for each other forever."""
    lengths = []
    for rank in range(2):
        loader = _ids_loader(count=count, batch_size=batch_size, seed=0, rank=rank, world_size=2, drop_last=drop_last)
        lengths.append((len(loader), len(list(loader))))
    assert lengths[0] == lengths[1] and lengths[0][0] == lengths[0][1] > 0


def test_the_device_loader_yields_each_images_own_label_through_shuffles_and_flips():
    images_uint8 = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).clone()
    images_uint8[:, :, :, 0] = 200  # a left column, so a flip is visible
    loader = wbflow.DeviceImageLoader(images_uint8, 5, labels=torch.arange(20) % 7, seed=3)
    loader.set_epoch(2)
    seen, flipped = [], 0
    for images, labels in loader:
        index = ((images[:, 0] + 1) * 127.5).round().long().amin(dim=(1, 2))  # each image's own value
        seen += index.tolist()
        flipped += int((images[:, 0, 0, 1] > images[:, 0, 0, 0]).sum())
        assert labels.dtype == torch.long and torch.equal(labels, index % 7)
    assert sorted(seen) == list(range(20)) and 0 < flipped < 20


def test_the_device_loader_refuses_labels_of_another_count():
    with pytest.raises(ValueError, match=r"^DeviceImageLoader: \(5,\) labels for 4 images$"):
        wbflow.DeviceImageLoader(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), 2, labels=torch.zeros(5))


# ----------------------------------------------------------------------------- image folders, CSV files and lists

def test_bad_data_folder_ends_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="data not found"):
        train_fire.main(fire_args(tmp_path / "missing", tmp_path / "out", "--no-wandb"))


def test_train_and_val_folders_give_both_splits_with_folder_class_names(tmp_path):
    write_pattern_folders(tmp_path / "train", per_class=3)
    write_pattern_folders(tmp_path / "val", per_class=2)
    train, val, class_names = wbflow.find_image_samples(tmp_path)
    assert class_names == sorted(SEED_CLASSES)
    assert len(train) == 15 and len(val) == 10
    assert all(Path(path).parent.name == class_names[label] for path, label in train + val)
    assert all("/val/" in path for path, _ in val)


def test_class_folders_are_split_stratified_and_seeded_with_the_given_class_order(tmp_path):
    write_pattern_folders(tmp_path, per_class=10)
    train, val, class_names = wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES,
                                                           val_split=0.2, seed=3)
    assert class_names == SEED_CLASSES
    assert np.bincount([label for _, label in val]).tolist() == [2] * 5
    assert np.bincount([label for _, label in train]).tolist() == [8] * 5
    assert not set(train) & set(val)
    assert wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES, val_split=0.2, seed=3)[1] == val
    assert wbflow.find_image_samples(tmp_path, class_names=SEED_CLASSES, val_split=0.2, seed=4)[1] != val


def test_csv_of_path_and_label_is_read_relative_to_its_folder(tmp_path):
    write_pattern_folders(tmp_path / "images", per_class=4, classes=SEED_CLASSES[:2])
    rows = ["path,label"] + [f"images/{name}/{i}.png,{name}" for name in SEED_CLASSES[:2] for i in range(4)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    train, val, class_names = wbflow.find_image_samples(tmp_path / "labels.csv", val_split=0.25,
                                                           class_names=SEED_CLASSES[:2])
    assert class_names == SEED_CLASSES[:2]
    assert len(train) == 6 and len(val) == 2 and sorted(label for _, label in val) == [0, 1]
    assert all(os.path.isfile(path) for path, _ in train + val)


def test_unreadable_images_are_skipped_with_one_warning_that_counts_them(tmp_path):
    write_pattern_folders(tmp_path, per_class=3, classes=["a", "b"])
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "garbage.png").write_bytes(os.urandom(300))
    pattern_image(0, np.random.default_rng(0), size=64).save(tmp_path / "b" / "whole.jpg")
    data = (tmp_path / "b" / "whole.jpg").read_bytes()
    (tmp_path / "b" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "a" / "notes.txt").write_text("not an image, not counted")
    with pytest.warns(UserWarning, match="skipped 3 unreadable image") as caught:
        train, val, _ = wbflow.find_image_samples(tmp_path, val_split=0.25)
    assert len(caught) == 1
    names = sorted(Path(path).name for path, _ in train + val)
    assert len(names) == 7 and "whole.jpg" in names
    assert not {"empty.jpg", "garbage.png", "truncated.jpg", "notes.txt"} & set(names)


def test_a_fifo_among_the_images_is_skipped_as_unreadable_without_being_opened(tmp_path):
    write_pattern_folders(tmp_path, per_class=1, classes=["a"])
    os.mkfifo(tmp_path / "a" / "pipe.png")
    samples = [(str(tmp_path / "a" / "0.png"), 0), (str(tmp_path / "a" / "pipe.png"), 0)]
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): .*pipe\.png$"):
        kept = within(30, wbflow.drop_unreadable_images, samples, fifo=tmp_path / "a" / "pipe.png")
    assert kept == samples[:1]
    dataset = wbflow.ImageSamples(samples[::-1], wbflow.image_transforms(32, train=False))
    with pytest.warns(UserWarning, match="pipe.png"):
        image, label = within(30, dataset.__getitem__, 0, fifo=tmp_path / "a" / "pipe.png")
    assert image.shape == (3, 32, 32) and label == 0


def test_an_image_that_breaks_mid_epoch_is_replaced_not_fatal(tmp_path):
    write_pattern_folders(tmp_path, per_class=2, classes=["a"])
    dataset = wbflow.ImageSamples([(str(tmp_path / "a" / "0.png"), 0), (str(tmp_path / "a" / "1.png"), 0)],
                                     wbflow.image_transforms(32, train=False))
    (tmp_path / "a" / "0.png").write_bytes(b"gone bad")
    with pytest.warns(UserWarning, match="0.png"):
        image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


@pytest.mark.parametrize("make, match", [
    (lambda root: ((root / "a").mkdir(parents=True), (root / "b").mkdir()), "no readable images"),
    (lambda root: (write_pattern_folders(root, 2, ["a"]), (root / "b").mkdir()), "no readable images in .*: b"),
    (lambda root: root.mkdir(), "at least two classes; .* has 0"),
    (lambda root: write_pattern_folders(root, 2, ["a"]), "at least two classes; .* has 1: a"),
])
def test_empty_data_is_a_clear_error(tmp_path, make, match):
    make(tmp_path / "data")
    with pytest.raises(ValueError, match=match):
        wbflow.find_image_samples(tmp_path / "data")


def test_a_named_class_without_a_folder_is_a_clear_error(tmp_path):
    write_pattern_folders(tmp_path, per_class=2, classes=["a"])
    with pytest.raises(FileNotFoundError, match="class folder.*not found.*高风险"):
        wbflow.find_image_samples(tmp_path, class_names=["a", "高风险"])


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), fraction=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**16))
def test_stratified_split_keeps_every_class_on_both_sides_in_proportion(counts, fraction, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    train_index, val_index = wbflow.stratified_split(labels, fraction, seed=seed)
    assert sorted(train_index + val_index) == list(range(len(labels)))
    for label, count in enumerate(counts):
        n_val = int(np.sum(labels[val_index] == label))
        assert abs(n_val - fraction * count) <= 1
        assert 1 <= n_val <= count - 1 if count >= 2 else n_val == 0
    assert wbflow.stratified_split(labels, fraction, seed=seed) == (train_index, val_index)


def test_loaders_shard_validation_without_padding_and_shuffle_training_by_epoch():
    train_set = torch.utils.data.TensorDataset(torch.arange(20.0), torch.zeros(20, dtype=torch.long))
    val_set = torch.utils.data.TensorDataset(torch.arange(7.0), torch.zeros(7, dtype=torch.long))
    shards = [wbflow.classifier_loaders(train_set, val_set, 4, rank=rank, world_size=2) for rank in (0, 1)]
    seen = sorted(x.item() for _, val_loader in shards for x, _ in val_loader.dataset)
    assert seen == list(range(7))
    train_loader = shards[0][0]
    orders = []
    for epoch in (0, 1):
        train_loader.sampler.set_epoch(epoch)
        orders.append([x.tolist() for x, _ in train_loader])
    assert orders[0] != orders[1] and len(orders[0]) == 2  # 10 per rank, batch 4, last 2 dropped


def test_a_16_bit_grayscale_png_keeps_its_contrast(tmp_path):
    from PIL import Image
    gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image, _ = wbflow.ImageSamples([(str(tmp_path / "g16.png"), 0)])[0]
    pixels = np.asarray(image)
    assert pixels.shape == (16, 16, 3)
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255
    np.testing.assert_allclose(pixels[0, :, 0], np.round(gradient[0] / 257), atol=1)


# ----------------------------------------------------------------------------- loaders, samplers and augmentation

@pytest.mark.parametrize("cores, local_ranks, expected", [(16, 1, 4), (2, 1, 2), (1, 1, 1), (4, 2, 2), (2, 4, 0)])
def test_default_num_workers_never_exceeds_the_available_cores(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert train_fire.parse_args([]).num_workers == expected


@pytest.mark.parametrize("text", [
    "\ufeffname,label\na.png,x\nsub/b.png,y\n",  # comma, a BOM and a header; a name with a folder
    "a.png\tx\nsub/b.png\ty\n",  # tab, no header
])
def test_a_list_is_tab_or_comma_separated_with_or_without_header_and_bom_and_a_name_is_found_beside_it(tmp_path, text):
    from PIL import Image
    (tmp_path / "list").mkdir()
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "list" / "a.png")  # in the folder named like the list
    Image.new("RGB", (4, 4)).save(tmp_path / "sub" / "b.png")  # only beside the list
    (tmp_path / "list.txt").write_text(text, encoding="utf-8")
    assert wbflow.list_images(tmp_path / "list.txt") == (
        [("a.png", str(tmp_path / "list" / "a.png"), 0), ("sub/b.png", str(tmp_path / "sub" / "b.png"), 1)], ["x", "y"])


@pytest.mark.parametrize("text, names", [
    ("a\tx\nb\ty\n", ["a", "b"]),  # names without suffixes: the first row is an image, not a header
    ("gone\tx\nb\ty\n", ["gone", "b"]),  # nor when its file is missing: it is named, not lost
    ("gone.png\tx\nc.png\ty\n", ["gone.png", "c.png"]),
    ("Image_ID\tlabel\na\tx\nb\ty\n", ["a", "b"]),  # a usual column name is a header
    ("file,label\nc.png,x\n", ["c.png"]),  # a first cell without the suffix the names have is a header
])
def test_a_header_is_only_a_first_row_that_cannot_be_a_name_in_the_folder(tmp_path, text, names):
    (tmp_path / "list").mkdir()
    for name in ("a", "b", "c.png"):
        (tmp_path / "list" / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text(text, encoding="utf-8")
    rows, _ = wbflow.list_images(tmp_path / "list.txt", strict=False)
    assert [name for name, _, _ in rows] == names


def test_labels_that_differ_only_by_whitespace_are_two_classes_named_in_one_warning(tmp_path):
    write_download(tmp_path / "data", mix=dict.fromkeys(SEED_CLASSES, 2), test_images=0)
    rng = np.random.default_rng(0)
    spaced = [hashed_jpeg(tmp_path / "data" / "train", SEED_CLASSES.index("无风险"), rng) for _ in range(2)]
    with open(tmp_path / "data" / "train.txt", "a", encoding="utf-8") as file:
        file.write("".join(f"{name}\t无 风险\n" for name in spaced))
    with pytest.warns(UserWarning, match=r"train\.txt: classes that differ only by whitespace: '无 风险' and '无风险'$"):
        _, _, class_names = wbflow.find_image_samples(tmp_path / "data")
    assert len(class_names) == 6 and "无 风险" in class_names


def test_a_gbk_list_reads_its_chinese_labels_and_a_list_of_no_known_encoding_is_one_line(tmp_path):
    from PIL import Image
    (tmp_path / "train").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / name)
    (tmp_path / "train.txt").write_bytes("a.jpg\t高风险\nb.jpg\t无风险\n".encode("gbk"))  # as Chinese Windows saves it
    rows, class_names = wbflow.list_images(tmp_path / "train.txt", SEED_CLASSES)
    assert [(name, SEED_CLASSES[label]) for name, _, label in rows] == [("a.jpg", "高风险"), ("b.jpg", "无风险")]
    (tmp_path / "train.txt").write_bytes(b"a.jpg\t\x81\x30\n")  # a GB18030 four-byte sequence cut short
    with pytest.raises(ValueError, match=r"^\S*train\.txt is neither UTF-8 nor GBK / GB18030 text$"):
        wbflow.list_images(tmp_path / "train.txt", SEED_CLASSES)


def test_the_balanced_sampler_draws_each_class_equally_often_seeded_shared_by_the_ranks_and_exact_on_resume():
    labels = [0] * 90 + [1] * 10
    weights = wbflow.class_balanced_weights(labels, 2)[labels]

    def epoch_order(rank=0, world_size=1, epoch=3, skip_batches=0):
        loader, _ = wbflow.classifier_loaders(list(range(100)), [0], 5, sample_weights=weights, seed=7, rank=rank,
                                              world_size=world_size)
        loader.sampler.set_epoch(epoch, skip_batches=skip_batches)
        return [index for batch in loader for index in batch.tolist()]

    order = epoch_order()
    assert len(order) == 100 and 35 <= sum(index >= 90 for index in order) <= 65  # 10% of the data, half the draws
    assert order == epoch_order() and order != epoch_order(epoch=4)
    assert epoch_order(skip_batches=4) == order[20:]
    halves = [epoch_order(rank, 2) for rank in (0, 1)]
    assert [index for pair in zip(*halves) for index in pair] == order


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


# ----------------------------------------------------------------------------- the generated competition dataset

def test_write_pattern_dataset_writes_the_competitions_layout_with_classes_a_small_cnn_learns(tmp_path):
    counts = {"高风险": 24, "中风险": 24, "低风险": 24, "无风险": 24, "非楼道": 24, "sixth": 24}
    labelled, test = wbflow.write_pattern_dataset(tmp_path, counts, test_images=60, size=24, seed=1)
    rows, classes = wbflow.list_images(tmp_path / "train.txt")  # name<TAB>label, found in train/
    assert {name: classes[label] for name, _, label in rows} == labelled and sorted(classes) == sorted(counts)
    assert [line for line in (tmp_path / "A.txt").read_text(encoding="utf-8").splitlines()] == list(test)
    assert all((tmp_path / "A" / name).is_file() for name in test) and set(test.values()) <= set(counts)
    assert wbflow.write_pattern_dataset(tmp_path / "again", counts, test_images=60, size=24, seed=1) == (labelled, test)
    train_set = wbflow.ImageSamples([(path, label) for _, path, label in rows],
                                    wbflow.image_transforms(24, train=True, crop_scale=(0.5, 1)))
    test_set = wbflow.ImageSamples([(str(tmp_path / "A" / name), classes.index(label)) for name, label in test.items()],
                                   wbflow.image_transforms(24, train=False))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 6))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):  # epochs: flips and crops keep each class's shape
        for images, labels in torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    logits, labels = wbflow.predict_logits(model, test_set)
    assert (logits.argmax(1) == labels).double().mean() > 0.6  # chance: 1/6


# ----------------------------------------------------------------------------- stratified folds

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=60), st.integers(2, 7), st.integers(0, 3))
def test_stratified_folds_are_disjoint_cover_the_data_and_share_every_class_evenly(labels, folds, seed):
    folds = min(folds, len(labels))
    split = wbflow.stratified_folds(labels, folds, seed=seed)
    assert len(split) == folds and sorted(sum(split, [])) == list(range(len(labels)))  # disjoint, covering
    assert all(fold == sorted(fold) for fold in split)
    assert max(map(len, split)) - min(map(len, split)) <= 1
    for label in set(labels):
        counts = [sum(labels[index] == label for index in fold) for fold in split]
        assert max(counts) - min(counts) <= 1
    assert wbflow.stratified_folds(labels, folds, seed=seed) == split  # seeded

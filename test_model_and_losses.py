"""wbflow's models and objectives: FlowUNet (widths, state_dict keys, a second time, class labels), the
rectified-flow and MeanFlow losses, label dropout, OT pairs, classifiers, focal loss and class weights."""
import hashlib
import itertools
import math
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st

import train_fire
import wbflow
from conftest import (Constant, TINY, TINY_MEANFLOW_UNET, TINY_UNET, fire_args, jump_times, randomised,
                      tiny_meanflow_unet, write_pattern_folders)

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- FlowUNet and the rectified-flow loss

def test_rectified_flow_loss_regresses_the_straight_line_velocity():
    seen = {}

    def model(x, t, labels=None):
        seen["x"], seen["t"], seen["labels"] = x, t, labels
        return torch.zeros_like(x)

    data, labels = torch.randn(8, 3, 4, 4), torch.zeros(8, dtype=torch.long)
    torch.manual_seed(0)
    loss = wbflow.rectified_flow_loss(model, (data, labels))
    torch.manual_seed(0)
    noise, t = torch.randn_like(data), torch.rand(8)
    torch.testing.assert_close(seen["t"], t)
    assert seen["labels"] is labels  # an (x1, labels) batch trains a class-conditional model
    torch.testing.assert_close(seen["x"], t.view(-1, 1, 1, 1) * data + (1 - t.view(-1, 1, 1, 1)) * noise)
    torch.testing.assert_close(loss, ((data - noise) ** 2).mean())


def test_default_flow_unet_is_torchcfms_cifar10_recipe_with_35_7m_parameters():
    model = wbflow.FlowUNet()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {32}
    attention_channels = [m.qkv.in_channels for m in model.modules() if isinstance(m, wbflow._FlowAttention)]
    assert attention_channels == [256] * 6  # 2 down + 3 up blocks at 16x16, 1 in the middle


@pytest.mark.parametrize("base_channels", [8, 16, 32, 64])
def test_flow_unet_output_depends_on_x_and_t_at_every_width(base_channels):
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**{**TINY_UNET, "base_channels": base_channels})
    for module in model.modules():  # undo only the zero initialisation, so the output is not zero
        if isinstance(module, nn.Conv2d) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.05)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([0.1, 0.1]))
        changed_t = model(x, torch.tensor([0.9, 0.9]))
        changed_x = model(x.flip(3), torch.tensor([0.1, 0.1]))
    assert out.shape == x.shape
    scale = out.abs().max()
    # a time-blind block (one channel per GroupNorm group) moved the output by ~1e-6 of its scale
    assert (out - changed_t).abs().max() > 1e-3 * scale
    assert (out - changed_x).abs().max() > 1e-3 * scale


# FlowUNet's state_dict as checkpoints hold it (the recipe's model and --smoke's), frozen as the count and sha256 of
# its "key shape" lines: a model built for the time t alone keeps exactly these, so every checkpoint still loads
FLOW_UNET_STATE_DICTS = {
    "default": ({}, 304, "0a02e89f4bd0bf0b6e135a703609bea22cf42d6cd8daa6cf52bf4c21f32d9385"),
    "smoke": (dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, head_channels=16, dropout=0.0), 128,
              "0f8441b803c4cc1c55bad500010374792c8efb0c21b60356a1cd2935663324ba")}


@pytest.mark.parametrize("name", FLOW_UNET_STATE_DICTS)
def test_flow_unet_keeps_the_state_dict_keys_and_shapes_its_checkpoints_were_written_with(name):
    model_config, count, sha256 = FLOW_UNET_STATE_DICTS[name]
    with torch.device("meta"):  # shapes without the weights
        state = wbflow.FlowUNet(**model_config).state_dict()
    lines = "".join(f"{key} {tuple(value.shape)}\n" for key, value in state.items())
    assert (len(state), hashlib.sha256(lines.encode()).hexdigest()) == (count, sha256)


def test_a_saved_flow_unet_loads_strictly_and_gives_the_same_velocity_with_r_and_labels_none(tmp_path):
    torch.manual_seed(0)
    saved = wbflow.FlowUNet(**TINY_UNET)
    for parameter in saved.parameters():
        nn.init.normal_(parameter, std=0.05)
    torch.save(saved.state_dict(), tmp_path / "flow_unet.pt")
    loaded = wbflow.FlowUNet(**TINY_UNET)
    loaded.load_state_dict(torch.load(tmp_path / "flow_unet.pt", weights_only=True))  # strict: every key, no other
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        expected = saved.eval()(x, t)
        assert torch.equal(loaded.eval()(x, t), expected)
        assert torch.equal(loaded(x, t, r=None, labels=None), expected)


def test_flow_unet_embeds_t_alone_as_guided_diffusions_sinusoidal_features_through_time_embed():
    model, t = wbflow.FlowUNet(**TINY_UNET), torch.tensor([0.0, 0.25, 1.0])
    frequencies = torch.exp(-math.log(10000) * torch.arange(8) / 8)  # base_channels 16: 8 of each
    features = torch.cat([torch.cos(t[:, None] * frequencies), torch.sin(t[:, None] * frequencies)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(t), model.time_embed(features), rtol=0, atol=0)


@pytest.mark.parametrize("extra", ["r", "labels"])
def test_a_flow_unet_built_for_t_alone_refuses_r_or_labels_with_a_value_error(extra):
    model = wbflow.FlowUNet(**TINY_UNET)
    given = {"r": torch.ones(2), "labels": torch.zeros(2, dtype=torch.long)}[extra]
    with pytest.raises(ValueError, match=rf"^FlowUNet: {extra} given, but this model was built for the time t alone$"):
        model(torch.randn(2, 3, 32, 32), torch.rand(2), **{extra: given})


def test_channels_last_and_bf16_autocast_paths_match_the_float32_contiguous_ones():
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**TINY_UNET)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(8), 4, channels_last=True)
    images = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)
    t = torch.rand(4)
    with torch.no_grad():
        expected = model(images.contiguous(), t)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(images, t), expected,
                                   rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wbflow.rectified_flow_loss(model, images)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    noise = torch.randn(4, 3, 32, 32)
    samples = wbflow.euler_sample(model, noise, 4, amp_dtype=torch.bfloat16)
    assert samples.dtype == torch.float32
    assert (samples - wbflow.euler_sample(model, noise, 4)).abs().max() < 0.1


# ----------------------------------------------------------------------------- classifiers and their losses

def test_unavailable_imagenet_weights_end_with_a_message_naming_the_file_and_folder(tmp_path, monkeypatch):
    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    data = write_pattern_folders(tmp_path / "data", per_class=3)
    argv = fire_args(data, tmp_path / "out", "--no-wandb") + ["--weights", "imagenet"]
    with pytest.raises(SystemExit) as exit_info:
        train_fire.main(argv)
    message = str(exit_info.value)
    assert "resnet18-f37072fd.pth" in message and "--weights none" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_build_classifier_uses_imagenet_weights_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    cached = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = wbflow.build_classifier("resnet18", num_classes=5, weights="imagenet")
    assert torch.equal(model.conv1.weight, cached["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, cached["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 5


def test_a_damaged_cached_imagenet_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"cut short by a full disk")
    with pytest.raises(ValueError, match=r"resnet18-f37072fd\.pth is not a loadable checkpoint") as error:
        wbflow.build_classifier("resnet18", num_classes=5, weights="imagenet")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "squeezenet1_1"])
def test_build_classifier_replaces_the_head_for_the_class_count(name):
    # heads of each kind: fc, classifier[-1], classifier[3] before nothing, SqueezeNet's 1x1 convolution
    model = wbflow.build_classifier(name, num_classes=5, weights="none").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert not [layer for layer in model.modules() if getattr(layer, "out_features", None) == 1000]


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 16), classes=st.integers(2, 6), seed=st.integers(0, 2**16),
       weighted=st.booleans())
def test_focal_loss_with_gamma_0_is_weighted_cross_entropy(batch, classes, seed, weighted):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=generator) * 3
    targets = torch.randint(0, classes, (batch,), generator=generator)
    alpha = torch.rand(classes, generator=generator) + 0.1 if weighted else None
    expected = F.cross_entropy(logits, targets, weight=alpha)
    assert torch.allclose(wbflow.focal_loss(logits, targets, gamma=0.0, alpha=alpha), expected, atol=1e-6)


def test_focal_loss_down_weights_confident_correct_predictions():
    logits = torch.tensor([[4.0, 0.0], [0.2, 0.0]])
    targets = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = wbflow.focal_loss(logits, targets, gamma=2.0, reduction="none")
    assert torch.all(focal < ce)
    assert focal[0] / ce[0] < focal[1] / ce[1]


def test_class_balanced_weights_give_rare_classes_more_weight():
    weights = wbflow.class_balanced_weights([0, 0, 0, 1, 2, 2], num_classes=4)
    assert weights.tolist() == pytest.approx([6 / 12, 6 / 4, 6 / 8, 0.0])


# ----------------------------------------------------------------------------- class labels in FlowUNet

def test_an_unconditional_checkpoint_written_before_class_labels_loads_strictly_and_samples_identically():
    # written by wbflow 5b10d37 (before num_classes): a FlowUNet's state_dict, its noise and its Euler-4 samples
    saved = wbflow.load_checkpoint(HERE / "testdata" / "flow_unet_before_labels.pt")
    model = wbflow.FlowUNet(**saved["config"]["model"])
    model.load_state_dict(saved["model"])  # strict: every key, no other
    torch.testing.assert_close(wbflow.euler_sample(model.eval(), saved["noise"], 4), saved["samples"],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unconditional", [None, 0])
def test_num_classes_none_or_0_builds_exactly_the_state_dict_of_a_model_for_t_alone(unconditional):
    with torch.device("meta"):
        before = wbflow.FlowUNet(**TINY).state_dict()
        state = wbflow.FlowUNet(**TINY, num_classes=unconditional).state_dict()
        conditional = wbflow.FlowUNet(**TINY, num_classes=10).state_dict()
    assert [(key, value.shape) for key, value in state.items()] == [(key, value.shape) for key, value in before.items()]
    assert conditional.keys() - before.keys() == {"label_embed.weight"}
    assert conditional["label_embed.weight"].shape == (11, 32)  # one row per class and the null row, embed_dim 4 x 8


def test_a_label_adds_its_embedding_row_to_the_time_embedding_and_no_labels_is_the_null_row():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=3))
    t, labels = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([2, 0, 3])
    with torch.no_grad():
        time_only = wbflow.FlowUNet.embed(model, t) - model.label_embed.weight[3]  # embed() adds the null row
        torch.testing.assert_close(model.embed(t, labels=labels), time_only + model.label_embed.weight[labels])
        torch.testing.assert_close(model.embed(t), model.embed(t, labels=torch.full((3,), 3)))
        x = torch.randn(3, 3, 8, 8)
        cats, dogs = model(x, t, labels=torch.tensor([0, 0, 0])), model(x, t, labels=torch.tensor([1, 1, 1]))
        assert not torch.allclose(cats, dogs)


def test_a_flow_unet_with_a_second_time_and_classes_adds_both_terms_to_the_time_embedding():
    model = randomised(wbflow.FlowUNet(**TINY, second_time=True, num_classes=3))
    t, r, labels = torch.tensor([0.1, 0.5]), torch.tensor([0.6, 0.5]), torch.tensor([2, 0])
    with torch.no_grad():
        expected = (model.time_embed(model._sinusoid(t)) + model.interval_embed(model._sinusoid(r - t))
                    + model.label_embed.weight[labels])
        torch.testing.assert_close(model.embed(t, r=r, labels=labels), expected)


def test_a_conditional_flow_unet_trains_its_label_embedding_on_labelled_batches_with_dropout():
    model = wbflow.FlowUNet(**TINY, num_classes=2)
    torch.manual_seed(0)
    for module in (model.output[-1],):  # a non-zero output layer, so the gradient reaches the embedding
        nn.init.normal_(module.weight, std=0.05)
    before = model.label_embed.weight.detach().clone()
    loader = wbflow.DeviceImageLoader(wbflow.synthetic_images(16, size=8), 8, labels=torch.arange(16) % 2)
    loss_fn = wbflow.drop_labels(wbflow.rectified_flow_loss, 0.5, null_label=2)
    stats = wbflow.train_epoch(model, loader, torch.optim.Adam(model.parameters(), lr=1e-2), loss_fn, progress=False)
    assert stats["steps"] == 2 and np.isfinite(stats["loss"])
    assert (model.label_embed.weight - before).abs().amax(dim=1).gt(0).all()  # both classes and the null row learnt


# ----------------------------------------------------------------------------- label dropout and OT pairs

def test_drop_labels_replaces_each_samples_label_by_the_null_class_at_the_asked_rate():
    seen = []
    loss_fn = wbflow.drop_labels(lambda model, batch: seen.append(batch) or torch.zeros(()), 0.1, null_label=10)
    labels = torch.arange(40_000) % 10
    torch.manual_seed(0)
    loss_fn(None, (torch.zeros(40_000, 1), labels))
    (data, dropped), = seen
    null = dropped == 10
    assert torch.equal(dropped[~null], labels[~null])  # the others keep their own label
    assert abs(null.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / 40_000) ** 0.5  # 4 sigma
    per_batch = null.view(400, 100).sum(dim=1)
    assert per_batch.min() < per_batch.max() and per_batch.max() < 100  # per sample, not a whole batch at once
    loss_fn(None, {"noise": torch.zeros(8, 1), "data": torch.zeros(8, 1), "labels": torch.zeros(8, dtype=torch.long)})
    assert set(seen[1]) == {"noise", "data", "labels"} and seen[1]["labels"].shape == (8,)


def test_drop_labels_at_rate_0_and_1_keeps_every_label_or_drops_every_one():
    seen = []
    labels = torch.arange(50) % 5
    for rate in (0.0, 1.0):
        wbflow.drop_labels(lambda model, batch: seen.append(batch[1]), rate, null_label=5)(None, (labels, labels))
    assert torch.equal(seen[0], labels) and torch.equal(seen[1], torch.full((50,), 5))


def _cost(noise, data):
    return (noise.flatten(1).double() - data.flatten(1).double()).square().sum().item()


def _lowest_cost(noise, data):
    """Brute force: the cheapest of all n! pairings, each a permutation p giving data[j] the noise p[j]."""
    cost = (noise.flatten(1).double()[:, None] - data.flatten(1).double()[None]).square().sum(-1).numpy()
    permutations = np.array(list(itertools.permutations(range(len(data)))))
    return cost[permutations, np.arange(len(data))].sum(1).min()


@settings(max_examples=40, deadline=None)
@given(labels=st.lists(st.integers(0, 2), min_size=1, max_size=9), shape=st.sampled_from([(2,), (1, 2, 2)]),
       seed=st.integers(0, 2**16))
def test_ot_pairs_with_labels_is_a_permutation_within_each_class_and_optimal_there(labels, shape, seed):
    generator, labels = torch.Generator().manual_seed(seed), torch.tensor(labels)
    noise, data = torch.randn(len(labels), *shape, generator=generator), torch.randn(len(labels), *shape,
                                                                                       generator=generator)
    paired = wbflow.ot_pairs(noise, data, labels)
    rows = {tuple(row): index for index, row in enumerate(noise.flatten(1).tolist())}
    order = [rows[tuple(row)] for row in paired.flatten(1).tolist()]  # data[j] got noise[order[j]]
    assert sorted(order) == list(range(len(labels)))
    assert all(labels[source] == labels[target] for target, source in enumerate(order))  # within its class
    for label in labels.unique():
        members = (labels == label).nonzero().flatten().tolist()
        best = _lowest_cost(noise[members], data[members])
        assert _cost(paired[members], data[members]) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_rectified_flow_loss_passes_the_labels_and_pairs_ot_noise_within_each_class():
    seen = {}

    def model(x, t, labels=None):
        seen.update(x=x, t=t, labels=labels)
        return torch.zeros_like(x)

    data, labels = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    torch.manual_seed(5)
    wbflow.rectified_flow_loss(model, (data, labels), coupling="ot")
    torch.manual_seed(5)
    noise = wbflow.ot_pairs(torch.randn(6, 2), data, labels)
    t = torch.rand(6)[:, None]
    assert seen["labels"] is labels
    torch.testing.assert_close(seen["x"], t * data + (1 - t) * noise)


def fixed_times(t, r):
    """A `times` for meanflow_loss that gives these (t, r)."""
    return lambda count, device: (t.to(device), r.to(device))


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


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 6), shape=st.sampled_from([(2,), (3, 2), (1, 2, 2)]), seed=st.integers(0, 2**16))
def test_ot_pairs_is_a_permutation_with_the_least_total_squared_distance(count, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    noise, data = torch.randn(count, *shape, generator=generator), torch.randn(count, *shape, generator=generator)
    paired = wbflow.ot_pairs(noise, data)
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))
    best = min(_cost(noise[list(order)], data) for order in itertools.permutations(range(count)))
    assert _cost(paired, data) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_fixed_pairs_train_on_their_own_noise_and_ot_pairs_train_on_shorter_paths():
    noise = torch.randn(64, 2)
    pairs = {"noise": noise, "data": noise + torch.tensor([1.0, -2.0])}
    assert wbflow.rectified_flow_loss(Constant([1.0, -2.0]), pairs) < 1e-10  # independent noise would be ~2
    data, still = torch.randn(64, 2) * 2, Constant([0.0, 0.0])  # its loss is the mean squared path length
    torch.manual_seed(0)
    independent = wbflow.rectified_flow_loss(still, data)
    torch.manual_seed(0)
    optimal = (data - wbflow.ot_pairs(torch.randn_like(data), data)).square().mean()
    torch.manual_seed(0)
    assert wbflow.rectified_flow_loss(still, data, coupling="ot").item() == pytest.approx(optimal.item())
    assert optimal < 0.7 * independent
    model = nn.Sequential(nn.Linear(2, 2))
    flow = type("Flow", (nn.Module,), {"forward": lambda self, x, t: model(x)})()
    flow.model = model
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.05)
    losses = [wbflow.train_epoch(flow, [pairs] * 40, optimizer, wbflow.rectified_flow_loss)["loss"],
              wbflow.train_epoch(flow, [pairs] * 40, optimizer, wbflow.rectified_flow_loss)["loss"]]
    assert losses[1] < 0.2 * losses[0]


# ----------------------------------------------------------------------------- MeanFlow: (t, r), the target and the loss

def test_a_flow_unet_built_for_a_second_time_takes_r_and_r_none_is_the_instantaneous_velocity():
    model = tiny_meanflow_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, r=t))
        assert (model(x, t, r=torch.ones(3)) - model(x, t)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        torch.testing.assert_close(model(x, 0, r=1), model(x, torch.zeros(3), r=torch.ones(3)))
    plain_keys = set(wbflow.FlowUNet(**{**TINY_MEANFLOW_UNET, "second_time": False}).state_dict())
    assert set(model.state_dict()) - plain_keys == {f"interval_embed.{layer}.{kind}" for layer in (0, 2)
                                                    for kind in ("weight", "bias")}


def py_meanflow_times(count, P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6, ratio=0.75):
    """py-meanflow's sample_two_timesteps_t_r_v1 (models/time_sampler.py), in its own time: noise at 1."""
    t = torch.sigmoid(torch.randn(count) * P_std_t + P_mean_t).clip(0.0, 1.0)
    r = torch.sigmoid(torch.randn(count) * P_std_r + P_mean_r).clip(0.0, 1.0)
    r = torch.where(torch.rand(count) < 1 - ratio, t, r)
    return t, torch.minimum(t, r)


def test_meanflow_times_are_py_meanflows_cifar10_times_mirrored_into_wbflows_time():
    torch.manual_seed(3)
    t_paper, r_paper = py_meanflow_times(100_000)
    torch.manual_seed(3)
    t, r = wbflow.meanflow_times(100_000)
    torch.testing.assert_close(t, 1 - t_paper, rtol=0, atol=1e-6)
    torch.testing.assert_close(r, 1 - r_paper, rtol=0, atol=1e-6)
    share = (r == t).float().mean().item()  # a quarter, and where r's draw fell on the other side of t's
    assert share == pytest.approx((r_paper == t_paper).float().mean().item(), abs=1e-3) and share > 0.25
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.6)).item(), abs=0.01)  # nearer the data


@settings(max_examples=30, deadline=None)
@given(mean_t=st.floats(-5, 5), mean_r=st.floats(-5, 5), std=st.floats(0.1, 3), equal_share=st.floats(0, 1))
def test_meanflow_times_give_jumps_forward_inside_zero_to_one(mean_t, mean_r, std, equal_share):
    t, r = wbflow.meanflow_times(64, mean_t=mean_t, std_t=std, mean_r=mean_r, std_r=std, equal_share=equal_share)
    assert t.shape == r.shape == (64,)
    assert (0 <= t).all() and (t <= r).all() and (r <= 1).all()


def test_meanflow_target_equals_the_velocity_minus_t_minus_r_times_a_finite_difference_of_u_along_the_path():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(1)
    z, velocity = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t, r = jump_times(4)
    target = wbflow.meanflow_target(model, z, t, r, velocity)
    model64, eps = model.double(), 1e-3  # du/dt: z moves at the velocity, t at 1, r stays
    z64, velocity64, t64, r64 = z.double(), velocity.double(), t.double(), r.double()
    with torch.no_grad():
        du_dt = (model64(z64 + eps * velocity64, t64 + eps, r=r64)
                 - model64(z64 - eps * velocity64, t64 - eps, r=r64)) / (2 * eps)
    expected = velocity64 - (t64 - r64).view(-1, 1, 1, 1) * du_dt
    assert target.dtype == torch.float32 and not target.requires_grad
    assert (expected - velocity64)[1:].abs().amax(dim=(1, 2, 3)).min() > 1e-2  # the du/dt term matters
    torch.testing.assert_close(target.double(), expected, rtol=0, atol=2e-5)
    assert torch.equal(target[0], velocity[0])  # r = t: the velocity itself


class StraightPathVelocity(nn.Module):
    """The exact average velocity of the straight paths from x0 to x1 = scale * x0 + shift (per element): the
    paths do not cross, and along each the velocity x1 - x0 is constant, so the average over any jump is it,
    written as a function of z on the path and t (wrong_scale: the field of another scale)."""

    def __init__(self, scale, shift, wrong_scale=None):
        super().__init__()
        self.shift, self.field_scale = shift, scale if wrong_scale is None else wrong_scale

    def forward(self, z, t, r=None):
        t = t.view(-1, *([1] * (z.dim() - 1)))
        x0 = (z - t * self.shift) / (1 - t + t * self.field_scale)
        return (self.field_scale - 1) * x0 + self.shift


def test_meanflow_loss_is_zero_for_the_exact_average_velocity_of_straight_paths_and_not_for_another_field():
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(64, 3, 4, 4, generator=generator)
    scale, shift = 0.5 + torch.rand(3, 4, 4, generator=generator), torch.randn(3, 4, 4, generator=generator)
    batch = {"noise": noise, "data": scale * noise + shift}
    torch.manual_seed(0)
    assert wbflow.meanflow_loss(StraightPathVelocity(scale, shift), batch).item() < 1e-8
    assert wbflow.meanflow_loss(StraightPathVelocity(scale, shift, wrong_scale=scale + 0.3), batch).item() > 1e-2


def py_meanflow_loss(u_func, x, e, t, r, norm_p=0.75, norm_eps=1e-3):
    """py-meanflow's MeanFlow.forward_with_loss (models/meanflow.py) in the paper's time (data at 0, noise at 1),
    given its noise e and times t >= r."""
    t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - t) * x + t * e
    v = e - x
    u_pred, dudt = torch.func.jvp(u_func, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    u_tgt = (v - (t - r) * dudt).detach()
    loss = ((u_pred - u_tgt) ** 2).sum(dim=(1, 2, 3))
    return (loss / (loss.detach() + norm_eps) ** norm_p).mean()


def test_meanflow_loss_in_wbflows_time_equals_py_meanflows_loss_in_the_papers_time():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(4)
    data, noise = torch.randn(6, 3, 8, 8, generator=generator), torch.randn(6, 3, 8, 8, generator=generator)
    t, r = jump_times(6)  # wbflow's: the paper's are 1 - t >= 1 - r

    def paper_u(z, t_paper, r_paper):  # the paper's u(z, r, t): the jump from t down to r, in its time
        return -model(z, 1 - t_paper.view(-1), r=1 - r_paper.view(-1))

    expected = py_meanflow_loss(paper_u, data, noise, 1 - t, 1 - r)
    loss = wbflow.meanflow_loss(model, {"noise": noise, "data": data}, times=fixed_times(t, r))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert loss.item() > 1e-2
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    expected_gradients = torch.autograd.grad(expected, list(model.parameters()))
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


class DropoutOfZ(nn.Module):
    """u(z, t, r) = dropout(z): its target's du/dt is the dropped-out velocity, with the prediction's mask only
    when both draw the same one."""

    def forward(self, z, t, r=None):
        return F.dropout(z, 0.5, self.training)


def test_meanflow_loss_computes_the_target_with_the_predictions_dropout_mask():
    generator = torch.Generator().manual_seed(5)
    data, noise = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    t, r = torch.full((8,), 0.2), torch.full((8,), 0.7)
    torch.manual_seed(6)
    loss = wbflow.meanflow_loss(DropoutOfZ(), {"noise": noise, "data": data}, times=fixed_times(t, r))
    torch.manual_seed(6)
    kept = F.dropout(torch.ones(8, 16), 0.5)  # the mask the prediction drew first: 0 or 2
    z, velocity = 0.2 * data + 0.8 * noise, data - noise
    squared_error = (kept * z - (velocity + 0.5 * kept * velocity)).square().sum(1)
    torch.testing.assert_close(loss, (squared_error / (squared_error + 1e-3) ** 0.75).mean())


def test_meanflow_loss_under_bf16_autocast_predicts_in_bf16_and_takes_the_jvp_in_float32():
    model = tiny_meanflow_unet()
    generator = torch.Generator().manual_seed(7)
    z, velocity = torch.randn(4, 3, 8, 8, generator=generator), torch.randn(4, 3, 8, 8, generator=generator)
    t, r = jump_times(4)
    batch, times = {"noise": z, "data": z + velocity}, fixed_times(t, r)
    float32_target = wbflow.meanflow_target(model, z, t, r, velocity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(wbflow.meanflow_target(model, z, t, r, velocity), float32_target)
        assert model(z, t, r=r).dtype == torch.bfloat16
        loss = wbflow.meanflow_loss(model, batch, times=times)
    float32_loss = wbflow.meanflow_loss(model, batch, times=times)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(float32_loss.item(), rel=0.05) and loss.item() != float32_loss.item()


def test_a_meanflow_step_with_a_non_finite_loss_is_skipped_and_the_weights_stay():
    model = tiny_meanflow_unet()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    data = torch.randn(4, 3, 8, 8)
    data[1, 0, 0, 0] = float("inf")
    result = wbflow.train_step(model, data, torch.optim.Adam(model.parameters(), lr=1e-2), wbflow.meanflow_loss)
    assert not result["finite"]
    assert all(torch.equal(parameter, old) for parameter, old in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- MeanFlow under DDP and torch.compile

_DDP_RANK = """
import sys
sys.path.insert(0, {here!r})
import torch
import wbflow
from conftest import tiny_meanflow_unet
from test_model_and_losses import ddp_batch, fixed_times

rank, world_size, device = wbflow.setup_distributed()
(noise, data), (t, r) = ddp_batch()
share = slice(rank * len(t) // world_size, (rank + 1) * len(t) // world_size)
loss_fn = lambda model, batch: wbflow.meanflow_loss(model, batch, times=fixed_times(t[share], r[share]))
gradients = []
for compiled in (False, True):  # DDP, and torch.compile outside DDP as train_flow compiles
    model = torch.nn.parallel.DistributedDataParallel(tiny_meanflow_unet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_model = torch.compile(model, backend="aot_eager") if compiled else model
    wbflow.train_step(train_model, {{"noise": noise[share], "data": data[share]}}, optimizer, loss_fn)
    gradients.append([parameter.grad for parameter in model.module.parameters()])
if rank == 0:
    torch.save(gradients, {gradients!r})
"""


def ddp_batch(count=8):
    """((noise, data), (t, r)) of the global batch the DDP test splits over two ranks."""
    generator = torch.Generator().manual_seed(8)
    return (torch.randn(count, 3, 8, 8, generator=generator), torch.randn(count, 3, 8, 8, generator=generator)), \
        jump_times(count, seed=9)


def test_meanflow_gradients_under_ddp_and_compile_on_two_gloo_processes_equal_one_process_on_the_global_batch(
        tmp_path):
    script, gradients_file = tmp_path / "rank.py", tmp_path / "gradients.pt"
    script.write_text(_DDP_RANK.format(here=str(HERE), gradients=str(gradients_file)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = tiny_meanflow_unet()
    (noise, data), (t, r) = ddp_batch()
    loss = wbflow.meanflow_loss(model, {"noise": noise, "data": data}, times=fixed_times(t, r))
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for ddp_gradients in torch.load(gradients_file, weights_only=True):  # DDP, then compiled DDP
        assert len(ddp_gradients) == len(expected)
        for gradient, expected_gradient in zip(ddp_gradients, expected):
            torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_a_compiled_flow_unet_trains_on_meanflow_loss_with_inductor():
    import torch._inductor
    graphs = []

    def inductor(graph_module, example_inputs):  # inductor, counting the graphs it compiles
        graphs.append(graph_module)
        return torch._inductor.compile(graph_module, example_inputs)

    torch._dynamo.reset()
    try:
        model = tiny_meanflow_unet(std=0.05)
        compiled = torch.compile(model, backend=inductor)
        eager = tiny_meanflow_unet(std=0.05)
        data = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10))
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, eager)]
        for step in range(3):
            results = []
            for train_model, optimizer in zip((compiled, eager), optimizers):
                torch.manual_seed(step)
                results.append(wbflow.train_step(train_model, data, optimizer, wbflow.meanflow_loss))
            assert all(result["finite"] for result in results)
            assert results[0]["loss"].item() == pytest.approx(results[1]["loss"].item(), rel=1e-4)
    finally:
        torch._dynamo.reset()
    assert graphs
    for parameter, eager_parameter in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(parameter, eager_parameter, rtol=1e-3, atol=1e-5)

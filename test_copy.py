"""Copying a function: `python wbflow.py copy NAME` prints NAME with the imports and definitions it needs,
and every public definition of wbflow.py, pasted from that output into a fresh namespace, runs on a tiny
real input.

CALLS holds one call per public definition, grouped by the module's sections; each gets the pasted
definition (not wbflow's) and checks what it returns."""
import ast
import contextlib
import functools
import io
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import wbflow

HERE = Path(__file__).resolve().parent
TREE = ast.parse((HERE / "wbflow.py").read_text())
PUBLIC = sorted(node.name for node in TREE.body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"))


@functools.lru_cache(maxsize=None)
def copy_command(*names):
    """What `python wbflow.py copy NAMES` prints, run in this process."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        wbflow._command_line(["copy", *names])
    return printed.getvalue()


def pasted(name):
    """`name` as a user gets it: the copy command's output executed in a fresh namespace, nothing else."""
    namespace = {"__name__": "pasted"}
    exec(compile(copy_command(name), f"<copy {name}>", "exec"), namespace)
    return namespace[name]


def defined(block):
    """The names a pasted block defines, in order, and its import lines."""
    body = ast.parse(block).body
    return ([getattr(node, "name", None) or node.targets[0].id for node in body if not isinstance(node, (
        ast.Import, ast.ImportFrom))], [ast.unparse(node) for node in body if isinstance(node, (ast.Import, ast.ImportFrom))])


def test_the_module_has_the_public_functions_the_brief_names():
    assert {"train_epoch", "train_step", "validate", "euler_sample", "fid", "log_artifact", "save_best",
            "frechet_distance", "wandb_run", "save_checkpoint", "load_checkpoint", "inception_score",
            "FlowUNet"} <= set(PUBLIC)


def test_copy_prints_the_imports_a_definition_uses_then_what_it_reaches_in_module_order():
    names, imports = defined(copy_command("train_step"))
    assert names == ["_grad_scaler", "_to_device", "_forward", "train_step"]
    assert imports == ["import math", "import torch"]  # only what that code uses, not the module's whole block
    names, imports = defined(copy_command("make_scaler"))
    assert names == ["autocast_dtype", "make_scaler", "_grad_scaler"] and imports == ["import torch"]


def test_copy_of_several_names_prints_each_definition_once():
    names, _ = defined(copy_command("train_epoch", "validate", "rank_and_world_size"))
    assert names == ["rank_and_world_size", "_grad_scaler", "_to_device", "_forward", "train_step", "RunningSums",
                     "train_epoch", "validate"]


def test_copy_of_a_constant_prints_what_its_value_uses():
    assert defined(copy_command("FID_WEIGHTS_URL"))[0] == ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL"]


def test_copy_of_an_unknown_name_is_one_line_naming_the_close_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        wbflow._command_line(["copy", "train_epoch", "trian_step"])
    assert exit_info.value.code == "python wbflow.py copy: wbflow has no trian_step (did you mean train_step, train_epoch?)"
    assert capsys.readouterr().out == ""  # nothing half-printed before the refusal
    with pytest.raises(SystemExit, match="^python wbflow.py copy: wbflow has no xyzzy$"):
        wbflow._command_line(["copy", "xyzzy"])


def test_the_printed_block_runs_as_a_file_of_its_own_in_a_fresh_interpreter(tmp_path):
    block = subprocess.run([sys.executable, "wbflow.py", "copy", "train_epoch", "fid"], cwd=HERE, check=True,
                           capture_output=True, text=True, timeout=120).stdout
    (tmp_path / "pasted.py").write_text(block + """

import sys
assert "wbflow" not in sys.modules
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(4)]
stats = train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                    lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]), progress=False)
features = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
print(stats["steps"], round(fid(features, features + 1), 6))
""")
    result = subprocess.run([sys.executable, "pasted.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "4 8.0\n"  # 4 steps; the same covariance, the means 1 apart in 8 dims


# ----------------------------------------------------------------------------- one call per public definition

CALLS = {}


def call(name):
    def register(check):
        CALLS[name] = check
        return check
    return register


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_definition_pasted_from_the_copy_command_runs_on_a_real_input(name, tmp_path, request):
    assert name in CALLS, f"test_copy.py has no call for {name}"
    CALLS[name](pasted(name), tmp_path, request.getfixturevalue)


def tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3))


def tiny_batches(count=4):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 2, 2, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            for _ in range(count)]


class ConstantVelocity(nn.Module):
    def forward(self, x, t):
        return torch.ones_like(x)


def tiny_flow_model():
    return wbflow.FlowUNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, dropout=0.0)


# ----------------------------------------------------------------------------- device & data

@call("rank_and_world_size")
def _(rank_and_world_size, tmp_path, fixture):
    assert rank_and_world_size() == (0, 1)


@call("setup_distributed")
def _(setup_distributed, tmp_path, fixture):
    assert setup_distributed()[:2] == (0, 1)


@call("load_cifar10")
def _(load_cifar10, tmp_path, fixture):
    from conftest import write_cifar_batches
    write_cifar_batches(tmp_path, per_batch=4)
    images, labels = load_cifar10(tmp_path, download=False)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and len(labels) == 20


@call("synthetic_images")
def _(synthetic_images, tmp_path, fixture):
    images = synthetic_images(2, size=8)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8 and torch.equal(images, synthetic_images(2, size=8))


@call("write_pattern_dataset")
def _(write_pattern_dataset, tmp_path, fixture):
    labelled, test = write_pattern_dataset(tmp_path, {"a": 2, "b": 1}, test_images=2, size=8)
    assert sorted(labelled.values()) == ["a", "a", "b"] and len(test) == 2
    assert wbflow.list_images(tmp_path / "train.txt")[1] == ["a", "b"]


@call("DeviceImageLoader")
def _(DeviceImageLoader, tmp_path, fixture):
    loader = DeviceImageLoader(torch.full((8, 3, 4, 4), 255, dtype=torch.uint8), 4)
    batches = list(loader)
    assert len(batches) == 2 and all(torch.equal(batch, torch.ones(4, 3, 4, 4)) for batch in batches)


def image_folders(tmp_path):
    from conftest import write_pattern_folders
    data = write_pattern_folders(tmp_path / "data", per_class=3, classes=["a", "b"])
    return data, [(str(path), index % 2) for index, path in enumerate(sorted(data.rglob("*.png"))[:2])]


@call("find_image_samples")
def _(find_image_samples, tmp_path, fixture):
    train_samples, val_samples, class_names = find_image_samples(image_folders(tmp_path)[0], val_split=0.34)
    assert class_names == ["a", "b"] and len(train_samples) == 4 and len(val_samples) == 2


@call("list_images")
def _(list_images, tmp_path, fixture):
    data = image_folders(tmp_path)[0]
    (tmp_path / "data" / "list.txt").write_text("a/0.png\ta\nb/1.png\tb\n")
    assert list_images(tmp_path / "data" / "list.txt") == ([("a/0.png", str(data / "a" / "0.png"), 0),
                                                            ("b/1.png", str(data / "b" / "1.png"), 1)], ["a", "b"])


@call("stratified_split")
def _(stratified_split, tmp_path, fixture):
    train_index, val_index = stratified_split([0, 0, 1, 1], 0.5)
    assert sorted(train_index + val_index) == [0, 1, 2, 3] and len(val_index) == 2


@call("stratified_folds")
def _(stratified_folds, tmp_path, fixture):
    folds = stratified_folds([0, 0, 0, 1, 1, 1, 1], 3, seed=1)
    assert sorted(sum(folds, [])) == list(range(7)) and sorted(map(len, folds)) == [2, 2, 3]


@call("drop_unreadable_images")
def _(drop_unreadable_images, tmp_path, fixture):
    samples = image_folders(tmp_path)[1]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert drop_unreadable_images(samples + [(str(tmp_path / "broken.png"), 0)]) == samples


@call("ImageSamples")
def _(ImageSamples, tmp_path, fixture):
    samples = image_folders(tmp_path)[1]
    image, label = ImageSamples(samples)[1]
    assert label == samples[1][1] and image.mode == "RGB"


@call("image_transforms")
def _(image_transforms, tmp_path, fixture):
    from PIL import Image
    assert image_transforms(8, train=False)(Image.new("RGB", (20, 10))).shape == (3, 8, 8)


@call("mix_batches")
def _(mix_batches, tmp_path, fixture):
    torch.manual_seed(0)
    images, soft_labels = mix_batches(3, mixup=0.4)(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, 3, 8, 8) and soft_labels.shape == (4, 3)
    torch.testing.assert_close(soft_labels.sum(1), torch.ones(4))
    assert mix_batches(3) is None


@call("default_num_workers")
def _(default_num_workers, tmp_path, fixture):
    assert 0 <= default_num_workers(most=2) <= 2


@call("classifier_loaders")
def _(classifier_loaders, tmp_path, fixture):
    train_loader, val_loader = classifier_loaders(list(range(4)), list(range(3)), 2)
    assert len(train_loader) == 2 and sum(len(batch) for batch in val_loader) == 3


@call("check_same_on_every_rank")
def _(check_same_on_every_rank, tmp_path, fixture):
    assert check_same_on_every_rank({"images": 3}) is None  # one process: nothing to compare


# ----------------------------------------------------------------------------- models

@call("FlowUNet")
def _(FlowUNet, tmp_path, fixture):
    model = FlowUNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, head_channels=8, image_size=8,
                     attention_resolutions=(4,))
    assert model(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 3, 8, 8)
    assert model.embed(torch.rand(2)).shape == (2, 32)  # 4 x base_channels


@call("build_classifier")
def _(build_classifier, tmp_path, fixture):
    assert build_classifier("resnet18", 5).fc.out_features == 5


@call("build_optimizer")
def _(build_optimizer, tmp_path, fixture):
    optimizer = build_optimizer("sgd", nn.Linear(2, 1).parameters(), 0.1)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]


# ----------------------------------------------------------------------------- losses

@call("classification_loss")
def _(classification_loss, tmp_path, fixture):
    loss, n_correct, n_samples = classification_loss(nn.CrossEntropyLoss())(tiny_classifier(), tiny_batches(1)[0])
    assert loss.ndim == 0 and 0 <= int(n_correct) <= 4 and n_samples == 4


@call("rectified_flow_loss")
def _(rectified_flow_loss, tmp_path, fixture):
    assert rectified_flow_loss(ConstantVelocity(), torch.randn(4, 2)) > 0


@call("ot_pairs")
def _(ot_pairs, tmp_path, fixture):
    assert ot_pairs(torch.tensor([[5.0], [0.0]]), torch.tensor([[0.1], [4.9]])).tolist() == [[0.0], [5.0]]


@call("drop_labels")
def _(drop_labels, tmp_path, fixture):
    seen = []
    loss_fn = drop_labels(lambda model, batch: seen.append(batch[1]), 1.0, null_label=3)
    loss_fn(None, (torch.zeros(2, 1), torch.tensor([0, 2])))
    assert seen[0].tolist() == [3, 3]


class JumpVelocity(nn.Module):  # an average velocity u(x, t, r) = r - t, the same for every x
    def forward(self, x, t, r=None):
        return (t if r is None else r)[:, None] - t[:, None] + torch.zeros_like(x)


@call("meanflow_times")
def _(meanflow_times, tmp_path, fixture):
    t, r = meanflow_times(8)
    assert t.shape == (8,) and (t <= r).all() and (r <= 1).all()


@call("meanflow_target")
def _(meanflow_target, tmp_path, fixture):
    # du/dt = -1 along the path; the jump from 0.25 to 0.75: velocity - (-0.5) * (-1)
    target = meanflow_target(JumpVelocity(), torch.zeros(2, 3), torch.full((2,), 0.25), torch.full((2,), 0.75),
                             torch.ones(2, 3))
    assert torch.equal(target, torch.full((2, 3), 0.5))


@call("meanflow_loss")
def _(meanflow_loss, tmp_path, fixture):
    assert meanflow_loss(JumpVelocity(), torch.randn(4, 2)) > 0


@call("focal_loss")
def _(focal_loss, tmp_path, fixture):
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0), nn.functional.cross_entropy(logits, targets))


@call("class_balanced_weights")
def _(class_balanced_weights, tmp_path, fixture):
    torch.testing.assert_close(class_balanced_weights([0, 0, 0, 1], 2), torch.tensor([2 / 3, 2.0]))


# ----------------------------------------------------------------------------- training

@call("autocast_dtype")
def _(autocast_dtype, tmp_path, fixture):
    assert autocast_dtype("cpu") is None and autocast_dtype("cpu", amp=True) == torch.bfloat16


@call("make_scaler")
def _(make_scaler, tmp_path, fixture):
    assert not make_scaler("cpu").is_enabled()


@call("make_ema")
def _(make_ema, tmp_path, fixture):
    model = nn.Linear(2, 1)
    ema_model = make_ema(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    expected = (ema_model.module.weight + model.weight) / 2
    ema_model.update_parameters(model)
    torch.testing.assert_close(ema_model.module.weight, expected)


@call("warmup_cosine_schedule")
def _(warmup_cosine_schedule, tmp_path, fixture):
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    scheduler, rates = warmup_cosine_schedule(optimizer, 6, 2), []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and rates[3] > rates[4] > rates[5] > 0


@call("train_step")
def _(train_step, tmp_path, fixture):
    model = tiny_classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[1].weight.detach().clone()
    result = train_step(model, tiny_batches(1)[0], optimizer, wbflow.classification_loss(nn.CrossEntropyLoss()),
                        grad_clip=1.0)
    assert bool(result["finite"]) and result["n_samples"] == 4 and not torch.equal(before, model[1].weight)
    moves = []

    class NotingMoves(torch.Tensor):  # a tensor that notes each .to(): the CPU sees the move CUDA would make
        def to(self, *args, **kwargs):
            moves.append((args, kwargs))
            return super().to(*args, **kwargs)

    def loss_of_a_nested_batch(model, batch):
        (images, [labels]), count = batch["inputs"], batch["count"]
        assert type(batch["inputs"]) is tuple and type(batch["inputs"][1]) is list and count == 4  # as they were
        return nn.functional.cross_entropy(model(images), labels)

    images, labels = (tensor.as_subclass(NotingMoves) for tensor in tiny_batches(1)[0])
    result = train_step(model, {"inputs": (images, [labels]), "count": 4}, optimizer, loss_of_a_nested_batch)
    assert moves == [((torch.device("cpu"),), {"non_blocking": True})] * 2 and result["n_samples"] == 4


@call("RunningSums")
def _(RunningSums, tmp_path, fixture):
    sums = RunningSums("cpu")
    for loss in (1.0, 3.0):
        sums.add({"loss": torch.tensor(loss), "grad_norm": torch.tensor(2.0), "finite": torch.tensor(True),
                  "n_correct": None, "n_samples": 4, "learning_rate": 0.1})
    assert sums.close_window()["loss"] == 2.0
    resumed = RunningSums("cpu")
    resumed.load_state_dict(sums.state_dict())
    assert resumed.means() == sums.means() and resumed.close_window() is None


@call("train_epoch")
def _(train_epoch, tmp_path, fixture):
    model = tiny_classifier()
    windows = []
    stats = train_epoch(model, tiny_batches(), torch.optim.SGD(model.parameters(), lr=0.1),
                        wbflow.classification_loss(nn.CrossEntropyLoss()), log_every=2,
                        on_log=lambda step, window: windows.append(step), progress=False)
    assert stats["steps"] == 4 and windows == [2, 4] and 0 <= stats["accuracy"] <= 100


@call("validate")
def _(validate, tmp_path, fixture):
    metrics = validate(tiny_classifier(), tiny_batches(), wbflow.classification_loss(nn.CrossEntropyLoss()))
    assert metrics["samples"] == 16 and math.isfinite(metrics["loss"])


@call("stop_on_signals")
def _(stop_on_signals, tmp_path, fixture):
    with stop_on_signals() as stop:
        assert isinstance(stop, threading.Event) and not stop.is_set()


@call("exit_stopped")
def _(exit_stopped, tmp_path, fixture):
    stop = threading.Event()
    stop.signal = 15
    with pytest.raises(SystemExit) as exit_code:
        exit_stopped(stop, {"step": 3}, tmp_path / "last.pt", script="train.py", argv=["--epochs", "2"])
    assert exit_code.value.code == 143 and wbflow.load_checkpoint(tmp_path / "last.pt") == {"step": 3}


@call("exit_when_stopped")
def _(exit_when_stopped, tmp_path, fixture):
    with pytest.raises(SystemExit) as exit_code:
        with exit_when_stopped("eval.py", "--eval") as stop:
            stop.signal = signal.SIGTERM
            stop.set()
    assert exit_code.value.code == 128 + signal.SIGTERM


@call("capture_rng_state")
def _(capture_rng_state, tmp_path, fixture):
    state = capture_rng_state()
    first = torch.rand(1)
    wbflow.restore_rng_state(state)
    assert torch.equal(torch.rand(1), first)


@call("restore_rng_state")
def _(restore_rng_state, tmp_path, fixture):
    state = wbflow.capture_rng_state()
    first = np.random.rand()
    restore_rng_state(state)
    assert np.random.rand() == first


@call("gather_from_ranks")
def _(gather_from_ranks, tmp_path, fixture):
    assert gather_from_ranks({"rank": 0}) == [{"rank": 0}]


@call("predict_logits")
def _(predict_logits, tmp_path, fixture):
    dataset = torch.utils.data.TensorDataset(torch.randn(5, 3, 2, 2), torch.arange(5) % 3)
    logits, labels = predict_logits(tiny_classifier(), dataset, batch_size=2, tta=True)
    assert logits.shape == (5, 3) and torch.allclose(logits.softmax(1).sum(1), torch.ones(5))
    assert labels.tolist() == [0, 1, 2, 0, 1]


@call("evaluate_classifier")
def _(evaluate_classifier, tmp_path, fixture):
    dataset = torch.utils.data.TensorDataset(torch.randn(6, 3, 2, 2), torch.arange(6) % 3)
    scores, probs, labels = evaluate_classifier(tiny_classifier(), dataset, nn.CrossEntropyLoss(), [2.0, 1.0, 1.0])
    assert probs.shape == (6, 3) and labels.tolist() == [0, 1, 2, 0, 1, 2] and scores["loss"] > 0
    assert scores["score"] == pytest.approx(wbflow.weighted_f1_score(labels, probs.argmax(1), [2.0, 1.0, 1.0]))


@call("predict_images")
def _(predict_images, tmp_path, fixture):
    paths = [path for path, _ in image_folders(tmp_path)[1]] + [str(tmp_path / "missing.png")]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        probs = predict_images(model, paths, wbflow.image_transforms(2, train=False), batch_size=1)
    assert probs.shape == (3, 3) and torch.allclose(probs[:2].sum(1), torch.ones(2)) and probs[2].isnan().all()


@call("predict_submission")
def _(predict_submission, tmp_path, fixture):
    paths = [path for path, _ in image_folders(tmp_path)[1]]
    model = wbflow.build_classifier("mobilenet_v3_small", 2)
    state = {"model": model.state_dict(), "config": {"model": "mobilenet_v3_small", "classes": ["a", "b"],
                                                       "image_size": 8, "mean_std": None, "class_counts": [1, 5]}}
    probs, predicted, fallback = predict_submission([state, state], ["x.png", "y.png"], paths, tmp_path / "s.txt")
    assert probs.shape == (2, 2) and fallback == 1 and len((tmp_path / "s.txt").read_text().splitlines()) == 2


@call("apply_class_offsets")
def _(apply_class_offsets, tmp_path, fixture):
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    assert apply_class_offsets(probs).tolist() == [0, 0]
    assert apply_class_offsets(probs, [0.0, 0.5]).tolist() == [1, 0]  # log 0.4 + 0.5 > log 0.6


@call("write_submission")
def _(write_submission, tmp_path, fixture):
    probs = torch.tensor([[0.2, 0.8], [math.nan, math.nan]])
    assert write_submission(tmp_path / "s.txt", ["a.jpg", "b.jpg"], probs, ["x", "y"], fallback=0) == [1, 0]
    assert (tmp_path / "s.txt").read_text() == "a.jpg\ty\nb.jpg\tx\n"
    assert (tmp_path / "predictions.csv").read_text() == "name,x,y\na.jpg,0.200000,0.800000\nb.jpg,,\n"


@call("write_probability_csv")
def _(write_probability_csv, tmp_path, fixture):
    write_probability_csv(tmp_path / "oof.csv", ["a,1.jpg"], torch.tensor([[0.25, 0.75]]), ["x", "y"], labels=[1])
    assert (tmp_path / "oof.csv").read_text() == 'name,label,x,y\n"a,1.jpg",y,0.250000,0.750000\n'


@call("read_probability_csv")
def _(read_probability_csv, tmp_path, fixture):
    for name, text in (("a.csv", "name,label,x,y\na.jpg,y,0.25,0.75\n"), ("b.csv", "name,label,x,y\nb.jpg,x,1,0\n")):
        (tmp_path / name).write_text(text)
    names, probs, labels, class_names = read_probability_csv(tmp_path / "a.csv", tmp_path / "b.csv")
    assert (names, probs.tolist(), labels, class_names) == (["a.jpg", "b.jpg"], [[0.25, 0.75], [1, 0]], [1, 0],
                                                            ["x", "y"])
    with pytest.raises(ValueError, match="name"):
        read_probability_csv(tmp_path / "a.csv", tmp_path / "a.csv")  # a.jpg twice


# ----------------------------------------------------------------------------- sampling

@call("euler_sample")
def _(euler_sample, tmp_path, fixture):
    noise = torch.randn(2, 3)
    samples = euler_sample(lambda x, t: torch.ones_like(x), noise, 4)  # a constant velocity 1 moves x by 1
    torch.testing.assert_close(samples, noise + 1)


@call("rk45_sample")
def _(rk45_sample, tmp_path, fixture):
    noise = torch.randn(2, 3)
    samples, nfe = rk45_sample(ConstantVelocity(), noise, tolerance=1e-4)
    torch.testing.assert_close(samples, noise + 1)
    assert nfe > 0


@call("sample_flow")
def _(sample_flow, tmp_path, fixture):
    noise = torch.randn(2, 3)
    samples, nfe = sample_flow(ConstantVelocity(), noise, "heun", 4)  # two Heun steps of two evaluations
    torch.testing.assert_close(samples, noise + 1)
    assert nfe == 4


@call("sample_images")
def _(sample_images, tmp_path, fixture):
    model, rng = tiny_flow_model().eval(), torch.get_rng_state()
    images_uint8, nfe = sample_images(model, 3, device="cpu", nfe=2, batch_size=2, seed=1)
    assert images_uint8.shape == (3, 3, 32, 32) and images_uint8.dtype == torch.uint8 and nfe == 2
    assert torch.equal(sample_images(model, 3, device="cpu", nfe=2, batch_size=2, seed=1)[0], images_uint8)  # seeded
    assert torch.equal(torch.get_rng_state(), rng)  # of its own generator
    assert sample_images(tiny_flow_model(), 3, stop=lambda: True) == (None, None)


@call("compare_solvers")
def _(compare_solvers, tmp_path, fixture):
    rows = compare_solvers(tiny_flow_model().eval(), torch.randn(2, 3, 32, 32), solvers=("euler", "heun"), nfes=(1, 2))
    assert [(row["solver"], row["nfe"]) for row in rows] == [("euler", 1), ("euler", 2), ("heun", 2)]


# ----------------------------------------------------------------------------- metrics

@call("straightness")
def _(straightness, tmp_path, fixture):
    assert straightness(ConstantVelocity(), torch.randn(2, 3), steps=4) == 0


@call("guided_velocity")
def _(guided_velocity, tmp_path, fixture):
    model = wbflow.FlowUNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, num_classes=2)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    with torch.no_grad():
        expected = model.eval()(x, t, labels=torch.tensor([0, 1, 0, 1]))
        assert torch.equal(guided_velocity(model, torch.arange(2), 1.0)(x, t), expected)


@call("class_grid")
def _(class_grid, tmp_path, fixture):
    model = wbflow.FlowUNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, head_channels=8, num_classes=2)
    grid, caption, used = class_grid(model.eval(), torch.randn(3, 3, 8, 8), ["cat", "dog"], guidance=2.0, nfe=2)
    assert grid.shape == (22, 32, 3) and caption == "rows: cat, dog" and used == 2


@call("meanflow_velocity")
def _(meanflow_velocity, tmp_path, fixture):
    samples = wbflow.euler_sample(meanflow_velocity(JumpVelocity(), 2), torch.zeros(2, 3), 2)  # two jumps of 1/2
    torch.testing.assert_close(samples, torch.full((2, 3), 0.5))


@call("reflow_shards")
def _(reflow_shards, tmp_path, fixture):
    wbflow.save_checkpoint({"seed": 0}, tmp_path / "pairs_00000.pt")
    plan, others = reflow_shards(tmp_path, 3, shard_size=2, shape=(3,), settings={"nfe": 4})
    assert [(meta["first"], meta["count"], meta["nfe"]) for meta in plan] == [(0, 2, 4), (2, 1, 4)]
    assert others == {tmp_path / "pairs_00000.pt": "nfe None there, 4 here"}


@call("generate_reflow_pairs")
def _(generate_reflow_pairs, tmp_path, fixture):
    [path] = generate_reflow_pairs(lambda noise: wbflow.images_to_uint8(noise), tmp_path, 2, shape=(3,))
    assert wbflow.load_checkpoint(path)["images_uint8"].shape == (2, 3)
    with pytest.raises(ValueError, match=r"pairs_00000\.pt holds pairs of another generation \(seed 0 there, 1 here\)"):
        generate_reflow_pairs(lambda noise: wbflow.images_to_uint8(noise), tmp_path, 2, shape=(3,), seed=1)
    generate_reflow_pairs(lambda noise: wbflow.images_to_uint8(noise), tmp_path, 2, shape=(3,), seed=1, overwrite=True)
    assert wbflow.load_checkpoint(path)["seed"] == 1  # the other generation's shard deleted, this one's written


@call("load_reflow_pairs")
def _(load_reflow_pairs, tmp_path, fixture):
    wbflow.save_checkpoint({"first": 0, "count": 2, "seed": 5, "images_uint8": torch.zeros(2, 3, dtype=torch.uint8)},
                           tmp_path / "pairs_00000.pt")
    images_uint8, seed, labels = load_reflow_pairs(tmp_path, 2)
    assert images_uint8.shape == (2, 3) and seed == 5 and labels is None  # a shard of an unconditional teacher


@call("ReflowPairLoader")
def _(ReflowPairLoader, tmp_path, fixture):
    [batch] = list(ReflowPairLoader(torch.full((2, 3), 255, dtype=torch.uint8), 0, 2))
    assert batch["data"].tolist() == [[1.0] * 3] * 2 and batch["noise"].shape == (2, 3)


@call("per_class_precision_recall")
def _(per_class_precision_recall, tmp_path, fixture):
    assert per_class_precision_recall([0, 1, 1], [0, 1, 0], 2) == ([0.5, 1.0], [1.0, 0.5], [1, 2])


@call("f1_scores")
def _(f1_scores, tmp_path, fixture):
    f1, macro_f1 = f1_scores([0, 1, 1, 2], [0, 1, 0, 1], 3)
    assert f1 == pytest.approx([2 / 3, 0.5, 0.0]) and macro_f1 == pytest.approx(7 / 18)


@call("weighted_f1_score")
def _(weighted_f1_score, tmp_path, fixture):
    assert weighted_f1_score([0, 1, 2, 2], [0, 1, 2, 1], [2.0, 1.5, 1.0]) == pytest.approx(2 + 1.5 * 2 / 3 + 2 / 3)


@call("weights_by_name")
def _(weights_by_name, tmp_path, fixture):
    assert weights_by_name({"b": 2}, ["a", "b"]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="c: no class"):
        weights_by_name({"c": 2}, ["a", "b"])


@call("classification_scores")
def _(classification_scores, tmp_path, fixture):
    scores = classification_scores([0, 1, 1], [0, 1, 0], [1.0, 2.0])
    assert scores["acc"] == pytest.approx(200 / 3) and scores["f1"] == pytest.approx([2 / 3, 2 / 3])
    assert scores["score"] == pytest.approx(2.0) and scores["macro_f1"] == pytest.approx(2 / 3)


@call("fit_class_offsets")
def _(fit_class_offsets, tmp_path, fixture):
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]])  # the second image is of class 1
    offsets, before, after = fit_class_offsets(probs, [0, 1, 0], [1.0, 1.0])
    assert after > before and wbflow.apply_class_offsets(probs, offsets).tolist() in ([0, 1, 0], [1, 1, 0])


@call("warn_of_absent_classes")
def _(warn_of_absent_classes, tmp_path, fixture):
    with pytest.warns(UserWarning, match="no image of class\\(es\\) 'b'"):
        warn_of_absent_classes([0, 0], ["a", "b"], "the list", "macro_f1")


@call("FIDInceptionV3")
def _(FIDInceptionV3, tmp_path, fixture):
    model = FIDInceptionV3()
    model.load_state_dict(torch.load(fixture("weights_path"), weights_only=True))
    features, logits = model.eval()(torch.zeros(1, 3, 299, 299))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)


@call("fid_weights_path")
def _(fid_weights_path, tmp_path, fixture):
    assert fid_weights_path(fixture("weights_path")) == fixture("weights_path")
    with pytest.raises(FileNotFoundError, match=r"weights file \S*absent\.pth does not exist: download https://\S+ to "
                                                r"\S+, or anywhere and pass --weights PATH \(or set \$WBFLOW_FID_WEIGHTS\)$"):
        fid_weights_path(tmp_path / "absent.pth", pass_as="--weights PATH")


@call("load_fid_inception")
def _(load_fid_inception, tmp_path, fixture):
    assert not load_fid_inception(fixture("weights_path")).training


@call("file_sha256")
def _(file_sha256, tmp_path, fixture):
    (tmp_path / "x").write_bytes(b"abc")
    assert file_sha256(tmp_path / "x") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@call("images_sha256")
def _(images_sha256, tmp_path, fixture):
    abc = torch.tensor([97, 98, 99], dtype=torch.uint8)  # the bytes b"abc"
    assert images_sha256(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@call("fid_reference")
def _(fid_reference, tmp_path, fixture):
    assert "pytorch-fid" in fid_reference("pytorch-fid")


@call("inception_features")
def _(inception_features, tmp_path, fixture):
    images = fixture("images_uint8")[:3]
    features, logits = inception_features(images, weights_path=fixture("weights_path"))
    torch.testing.assert_close(features, wbflow.inception_features(images, fixture("inception"))[0])


@call("feature_statistics")
def _(feature_statistics, tmp_path, fixture):
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu, sigma = feature_statistics(features)
    assert np.allclose(sigma, np.cov(features.numpy(), rowvar=False)) and np.allclose(mu, features.mean(0).numpy())


@call("frechet_distance")
def _(frechet_distance, tmp_path, fixture):
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)) == pytest.approx(2.0)


@call("fid")
def _(fid, tmp_path, fixture):
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert fid(features, features + 1) == pytest.approx(8.0)  # the same covariance, the means 1 apart in 8 dims


@call("kid")
def _(kid, tmp_path, fixture):
    features = torch.randn(30, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert kid(features, features, subsets=2, subset_size=10) == wbflow.kid(features, features, subsets=2, subset_size=10)


@call("statistics_path")
def _(statistics_path, tmp_path, fixture):
    path = statistics_path(tmp_path, "cifar10-train", "ab" * 32, resize="pytorch-fid")
    assert path == str(tmp_path / "cifar10-train-pytorch-fid-abababababab.npz")


@call("save_statistics")
def _(save_statistics, tmp_path, fixture):
    images = fixture("images_uint8")[:3]
    path = save_statistics(images, tmp_path, "pasted", weights_path=fixture("weights_path"))
    assert path == wbflow.statistics_path(tmp_path, "pasted", wbflow.file_sha256(fixture("weights_path")))
    assert save_statistics(None, tmp_path, "pasted", weights_path=fixture("weights_path")) == path  # the cached file
    with pytest.raises(FileNotFoundError, match="FID statistics file not found: .*uncached-tensorflow-"):
        save_statistics(None, tmp_path, "uncached", weights_path=fixture("weights_path"))
    with np.load(path) as stored:
        assert np.array_equal(stored["mu"], wbflow.inception_features(images, fixture("inception"))[0].double().mean(0).numpy())


@call("cached_statistics")
def _(cached_statistics, tmp_path, fixture):
    images, weights = fixture("images_uint8")[:3], fixture("weights_path")
    path = cached_statistics(images, tmp_path, "pasted", weights_path=weights)
    digest = wbflow.images_sha256(images)[:16]
    assert path == wbflow.statistics_path(tmp_path, f"pasted-3-{digest}", wbflow.file_sha256(weights))
    assert cached_statistics(images[:2], tmp_path, "pasted", weights_path=weights) != path  # other images, other file
    (tmp_path / "file").write_text("a file where the cache folder would be")
    with pytest.raises(ValueError, match=r"the cache .*\.npz cannot be written"):
        cached_statistics(images, tmp_path / "file" / "stats", what="the cache", weights_path=weights)


@call("inception_score")
def _(inception_score, tmp_path, fixture):
    logits = torch.randn(20, 1008, generator=torch.Generator().manual_seed(0))
    assert inception_score(logits, splits=2) == wbflow.inception_score(logits, splits=2)


@call("fid_and_inception_score")
def _(fid_and_inception_score, tmp_path, fixture):
    images, inception = fixture("images_uint8"), fixture("inception")
    real = torch.randn(30, 2048, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score, (is_mean, is_std) = fid_and_inception_score(images, real, weights_path=fixture("weights_path"))
    features, logits = wbflow.inception_features(images, inception)
    assert score == pytest.approx(wbflow.fid(real, features), rel=1e-6)
    assert (is_mean, is_std) == pytest.approx(wbflow.inception_score(logits, splits=10), rel=1e-6)
    assert fid_and_inception_score(images[:3], inception=inception)[0] is None  # no statistics: no FID


@call("sample_and_score")
def _(sample_and_score, tmp_path, fixture):
    model, real = tiny_flow_model().eval(), torch.randn(30, 2048, generator=torch.Generator().manual_seed(1))
    (score, (is_mean, is_std)), samples_uint8, used = sample_and_score(
        model, 3, real.double(), nfe=2, batch_size=2, seed=1, weights_path=fixture("weights_path"))
    assert torch.equal(samples_uint8, wbflow.sample_images(model, 3, nfe=2, batch_size=2, seed=1)[0]) and used == 2
    features, logits = wbflow.inception_features(samples_uint8, fixture("inception"))
    assert score == pytest.approx(wbflow.fid(real.double(), features), rel=1e-6)
    assert (is_mean, is_std) == pytest.approx(wbflow.inception_score(logits, splits=3), rel=1e-6)
    assert sample_and_score(model, 3, stop=lambda: True, weights_path=fixture("weights_path")) is None


# ----------------------------------------------------------------------------- images & W&B

@call("wandb_run")
def _(wandb_run, tmp_path, fixture):
    from conftest import run_logs
    wandb_dir = fixture("offline_wandb")
    with wandb_run({"a": 1}, project="test") as run:
        run.log({"x": 1.0}, step=1)
    [log] = run_logs(wandb_dir)
    assert log.values("x") == [1.0] and log.config["a"] == 1


@call("define_metrics")
def _(define_metrics, tmp_path, fixture):
    from conftest import run_logs
    with offline_run(fixture) as run:
        define_metrics(run, {"loss": "min", "val_acc": "max"}, "epoch", global_step=("loss",))
    steps = {metric.name: metric.step_metric for metric in run_logs(fixture("offline_wandb"))[0].metrics}
    assert steps == {"epoch": "", "loss": "", "val_acc": "epoch"}


def offline_run(fixture):
    fixture("offline_wandb")
    return wbflow.wandb_run(project="test")


@call("flush_run")
def _(flush_run, tmp_path, fixture):
    with offline_run(fixture) as run:
        run.log({"x": 1.0}, step=1)
        flush_run(run)
        assert any(path.stat().st_size > 7 for path in Path(run.settings.sync_dir).glob("run-*.wandb"))


@call("watch_model")
def _(watch_model, tmp_path, fixture):
    with offline_run(fixture) as run:
        watch_model(run, nn.Linear(2, 1), log_freq=100)
        with pytest.raises(ValueError, match="log_freq"):
            watch_model(run, nn.Linear(2, 1), log_freq=10)


@call("log_model_graph")
def _(log_model_graph, tmp_path, fixture):
    with offline_run(fixture) as run:
        assert log_model_graph(run, nn.Linear(2, 1), torch.randn(1, 2), step=1)


@call("log_artifact")
def _(log_artifact, tmp_path, fixture):
    from conftest import run_logs
    path = wbflow.save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.pt")
    with offline_run(fixture) as run:
        log_artifact(run, path, "model-x", aliases=("latest", "epoch-1"))
    [log] = run_logs(fixture("offline_wandb"))
    assert [(a["name"], sorted(a["aliases"])) for a in log.artifacts] == [("model-x", ["epoch-1", "latest"])]


@call("use_artifact")
def _(use_artifact, tmp_path, fixture):
    from conftest import run_logs
    path = wbflow.save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.pt")
    with offline_run(fixture) as run:
        use_artifact(run, path, "model-x")
    [log] = run_logs(fixture("offline_wandb"))
    assert [(a["name"], a["used"]) for a in log.artifacts] == [("model-x", True)]


@call("images_to_uint8")
def _(images_to_uint8, tmp_path, fixture):
    assert images_to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


@call("sample_grid")
def _(sample_grid, tmp_path, fixture):
    assert sample_grid(torch.zeros(4, 3, 8, 8)).shape == (2 + 2 * 10, 2 + 2 * 10, 3)


@call("save_png")
def _(save_png, tmp_path, fixture):
    from PIL import Image
    path = save_png(np.zeros((4, 6, 3), dtype=np.uint8), tmp_path / "samples" / "a.png")
    assert Image.open(path).size == (6, 4)


@call("log_image_grid")
def _(log_image_grid, tmp_path, fixture):
    from conftest import run_logs
    with offline_run(fixture) as run:
        log_image_grid(run, "grid", np.zeros((4, 4, 3), dtype=np.uint8), step=1)
    [log] = run_logs(fixture("offline_wandb"))
    assert log.values("grid")[0]["_type"] == "image-file"


@call("samples_table")
def _(samples_table, tmp_path, fixture):
    wbflow.save_png(np.zeros((4, 4, 3), dtype=np.uint8), tmp_path / "samples" / "a.png")
    table = samples_table([{"epoch": 1, "solver": "euler", "nfe": 1, "seconds": 0.1, "samples": "samples/a.png"}],
                          root=tmp_path)
    assert table.columns[:3] == ["epoch", "solver", "nfe"] and len(table.data) == 1


@call("samples_table_rows")
def _(samples_table_rows, tmp_path, fixture):
    compared = [{"solver": "heun", "nfe": 2, "seconds": 0.5, "images": torch.zeros(4, 3, 8, 8)}]  # compare_solvers'
    rows = samples_table_rows(compared, 3, tmp_path, straightness=0.25)
    assert rows == [{"epoch": 3, "solver": "heun", "nfe": 2, "seconds": 0.5, "straightness": 0.25,
                     "samples": str(Path("samples") / "epoch_0003_heun_nfe002.png")}]
    assert (tmp_path / rows[0]["samples"]).is_file() and len(wbflow.samples_table(rows, root=tmp_path).data) == 1


@call("log_guidance_sweep")
def _(log_guidance_sweep, tmp_path, fixture):
    with offline_run(fixture) as run:
        scores = [{"guidance": 1.0, "eval/fid_score": 9.0}, {"guidance": 2.0, "eval/fid_score": 7.0}]
        best = log_guidance_sweep(run, scores)
    assert best == {"guidance": 2.0, "eval/fid_score": 7.0}


@call("log_classification_report")
def _(log_classification_report, tmp_path, fixture):
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    with offline_run(fixture) as run:
        report = log_classification_report(run, probs, torch.tensor([0, 1, 0]), ["x", "y"], step=3)
        assert log_classification_report(run, probs, None, ["x", "y"]) == {}  # a test list: the table alone
    assert report == {"precision": [1.0, 0.5], "recall": [0.5, 1.0], "support": [2, 1]}


# ----------------------------------------------------------------------------- checkpoints

@call("write_atomically")
def _(write_atomically, tmp_path, fixture):
    path = write_atomically(tmp_path / "a" / "b.txt", lambda file: file.write(b"text"))
    assert path.read_bytes() == b"text" and sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


@call("save_checkpoint")
def _(save_checkpoint, tmp_path, fixture):
    assert wbflow.load_checkpoint(save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.pt"))["w"].item() == 1


@call("load_checkpoint")
def _(load_checkpoint, tmp_path, fixture):
    assert load_checkpoint(wbflow.save_checkpoint({"s": 1}, tmp_path / "d.pt")) == {"s": 1}


@call("check_outputs")
def _(check_outputs, tmp_path, fixture):
    (tmp_path / "A.txt").write_text("a.jpg\n")
    check_outputs({"--submission": tmp_path / "s.txt"}, {"--predict": tmp_path / "A.txt"})
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match=r"--submission .*/link/A\.txt would overwrite an input .*\(--predict "):
        check_outputs({"--submission": tmp_path / "link" / "A.txt"}, {"--predict": tmp_path / "A.txt"})


@call("prepare_out_dir")
def _(prepare_out_dir, tmp_path, fixture):
    assert prepare_out_dir(tmp_path / "o") == (tmp_path / "o", [])


@call("rotate_checkpoints")
def _(rotate_checkpoints, tmp_path, fixture):
    for epoch in range(1, 5):
        wbflow.save_checkpoint({"epoch_loss": float(epoch)}, tmp_path / f"checkpoint_epoch_{epoch}.pt")
    assert [path.name for path in rotate_checkpoints(tmp_path, keep=2)] == ["checkpoint_epoch_2.pt"]


@call("save_best")
def _(save_best, tmp_path, fixture):
    path = tmp_path / "best.pt"
    assert save_best({"w": 1}, 0.5, None, path) == (0.5, True)
    assert save_best({"w": 2}, 0.4, 0.5, path) == (0.5, False) and wbflow.load_checkpoint(path) == {"w": 1}


@call("checkpoint_state")
def _(checkpoint_state, tmp_path, fixture):
    model = nn.Linear(2, 1)
    state = checkpoint_state({"model": model, "epoch": 3}, driver="train")
    assert state["epoch"] == 3 and state["driver"] == "train" and torch.equal(state["model"]["bias"], model.bias)
    assert torch.equal(state["rng"][0]["torch"], torch.get_rng_state())  # every rank's, in rank order


@call("restore_state")
def _(restore_state, tmp_path, fixture):
    model, scaler = nn.Linear(2, 1), torch.amp.GradScaler("cpu", enabled=False)
    saved = wbflow.checkpoint_state({"model": model, "scaler": scaler, "epoch": 3})
    expected, drawn = model.weight.detach().clone(), torch.rand(1)
    state = {"model": nn.Linear(2, 1), "scaler": scaler, "epoch": 0}
    assert restore_state(state, wbflow.load_checkpoint(wbflow.save_checkpoint(saved, tmp_path / "s.pt"))) is state
    assert state["epoch"] == 3 and torch.equal(state["model"].weight, expected) and torch.equal(torch.rand(1), drawn)


@call("check_checkpoint")
def _(check_checkpoint, tmp_path, fixture):
    with pytest.raises(ValueError, match="lacks optimizer"):
        check_checkpoint({"model": {}}, driver="train", required=("model", "optimizer"))


@call("resume_command")
def _(resume_command, tmp_path, fixture):
    assert resume_command("train.py", ["--resume", "a.pt", "--epochs", "3"], "b.pt") == \
        "python train.py --epochs 3 --resume b.pt"
    assert resume_command("train.py", ["--resume=a.pt", "--epochs", "3"], "b b.pt", world_size=2) == \
        "torchrun --standalone --nproc_per_node=2 train.py --epochs 3 --resume 'b b.pt'"


@call("wandb_resume_plan")
def _(wandb_resume_plan, tmp_path, fixture):
    assert wandb_resume_plan("abc", True, 7, "last.pt")[:2] == ("abc", None)
    assert wandb_resume_plan("abc", False, 7, "e.pt")[:2] == (None, {"run_id": "abc", "step": 7, "checkpoint": "e.pt"})


@call("resume_from")
def _(resume_from, tmp_path, fixture):
    model = nn.Linear(2, 1)
    saved = wbflow.checkpoint_state({"model": model, "step": 7}, config={"lr": 0.1}, driver="train",
                                    wandb_run_id="abc", wandb_last_act=True)
    path = wbflow.save_checkpoint(saved, tmp_path / "last.pt")
    state = {"model": nn.Linear(2, 1), "step": 0}
    checkpoint, plan = resume_from(str(path), state, program="train.py", driver="train", expected={"lr": 0.1})
    assert state["step"] == 7 and torch.equal(state["model"].weight, model.weight) and plan[:2] == ("abc", None)
    with pytest.raises(SystemExit, match="lr 0.1, this run has 0.2"):
        resume_from(str(path), state, program="train.py", driver="train", expected={"lr": 0.2})


@call("fetch_checkpoint")
def _(fetch_checkpoint, tmp_path, fixture):
    path = wbflow.save_checkpoint({"a": 1}, tmp_path / "c.pt")
    assert fetch_checkpoint(path) == path


@call("load_checked")
def _(load_checked, tmp_path, fixture):
    path = wbflow.save_checkpoint({"model": {"w": torch.ones(2)}, "driver": "train"}, tmp_path / "c.pt")
    assert load_checked(str(path), program="train.py", flag="--resume", driver="train", required=("model",))[1][
        "model"]["w"].tolist() == [1.0, 1.0]
    for reference, why in ((path, "lacks optimizer"), (tmp_path, "is a folder"), (tmp_path / "no.pt", "not found")):
        with pytest.raises(SystemExit, match=f"^train.py: --resume {reference}: .*{why}"):
            load_checked(str(reference), program="train.py", flag="--resume", driver="train", required=("optimizer",))


@call("load_checkpoints")
def _(load_checkpoints, tmp_path, fixture):
    paths = [wbflow.save_checkpoint({"config": {"classes": classes}}, tmp_path / f"{index}.pt")
             for index, classes in enumerate((["a", "b"], ["a", "b"], ["b", "a"]))]
    assert len(load_checkpoints(paths[:2], same=("classes",), program="p", flag="--checkpoint", driver="d")) == 2
    with pytest.raises(SystemExit, match="2.pt: trained with classes"):
        load_checkpoints(paths, same=("classes",), program="p", flag="--checkpoint", driver="d")


@call("write_ensemble")
def _(write_ensemble, tmp_path, fixture):
    path = wbflow.save_checkpoint({"w": 1}, tmp_path / "m" / "a.pt")
    write_ensemble(tmp_path / "e.json", [path], ["x", "y"], [0.5, 0.0], note=1)
    assert wbflow.read_ensemble(tmp_path / "e.json")[2:] == ([0.5, 0.0], {
        "checkpoints": [{"path": "m/a.pt", "sha256": wbflow.file_sha256(path)}], "class_names": ["x", "y"],
        "offsets": [0.5, 0.0], "note": 1})


@call("read_ensemble")
def _(read_ensemble, tmp_path, fixture):
    path = wbflow.save_checkpoint({"w": 1}, tmp_path / "a.pt")
    wbflow.write_ensemble(tmp_path / "e.json", [path], ["x", "y"])
    assert read_ensemble(tmp_path / "e.json")[:3] == ([tmp_path / "a.pt"], ["x", "y"], [0.0, 0.0])
    wbflow.save_checkpoint({"w": 2}, path)
    with pytest.raises(ValueError, match="a.pt has changed since"):
        read_ensemble(tmp_path / "e.json")


@call("fit_ensemble")
def _(fit_ensemble, tmp_path, fixture):
    model = wbflow.save_checkpoint({"w": 1}, tmp_path / "a.pt")
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]])  # the second image is of class y
    wbflow.write_probability_csv(tmp_path / "oof.csv", ["a", "b", "c"], probs, ["x", "y"], [0, 1, 0])
    scores, offsets = fit_ensemble([tmp_path / "oof.csv"], [model], ["x", "y"], [1.0, 1.0], tmp_path / "e.json")
    assert scores["oof_score_with_offsets"] > scores["oof_score"] and scores["oof_acc"] == pytest.approx(200 / 3)
    assert wbflow.read_ensemble(tmp_path / "e.json")[2] == offsets


# ----------------------------------------------------------------------------- config & command line

@call("load_yaml_config")
def _(load_yaml_config, tmp_path, fixture):
    import flow_config
    assert load_yaml_config(flow_config.DEFAULT_CONFIG, ["training.epochs=3"])["training"]["epochs"] == 3


@call("str2bool")
def _(str2bool, tmp_path, fixture):
    assert str2bool("False") is False and str2bool("yes") is True


@call("name_values")
def _(name_values, tmp_path, fixture):
    assert name_values("高风险=2, 中风险=1.5") == {"高风险": 2.0, "中风险": 1.5}


@call("output_file")
def _(output_file, tmp_path, fixture):
    assert output_file(None, tmp_path, "s.txt") == output_file(str(tmp_path), "x", "s.txt") == tmp_path / "s.txt"
    assert output_file("new/", "x", "s.txt") == Path("new/s.txt")
    assert output_file("a.txt", "x", "s.txt") == Path("a.txt")


@call("DefaultsHelpFormatter")
def _(DefaultsHelpFormatter, tmp_path, fixture):
    import argparse
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=3, help="a size")
    parser.add_argument("--name", help="a name (default: the first)")
    assert "a size (default: 3)" in parser.format_help() and "(default: None)" not in parser.format_help()


@call("add_sweep_argument")
def _(add_sweep_argument, tmp_path, fixture):
    import argparse
    parser = argparse.ArgumentParser()
    add_sweep_argument(parser, "--batch-size", type=int)
    assert parser.parse_args(["--batch_size", "3"]).batch_size == 3


@call("check_numbers")
def _(check_numbers, tmp_path, fixture):
    with pytest.raises(ValueError, match="--epochs must be positive, not 0"):
        check_numbers({"--epochs": 0})
    with pytest.raises(ValueError, match=r"--dropout must be in \[0, 1\), not 1"):
        check_numbers({"--epochs": 1}, {}, {"--ema-decay": 0.0, "--dropout": 1})


@call("check_choices")
def _(check_choices, tmp_path, fixture):
    assert check_choices("solver", ("euler", "heun"), {"solver": "heun", "table": ["euler", "heun"]}) is None
    with pytest.raises(ValueError, match=r"^unknown solver 'rk4' in table; choose from euler, heun$"):
        check_choices("solver", ("euler", "heun"), {"solver": "heun", "table": ["euler", "rk4"]})


@call("exit_on_error")
def _(exit_on_error, tmp_path, fixture):
    with pytest.raises(SystemExit, match="train.py: missing"):
        with exit_on_error("train.py"):
            raise FileNotFoundError("missing")

"""Fewer sampling steps (issue 18): the exact OT coupling, the straightness measure, reflow pairs in shards
and `train_flow.py --reflow` with its W&B lineage, read back from the offline record."""
import glob
import itertools
import json
import signal

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import train_flow
import wbflow
from conftest import run_logs
from test_guard import refused
from test_training import signal_on_call
from test_wbflow import tiny_flow_checkpoint


def _cost(noise, data):
    return (noise.flatten(1).double() - data.flatten(1).double()).square().sum().item()


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 6), shape=st.sampled_from([(2,), (3, 2), (1, 2, 2)]), seed=st.integers(0, 2**16))
def test_ot_pairs_is_a_permutation_with_the_least_total_squared_distance(count, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    noise, data = torch.randn(count, *shape, generator=generator), torch.randn(count, *shape, generator=generator)
    paired = wbflow.ot_pairs(noise, data)
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))
    best = min(_cost(noise[list(order)], data) for order in itertools.permutations(range(count)))
    assert _cost(paired, data) == pytest.approx(best, rel=1e-9, abs=1e-9)


class Constant(nn.Module):
    def __init__(self, velocity):
        super().__init__()
        self.velocity = nn.Parameter(torch.as_tensor(velocity, dtype=torch.float32))

    def forward(self, x, t):
        return self.velocity.expand_as(x)


class Rotation(nn.Module):  # v = A x: the paths curve
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1) + self.anchor


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


def test_straightness_is_zero_for_a_constant_velocity_and_grows_with_the_curvature():
    noise = torch.randn(32, 2)
    assert wbflow.straightness(Constant([0.5, -1.0]), noise, steps=20) < 1e-12
    curved = wbflow.straightness(Rotation(), noise, steps=20)
    assert curved > 0.05 and wbflow.straightness(Rotation(), 2 * noise, steps=20) == pytest.approx(4 * curved)


def test_a_killed_pair_generation_resumes_at_the_next_shard_without_duplicates(tmp_path):
    settings_ = dict(shard_size=4, shape=(2,), settings={"nfe": 2}, seed=3)

    def model(noise):  # a flow of constant velocity, sampled with 2 Euler steps
        return wbflow.images_to_uint8(wbflow.euler_sample(Constant([0.25, 0.5]), noise, 2))
    whole = wbflow.generate_reflow_pairs(model, tmp_path / "whole", 10, **settings_)
    calls = []
    assert wbflow.generate_reflow_pairs(model, tmp_path / "cut", 10, stop=lambda: calls.append(1) or len(calls) > 1,
                                        **settings_) is None
    assert [path.name for path in sorted((tmp_path / "cut").glob("*"))] == ["pairs_00000.pt"]
    resumed = wbflow.generate_reflow_pairs(model, tmp_path / "cut", 10, **settings_)
    assert [path.name for path in resumed] == [path.name for path in whole] == [
        "pairs_00000.pt", "pairs_00001.pt", "pairs_00002.pt"]
    images_uint8, seed, labels = wbflow.load_reflow_pairs(tmp_path / "cut", 10)
    assert labels is None
    torch.testing.assert_close(images_uint8, wbflow.load_reflow_pairs(tmp_path / "whole", 10)[0])
    with pytest.raises(ValueError, match=r"pairs_00000\.pt and 2 more files hold pairs of another generation "
                                         r"\(nfe 2 there, 4 here\)"):
        wbflow.generate_reflow_pairs(model, tmp_path / "cut", 10, **{**settings_, "settings": {"nfe": 4}})
    loader = wbflow.ReflowPairLoader(images_uint8, seed, 3)
    loader.set_epoch(1)
    batches = list(loader)
    noise = torch.cat([batch["noise"] for batch in batches])
    assert len(batches) == 3 and len({tuple(row) for row in noise.tolist()}) == 9  # no pair twice
    data = torch.cat([batch["data"] for batch in batches])  # each sample is its noise moved by the velocity
    torch.testing.assert_close(data, (noise + torch.tensor([0.25, 0.5])).clamp(-1, 1), atol=1 / 127.5, rtol=0)
    loader.set_epoch(1, skip_batches=2)
    torch.testing.assert_close(next(iter(loader))["noise"], batches[2]["noise"])


TINY = ["--smoke", "--set", "data.max_images=32", "--set", "training.batch_size=16", "--set", "model.base_channels=8",
        "--set", "model.head_channels=8", "--set", "sampling.num_images=4", "--set", "sampling.table_nfes=[1]",
        "--set", "sampling.table_solvers=[euler]", "--set", "reflow.num_pairs=32", "--set", "reflow.shard_size=16",
        "--set", "reflow.nfe=2", "--set", "sampling.nfe=4"]


def test_smoke_reflow_logs_pairs_that_use_the_teacher_and_a_student_that_uses_them(offline_wandb, tmp_path):
    train_flow.main(TINY + ["--out-dir", str(tmp_path / "teacher")])
    teacher_path = tmp_path / "teacher" / "last.pt"
    result = train_flow.main(TINY + ["--out-dir", str(tmp_path / "student"), "--reflow", str(teacher_path)])
    teacher, pairs, student = run_logs(offline_wandb)
    [used_model] = [artifact for artifact in pairs.artifacts if artifact["used"]]
    assert used_model["type"] == "model" and used_model["name"] == f"model-{teacher.run_id}"
    [dataset] = [artifact for artifact in pairs.artifacts if artifact["type"] == "dataset" and not artifact["used"]]
    assert dataset["name"] == f"reflow-pairs-{teacher.run_id}" and sorted(dataset["files"]) == [
        "pairs_00000.pt", "pairs_00001.pt"] and dataset["metadata"]["num_pairs"] == 32
    [used_dataset] = [artifact for artifact in student.artifacts if artifact["used"]]
    assert used_dataset["type"] == "dataset" and used_dataset["name"] == dataset["name"]
    assert [artifact["name"] for artifact in student.artifacts if artifact["type"] == "model"] == [
        f"model-{student.run_id}"] and student.config["reflow"]["teacher"] == str(teacher_path)
    [straightness] = student.values("eval/straightness")
    assert straightness > 0 and result["step"] == 2
    [table] = glob.glob(str(offline_wandb / "wandb" / f"*{student.run_id}" / "files" / "media" / "table" / "eval"
                            / "samples_table_*.table.json"))
    table = json.loads(open(table).read())
    assert table["columns"][4] == "straightness" and table["data"][0][4] == pytest.approx(straightness)


def test_the_epochs_end_and_the_pair_generation_sample_the_ema_model_in_eval_mode(tmp_path):
    """The samplers leave the velocity's mode as given: train_flow puts its EMA model in eval mode (no dropout)."""
    calls = []  # (training mode, inference mode) of every FlowUNet forward

    def record(module, args):
        if isinstance(module, wbflow.FlowUNet):
            calls.append((module.training, torch.is_inference_mode_enabled()))

    argv = TINY + ["--no-wandb", "--set", "model.dropout=0.5"]
    with torch.nn.modules.module.register_module_forward_pre_hook(record):  # removed at the end
        train_flow.main(argv + ["--out-dir", str(tmp_path / "teacher")])
        trained = len(calls)
        train_flow.main(argv + ["--out-dir", str(tmp_path / "student"), "--reflow", str(tmp_path / "teacher" / "last.pt")])
    sampled = [training for training, inference in calls if inference]
    assert set(calls[:trained]) == {(True, False), (False, True)}  # the steps; the grid, straightness and table
    assert sampled and not any(sampled) and (False, True) in calls[trained:]  # and the teacher's pairs


def test_load_reflow_pairs_refuses_shards_of_two_generations_or_of_another_teacher(tmp_path):
    def made_by(teacher, folder):
        wbflow.generate_reflow_pairs(lambda noise: wbflow.images_to_uint8(noise), tmp_path / folder, 4, shard_size=2,
                                     shape=(3,), settings={"teacher_sha256": teacher, "nfe": 1})
    made_by("aa", "a")
    made_by("bb", "b")
    (tmp_path / "a" / "pairs_00001.pt").write_bytes((tmp_path / "b" / "pairs_00001.pt").read_bytes())
    with pytest.raises(ValueError, match=r"mixes pairs of two generations: teacher_sha256 'aa' in pairs_00000\.pt, "
                                         r"'bb' in pairs_00001\.pt"):
        wbflow.load_reflow_pairs(tmp_path / "a", 4)
    with pytest.raises(ValueError, match=r"holds pairs of another generation \(teacher_sha256 'bb' there, 'aa' here\)"):
        wbflow.load_reflow_pairs(tmp_path / "b", 4, {"teacher_sha256": "aa", "nfe": 1})
    assert wbflow.load_reflow_pairs(tmp_path / "b", 4, {"teacher_sha256": "bb", "nfe": 1})[0].shape == (4, 3)
    plan, others = wbflow.reflow_shards(tmp_path / "a", 4, shard_size=2, shape=(3,), settings={"teacher_sha256": "aa",
                                                                                             "nfe": 1})
    assert others == {tmp_path / "a" / "pairs_00001.pt": "teacher_sha256 'bb' there, 'aa' here"}


def test_reflow_with_another_teacher_refuses_the_earlier_pairs_or_with_overwrite_makes_them_again(tmp_path,
                                                                                                  monkeypatch):
    """A generation stopped under teacher A and run again with teacher B: never a mix of both teachers' pairs."""
    teachers = [tiny_flow_checkpoint(tmp_path / f"teacher_{name}.pt") for name in "ab"]
    hashes = [wbflow.file_sha256(path) for path in teachers]
    out = tmp_path / "student"
    argv = TINY + ["--no-wandb", "--set", "model.attention_resolutions=[]", "--out-dir", str(out)]  # the teachers' UNet
    real_sample = wbflow.sample_flow
    monkeypatch.setattr(wbflow, "sample_flow", signal_on_call(real_sample, 1))  # SIGTERM while making shard 0
    with pytest.raises(SystemExit) as stopped:
        train_flow.main(argv + ["--reflow", str(teachers[0])])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [path.name for path in (out / "reflow_pairs").iterdir()] == ["pairs_00000.pt"]
    monkeypatch.setattr(wbflow, "sample_flow", real_sample)
    refused(train_flow.main, argv + ["--reflow", str(teachers[1])],
            rf"pairs_00000\.pt holds pairs of another generation \(teacher_sha256 '{hashes[0]}' there, '{hashes[1]}' "
            rf"here\): pass --overwrite to delete them")
    monkeypatch.setattr(wbflow, "train_epoch", lambda *args, **kwargs: pytest.fail("training starts"))
    with pytest.raises(pytest.fail.Exception, match="training starts"):
        train_flow.main(argv + ["--reflow", str(teachers[1]), "--overwrite"])
    shards = [wbflow.load_checkpoint(path) for path in sorted((out / "reflow_pairs").iterdir())]
    assert [(shard["first"], shard["teacher_sha256"]) for shard in shards] == [(0, hashes[1]), (16, hashes[1])]

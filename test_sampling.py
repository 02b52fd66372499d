"""wbflow's sampling: Euler, Heun and RK45 on a velocity, compare_solvers, straightness, classifier-free
guidance and the class grid, reflow pairs and their generations, MeanFlow's jumps."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import wbflow
from conftest import Constant, TINY, TINY_UNET, randomised, tiny_meanflow_unet

# ----------------------------------------------------------------------------- samplers and solvers

class _LinearField(nn.Module):
    """v(x, t) = a * x, so x(1) = x(0) * exp(a); counts evaluations and records (inference mode, training mode)
    of each."""

    def __init__(self, a=1.0):
        super().__init__()
        self.a, self.calls, self.modes = a, 0, []

    def forward(self, x, t):
        self.calls += 1
        self.modes.append((torch.is_inference_mode_enabled(), self.training))
        return self.a * x


def test_euler_and_heun_converge_at_first_and_second_order_with_steps_and_2x_steps_evaluations():
    noise = torch.randn(4, 3, 8, 8)
    exact = noise * math.e
    errors = {}
    for name, evaluations in [("euler", 1), ("heun", 2)]:
        for steps in (10, 20):
            field = _LinearField().train()  # the caller's mode: the sampler leaves it as it is
            samples = wbflow.euler_sample(field, noise, steps, heun=name == "heun")
            assert field.calls == evaluations * steps and set(field.modes) == {(True, True)} and field.training
            errors[name, steps] = (samples - exact).abs().max().item()
    assert 1.8 < errors["euler", 10] / errors["euler", 20] < 2.2
    assert 3.6 < errors["heun", 10] / errors["heun", 20] < 4.4
    assert errors["heun", 10] < errors["euler", 20] / 10


def test_rk45_is_accurate_and_reports_the_evaluations_it_used():
    noise = torch.randn(2, 3, 4, 4)
    field = _LinearField()
    samples, nfe = wbflow.rk45_sample(field, noise, tolerance=1e-6)
    torch.testing.assert_close(samples, noise * math.e, rtol=1e-5, atol=1e-5)
    assert nfe == field.calls and 6 <= nfe < 200


def test_compare_solvers_gives_one_row_per_solver_and_budget():
    rows = wbflow.compare_solvers(_LinearField(), torch.randn(2, 3, 4, 4), nfes=(1, 2, 4), tolerance=1e-3)
    assert [(row["solver"], row["nfe"]) for row in rows[:5]] == [
        ("euler", 1), ("euler", 2), ("euler", 4), ("heun", 2), ("heun", 4)]
    assert rows[5]["solver"] == "rk45" and rows[5]["nfe"] > 0 and len(rows) == 6


def test_euler_and_heun_sample_a_model_bit_for_bit_as_a_hand_written_loop_does_in_the_callers_mode():
    torch.manual_seed(0)
    model = wbflow.FlowUNet(**{**TINY_UNET, "dropout": 0.3}).eval()  # the caller's eval mode: no dropout
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.05)
    noise, steps = torch.randn(2, 3, 32, 32), 3
    times = torch.linspace(0.0, 1.0, steps + 1).tolist()
    euler, heun = noise.clone(), noise.clone()
    with torch.inference_mode():
        for t_now, t_next in zip(times[:-1], times[1:]):
            dt, now, after = t_next - t_now, torch.full((2,), t_now), torch.full((2,), t_next)
            euler.add_(model(euler, now), alpha=dt)
            velocity = model(heun, now)
            heun.add_((velocity + model(heun + dt * velocity, after)) / 2, alpha=dt)
    assert torch.equal(wbflow.euler_sample(model, noise, steps), euler)
    assert torch.equal(wbflow.sample_flow(model, noise, "heun", 2 * steps)[0], heun)
    assert not torch.equal(wbflow.euler_sample(model.train(), noise, steps), euler)  # dropout on: the mode is as given


def test_every_sampler_takes_a_plain_velocity_function_and_runs_it_in_inference_mode_under_amp_dtype():
    calls = []

    def velocity(x, t):  # v = 1 + 2t: x(1) = x(0) + 2
        calls.append((t.shape, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")
                      and torch.get_autocast_dtype("cpu")))
        return (1 + 2 * t)[:, None].expand_as(x)

    noise = torch.randn(3, 2)
    torch.testing.assert_close(wbflow.euler_sample(velocity, noise, 4, heun=True, amp_dtype=torch.bfloat16), noise + 2)
    assert set(calls) == {((3,), True, torch.bfloat16)} and len(calls) == 8
    calls.clear()
    samples, nfe = wbflow.rk45_sample(velocity, noise, tolerance=1e-6)
    torch.testing.assert_close(samples, noise + 2)
    assert len(calls) == nfe and set(calls) == {((3,), True, False)}
    rows = wbflow.compare_solvers(velocity, noise, nfes=(1, 2), amp_dtype=torch.bfloat16)
    assert [(row["solver"], row["nfe"]) for row in rows][:3] == [("euler", 1), ("euler", 2), ("heun", 2)]
    torch.testing.assert_close(rows[2]["images"], noise + 2)  # Heun: exact for v linear in t
    # the velocities at t = 0, 1/4, 2/4, 3/4: 1 + 2t has variance 4 * 5/64 over them
    assert wbflow.straightness(velocity, noise, steps=4, amp_dtype=torch.bfloat16) == pytest.approx(20 / 64)
    images_uint8, nfe = wbflow.sample_images(velocity, 3, device="cpu", shape=(2,), solver="heun", nfe=2, seed=5)
    generator = torch.Generator().manual_seed(5)
    assert nfe == 2 and torch.equal(images_uint8, wbflow.images_to_uint8(torch.randn(3, 2, generator=generator) + 2))


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 64), a=st.floats(-4, 4), b=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_euler_is_exact_for_a_constant_velocity_and_heun_for_one_linear_in_t(steps, a, b, seed):
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed))

    def linear(x, t):
        return (a + b * t)[:, None].expand_as(x)

    def close(samples, expected):  # float32 steps of values up to about 16
        torch.testing.assert_close(samples, expected, rtol=0, atol=1e-4)

    close(wbflow.euler_sample(lambda x, t: torch.full_like(x, a), noise, steps), noise + a)
    close(wbflow.euler_sample(linear, noise, steps, heun=True), noise + a + b / 2)
    close(wbflow.euler_sample(linear, noise, steps), noise + a + b / 2 - b / (2 * steps))  # Euler: a left Riemann sum


def _mixture_of_gaussians(count, generator, modes=8, radius=4.0, std=0.3):
    angles = 2 * math.pi * torch.randint(0, modes, (count,), generator=generator) / modes
    centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centres + std * torch.randn(count, 2, generator=generator)


class _TimeMLP(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.expand(x.shape[0])[:, None]], dim=1))


def test_objective_and_sampler_learn_a_2d_mixture_of_gaussians():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = _TimeMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batches = [_mixture_of_gaussians(256, generator) for _ in range(1500)]
    wbflow.train_epoch(model, batches, optimizer, wbflow.rectified_flow_loss, progress=False, log_every=10**6,
                       scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1 / 100, total_iters=99), grad_clip=1.0)
    data, noise = _mixture_of_gaussians(4000, generator), torch.randn(4000, 2, generator=generator)
    samples = wbflow.euler_sample(model, noise, 50)

    def frechet(points):
        return wbflow.frechet_distance(*wbflow.feature_statistics(points), *wbflow.feature_statistics(data))

    assert frechet(noise) > 5.0 and frechet(samples) < frechet(noise) / 20
    centres = 4.0 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1)
    nearest = torch.cdist(samples, centres).min(dim=1)
    assert (nearest.values < 1.0).float().mean() > 0.8  # mass on the modes, not just matching moments
    assert nearest.indices.bincount(minlength=8).min() > 4000 / 8 / 3  # and every mode covered


# ----------------------------------------------------------------------------- straightness and reflow pairs

class LabelledVelocity(nn.Module):
    """v(x, t, labels) = x * (1 + t) + an offset per label (the last row the null class), counting its calls."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [0.5, 0.25]]))
        self.batch_sizes = []

    def forward(self, x, t, labels=None):
        self.batch_sizes.append(x.shape[0])
        labels = torch.full((x.shape[0],), self.num_classes) if labels is None else labels
        return x * (1 + t[:, None]) + self.offset[labels]


def test_a_conditional_teachers_reflow_pairs_keep_the_label_each_was_generated_for(tmp_path):
    seen = []

    def sample(noise, labels):  # a "teacher" whose sample shows the label it was asked for
        seen.append(labels.clone())
        return torch.full((len(noise), 2), 0, dtype=torch.uint8) + labels[:, None].to(torch.uint8)

    paths = wbflow.generate_reflow_pairs(sample, tmp_path, 10, shard_size=4, shape=(2,), num_classes=3)
    assert len(paths) == 3 and torch.equal(torch.cat(seen), torch.arange(10) % 3)  # class-balanced, pair i: i % 3
    images_uint8, seed, labels = wbflow.load_reflow_pairs(tmp_path, 10)
    assert torch.equal(labels, torch.arange(10) % 3) and torch.equal(images_uint8[:, 0].long(), labels)
    loader = wbflow.ReflowPairLoader(images_uint8, seed, 5, labels=labels)
    loader.set_epoch(2)
    for batch in loader:
        assert torch.equal(((batch["data"][:, 0] + 1) * 127.5).round().long(), batch["labels"])  # each pair its own
    plan, others = wbflow.reflow_shards(tmp_path, 10, shard_size=4, shape=(2,))  # an unconditional generation
    assert sorted(others.values()) == ["num_classes 3 there, None here"] * 3
    with pytest.raises(ValueError, match="pairs of another generation \\(num_classes 3 there, None here\\)"):
        wbflow.generate_reflow_pairs(lambda noise: noise, tmp_path, 10, shard_size=4, shape=(2,))


class Rotation(nn.Module):  # v = A x: the paths curve
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1) + self.anchor


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


# ----------------------------------------------------------------------------- guidance

def test_guided_velocity_is_the_cfg_formula_in_one_batched_forward():
    model, x, t = LabelledVelocity(), torch.randn(4, 2), torch.full((4,), 0.3)
    labels = torch.tensor([0, 1, 2, 1])
    guided = wbflow.guided_velocity(model, labels, 2.5)(x, t)
    assert model.batch_sizes == [8]  # the conditional and the null rows together
    v_cond, v_uncond = model(x, t, labels), model(x, t, torch.full((4,), 3))
    torch.testing.assert_close(guided, v_uncond + 2.5 * (v_cond - v_uncond))


def test_guided_velocity_at_scale_1_is_exactly_the_conditional_velocity():
    model, x, t = LabelledVelocity(), torch.randn(5, 2), torch.rand(5)
    labels = torch.tensor([2, 0, 1, 1, 0])
    assert torch.equal(wbflow.guided_velocity(model, labels, 1.0)(x, t), model(x, t, labels))
    assert model.batch_sizes == [5, 5]  # no null rows needed


@pytest.mark.parametrize("w", [0.0, 0.5, 2.0])
def test_flow_matchings_guidance_weight_w_is_our_scale_1_plus_w(w):
    model, x, t, labels = LabelledVelocity(), torch.randn(3, 2), torch.rand(3), torch.tensor([0, 1, 2])
    cond, uncond = model(x, t, labels), model(x, t, None)
    torch.testing.assert_close(wbflow.guided_velocity(model, labels, 1 + w)(x, t), (1 + w) * cond - w * uncond)


def test_guided_velocity_guides_only_for_t_inside_its_interval():
    model, x = LabelledVelocity(), torch.randn(5, 2)
    t, labels = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.95]), torch.tensor([0, 1, 2, 0, 1])
    guided = wbflow.guided_velocity(model, labels, 3.0, interval=(0.2, 0.8))(x, t)
    everywhere = wbflow.guided_velocity(model, labels, 3.0)(x, t)
    conditional = model(x, t, labels)
    inside = torch.tensor([False, True, True, True, False])
    assert torch.equal(guided[inside], everywhere[inside]) and torch.equal(guided[~inside], conditional[~inside])
    assert not torch.allclose(everywhere[~inside], conditional[~inside])


def test_guided_velocity_repeats_shorter_labels_along_the_batch_for_class_balanced_samples():
    model, x, t = LabelledVelocity(), torch.randn(7, 2), torch.rand(7)
    torch.testing.assert_close(wbflow.guided_velocity(model, torch.arange(3), 1.0)(x, t),
                               model(x, t, torch.tensor([0, 1, 2, 0, 1, 2, 0])))


def test_guided_velocity_runs_in_the_samplers_with_a_flow_unet_and_refuses_an_unconditional_one():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=2))
    noise = torch.randn(4, 3, 8, 8)
    samples, used = wbflow.sample_flow(wbflow.guided_velocity(model, torch.arange(2), 2.0), noise, "heun", 4)
    assert samples.shape == noise.shape and used == 4 and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="guided_velocity needs a model built with num_classes"):
        wbflow.guided_velocity(wbflow.FlowUNet(**TINY), torch.arange(2), 2.0)


def test_class_grid_draws_one_row_per_class_from_the_same_noise_and_names_the_classes():
    model = randomised(wbflow.FlowUNet(**TINY, num_classes=3))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid, caption, used = wbflow.class_grid(model, noise, ["cat", "dog", "ship"], guidance=2.0, nfe=3)
    assert caption == "rows: cat, dog, ship" and used == 3
    assert grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)  # 3 rows x 2 columns of 8-pixel images, 2-pixel padding
    cells = [[grid[2 + 10 * row:10 + 10 * row, 2 + 10 * column:10 + 10 * column] for column in range(2)]
             for row in range(3)]
    expected = wbflow.euler_sample(wbflow.guided_velocity(model, torch.tensor([1, 1]), 2.0), noise, 3)
    assert np.array_equal(np.stack(cells[1]), wbflow.images_to_uint8(expected).permute(0, 2, 3, 1).numpy())
    assert not np.array_equal(cells[0][0], cells[1][0])  # the label changes the sample of one noise
    again = wbflow.class_grid(model, noise, ["cat", "dog", "ship"], guidance=2.0, nfe=3)[0]
    assert np.array_equal(grid, again)
    with pytest.raises(ValueError, match="class_grid: 2 class names for a model of 3 classes"):
        wbflow.class_grid(model, noise, ["cat", "dog"])


# ----------------------------------------------------------------------------- MeanFlow's jumps

class RecordedCalls(nn.Module):
    """An average velocity that records each call's (t, r): u = (r - t) + x."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, r=None):
        self.calls.append((t.tolist(), r.tolist()))
        return (r - t)[:, None] + x


def test_one_step_is_noise_plus_the_jump_from_0_to_1_and_k_steps_are_euler_on_jumps_of_1_over_k():
    model, noise = tiny_meanflow_unet().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = noise + model(noise, 0, r=1)
    torch.testing.assert_close(wbflow.euler_sample(wbflow.meanflow_velocity(model, 1), noise, 1), expected)
    recorded, noise = RecordedCalls(), torch.zeros(2, 1)
    samples = wbflow.euler_sample(wbflow.meanflow_velocity(recorded, 4), noise, 4)
    starts = [0.0, 0.25, 0.5, 0.75]
    assert [(t, r) for t, r in recorded.calls] == [([start] * 2, [start + 0.25] * 2) for start in starts]
    expected = torch.zeros(2, 1)
    for _ in starts:  # x += (1/4) * u, with u = 1/4 + x
        expected = expected + 0.25 * (0.25 + expected)
    torch.testing.assert_close(samples, expected)


def test_the_meanflow_solver_of_sample_flow_and_compare_solvers_makes_nfe_jumps_of_the_model():
    model, noise = tiny_meanflow_unet().eval(), torch.randn(2, 3, 8, 8)
    samples, used = wbflow.sample_flow(model, noise, "meanflow", 2)
    assert used == 2 and torch.equal(samples, wbflow.euler_sample(wbflow.meanflow_velocity(model, 2), noise, 2))
    rows = wbflow.compare_solvers(model, noise, solvers=("meanflow",), nfes=(1, 2, 4))
    assert [(row["solver"], row["nfe"]) for row in rows] == [("meanflow", 1), ("meanflow", 2), ("meanflow", 4)]
    with torch.no_grad():
        torch.testing.assert_close(rows[0]["images"], noise + model(noise, 0, r=1))
    assert torch.equal(rows[1]["images"], samples)

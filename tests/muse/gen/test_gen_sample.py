"""Samplers on a Gaussian target whose exact flow is known; the Euler loop against diffusers' scheduler."""

import pytest
import torch

from muse.gen.sample import euler_sample, heun_sample, initial_noise, save_grid, sigma_grid

MEAN, STD = 2.0, 0.5


def exact_velocity(x, t):
    """E[ε − x₀ | x_t = x] for x₀ ~ N(MEAN, STD²), ε ~ N(0, 1), x_t = (1 − t)·x₀ + t·ε: jointly Gaussian,
    so both conditional means are linear in x."""
    t = t.view(-1, *([1] * (x.dim() - 1))).double()
    variance = (1 - t) ** 2 * STD ** 2 + t ** 2
    centred = x.double() - (1 - t) * MEAN
    x0 = MEAN + (1 - t) * STD ** 2 / variance * centred
    noise = t / variance * centred
    return (noise - x0).float()


@pytest.mark.parametrize("sampler,steps,tolerance", [(euler_sample, 50, 0.03), (heun_sample, 10, 0.01)])
def test_samplers_carry_noise_to_the_gaussian_target(sampler, steps, tolerance):
    noise = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0))
    samples = sampler(exact_velocity, noise, sigma_grid(steps))
    # The exact flow is affine in x: the samples' mean and std are the map's, up to sampling noise
    # (1/√40000 of the std) and the discretisation error the tolerance allows.
    assert abs(float(samples.mean()) - MEAN) < tolerance
    assert abs(float(samples.std()) - STD) < tolerance


def test_heun_is_more_accurate_than_euler_at_the_same_steps():
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, sampler in (("euler", euler_sample), ("heun", heun_sample)):
        samples = sampler(exact_velocity, noise, sigma_grid(8))
        errors[name] = abs(float(samples.std()) - STD) + abs(float(samples.mean()) - MEAN)
    assert errors["heun"] < errors["euler"] / 3, errors


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_euler_loop_is_diffusers_flow_match_euler_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(x, t):  # any field: here a non-linear one, so a wrong time would show
        return torch.sin(3 * x) * t.view(-1, 1, 1, 1) + x ** 2 / 4

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(12)
    x = noise.clone()
    for timestep in scheduler.timesteps:
        t = (timestep / scheduler.config.num_train_timesteps).expand(3)
        x = scheduler.step(velocity(x, t), timestep, x, return_dict=False)[0]
    ours = euler_sample(velocity, noise, sigma_grid(12, shift))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)
    grid = sigma_grid(12, shift)
    assert grid[0] == 1 and grid[-1] == 0 and len(grid) == 13 and bool((grid[1:] < grid[:-1]).all())


def test_noise_depends_on_the_seed_alone(tmp_path):
    both = initial_noise([3, 4], (2, 2, 2))
    assert torch.equal(initial_noise([4], (2, 2, 2))[0], both[1]) and not torch.equal(both[0], both[1])
    path = save_grid(torch.zeros(5, 3, 8, 8), 2, tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(path).size == (2 * 8 * 16, 3 * 8 * 16)  # 3 rows of 2, 8-pixel tiles enlarged ×16

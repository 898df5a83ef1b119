"""Exact identities between solvers and parameterisations (float64)."""
import pytest
import torch

from stride_diffusion.solvers import GaussianMixture, make_table, sample, seeded_noise
from stride_diffusion.solvers.builders import Ctx, ddim, dpmpp
from stride_diffusion.solvers.grids import make_grid
from stride_diffusion.solvers.param import PARAMS, convert
from stride_diffusion.solvers.schedules import EDMSchedule, FlowSchedule, VPLinearSchedule, VPSchedule

SCHEDULES = [FlowSchedule(), VPSchedule("linear"), VPSchedule("cosine"), VPLinearSchedule(), EDMSchedule()]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name + getattr(s, "betas_kind", ""))
@pytest.mark.parametrize("param", PARAMS)
def test_parameterisation_round_trip(sched, param):
    t = torch.linspace(sched.t_min, sched.t_max, 7, dtype=torch.float64)
    a, s = sched.alpha(t), sched.sigma(t)
    da, ds = sched.derivatives(t)
    x, out = torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for target in ("eps", "x0", "v", "flow", "velocity"):
        A, B = convert(param, target, a, s, da, ds)
        q = A * x + B * out
        back = (q - A * x) / B
        # exact up to rounding: a few ulps of the largest term, amplified by 1/|B|
        bound = 8 * torch.finfo(torch.float64).eps * ((A * x).abs() + q.abs()) / B.abs()
        assert ((back - out).abs() <= bound + 1e-15).all(), (target, (back - out).abs().max())
    # x0 and eps recovered from the output reconstruct the state exactly
    (ax, bx), (ae, be) = convert(param, "x0", a, s), convert(param, "eps", a, s)
    torch.testing.assert_close(a * (ax * x + bx * out) + s * (ae * x + be * out), x, rtol=1e-12, atol=1e-12)


def test_velocity_is_time_derivative_of_the_interpolant():
    """dx/dt from convert(..., 'velocity') equals d/dt [alpha x0 + sigma eps] by finite differences."""
    sched = VPLinearSchedule()
    x0, eps = torch.randn(2, 5, dtype=torch.float64)
    t, h = torch.tensor(0.4, dtype=torch.float64), 1e-6
    xt = lambda u: sched.alpha(u) * x0 + sched.sigma(u) * eps
    fd = (xt(t + h) - xt(t - h)) / (2 * h)
    A, B = convert("eps", "velocity", sched.alpha(t), sched.sigma(t), *sched.derivatives(t))
    torch.testing.assert_close(A * xt(t) + B * eps, fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name + getattr(s, "betas_kind", ""))
def test_lambda_inverse(sched):
    t = torch.linspace(sched.t_min, sched.t_max, 11, dtype=torch.float64)
    torch.testing.assert_close(sched.t_of_lam(sched.lam(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: s.name + getattr(s, "betas_kind", ""))
def test_first_order_dpmpp_is_ddim(sched):
    grid = make_grid("logsnr", sched, 7)
    a, b = dpmpp(Ctx(sched, "eps", grid), order=1), ddim(Ctx(sched, "eps", grid))
    for k in ("tau", "hx", "hd", "c", "b"):
        torch.testing.assert_close(getattr(a, k), getattr(b, k), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("param", PARAMS)
def test_ddim_is_euler_on_the_flow_schedule(param):
    sched = FlowSchedule()
    m = GaussianMixture.random(sched, param, num_classes=2, per_class=2, dim=6, seed=3)
    noise, labels = seeded_noise(range(4), m.shape, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    for nfe in (1, 3, 8):
        y1 = sample(m, make_table("ddim", sched, param, nfe, grid="uniform"), noise, labels, guidance=1.7)
        y2 = sample(m, make_table("euler", sched, param, nfe, grid="uniform"), noise, labels, guidance=1.7)
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)


def test_ddim_is_not_euler_off_the_flow_schedule():
    """The identity above is a property of alpha = 1 - t, sigma = t, not of the code."""
    sched = VPLinearSchedule()
    m = GaussianMixture.random(sched, "eps", num_classes=2, per_class=1, dim=6, seed=3)
    noise, labels = seeded_noise(range(2), m.shape, dtype=torch.float64), torch.tensor([0, 1])
    y1 = sample(m, make_table("ddim", sched, "eps", 4), noise, labels)
    y2 = sample(m, make_table("euler", sched, "eps", 4), noise, labels)
    assert (y1 - y2).abs().max() > 1e-3


def test_one_step_ddim_lands_on_the_denoised_mean():
    """From pure noise at lambda -> -inf the DDIM step is the x0 prediction scaled by alpha."""
    sched = VPLinearSchedule()
    m = GaussianMixture.random(sched, "eps", num_classes=2, per_class=1, dim=6, seed=0)
    tab = make_table("ddim", sched, "eps", 1)
    noise, labels = seeded_noise([5], m.shape, dtype=torch.float64), torch.tensor([1])
    y = sample(m, tab, noise, labels)
    x = noise * tab.init
    a0, s0 = sched.alpha(sched.t_max), sched.sigma(sched.t_max)
    a1, s1 = sched.alpha(sched.t_min), sched.sigma(sched.t_min)
    expect = s1 / s0 * x + (a1 - s1 / s0 * a0) * m.x0(x, sched.t_max, labels)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nfe", [2, 3, 4, 5, 6, 10])
def test_heun_never_evaluates_the_model_at_t_min(nfe):
    """EDM's Heun ends with an Euler step at every NFE: a corrector at t_min would evaluate a
    velocity/eps prediction where it is poorly determined."""
    from stride_diffusion.solvers.builders import make_table
    from stride_diffusion.solvers.schedules import FlowSchedule

    s = FlowSchedule()
    tab = make_table("heun", s, "flow", nfe)
    assert tab.nfe == nfe and float(min(tab.tau)) > s.t_min + 1e-9

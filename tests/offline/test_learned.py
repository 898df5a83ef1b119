"""Learned solvers (solver search, D-ODE) on the analytic mixture as the frozen network: exact
identities with their classic bases, the unrolled sampler against the executor, fits that lower the
error they target, and the solver-file refusals."""
import json
import math

import pytest
import torch

from stride_diffusion.offline.dode import fit_lambdas
from stride_diffusion.offline.fitting import coeffs_of, heldout, rmse, targets_at, teacher_trajectory, unroll
from stride_diffusion.offline.search import search
from stride_diffusion.solvers import GaussianMixture, make_table, sample, seeded_noise
from stride_diffusion.solvers.artifact import load_solvers
from stride_diffusion.solvers.builders import Ctx, ddim, euler
from stride_diffusion.solvers.grids import make_grid
from stride_diffusion.solvers.learned import (
    DODE_BASES,
    FORMAT,
    coef_matrix,
    dode_semantics,
    dode_spec,
    dode_table,
    grid_from_logits,
    grid_of,
    searched_coeffs,
    searched_from_table,
    searched_spec,
    searched_table,
    solver_from_json,
    solver_to_json,
    table_from_coeffs,
)
from stride_diffusion.solvers.schedules import FlowSchedule, VPSchedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
CASES = [(FlowSchedule(), "flow", "velocity", euler), (VPSchedule("linear"), "eps", "x0", ddim)]
IDS = ["flow-velocity", "vp-x0"]


def gmm(schedule, param, per_class=1, dim=8):
    return GaussianMixture.random(schedule, param, num_classes=3, per_class=per_class, dim=dim, seed=1)


def batch(m, n=6, seed=0, dtype=F64):
    return seeded_noise(range(seed, seed + n), m.shape, dtype=dtype), torch.arange(n) % m.num_classes


def same_table(a, b):
    fields = ("tau", "s", "hx", "hd", "c", "b")
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in fields) and a.init == b.init


@pytest.mark.parametrize("schedule,param,form,classic", CASES, ids=IDS)
def test_identity_coefficients_are_euler_or_ddim(schedule, param, form, classic):
    grid = make_grid("uniform", schedule, 5)
    tab = searched_table(schedule, param, form, grid, torch.eye(5, dtype=F64))
    assert same_table(tab, classic(Ctx(schedule, param, grid)))


@pytest.mark.parametrize("schedule,param,form,classic", CASES, ids=IDS)
def test_unrolled_sampler_is_the_executor_and_differentiable(schedule, param, form, classic):
    m = gmm(schedule, param)
    noise, labels = batch(m)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, generator=g, dtype=F64).requires_grad_(True)
    lower = (0.3 * torch.randn(5, 5, generator=g, dtype=F64)).requires_grad_(True)
    co = searched_coeffs(schedule, param, form, grid_from_logits(logits, schedule.t_max, schedule.t_min),
                         coef_matrix(lower))
    y = unroll(m, co, noise, labels)
    torch.testing.assert_close(y, sample(m, table_from_coeffs(co, "s"), noise, labels).reshape(6, -1),
                               rtol=0, atol=1e-5)
    y.square().sum().backward()
    for p in (logits, lower):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert lower.grad.triu().abs().sum() == 0  # only the strictly-lower part is free


def test_classic_multistep_in_searched_form():
    """--init best: DPM-Solver++(2M) is a searched x0-form solver (rows sum to the DDIM step)."""
    s = VPSchedule("linear")
    tab = make_table("dpmpp-2m", s, "eps", 6)
    grid, M = searched_from_table(tab, s, "eps", "x0")
    torch.testing.assert_close(searched_table(s, "eps", "x0", grid, M).b, tab.b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        searched_from_table(make_table("heun", s, "eps", 6), s, "eps", "x0")


def exact(m, noise, labels):
    s = m.schedule
    y0 = noise.reshape(len(noise), -1).double() * s.sigma(torch.tensor(s.t_max, dtype=F64))
    return m.exact_solution(y0, s.t_max, s.t_min, labels)


def test_search_beats_its_euler_initialisation():
    m = gmm(FlowSchedule(), "flow")
    vn, vl = heldout(m, 16)
    ref = exact(m, vn, vl)
    res = search(m, [4], iters=30, batch=8, teacher_nfe=24, val=16, val_every=5, ref=ref,
                 log=lambda *a, **k: None)[4]
    assert res["init"] == "euler/uniform"
    assert res["best_rmse"] < 0.25 * res["init_rmse"], (res["init_rmse"], res["best_rmse"])
    tab = searched_table(m.schedule, m.param, "velocity", res["grid"], res["M"])
    assert math.isclose(rmse(sample(m, tab, vn, vl), ref), res["best_rmse"], rel_tol=1e-6)


@pytest.mark.parametrize("base", DODE_BASES)
def test_dode_with_zero_lambdas_is_its_base(base):
    s = VPSchedule("linear")
    tab = make_table(base, s, "eps", 5)
    assert same_table(dode_table(tab, torch.zeros(5), dode_semantics(base)), tab)


def _dode_by_hand(m, base, lam, noise, labels):
    """D-ODE written out per solver (not through the table algebra)."""
    s = m.schedule
    y = base.init * noise.reshape(len(noise), -1)
    x0 = lambda y, t: m.x0(y, t.expand(len(y)), labels)
    if base.meta["solver"] == "ddim":  # D~ = x0_k + lam (x0_k - x0_{k-1}) in the DDIM step
        t, prev = grid_of(base), None
        for k in range(base.nfe):
            a, sg, a1, s1 = s.alpha(t[k]), s.sigma(t[k]), s.alpha(t[k + 1]), s.sigma(t[k + 1])
            D = x0(y, t[k])
            Dt = D if prev is None else D + lam[k] * (D - prev)
            y, prev = s1 / sg * y + (a1 - s1 / sg * a) * Dt, D
        return y
    if base.meta["solver"] == "dpmpp-2m":  # D~ on the solver's effective x0 (Lu et al. 2022, 2M)
        t, lm, prev, prevD, n = grid_of(base), s.lam(grid_of(base)), None, None, base.nfe
        for k in range(n):
            h = lm[k + 1] - lm[k]
            D = x0(y, t[k])
            De = D if (k == 0 or k == n - 1) else D + (D - prev) / (2 * (lm[k] - lm[k - 1]) / h)
            Dt = De if k == 0 else De + lam[k] * (De - prevD)
            y = s.sigma(t[k + 1]) / s.sigma(t[k]) * y - s.alpha(t[k + 1]) * torch.expm1(-h) * Dt
            prev, prevD = D, De
        return y
    if base.meta["solver"] == "heun":  # D-EDM: predictor and corrector each add lam (v_k - v_{k-1})
        t, prev = grid_of(base), None
        vel = lambda y, u: m(y, u.expand(len(y)), u.expand(len(y)), labels).reshape(len(y), -1)
        k = 0
        for i in range(len(t) - 1):
            dt = t[i + 1] - t[i]
            v = vel(y, t[i])
            yp = y + dt * v + (0 if prev is None else lam[k] * dt * (v - prev))
            k += 1
            if k == base.nfe:
                return yp
            v2 = vel(yp, t[i + 1])
            y = y + dt / 2 * (v + v2) + lam[k] * dt / 2 * (v2 - v)
            prev, k = v2, k + 1
        return y


@pytest.mark.parametrize("base,sem", [("ddim", "raw"), ("dpmpp-2m", "effective"), ("heun", "raw")])
def test_dode_table_is_dode_written_out(base, sem):
    s = FlowSchedule()
    m = gmm(s, "flow")
    noise, labels = batch(m)
    n = 5
    tab = make_table(base, s, "flow", n)
    lam = torch.tensor([0.0, 0.7, -0.4, 1.3, 0.5], dtype=F64)
    got = sample(m, dode_table(tab, lam, sem), noise, labels).reshape(6, -1)
    torch.testing.assert_close(got, _dode_by_hand(m, tab, lam, noise, labels), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("base", ["ddim", "dpmpp-2m", "heun"])
def test_dode_fit_lowers_the_error_it_targets(base):
    s = FlowSchedule()
    m = gmm(s, "flow")
    noise, labels = batch(m, 16, seed=30_000_000, dtype=torch.float32)
    tab = make_table(base, s, "flow", 4)
    sem = "effective" if base == "dpmpp-2m" else "raw"
    tgt = targets_at(*teacher_trajectory(m, grid_of(tab), noise, labels, C=4), tab.s.tolist())
    lam, before, after = fit_lambdas(m, tab, sem, noise, labels, tgt)
    assert lam[0] == 0
    assert all(a <= b + 1e-9 for a, b in zip(after, before)) and sum(after) < 0.8 * sum(before)
    d = dode_table(tab, lam, sem)  # the fitted table's states are the ones the fit saw
    final = sample(m, d, noise, labels).reshape(16, -1).double()
    assert math.isclose(rmse(final, tgt[-1]), after[-1], rel_tol=1e-3, abs_tol=1e-6)
    vn, vl = heldout(m, 16)  # and on held-out seeds the final sample is closer to the ODE solution
    ref = exact(m, vn, vl)
    assert rmse(sample(m, d, vn, vl), ref) < 0.8 * rmse(sample(m, tab, vn, vl), ref)


def _files(s):
    M = torch.eye(4, dtype=F64)
    M[2, 1], M[2, 2], M[3, 0], M[3, 3] = -0.5, 1.5, 0.25, 0.75
    sp = searched_spec(s, "eps", "x0", make_grid("logsnr", s, 4), M, "ddim/logsnr")
    dp = dode_spec(s, "eps", "dpmpp-2m", 4, [0.0, 0.3, -0.1, 0.2])
    return {"searched-nfe4": solver_to_json(sp, "abc123", "searched-nfe4", {"cpu_minutes": 0.1},
                                            {"heldout_rmse": 0.1}),
            "dode-dpmpp-2m-nfe4": solver_to_json(dp, "abc123", "dode-dpmpp-2m-nfe4")}


def test_solver_files_round_trip(tmp_path):
    s = VPSchedule("linear")
    files = _files(s)
    for name, d in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    got = load_solvers(tmp_path, "abc123")
    assert sorted(got) == sorted(files)
    for name, d in files.items():
        assert d["format"] == FORMAT and got[name].nfe == 4 and got[name].name == name
        assert same_table(got[name], solver_from_json(json.loads(json.dumps(d)), "abc123"))
    base = make_table("dpmpp-2m", s, "eps", 4)
    assert same_table(got["dode-dpmpp-2m-nfe4"], dode_table(base, [0.0, 0.3, -0.1, 0.2], "effective"))
    assert load_solvers(tmp_path / "absent", "abc123") == {}


def test_solver_files_refused(tmp_path):
    d = _files(VPSchedule("linear"))["searched-nfe4"]
    with pytest.raises(ValueError, match="fitted on model sha256"):
        solver_from_json(d, "other")
    with pytest.raises(ValueError, match="format"):
        solver_from_json({**d, "format": "stride.solver/0"}, "abc123")
    with pytest.raises(ValueError, match="shape"):
        solver_from_json({**d, "coefficients": [r + [0.0] for r in d["coefficients"]]}, "abc123")
    with pytest.raises(ValueError, match="grid has"):
        solver_from_json({**d, "grid": d["grid"][:-1]}, "abc123")
    bad = [list(r) for r in d["coefficients"]]
    bad[2][1] += 0.1
    with pytest.raises(ValueError, match="sum to 1"):
        solver_from_json({**d, "coefficients": bad}, "abc123")
    with pytest.raises(ValueError, match="no longer build"):
        solver_from_json({**d, "table": {**d["table"], "c": [v * 1.01 for v in d["table"]["c"]]}}, "abc123")
    dd = _files(VPSchedule("linear"))["dode-dpmpp-2m-nfe4"]
    with pytest.raises(ValueError, match="lambdas"):
        solver_from_json({**dd, "lambdas": [0.0, 0.1]}, "abc123")
    (tmp_path / "a.json").write_text(json.dumps(d))
    (tmp_path / "b.json").write_text(json.dumps({**d, "model_sha256": "other"}))
    with pytest.raises(ValueError, match="fitted on"):
        load_solvers(tmp_path, "abc123")
    with pytest.warns(UserWarning, match="b.json"):
        assert list(load_solvers(tmp_path, "abc123", strict=False)) == ["a"]


def test_unroll_of_a_classic_table_is_the_executor():
    s = VPSchedule("linear")
    m = gmm(s, "eps")
    noise, labels = batch(m)
    tab = make_table("unipc", s, "eps", 6)
    got = unroll(m, coeffs_of(tab), noise, labels)
    torch.testing.assert_close(got, sample(m, tab, noise, labels).reshape(6, -1))


def test_dode_heun_fits_predictor_and_corrector_jointly():
    """The joint fit lands every corrector (the states Heun serves) at least as close to the teacher as
    the greedy one, which fits each predictor to its own (never served) landing state."""
    s = FlowSchedule()
    m = gmm(s, "flow")
    noise, labels = batch(m, 16, seed=30_000_000, dtype=torch.float32)
    tab = make_table("heun", s, "flow", 7)
    tgt = targets_at(*teacher_trajectory(m, grid_of(tab), noise, labels, C=4), tab.s.tolist())
    lam_j, _, after_j = fit_lambdas(m, tab, "raw", noise, labels, tgt)
    lam_g, _, after_g = fit_lambdas(m, tab, "raw", noise, labels, tgt, joint=False)
    assert not torch.equal(lam_j, lam_g)
    final = lambda lam: rmse(sample(m, dode_table(tab, lam, "raw"), noise, labels).reshape(16, -1).double(),
                             tgt[-1])
    assert final(lam_j) <= final(lam_g) + 1e-9
    # the first jointly fitted pair (predictor 2, corrector 3) starts from the same state in both fits;
    # its corrector lands within a sliver of the greedy one, the price of the predictor's ridge
    assert tab.s[2] == tab.s[3] and torch.equal(lam_j[:2], lam_g[:2])
    assert after_j[3] <= 1.05 * after_g[3] and abs(float(lam_j[2])) < abs(float(lam_g[2]))


@pytest.mark.parametrize("n", [5, 7])
def test_dode_heun_predictors_stay_inside_the_clip(n):
    """A predictor's scalar only moves where its corrector evaluates, a second-order lever: without the
    ridge on it the pair's error is nearly flat in it and the search ran to the clip (every predictor
    at -5 here). With the same eps^2 lam^2 ridge as every closed-form scalar it stays near 0."""
    s = FlowSchedule()
    m = gmm(s, "flow")
    noise, labels = batch(m, 16, seed=30_000_000, dtype=torch.float32)
    tab = make_table("heun", s, "flow", n)
    tgt = targets_at(*teacher_trajectory(m, grid_of(tab), noise, labels, C=4), tab.s.tolist())
    lam, _, _ = fit_lambdas(m, tab, "raw", noise, labels, tgt, clip=5.0)
    predictors = [k for k in range(1, n - 1) if tab.s[k] == tab.s[k + 1]]
    assert predictors and all(abs(float(lam[k])) < 1.0 for k in predictors), lam.tolist()

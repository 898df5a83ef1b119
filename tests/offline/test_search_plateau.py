"""The solver search's plateau rule (learning-rate decays, minimum iterations) and its warm start
from the next smaller NFE, on the analytic mixture as the frozen network: the selection-set error
never rises with NFE, a plateau restarts at a lower rate before it stops, and a larger NFE starts
from the smaller one's result."""
import itertools

import pytest
import torch

from stride_diffusion.offline.fitting import heldout, reference, rmse
from stride_diffusion.offline.search import (
    PAD,
    SelectionError,
    Student,
    Teacher,
    extended,
    kept_on_disk,
    optimise,
    padded,
    search,
    split,
)
from stride_diffusion.solvers import GaussianMixture, sample
from stride_diffusion.solvers.learned import restriction_mask, searched_table
from stride_diffusion.solvers.schedules import F64, FlowSchedule, VPSchedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
QUIET = lambda *a, **k: None
FAST = dict(batch=6, teacher_nfe=32, val=16, val_every=5, log=QUIET)
CASES = [(FlowSchedule(), "flow", "velocity"), (VPSchedule("linear"), "eps", "x0")]
IDS = ["flow-velocity", "vp-x0"]


def mixture(schedule=None, param="flow", seed=1):
    return GaussianMixture.random(schedule or FlowSchedule(), param, num_classes=4, per_class=1, dim=16,
                                  seed=seed, scale=0.05)


def selection_error(m, form, val=16):
    vn, vl = heldout(m, val)
    return SelectionError(m, form, lambda k: restriction_mask(k, False), vn, vl, reference(m, vn, vl), 1.0)


# --- monotone in NFE --------------------------------------------------------------------------------


def test_the_error_never_rises_with_nfe_where_a_cold_search_does():
    m = mixture()
    cold = search(m, [3, 4, 5], iters=80, patience=20, warm=False, **FAST)
    errs = [cold[n]["best_rmse"] for n in (3, 4, 5)]
    assert any(b > a for a, b in itertools.pairwise(errs)), errs  # the case the warm start is for
    warm = search(m, [3, 4, 5], iters=80, patience=20, **FAST)
    errs = [warm[n]["best_rmse"] for n in (3, 4, 5)]
    assert all(b <= a for a, b in itertools.pairwise(errs)), errs
    assert warm[5]["best_rmse"] < cold[5]["best_rmse"]


@pytest.mark.parametrize("schedule,param,form", CASES, ids=IDS)
def test_a_padded_table_samples_as_the_smaller_one(schedule, param, form):
    """The floor a search at NFE n is held to: the smaller table with near-zero steps inserted gives
    the same samples, so keeping it when the search does worse keeps the error flat."""
    m = mixture(schedule, param)
    err = selection_error(m, form)
    g = torch.tensor([schedule.t_max, 0.6, 0.25, schedule.t_min], dtype=F64)
    M = torch.tensor([[1.0, 0, 0], [0.4, 0.6, 0], [-0.2, 0.5, 0.7]], dtype=F64)
    e = err(g, M)
    for extra in (1, 2):
        pg, pM = padded(g, M, 3 + extra)
        assert len(pM) == 3 + extra and bool((pg[1:] < pg[:-1]).all())
        torch.testing.assert_close(pM.sum(1), torch.ones(3 + extra, dtype=F64))
        assert abs(err(pg, pM) - e) < 2e-6 * e
    # a real cut moves the samples: the near-zero step is what keeps them
    assert abs(err(*split(g, M, 1, 0.4)) - e) > 10 * abs(err(*padded(g, M, 4)) - e)
    assert PAD < 1e-4


def test_a_search_worse_than_the_smaller_nfe_keeps_the_padded_table(monkeypatch):
    """NFE 4 from a bad start with lr 0 cannot improve: the padded NFE 3 result is kept instead."""
    import stride_diffusion.offline.search as S

    m = mixture()
    good = S.starts

    def bad_start(model, n, form, init, err, prev=None):
        if n == 3:
            return good(model, n, form, init, err, prev)
        t = model.schedule
        return {"bad": (torch.tensor([t.t_max, 0.99, 0.98, 0.97, t.t_min], dtype=F64), torch.eye(4, dtype=F64))}

    monkeypatch.setattr(S, "starts", bad_start)
    res = search(m, [3, 4], iters=20, patience=10, **FAST)
    assert res[4]["init"] == "bad" and res[4]["init_rmse"] > res[3]["best_rmse"]
    assert res[4]["padded_from"] == 3 and len(res[4]["M"]) == 4
    assert res[4]["best_rmse"] == pytest.approx(res[3]["best_rmse"], rel=1e-4)
    assert selection_error(m, "velocity")(res[4]["grid"], res[4]["M"]) == pytest.approx(res[4]["best_rmse"])


# --- the plateau rule -------------------------------------------------------------------------------


def test_a_plateau_decays_the_learning_rate_before_it_stops():
    """lr 0: the error never improves, so every `patience` iterations is a plateau: the first two
    restart at 0.3 x the rate, the third stops (without decays it stops at the first)."""
    m = mixture()
    kw = dict(iters=200, patience=10, lr=0.0, warm=False, **FAST)
    res = search(m, [3], decays=2, lr_decay=0.3, **kw)[3]
    assert res["lr_decays"] == 2 and res["iters_run"] == 30 and res["stopped_on_plateau"]
    res = search(m, [3], decays=0, **kw)[3]
    assert res["lr_decays"] == 0 and res["iters_run"] == 10


def test_no_plateau_stops_before_the_minimum_iterations():
    m = mixture()
    res = search(m, [3], iters=200, patience=10, decays=1, min_iters=55, lr=0.0, warm=False, **FAST)[3]
    assert res["lr_decays"] == 1 and res["stopped_on_plateau"]
    assert res["iters_run"] == 55 + (-55) % 5  # the first validation at or after min_iters
    capped = search(m, [3], iters=40, patience=10, decays=1, min_iters=55, lr=0.0, warm=False, **FAST)[3]
    assert capped["iters_run"] == 40 and not capped["stopped_on_plateau"]


def test_a_decay_restarts_from_the_best_iterate_at_the_lower_rate():
    m = mixture()
    g = torch.linspace(m.schedule.t_max, m.schedule.t_min, 4, dtype=F64)
    st = Student(m, 3, "velocity", g, torch.eye(3, dtype=F64), lr=1e-2)
    best = st.snapshot()
    with torch.no_grad():
        st.logits.add_(0.5), st.lower.add_(torch.tril(torch.ones(3, 3, dtype=F64), -1))
    st.opt.m = [torch.ones_like(p) for p in st.opt.params]
    st.restart(0.3, it=70)
    grid, M = st.params()
    torch.testing.assert_close(grid.detach(), best[0]), torch.testing.assert_close(M.detach(), best[1])
    assert st.opt.lr == pytest.approx(3e-3) and st.progress == 70 and st.decays == 1
    assert all(bool((mo == 0).all()) for mo in st.opt.m)


def test_optimise_without_decays_is_the_stop_on_first_plateau_rule():
    """The grid baselines (LD3) call optimise directly and keep the one-plateau rule."""
    m = mixture()
    vn, vl = heldout(m, 8)
    g = torch.linspace(m.schedule.t_max, m.schedule.t_min, 4, dtype=F64)
    st = Student(m, 3, "velocity", g, torch.eye(3, dtype=F64), lr=0.0)
    r = optimise(m, {3: st}, vn, vl, reference(m, vn, vl), iters=60, patience=10, batch=4, teacher_nfe=16,
                 val_every=5, log=QUIET)[3]
    assert r["iters_run"] == 10 and r["lr_decays"] == 0 and r["stopped_on_plateau"]


# --- warm start -------------------------------------------------------------------------------------


def test_a_larger_nfe_starts_from_the_smaller_ones_result_extended():
    m = mixture()
    res = search(m, [3, 5], iters=40, patience=20, **FAST)
    err = selection_error(m, "velocity")
    g5, M5 = extended(res[3]["grid"], res[3]["M"], 5, err)
    assert res[5]["starts"]["searched-nfe3 extended"] == pytest.approx(err(g5, M5), rel=1e-9)
    assert res[5]["starts"]["searched-nfe3 extended"] < res[5]["starts"]["euler/uniform"]
    assert res[5]["init"] == "searched-nfe3 extended"
    assert res[5]["init_rmse"] == pytest.approx(err(g5, M5), rel=1e-9)
    # the extension keeps every node of the smaller grid and cuts steps between them
    assert all(bool(torch.isclose(g5, t, atol=0, rtol=1e-12).any()) for t in res[3]["grid"])
    cold = search(m, [5], iters=40, patience=20, warm=False, **FAST)[5]
    assert list(cold["starts"]) == ["euler/uniform"] and cold["init"] == "euler/uniform"


@pytest.mark.parametrize("schedule,param,form", CASES, ids=IDS)
def test_a_cut_step_keeps_the_rows_history_and_rows_sum_to_one(schedule, param, form):
    g = torch.tensor([schedule.t_max, 0.5, 0.2, schedule.t_min], dtype=F64)
    M = torch.tensor([[1.0, 0, 0], [0.4, 0.6, 0], [-0.2, 0.5, 0.7]], dtype=F64)
    g2, M2 = split(g, M, 1, 0.3)
    assert g2.tolist() == [schedule.t_max, 0.5, 0.3, 0.2, schedule.t_min]
    torch.testing.assert_close(M2, torch.tensor([[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.4, 0, 0.6, 0],
                                                 [-0.2, 0.5, 0, 0.7]], dtype=F64))
    tab = searched_table(schedule, param, form, g2, M2)
    m = mixture(schedule, param)
    vn, vl = heldout(m, 4)
    assert torch.isfinite(sample(m, tab, vn, vl)).all() and rmse(sample(m, tab, vn, vl), vn) > 0


def test_a_larger_nfe_races_its_two_starts_and_keeps_the_winner():
    m = mixture()
    res = search(m, [3, 5], iters=60, patience=10, **FAST)
    race = res[5]["race"]
    assert set(race) == {"euler/uniform", "searched-nfe3 extended"} and sum(r["won"] for r in race.values()) == 1
    won = next(k for k, r in race.items() if r["won"])
    assert res[5]["init"] == won and race[won]["best_rmse"] == min(r["best_rmse"] for r in race.values())
    assert res[5]["iters_total"] == sum(r["iters_run"] for r in race.values())
    assert list(res[3]["race"]) == ["euler/uniform"]  # the first NFE has one start


def test_the_starts_wait_at_their_first_plateau_and_the_loser_stops_there():
    """Two starts with lr 0 never improve: both reach their first plateau at `patience`; the one that
    started lower goes on with every decay, the other has taken exactly `patience` steps."""
    m = mixture()
    vn, vl = heldout(m, 8)
    t = m.schedule
    good = torch.linspace(t.t_max, t.t_min, 4, dtype=F64)
    bad = torch.tensor([t.t_max, 0.99, 0.98, t.t_min], dtype=F64)
    sts = {k: Student(m, 3, "velocity", g, torch.eye(3, dtype=F64), init=k, lr=0.0, race=3)
           for k, g in (("bad", bad), ("good", good))}
    r = optimise(m, sts, vn, vl, reference(m, vn, vl), iters=200, patience=10, decays=2, batch=4,
                 teacher_nfe=16, val_every=5, log=QUIET)
    assert r["bad"]["lost_race"] and r["bad"]["iters_run"] == 10 and r["bad"]["lr_decays"] == 0
    assert not r["good"]["lost_race"] and r["good"]["stopped_on_plateau"]
    assert r["good"]["lr_decays"] == 2 and r["good"]["iters_run"] == 30


def test_a_start_that_plateaus_first_waits_without_training():
    """lr 0 plateaus at 10 and waits; the start with a working rate trains until its own plateau."""
    m = mixture()
    vn, vl = heldout(m, 8)
    g = torch.linspace(m.schedule.t_max, m.schedule.t_min, 4, dtype=F64)
    sts = {k: Student(m, 3, "velocity", g, torch.eye(3, dtype=F64), init=k, lr=lr, race=3)
           for k, lr in (("still", 0.0), ("moving", 1e-2))}
    r = optimise(m, sts, vn, vl, reference(m, vn, vl), iters=300, patience=10, decays=0, batch=4,
                 teacher_nfe=16, val_every=5, log=QUIET)
    assert r["moving"]["iters_run"] > 10 and r["moving"]["best_rmse"] < r["still"]["best_rmse"]
    assert r["still"]["iters_run"] == 10 and r["still"]["lost_race"]
    assert r["still"]["curve"][-1][0] == 10  # not validated while it waited


def test_the_teacher_cycles_through_its_pool_of_batches(monkeypatch):
    """Iteration pool + k reads batch k, and the teacher runs once per batch of the pool."""
    import stride_diffusion.offline.search as S

    calls = []
    real = S.trajectory
    monkeypatch.setattr(S, "trajectory", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = mixture()
    teach = Teacher(m, "dpmpp-2m/logsnr", 8, 3, seed=5, pool=4)
    first = [teach(it) for it in range(1, 5)]
    again = [teach(it) for it in range(5, 13)]
    assert len(calls) == 4
    for k, b in enumerate(again):
        for x, y in zip(b, first[k % 4]):
            assert torch.equal(x, y)
    assert not torch.equal(first[0][0], first[1][0])
    fresh = Teacher(m, "dpmpp-2m/logsnr", 8, 3, seed=5)  # no pool: a new batch every iteration
    assert not torch.equal(fresh(5)[0], fresh(1)[0]) and torch.equal(fresh(1)[0], first[0][0])


def test_keep_better_keeps_an_old_file_only_where_the_error_still_falls_with_nfe(tmp_path):
    """Old NFE 3 is better and kept; old NFE 4 is better but below the NFE 5 that is written, so it
    would make the error rise with NFE: the new one is written; old NFE 5 is worse; another seed
    set is never compared."""
    import json

    def doc(e, seeds="s"):
        return {"model_sha256": "m", "metrics": {"heldout_rmse": e, "heldout_seeds": seeds},
                "fit": {"reference": "r"}}

    new = {3: 0.05, 4: 0.03, 5: 0.02, 6: 0.015}
    old = {3: 0.04, 4: 0.01, 5: 0.025}
    for n, e in old.items():
        (tmp_path / f"{n}.json").write_text(json.dumps(doc(e)))
    (tmp_path / "6.json").write_text(json.dumps(doc(0.001, seeds="other")))
    files = {n: (tmp_path / f"{n}.json", doc(e)) for n, e in new.items()}
    kept = kept_on_disk(files)
    assert kept == {3}
    on_disk = [old[n] if n in kept else new[n] for n in sorted(new)]
    assert on_disk == sorted(on_disk, reverse=True)

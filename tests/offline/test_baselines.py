"""Evaluation honesty: disjoint seed streams (and their refusals), the grid baselines' tables and
dynamic programme, and the search's plateau stop."""
import itertools

import pytest
import torch

from stride_diffusion.offline import cli
from stride_diffusion.offline.dode import FIT_SEED
from stride_diffusion.offline.fitting import heldout
from stride_diffusion.offline.grid_search import GRID_SOLVERS, coef_of_grid, dp_path, form_of
from stride_diffusion.offline.search import optimise, search
from stride_diffusion.offline.seeds import (
    STREAMS,
    evaluation_sets,
    overlaps,
    seeds,
    selection_set,
    stream_range,
    stream_seed,
)
from stride_diffusion.solvers import GaussianMixture, seeded_noise
from stride_diffusion.solvers.builders import build
from stride_diffusion.solvers.learned import searched_table
from stride_diffusion.solvers.schedules import FlowSchedule, VPSchedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- seeds ------------------------------------------------------------------------------------------


def used_ranges() -> dict:
    """Every seed range the tools draw with their defaults (and the largest evaluation allowed)."""
    return {
        "evaluation (10 sets of 1e6)": range(evaluation_sets(1_000_000, 10)[0][0],
                                             evaluation_sets(1_000_000, 10)[-1][-1] + 1),
        "selection": range(selection_set(1_000_000)[0], selection_set(1_000_000)[-1] + 1),
        "search stream": range(stream_seed("search"), stream_seed("search") + 1),
        "ld3 streams": range(seeds("search", 1, 1000)[0], seeds("search", 1, 1000 + len(GRID_SOLVERS))[0] + 1),
        "dode fit": range(FIT_SEED, FIT_SEED + 64),
        "grid fit": seeds("grid", 256),
        "secant stream": range(stream_seed("secant"), stream_seed("secant") + 1),
        "train stream": range(stream_seed("train"), stream_seed("train") + 1),
    }


def test_every_stream_is_disjoint_from_every_other():
    for (a, ra), (b, rb) in itertools.combinations(STREAMS.items(), 2):
        assert not overlaps(range(ra[0], ra[0] + ra[1]), range(rb[0], rb[0] + rb[1])), (a, b)
    for (a, ra), (b, rb) in itertools.combinations(used_ranges().items(), 2):
        assert not overlaps(ra, rb), (a, b)


def test_the_selection_set_is_what_the_search_keeps_its_iterate_on():
    m = GaussianMixture.random(FlowSchedule(), "flow", num_classes=3, per_class=1, dim=8, seed=1)
    vn, _ = heldout(m, 5)
    assert torch.equal(vn, seeded_noise(selection_set(5), m.shape))


@pytest.mark.parametrize("call,match", [
    (lambda: evaluation_sets(1_000_001, 2), "overlap"),
    (lambda: evaluation_sets(500, 11), "1..10"),
    (lambda: evaluation_sets(500, 2, [10_000_000, 10_000_100]), "overlap"),
    (lambda: evaluation_sets(500, 1, [20_000_000]), "collide"),
    (lambda: evaluation_sets(500, 1, [19_999_800]), "collide"),
    (lambda: selection_set(1_000_001), "collide"),
    (lambda: stream_seed("search", 1_000_000), "collide"),
    (lambda: stream_range("dode", 29_999_999, 10), "collide"),
    (lambda: seeds("nope", 1), "allowed"),
])
def test_colliding_seed_requests_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("args", [["--n", "1000001"], ["--seeds", "20000000"], ["--seed-sets", "11"]])
def test_eval_cli_refuses_colliding_seeds_with_exit_2(args, capsys):
    assert cli.main(["eval", "artifacts/digits", "--no-images", "--cache", "", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stride offline eval:") and ("collide" in err or "overlap" in err or "1..10" in err)


# --- grid baselines ---------------------------------------------------------------------------------


def same(a, b):
    return all(torch.allclose(getattr(a, k), getattr(b, k), rtol=1e-10, atol=1e-12)
               for k in ("tau", "s", "hx", "hd", "c")) and torch.allclose(
        torch.tril(_abs(a)), torch.tril(_abs(b)), rtol=1e-10, atol=1e-12)


def _abs(t):
    from stride_diffusion.solvers.learned import absolute
    return absolute(t)


@pytest.mark.parametrize("schedule,param", [(FlowSchedule(), "flow"), (VPSchedule("linear"), "eps")])
@pytest.mark.parametrize("solver", GRID_SOLVERS)
@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_a_baseline_file_builds_exactly_the_classic_solver_on_its_grid(schedule, param, solver, n):
    g = torch.rand(n - 1, generator=torch.Generator().manual_seed(n), dtype=F64).sort(descending=True).values
    grid = torch.cat([torch.tensor([schedule.t_max], dtype=F64),
                      schedule.t_min + (schedule.t_max - schedule.t_min) * (0.05 + 0.9 * g),
                      torch.tensor([schedule.t_min], dtype=F64)])
    tab = searched_table(schedule, param, form_of(solver), grid, coef_of_grid(schedule, solver, grid))
    assert same(tab, build(solver, schedule, param, grid))


def _path_cost(path, c1, c2):
    steps = list(itertools.pairwise(path))
    if c2 is None or len(steps) < 3:
        return sum(float(c1[i, j]) for i, j in steps)
    cost = float(c1[steps[0]]) + float(c1[steps[-1]])
    for k in range(1, len(steps) - 1):
        cost += float(c2[path[k - 1], path[k], path[k + 1]])
    return cost


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_the_dynamic_programme_finds_the_cheapest_path(second_order, n):
    M = 8
    g = torch.Generator().manual_seed(10 * n + second_order)
    c1 = torch.rand(M, M, generator=g, dtype=F64).triu(1)
    c1[c1 == 0] = float("inf")
    c2 = None
    if second_order:
        c2 = torch.rand(M, M, M, generator=g, dtype=F64)
        h, i, j = torch.meshgrid(torch.arange(M), torch.arange(M), torch.arange(M), indexing="ij")
        c2[~((h < i) & (i < j))] = float("inf")
    path = dp_path(c1, c2, n)
    assert path[0] == 0 and path[-1] == M - 1 and len(path) == n + 1
    brute = min(_path_cost([0, *mid, M - 1], c1, c2) for mid in itertools.combinations(range(1, M - 1), n - 1))
    assert _path_cost(path, c1, c2) == pytest.approx(brute)


# --- the search stops on a plateau -------------------------------------------------------------------


def test_the_search_stops_on_a_plateau_and_records_its_iterations():
    m = GaussianMixture.random(FlowSchedule(), "flow", num_classes=3, per_class=1, dim=8, seed=1)
    quiet = lambda *a, **k: None
    capped = search(m, [3], iters=60, patience=1000, decays=0, batch=4, teacher_nfe=16, val=8, val_every=5,
                    lr=0.0, log=quiet)[3]
    assert capped["iters_run"] == 60 and not capped["stopped_on_plateau"]
    # lr 0: nothing moves, so the held-out error never improves and, without learning-rate decays
    # (tests/offline/test_search_plateau.py), the run stops after `patience`
    res = search(m, [3], iters=60, patience=10, decays=0, batch=4, teacher_nfe=16, val=8, val_every=5, lr=0.0,
                 log=quiet)[3]
    assert res["stopped_on_plateau"] and res["iters_run"] == 10 and res["best_iter"] == 0
    assert optimise is not None

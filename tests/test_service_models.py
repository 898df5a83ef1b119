"""Sampler resolution (eval.json, defaults, learned solvers), class labels, PNG encoding."""
import numpy as np
import pytest
import torch

from stride_diffusion.service.models import ModelEntry, SolverError, analytic_entry
from stride_diffusion.solvers.builders import make_table


@pytest.fixture(scope="module")
def gmm():
    return analytic_entry()


def entry_with(gmm, rows=(), learned=None):
    learned = learned or {}
    return ModelEntry("m", gmm.model, gmm.class_names, {}, list(rows), learned)


def test_defaults_without_eval(gmm):
    assert gmm.resolve(4) == "dpmpp-2m" and gmm.resolve(3) == "dpmpp-2m"
    assert gmm.resolve(2) == "euler" and gmm.resolve(1) == "euler"  # flow schedule: DDIM is Euler


def test_auto_picks_lowest_fd_at_that_nfe(gmm):
    learned = make_table("unipc", gmm.model.schedule, gmm.model.param, 4)
    rows = [{"solver": "dpmpp-2m", "nfe": 4, "fd": 3.0}, {"solver": "mine", "nfe": 4, "fd": 1.0},
            {"solver": "heun", "nfe": 4, "fd": 2.0}, {"solver": "secant", "nfe": 4, "fd": 0.5},  # not runnable here
            {"solver": "ipndm", "nfe": 8, "fd": 0.1}, {"solver": "ddim", "nfe": 4, "fd": None, "rmse": 0.1}]
    e = entry_with(gmm, rows, {"mine": learned})
    assert e.resolve(4) == "mine"
    assert e.resolve(8) == "ipndm"
    assert e.resolve(6) == "dpmpp-2m"  # not measured: default
    ch = e.choices([4, 6])
    assert ch["4"]["source"] == "eval.json" and ch["4"]["quality"]["fd"] == 1.0
    assert ch["6"]["source"] == "default"
    assert e.table("mine", 4).nfe == 4


def test_auto_picks_by_the_selection_sets_fd_not_the_reported_one(gmm):
    """eval.json rows carry the evaluation sets' fd (reported) and the selection set's (chosen on)."""
    rows = [{"solver": "dpmpp-2m", "nfe": 4, "fd": 1.0, "selection_fd": 2.0},
            {"solver": "heun", "nfe": 4, "fd": 1.5, "selection_fd": 1.2}]
    assert entry_with(gmm, rows).resolve(4) == "heun"


def test_explicit_solvers(gmm):
    e = entry_with(gmm, learned={"mine": make_table("unipc", gmm.model.schedule, gmm.model.param, 4)})
    assert e.resolve(4, "heun") == "heun" and e.table("heun", 4).nfe == 4
    assert e.resolve(5, "dpmpp-2m/logsnr") == "dpmpp-2m/logsnr" and e.table("dpmpp-2m/logsnr", 5).nfe == 5
    with pytest.raises(SolverError, match="allowed: 'auto'.*dpmpp-2m.*mine"):
        e.resolve(4, "nope")
    with pytest.raises(SolverError, match="steps=4 only"):
        e.resolve(8, "mine")
    with pytest.raises(SolverError):
        e.resolve(4, "dpmpp-2m/zigzag")


def test_every_classic_solver_spends_exactly_steps_evaluations(gmm):
    for s in gmm.solver_names():
        for n in (1, 2, 3, 5):
            assert gmm.table(s, n).nfe == n


def test_class_labels(gmm):
    assert gmm.class_index(3) == 3 and gmm.class_index("3") == 3 and gmm.class_index("three") == 3
    assert gmm.class_index("Three") == 3
    for bad in (10, -1, "eleven", True, 2.5, None):
        with pytest.raises(ValueError, match=r"0\.\.9 or one of the class names"):
            gmm.class_index(bad)


def test_entry_from_an_artifact_directory(tmp_path):
    """The artifact path: model.json + weights, a learned solver file, eval.json choosing per NFE."""
    from service_fixtures import tiny_artifact

    from stride_diffusion.solvers.schedules import FlowSchedule

    out = tiny_artifact(tmp_path / "tiny", learned={"fast3": make_table("unipc", FlowSchedule(), "flow", 3)},
                        default_guidance=1.5, eval_rows=[
                            {"solver": "fast3", "nfe": 3, "fd": 1.0}, {"solver": "heun", "nfe": 3, "fd": 2.0},
                            {"solver": "ipndm", "nfe": 2, "fd": 5.0}, {"solver": "euler", "nfe": 2, "fd": 4.0}])
    e = ModelEntry.from_artifact(str(out))
    assert e.name == "tiny" and e.class_names == ["a", "b", "c"] and e.shape == (1, 8, 8)
    assert e.default_guidance == 1.5 and e.data_range == (-1.0, 1.0)
    assert e.resolve(3) == "fast3" and e.resolve(2) == "euler" and e.resolve(4) == "dpmpp-2m"
    assert "fast3" in e.solver_names() and e.table("fast3", 3).nfe == 3


def _run(engine, jobs_admits):
    """Admit (job, table, first, count, rows) tuples, step to the end; {(job id, index): sample}."""
    for args in jobs_admits:
        engine.add(*args)
    out = {}
    while engine.busy:
        done = engine.step()
        engine.release(done)
        out.update({(jid, i): y for jid, i, y in done})
    return out


def _job(id, solver, steps, label, n, seed, guidance=1.0, model="gmm"):
    from stride_diffusion.service.jobs import Job
    return Job(id, model, steps, solver, label, n, seed, guidance, "png", 1e18, 0.0)


def test_engine_mixed_split_and_dropped_rows_match_the_one_shot_sampler(gmm):
    """Images of one request admitted in two parts, beside other step counts, solvers and guidance,
    and beside a request dropped mid-way, equal the executor's one-shot result per seed."""
    from stride_diffusion.service.engine import Engine
    from stride_diffusion.service.images import quantize
    from stride_diffusion.service.models import Registry
    from stride_diffusion.solvers.executor import sample, seeded_noise

    eng = Engine(Registry([gmm]), [2, 4, 8])
    a, b, c = _job("a", "dpmpp-2m", 4, 3, 3, 10), _job("b", "ipndm", 8, 5, 2, 20, 2.0), _job("c", "euler", 8, 1, 2, 30)
    ta, tb, tc = gmm.table("dpmpp-2m", 4), gmm.table("ipndm", 8), gmm.table("euler", 8)
    eng.add(a, ta, 0, 2, 1)
    eng.add(b, tb, 0, 2, 2)
    eng.add(c, tc, 0, 2, 1)
    assert eng.rows == 2 + 4 + 2
    eng.release(eng.step())
    eng.drop("c")  # expired: its rows leave, the others carry on
    eng.add(a, ta, 2, 1, 1)  # the rest of a joins between steps
    out = _run(eng, [])
    assert set(out) == {("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)} and eng.rows == 0
    with torch.inference_mode():
        for (jid, i), y in out.items():
            job, tab = {"a": (a, ta), "b": (b, tb)}[jid]
            ref = sample(gmm.model, tab, seeded_noise([job.seed + i], gmm.shape), torch.tensor([job.label]), job.guidance)
            assert y.dtype == np.uint8 and np.array_equal(y, quantize(ref, gmm.data_range)[0].numpy()), (jid, i)


class _SecantLike:
    """A stand-in for a secant model: its own network (here the mixture) and its own table."""

    def __init__(self, inner):
        self.inner, self.schedule, self.param = inner, inner.schedule, inner.param
        self.num_classes, self.shape, self.guidance_input = inner.num_classes, inner.shape, False
        self.calls = 0

    def table(self, n):
        return make_table("euler", self.schedule, self.param, n)

    def __call__(self, *a):
        self.calls += 1
        return self.inner(*a)


def test_secant_variants_run_on_their_own_network(gmm):
    from stride_diffusion.service.engine import Engine
    from stride_diffusion.service.models import Registry

    sec = _SecantLike(gmm.model)
    e = ModelEntry("m", gmm.model, gmm.class_names, {}, [{"solver": "secant", "nfe": 2, "fd": 0.1}], {},
                   {"secant": sec})
    assert e.resolve(2) == "secant" and e.resolve(4) == "dpmpp-2m" and "secant" in e.solver_names()
    assert e.model_for("secant") is sec and e.stepper_key("secant") == "m:secant"
    eng = Engine(Registry([e]), [2, 4])
    out = _run(eng, [(_job("s", "secant", 2, 1, 1, 5, model="m"), e.table("secant", 2), 0, 1, 1),
                     (_job("p", "dpmpp-2m", 4, 1, 1, 5, model="m"), e.table("dpmpp-2m", 4), 0, 1, 1)])
    assert len(out) == 2 and sec.calls == 2  # two steps on the secant network, none of the plain request's
    from stride_diffusion.service.metrics import Metrics
    from stride_diffusion.service.settings import Settings
    from stride_diffusion.service.worker import Worker

    sec.calls = 0
    Worker(Registry([e]), Settings(test_model="gmm", steps=[2, 4], max_batch=4), None, Metrics(process=False)).warm_up()
    assert sec.calls == 3 + 2 + 4  # buckets 1, 2, 4 at one step each, then a full sample per step count


def test_metrics_create_every_served_series_before_the_first_request(gmm):
    from prometheus_client import generate_latest

    from stride_diffusion.service.metrics import Metrics

    m = Metrics(process=False)
    m.init_labels([gmm], [1, 4])
    text = generate_latest(m.registry).decode()
    for steps, solver in ((1, "euler"), (4, "dpmpp-2m")):
        assert f'stride_images_total{{model="gmm",solver="{solver}",steps="{steps}"}} 0.0' in text
        assert f'stride_request_duration_seconds_count{{model="gmm",solver="{solver}",steps="{steps}"}} 0.0' in text


def test_load_only_what_is_served():
    """A worker loads the secant networks the auto-pick serves (or --variants); an API process reads
    metadata only (nets on the meta device) and makes the same choices."""
    steps = [1, 2, 4, 8]
    every = ModelEntry.from_artifact("artifacts/digits")
    served = ModelEntry.from_artifact("artifacts/digits", steps=steps)
    picks = {every.best(n)[0] for n in steps}
    assert set(served.variants) == picks & set(every.variants) and len(served.variants) < len(every.variants)
    assert {n: served.best(n)[0] for n in steps} == {n: every.best(n)[0] for n in steps}
    one = ModelEntry.from_artifact("artifacts/digits", variants=["secant-pu"])
    assert list(one.variants) == ["secant-pu"]
    with pytest.raises(ValueError, match="available"):
        ModelEntry.from_artifact("artifacts/digits", variants=["secant-nope"])
    api = ModelEntry.from_artifact("artifacts/digits", steps=steps, weights=False)
    assert next(api.model.net.parameters()).device.type == "meta"
    assert all(next(m.net.parameters()).device.type == "meta" for m in api.variants.values())
    for n in steps:
        s = api.resolve(n)
        assert s == served.resolve(n) and torch.equal(api.table(s, n).b, served.table(s, n).b)
        assert api.rows_per_guided_image(s) == served.rows_per_guided_image(s)
    assert api.display_scale == 8 and analytic_entry().display_scale == 8

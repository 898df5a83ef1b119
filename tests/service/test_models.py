"""Sampler resolution (eval.json, defaults, learned solvers), class labels, PNG encoding."""
import numpy as np
import pytest
import torch

from stride_diffusion.service.labels import class_index, closest
from stride_diffusion.service.models import ModelEntry, analytic_entry
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.samplers import SamplerSet, SolverError, load_samplers
from stride_diffusion.solvers.samplers.learned import LearnedSampler
from stride_diffusion.solvers.samplers.secant import SecantSampler


@pytest.fixture(scope="module")
def gmm():
    return analytic_entry()


def entry_with(gmm, rows=(), learned=None, own=None):
    """The mixture with measured `rows`, learned tables {name: Table} and own-network samplers {name: model}."""
    extra = [LearnedSampler(k, t, gmm.model) for k, t in (learned or {}).items()]
    extra += [SecantSampler(k, m) for k, m in (own or {}).items()]
    ss = SamplerSet(gmm.model, [*load_samplers(gmm.model), *extra], rows)
    return ModelEntry("m", gmm.model, gmm.class_names, {}, ss)


def pick(e, steps, solver="auto", guidance=None) -> str:
    return e.samplers.resolve(steps, solver, guidance).name


def table(e, solver, steps):
    return e.samplers[solver].table(steps)


def test_defaults_without_eval(gmm):
    assert pick(gmm, 4) == "dpmpp-2m" and pick(gmm, 3) == "dpmpp-2m"
    assert pick(gmm, 2) == "euler" and pick(gmm, 1) == "euler"  # flow schedule: DDIM is Euler


def test_auto_picks_lowest_fd_at_that_nfe(gmm):
    learned = make_table("unipc", gmm.model.schedule, gmm.model.param, 4)
    rows = [{"solver": "dpmpp-2m", "nfe": 4, "fd": 3.0}, {"solver": "mine", "nfe": 4, "fd": 1.0},
            {"solver": "heun", "nfe": 4, "fd": 2.0}, {"solver": "secant", "nfe": 4, "fd": 0.5},  # not runnable here
            {"solver": "ipndm", "nfe": 8, "fd": 0.1}, {"solver": "ddim", "nfe": 4, "fd": None, "rmse": 0.1}]
    e = entry_with(gmm, rows, {"mine": learned})
    assert pick(e, 4) == "mine"
    assert pick(e, 8) == "ipndm"
    assert pick(e, 6) == "dpmpp-2m"  # not measured: default
    ch = e.samplers.choices([4, 6])
    assert ch["4"]["source"] == "eval.json" and ch["4"]["quality"]["fd"] == 1.0
    assert ch["6"]["source"] == "default"
    assert table(e, "mine", 4).nfe == 4


def test_auto_picks_by_the_selection_sets_fd_not_the_reported_one(gmm):
    """eval.json rows carry the evaluation sets' fd (reported) and the selection set's (chosen on)."""
    rows = [{"solver": "dpmpp-2m", "nfe": 4, "fd": 1.0, "selection_fd": 2.0},
            {"solver": "heun", "nfe": 4, "fd": 1.5, "selection_fd": 1.2}]
    assert pick(entry_with(gmm, rows), 4) == "heun"


def test_explicit_solvers(gmm):
    e = entry_with(gmm, learned={"mine": make_table("unipc", gmm.model.schedule, gmm.model.param, 4)})
    assert pick(e, 4, "heun") == "heun" and table(e, "heun", 4).nfe == 4
    assert pick(e, 5, "dpmpp-2m/logsnr") == "dpmpp-2m/logsnr" and table(e, "dpmpp-2m/logsnr", 5).nfe == 5
    with pytest.raises(SolverError, match="allowed: 'auto'.*dpmpp-2m.*mine"):
        pick(e, 4, "nope")
    with pytest.raises(SolverError, match="steps=4 only"):
        pick(e, 8, "mine")
    with pytest.raises(SolverError):
        pick(e, 4, "dpmpp-2m/zigzag")


def test_every_classic_solver_spends_exactly_steps_evaluations(gmm):
    for s in gmm.samplers.names():
        for n in (1, 2, 3, 5):
            assert table(gmm, s, n).nfe == n


def test_class_labels(gmm):
    """One rule for /generate and the OpenAI route: an index, or a name exact first, then ignoring case."""
    names = gmm.class_names
    assert class_index(names, 3) == 3 and class_index(names, 3.0) == 3 and class_index(names, "three") == 3
    assert class_index(names, "Three") == 3 and class_index(names, " THREE ") == 3
    assert class_index(["Tabby", "tabby"], "tabby") == 1 and class_index(["Tabby", "tabby"], "TABBY") == 0
    assert class_index([str(k) for k in range(10)], "7") == 7  # a digit string is a name
    for bad in (10, -1, "eleven", "3", True, 2.5, float("nan"), None):  # a JSON string is never an index
        with pytest.raises(ValueError, match=r"0\.\.9 or one of the class names"):
            class_index(names, bad)
    assert closest(names, "Sevn")[0] == "seven" and len(closest(names, "Sevn")) == 5


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
    assert pick(e, 3) == "fast3" and pick(e, 2) == "euler" and pick(e, 4) == "dpmpp-2m"
    assert "fast3" in e.samplers.names() and table(e, "fast3", 3).nfe == 3


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
    ta, tb, tc = table(gmm, "dpmpp-2m", 4), table(gmm, "ipndm", 8), table(gmm, "euler", 8)
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
    e = entry_with(gmm, [{"solver": "secant", "nfe": 2, "fd": 0.1}], own={"secant": sec})
    assert pick(e, 2) == "secant" and pick(e, 4) == "dpmpp-2m" and "secant" in e.samplers.names()
    assert e.samplers["secant"].model is sec and e.stepper_key("secant") == "m:secant"
    eng = Engine(Registry([e]), [2, 4])
    out = _run(eng, [(_job("s", "secant", 2, 1, 1, 5, model="m"), table(e, "secant", 2), 0, 1, 1),
                     (_job("p", "dpmpp-2m", 4, 1, 1, 5, model="m"), table(e, "dpmpp-2m", 4), 0, 1, 1)])
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
    own = lambda e: [s.name for s in e.samplers if s.network]  # samplers with their own network (secant)
    picks = {every.samplers.best(n)[0].name for n in steps}
    assert set(own(served)) == picks & set(own(every)) and len(own(served)) < len(own(every))
    assert {n: pick(served, n) for n in steps} == {n: pick(every, n) for n in steps}
    one = ModelEntry.from_artifact("artifacts/digits", variants=["secant-pu"])
    assert own(one) == ["secant-pu"]
    with pytest.raises(ValueError, match="available"):
        ModelEntry.from_artifact("artifacts/digits", variants=["secant-nope"])
    api = ModelEntry.from_artifact("artifacts/digits", steps=steps, weights=False)
    assert next(api.model.net.parameters()).device.type == "meta"
    assert all(next(s.model.net.parameters()).device.type == "meta" for s in api.samplers if s.network)
    for n in steps:
        s = pick(api, n)
        assert s == pick(served, n) and torch.equal(table(api, s, n).b, table(served, s, n).b)
        assert api.samplers[s].rows_per_image(2.0) == served.samplers[s].rows_per_image(2.0)
    assert api.display_scale == 8 and analytic_entry().display_scale == 8

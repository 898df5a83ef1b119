"""Every CUDA-only path of the hot loop, run on the CPU: the Triton update (update='triton', the
kernel in Triton's interpreter) against the torch update (update='torch') for every adapter kind
(stride flow and VP demo nets; imported diffusers DiT with learned sigma, UNet with v-prediction,
SiT), fp32 and bf16 networks, with and without the static batch buckets, mixed step counts and
solvers, CFG rows beside unguided samples, samples joining and leaving mid-run; then through the
worker's Engine (decode, uint8 quantisation, the batch copy) and through one embedded `stride
serve` request per adapter kind.

The learned-sigma DiT's output is a row-strided view (the first C of 2C channels; in a static bucket
also a row prefix of the bucket's output): the kernel reads it in place, where the old wrapper
refused it ("y, d and hist must be contiguous").

Tolerances. Both updates do the same float32 operations in the same order (solvers.update), and
the interpreter runs them as numpy float32 ops (no FMA contraction), so in fp32 they agree bit for
bit on every path measured here (max scaled difference 0). A bf16 network's output is fed to the
update as is (bf16) and widened exactly to float32 by both; the state stays float32, so the two
runs see the same inputs at every step and agree bit for bit too. The checks allow 1e-5 of the
sample's scale (float32 rounding of a few reassociated ops, should the interpreter or torch ever
contract an FMA) and assert no more; images (uint8) must then be equal but for at most one grey level
in a tiny fraction of pixels (a value on a rounding edge; measured: equal everywhere)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_fixtures import ROOT, ApiServer
from tiny_models import ddim, dit_pipeline, sit_checkpoint, unet_pipeline

pytest.importorskip("triton")

from stride_diffusion.offline import cli
from stride_diffusion.service import images
from stride_diffusion.service.cli import parser, settings_from
from stride_diffusion.service.engine import Engine
from stride_diffusion.service.jobs import Job
from stride_diffusion.service.models import ModelEntry, Registry
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers import Stepper, make_table, seeded_noise
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.network import Network
from stride_diffusion.solvers.triton_update import fused_update_triton
from stride_diffusion.solvers.update import fused_update_torch, update_fn

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

KINDS = ["flow", "vp", "dit", "unet-v", "sit"]  # adapters: stride, stride, dit (learned sigma), unet2d, sit
BUCKETS = (1, 2, 4, 8, 16)
SCALED_TOL = 1e-5


# -- the five models, imported as a user imports them -------------------------------------------------

@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("update_paths")
    # DiT with learned sigma (8 output channels for 4 latent ones) and a VAE: `stride offline import diffusers`
    dit_pipeline(d / "dit-pipe")
    assert cli.main(["import", "diffusers", str(d / "dit-pipe"), "--name", "dit", "--out", str(d / "dit")]) == 0
    # a class-conditional pixel UNet with v-prediction (the scheduler config says so)
    unet_pipeline(d / "unet-pipe", scheduler=ddim(prediction_type="v_prediction"))
    assert cli.main(["import", "diffusers", str(d / "unet-pipe"), "--name", "unet-v", "--out", str(d / "unet-v")]) == 0
    sit_checkpoint(d)  # SiT: a DiT-layout checkpoint on the flow schedule
    assert cli.main(["import", "dit-checkpoint", str(d / "SiT-tiny.pt"), "--vae", str(d / "vae"), "--schedule", "flow",
                     "--heads", "2", "--name", "sit", "--out", str(d / "sit")]) == 0
    out = {"flow": f"{ROOT}/artifacts/digits", "vp": f"{ROOT}/artifacts/digits-vp", "dit": str(d / "dit"),
           "unet-v": str(d / "unet-v"), "sit": str(d / "sit")}
    kinds = {k: json.loads(Path(v, "model.json").read_text()).get("adapter", {}).get("kind", "stride")
             for k, v in out.items()}
    assert kinds == {"flow": "stride", "vp": "stride", "dit": "dit", "unet-v": "unet2d", "sit": "sit"}
    return out


@pytest.fixture(scope="module")
def models(arts):
    """(kind, dtype) -> the model, loaded once per dtype: a bf16 Network casts the weights in place."""
    cache = {}

    def get(kind, dtype):
        if (kind, dtype) not in cache:
            cache[kind, dtype] = load_artifact(arts[kind], dtype=dtype).model
        return cache[kind, dtype]

    return get


# -- 1. the Stepper: every adapter x precision x static buckets ------------------------------------

class Spy:
    """The update, recording the layout of every `d` it is handed."""

    def __init__(self, fn, net, st):
        self.fn, self.net, self.st, self.calls = fn, net, st, []

    def __call__(self, y, d, uncond, w, *rest):
        outs = [k.out for k in self.net.buckets.values() if k.out is not None]
        self.calls.append(dict(dtype=d.dtype, contiguous=d.is_contiguous(), row=d.stride(0), D=y.shape[1],
                               subset=y.data_ptr() != self.st.y.data_ptr(),  # the active rows' copy
                               rows=d.shape[0], guided=bool((uncond >= 0).any()), plain=bool((uncond < 0).any()),
                               in_bucket=any(d.untyped_storage().data_ptr() == o.untyped_storage().data_ptr()
                                             for o in outs)))
        return self.fn(y, d, uncond, w, *rest)


def tables(model):
    s, p = model.schedule, model.param
    return {name: make_table(name.split(":")[0], s, p, int(name.split(":")[1]))
            for name in ("dpmpp-3m:4", "euler:1", "unipc:3", "ipndm:2", "dpmpp-2m:3")}


def run_stepper(model, update: str, dtype, static: bool, step_graph: bool = False):
    """Mixed step counts and solvers, guided (w != 1) and unguided samples in one call, two samples
    joining after the first step, one leaving mid-run, finished samples collected only every other
    step (so that steps also run on a subset of the rows: the index_select / index_copy_ path)."""
    net = Network(model, dtype, BUCKETS if static else (), static=static)
    tabs = tables(model)
    st = Stepper(net, window=max(t.window for t in tabs.values()), update=update, step_graph=step_graph)
    if step_graph:  # count the steps the step graph ran
        graph_step = st.graph.step
        spy_steps = st.graph.steps = []
        st.graph.step = lambda b, *a: (spy_steps.append(b), graph_step(b, *a))
    assert st.update is {"triton": fused_update_triton, "torch": fused_update_torch}[update]
    spy = st.update = Spy(st.update, net, st)
    shape = model.shape
    st.add([tabs["dpmpp-3m:4"], tabs["euler:1"], tabs["unipc:3"], tabs["ipndm:2"]], seeded_noise(range(4), shape),
           [0, 1, 2, 3], [1.0, 2.5, 1.0, 4.0], ids=list("abcd"))
    done = {}
    with torch.inference_mode():
        for k in range(6):
            if k == 1:  # join between steps, one guided
                st.add([tabs["dpmpp-2m:3"], tabs["dpmpp-3m:4"]], seeded_noise([4, 5], shape), [4, 5], [3.0, 1.0],
                       ids=list("ef"))
            if k == 2:  # leave before finishing (an expired request)
                assert "a" in st.ids
                st.remove(["a"])
            st.step()
            if k % 2:
                done.update(st.pop_done())
    done.update(st.pop_done())
    assert len(st) == 0 and set(done) == set("bcdef")
    return done, (st.graph.steps if step_graph else spy)


def scaled_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_stepper_triton_matches_torch(models, kind, dtype, static):
    model = models(kind, "bf16" if dtype == torch.bfloat16 else "fp32")
    got, spy = run_stepper(model, "triton", dtype, static)
    want, _ = run_stepper(model, "torch", dtype, static)
    errs = {i: scaled_err(got[i], want[i]) for i in want}
    assert max(errs.values()) <= SCALED_TOL, errs
    assert all(torch.isfinite(v).all() for v in got.values()) and all(v.dtype == torch.float32 for v in got.values())
    calls = spy.calls
    assert calls and all(c["dtype"] == dtype for c in calls)  # the network's dtype, read as is
    assert any(c["guided"] and c["plain"] for c in calls)  # CFG rows beside unguided samples in one launch
    assert any(c["subset"] for c in calls) and not all(c["subset"] for c in calls)  # both paths of Stepper.step
    assert all(c["in_bucket"] for c in calls) if static else not any(c["in_bucket"] for c in calls)
    if kind == "dit":  # learned sigma: the first C of 2C channels, never copied on the way to the kernel
        assert all(not c["contiguous"] and c["row"] == 2 * c["D"] for c in calls if c["rows"] > 1), calls
    else:
        assert all(c["contiguous"] for c in calls)


@pytest.mark.parametrize("update", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_step_graph_is_the_plain_step_bit_for_bit(models, kind, dtype, update):
    """The whole step on the static bucket buffers (solvers/step_graph.py: what a CUDA graph
    captures, run eagerly) gives the plain step's samples through the same static Network exactly:
    mixed steps and solvers, CFG rows beside unguided samples, samples joining and leaving; the
    steps on a subset of the samples take the plain path, the others the graph's."""
    model = models(kind, "bf16" if dtype == torch.bfloat16 else "fp32")
    got, buckets = run_stepper(model, update, dtype, static=True, step_graph=True)
    want, spy = run_stepper(model, update, dtype, static=True)
    assert set(got) == set(want) == set("bcdef")
    assert all(torch.equal(got[i], want[i]) for i in want), {i: scaled_err(got[i], want[i]) for i in want}
    assert buckets and set(buckets) <= set(BUCKETS) and len(buckets) < len(spy.calls)  # both paths ran
    assert len({b for b in buckets}) > 1  # samples joining and leaving changed the bucket


def test_step_graph_keeps_the_state_in_its_store(models):
    """The state lives in the store the graph reads (views, so nothing is copied in a step), and
    leaves it only for more samples than the largest bucket (then the plain step runs)."""
    model = models("flow", "fp32")
    tab = tables(model)["euler:1"]
    st = Stepper(Network(model, None, (2, 4), static=True), window=1, update="torch", step_graph=True)
    st.add([tab] * 3, seeded_noise(range(3), model.shape), 1, 1.0)
    assert st.graph.holds(st.y) and st.graph.holds(st.hist)
    assert st.y.data_ptr() == st.graph.y.data_ptr() and st.hist.data_ptr() == st.graph.hist.data_ptr()
    assert st.graph.bucket(3, st.y) == 4 and st.graph.bucket(5, st.y) is None
    st.add([tab] * 2, seeded_noise(range(3, 5), model.shape), 1, 1.0)  # 5 > cap 4: plain tensors
    assert not st.graph.holds(st.y) and st.graph.bucket(5, st.y) is None
    with torch.inference_mode():
        st.step()
    out = st.pop_done()
    assert len(out) == 5 and len(st) == 0 and st.graph.holds(st.y) and st.graph.holds(st.hist)  # back in the store


def test_learned_sigma_output_reaches_the_kernel_strided(models):
    """What crashed on the GPU: the DiT adapter keeps a view of the first C channels, and the old
    wrapper refused any non-contiguous `d`. Directly, and as a static bucket's prefix view."""
    model = models("dit", "fp32")
    C, D = model.shape[0], int(np.prod(model.shape))
    x = seeded_noise(range(6), model.shape)
    t, lab = torch.linspace(0.2, 0.9, 6), torch.tensor([0, 1, 2, 10, 10, 10])  # 3 cond rows, 3 null rows
    net = Network(model, buckets=[8], static=True)
    with torch.inference_mode():
        outs = {"eager": model(x, t, torch.zeros(6), lab), "bucket": net(x, t, torch.zeros(6), lab)}
    for where, out in outs.items():
        d = out.reshape(6, -1)
        assert not d.is_contiguous() and d.stride() == (2 * D, 1), (where, d.stride())  # the old check raised here
        assert out.shape[1] == C
        g = torch.Generator().manual_seed(1)
        a = dict(y=torch.randn(3, D, generator=g), d=d, uncond=torch.tensor([3, -1, 5]), w=torch.tensor([2.0, 1.0, 4.0]),
                 hx=torch.rand(3, generator=g), hd=torch.rand(3, generator=g), c=torch.rand(3, generator=g),
                 b=torch.rand(3, 2, generator=g), hist=torch.randn(3, 2, D, generator=g), slot=torch.tensor([0, 1, 1]))
        t_, r_ = ({k: v.clone() if k != "d" else v for k, v in a.items()} for _ in range(2))
        fused_update_triton(**t_)
        fused_update_torch(**{**r_, "d": d.contiguous()})
        assert torch.equal(t_["y"], r_["y"]) and torch.equal(t_["hist"], r_["hist"]), where


# -- 2. the worker's Engine: decode, uint8, the batch copy ---------------------------------------------

STEPS = [1, 2, 3]


@pytest.fixture(scope="module")
def registries(arts):
    """dtype -> a Registry of the five models (own copies per dtype: Engine(dtype='bf16') casts in place);
    the flow demo model with a secant network (guidance as an input: no CFG rows)."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = Registry([ModelEntry.from_artifact(arts[k], steps=STEPS,
                                                              variants=["secant-tan-pu"] if k == "flow" else None)
                                     for k in KINDS])
        return cache[dtype]

    return get


def job(id, entry, steps, solver, label, n, seed, guidance):
    return Job(id, entry.name, steps, solver, label, n, seed, guidance, "png", 1e18, 0.0)


def run_engine(reg: Registry, update: str, static: bool, dtype, step_graph: bool = True):
    eng = Engine(reg, STEPS, dtype=dtype, buckets=BUCKETS if static else (), update=update, static=static)
    assert all((st.graph is not None) == static for st in eng.steppers.values())  # static buckets: step graphs
    for st in eng.steppers.values():
        st.graph = st.graph if step_graph else None
    want = {"triton": fused_update_triton, "torch": fused_update_torch}[update]
    assert eng.steppers and all(st.update is want for st in eng.steppers.values())
    assert all(isinstance(st.model, Network) and st.model.static for st in eng.steppers.values()) if static else True

    def admit(j, e, first, count):
        s = e.samplers[j.solver]
        eng.add(j, s.table(j.steps), first, count, s.rows_per_image(j.guidance))

    late = []
    for m, e in enumerate(reg):
        a = job(f"{e.name}/a", e, 3, "dpmpp-2m", 1, 3, 10 * m, 2.0)  # guided, admitted in two parts
        b = job(f"{e.name}/b", e, 2, "euler", 2, 1, 10 * m + 5, 1.0)  # dropped mid-run
        c = job(f"{e.name}/c", e, 1, "ddim", 3, 1, 10 * m + 7, 1.0)  # plain, joins later
        admit(a, e, 0, 2)
        admit(b, e, 0, 1)
        late += [(a, e, 2, 1), (c, e, 0, 1)]
        if "secant-tan-pu" in e.samplers:  # a guidance-input network: its own stepper, no CFG rows
            admit(job(f"{e.name}/s", e, 2, "secant-tan-pu", 4, 2, 99, 2.0), e, 0, 2)
    out = {}

    def collect(done):
        eng.release(done)
        out.update({(jid, i): px for jid, i, px in done})

    collect(eng.step())
    for e in reg:
        eng.drop(f"{e.name}/b")
    for args in late:
        admit(*args)
    while eng.busy:
        collect(eng.step())
    return out


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("dtype", [None, "bf16"], ids=["fp32", "bf16"])
def test_engine_images_triton_match_torch(registries, static, dtype):
    reg = registries(dtype)
    got = run_engine(reg, "triton", static, dtype)
    want = run_engine(reg, "torch", static, dtype)
    names = [e.name for e in reg]
    assert set(want) == {(f"{n}/{j}", i) for n in names for j, k in (("a", 3), ("c", 1)) for i in range(k)} | {
        ("digits/s", 0), ("digits/s", 1)}
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g.dtype == np.uint8 and g.shape == w.shape, key
        diff = np.abs(g.astype(int) - w.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (key, diff.max(), (diff > 0).mean())
    shapes = {jid.split("/")[0]: px.shape for (jid, _), px in want.items()}
    assert shapes["dit"] == shapes["sit"] == (16, 16, 3)  # the VAE decoded them
    assert shapes["unet-v"] == (8, 8, 3) and shapes["digits"] == (16, 16, 1)


@pytest.mark.parametrize("dtype", [None, "bf16"], ids=["fp32", "bf16"])
def test_engine_step_graph_images_are_the_plain_steps(registries, dtype):
    reg = registries(dtype)
    got = run_engine(reg, "torch", True, dtype)
    want = run_engine(reg, "torch", True, dtype, step_graph=False)
    assert set(got) == set(want) and len(want) == len(KINDS) * 4 + 2
    assert all(np.array_equal(got[k], want[k]) for k in want)


# -- 3. one embedded `stride serve` request per adapter kind -------------------------------------------

def test_serve_with_update_triton_gives_the_torch_images(arts, monkeypatch):
    common = ["--artifacts", *arts.values(), "--steps", "3", "--max-batch", "8", "--threads", "1"]
    with_flag = settings_from(parser().parse_args([*common, "--update", "triton"]))  # `stride serve --update triton`
    assert with_flag.update == "triton"
    monkeypatch.setenv("STRIDE_UPDATE", "torch")  # and the env var, for the reference server
    from_env = settings_from(parser().parse_args(common))
    assert from_env.update == "torch"
    got, want = {}, {}
    for s, out in ((with_flag, got), (from_env, want)):
        srv = ApiServer(s)
        try:
            kernel = {"triton": fused_update_triton, "torch": fused_update_torch}[s.update]
            assert all(st.update is kernel for st in srv.service.worker.engine.steppers.values())
            for name in srv.service.registry.names():
                r = httpx.post(srv.url + "/generate", json={"model": name, "class_label": 1, "n": 2, "seed": 5,
                                                            "steps": 3, "guidance": 2.0, "format": "json"}, timeout=120)
                assert r.status_code == 200, (name, r.text)
                out[name] = [images.decode(base64.b64decode(b)) for b in r.json()["images"]]
        finally:
            srv.stop()
    assert set(got) == set(want) == {"digits", "digits-vp", "dit", "unet-v", "sit"}
    for name, imgs in want.items():
        assert len(imgs) == len(got[name]) == 2
        for g, w in zip(got[name], imgs):
            assert np.array_equal(g, w), name


@pytest.mark.parametrize("update", ["triton", "torch"])
def test_worker_warm_up_runs_the_configured_update(monkeypatch, update):
    """The setting reaches the warm-up's own Steppers too (they read only STRIDE_UPDATE before): the
    update warmed up is the one the requests run."""
    from stride_diffusion.service.metrics import Metrics
    from stride_diffusion.service.models import analytic_entry
    from stride_diffusion.service.worker import Worker
    from stride_diffusion.solvers import triton_update
    from stride_diffusion.solvers import update as update_module

    calls = {"triton": 0, "torch": 0}

    def counting(name, fn):
        def f(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return f

    monkeypatch.setattr(triton_update, "fused_update_triton", counting("triton", fused_update_triton))
    monkeypatch.setattr(update_module, "fused_update_torch", counting("torch", fused_update_torch))
    monkeypatch.delenv("STRIDE_UPDATE", raising=False)
    s = Settings(test_model="gmm", steps=[2], max_batch=4, threads=1, update=update)
    Worker(Registry([analytic_entry()]), s, None, Metrics(process=False)).warm_up()
    other = {"triton": "torch", "torch": "triton"}[update]
    assert calls == {update: 3 + 2, other: 0}  # buckets 1, 2, 4 one step each, then 2 steps of a sample


def test_update_setting_names():
    assert Settings(update="triton").update == "triton"
    with pytest.raises(ValueError):
        Settings(update="cuda")
    assert update_fn("TRITON") is fused_update_triton and update_fn("torch") is fused_update_torch
    with pytest.raises(ValueError, match="auto, torch, triton"):
        update_fn("numba")

"""The hot-path model call: bf16/fp16 networks with a float32 state, and the bucketed static-buffer
path (what a CUDA graph replays) run eagerly on the CPU."""
import numpy as np
import pytest
import torch

from stride_diffusion.solvers import Stepper, make_table, seeded_noise
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.network import Network, dtype_of


@pytest.fixture(scope="module")
def digits():
    return load_artifact("artifacts/digits").model


def run(model, tables, seeds, labels, w):
    st = Stepper(model, window=max(t.window for t in tables))
    st.add(tables, seeded_noise(seeds, model.shape), labels, w, ids=seeds)
    out = {}
    with torch.inference_mode():
        while len(st):
            st.step()
            out.update(st.pop_done())
    return torch.stack([out[s] for s in seeds])


def tables(model):
    return [make_table("euler", model.schedule, model.param, 2), make_table("dpmpp-2m", model.schedule, model.param, 4)]


def test_static_buckets_match_eager(digits):
    """Rows padded to a bucket (with CFG rows, and the bucket larger than the call) give the eager
    result exactly: padding rows are never read, and every row is computed on its own."""
    tabs = tables(digits) * 3
    seeds, labels, w = list(range(6)), [0, 1, 2, 3, 4, 5], [1.0, 2.0, 1.0, 1.5, 1.0, 1.0]
    ref = run(digits, tabs, seeds, labels, w)
    net = Network(digits, buckets=[4, 16], static=True)
    got = run(net, tabs, seeds, labels, w)
    assert set(net.buckets) == {4, 16} and net.buckets[16].out is not None  # the bucket path ran
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_static_buckets_with_a_guidance_input_network():
    """A secant network takes the guidance scale as an input: its bucket carries it too."""
    from stride_diffusion.service.models import ModelEntry

    e = ModelEntry.from_artifact("artifacts/digits", variants=["secant-tan-pu"])
    m = e.samplers["secant-tan-pu"].model
    assert m.guidance_input
    tabs = [m.table(2), m.table(4), m.table(4)]
    seeds, labels, w = [7, 8, 9], [1, 2, 3], [1.0, 2.5, 1.5]
    ref = run(m, tabs, seeds, labels, w)
    net = Network(m, buckets=[8], static=True)
    torch.testing.assert_close(run(net, tabs, seeds, labels, w), ref, rtol=0, atol=2e-5)
    assert net.buckets[8].w is not None


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_low_precision_network_float32_state(name):
    model = load_artifact("artifacts/digits").model  # its own copy: the cast is in place
    ref = run(model, tables(model), [1, 2], [3, 7], 1.5)
    net = Network(model, dtype=dtype_of(name))
    out = net(seeded_noise([0], model.shape), torch.ones(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert out.dtype == dtype_of(name)  # the update reads the network's dtype
    got = run(net, tables(model), [1, 2], [3, 7], 1.5)
    assert got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.1, err  # low precision changes the result, a little (data range [-1, 1])
    assert Network(model).dtype == dtype_of(name)  # no dtype asked: the weights' own


def test_unknown_dtype_names_the_allowed():
    with pytest.raises(ValueError, match="allowed"):
        dtype_of("float8")


def test_graphs_are_cuda_only(digits):
    net = Network(digits, buckets=[2], graphs=True)
    assert not net.graphs and net.buckets == {}  # CPU: eager
    net.capture()  # no-op off CUDA


def test_engine_runs_a_bf16_artifact_under_the_wrapper():
    """--dtype bf16: the network loads in bf16, the engine wraps it (autocast), the state stays fp32."""
    from stride_diffusion.service.engine import Engine
    from stride_diffusion.service.jobs import Job
    from stride_diffusion.service.models import ModelEntry, Registry

    e = ModelEntry.from_artifact("artifacts/digits", dtype="bf16", steps=[2])
    eng = Engine(Registry([e]), [2])
    st = eng.steppers[e.name]
    assert isinstance(st.model, Network) and st.model.dtype == torch.bfloat16
    eng.add(Job("j", e.name, 2, "euler", 3, 1, 5, 1.5, "png", 1e18, 0.0), e.samplers["euler"].table(2), 0, 1, 2)
    out = []
    while eng.busy:
        done = eng.step()
        eng.release(done)
        out += done
    assert st.y.dtype == torch.float32 and len(out) == 1 and out[0][2].dtype == np.uint8

"""The Triton update on the CPU against the torch reference. CPU tensors run the kernel in Triton's
interpreter whatever TRITON_INTERPRET says (solvers.triton_update decorates it once compiled, once
interpreted), so nothing is set before the import."""
import os

import pytest
import torch

triton = pytest.importorskip("triton")

from stride_diffusion.solvers import triton_update
from stride_diffusion.solvers.triton_update import fused_update_triton
from stride_diffusion.solvers.update import fused_update_torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def make(B, D, W, dtype, ddtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    uncond = torch.tensor([B + 1, -1, B, -1, B + 2, B + 3, -1][:B], dtype=torch.int64)  # some guided
    return dict(  # d: B cond rows, then the uncond rows (one unused)
        y=r(B, D).to(dtype), d=r(B + 4, D).to(ddtype), uncond=uncond,
        w=1 + 3 * torch.rand(B, generator=g), hx=r(B), hd=r(B), c=r(B), b=r(B, W),
        hist=r(B, W, D).to(dtype), slot=torch.randint(0, W, (B,), generator=g))


def run_both(a, **kw):
    t = {k: v.clone() for k, v in a.items()}
    fused_update_triton(**t, **kw)
    r = {k: v.clone() for k, v in a.items()}
    fused_update_torch(**r)
    return t, r


def check(t, r, dtype):
    # fp32: the same operations in the same order. bf16: the interpreter converts float32 -> bfloat16 by
    # truncation where torch (and the GPU) round to nearest, so stores may differ by one bf16 ulp (2^-7 rel).
    tol = dict(rtol=2 ** -7, atol=1e-6) if dtype == BF16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(t["hist"], r["hist"], **tol)
    torch.testing.assert_close(t["y"], r["y"], **tol)


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("D,block", [(1000, 1024), (3 * 17 * 19, 256)])  # one masked block; several + a tail
@pytest.mark.parametrize("dtype,ddtype", [(F32, F32), (BF16, BF16), (F32, BF16), (F16, F32)])
def test_matches_torch(W, D, block, dtype, ddtype):
    a = make(5, D, W, dtype, ddtype, seed=W)
    t, r = run_both(a, block=block)
    check(t, r, dtype)
    assert torch.equal(t["d"], a["d"])


def test_ring_over_steps():
    W, steps = 3, 5
    a = make(4, 300, W, F32, F32)
    a["slot"] = torch.tensor([0, 1, 2, 0])
    t = {k: v.clone() for k, v in a.items()}
    r = {k: v.clone() for k, v in a.items()}
    for k in range(steps):
        for s in (t, r):
            s["d"] = torch.randn_like(s["d"], generator=torch.Generator().manual_seed(k))
            s["slot"] = (a["slot"] + k) % W
        fused_update_triton(**t, block=128)
        fused_update_torch(**r)
    check(t, r, F32)


def test_negative_slots():  # indexed as python does: slot - W .. W - 1
    a = make(4, 100, 3, F32, F32)
    a["slot"] = torch.tensor([-1, -3, 2, -2])
    check(*run_both(a), F32)


def test_float64_state():
    a = make(3, 200, 2, torch.float64, torch.float64)
    t, r = run_both(a)
    torch.testing.assert_close(t["y"], r["y"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t["hist"], r["hist"], rtol=1e-12, atol=1e-12)


def test_empty_batch():
    a = make(0, 64, 2, F32, F32)
    fused_update_triton(**a)


def test_no_environment_needed(monkeypatch):
    """CPU: interpreted, CUDA: compiled, from one import; and deciding it leaves TRITON_INTERPRET as it was."""
    assert isinstance(triton_update._KERNELS["cuda"], triton.runtime.JITFunction)
    assert not isinstance(triton_update._KERNELS["cpu"], triton.runtime.JITFunction)  # the interpreter's
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not isinstance(triton_update._jit(True), triton.runtime.JITFunction)
    assert "TRITON_INTERPRET" not in os.environ
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(triton_update._jit(False), triton.runtime.JITFunction)
    assert os.environ["TRITON_INTERPRET"] == "1"


# -- d as a row-strided view: a learned-sigma network's first C of 2C channels, a bucket's prefix --------

@pytest.mark.parametrize("view", ["first-half", "second-half", "bucket-prefix", "bucket-of-halves", "one-row"])
@pytest.mark.parametrize("ddtype", [F32, BF16], ids=["d-fp32", "d-bf16"])
def test_row_strided_d_matches_torch(view, ddtype):
    B, D, W = 4, 300, 3
    a = make(B, D, W, F32, ddtype, seed=7)
    R = a["d"].shape[0]
    g = torch.Generator().manual_seed(3)
    full = torch.randn(16, 2 * D, generator=g).to(ddtype)  # [bucket rows, 2D]: 2C channels, 16-row bucket
    if view == "one-row":  # one sample, no guidance: a single row of a wider output
        a = {k: v[:1] for k, v in a.items()}
        a["uncond"] = torch.tensor([-1])
        d = full[:1, :D]
    else:
        d = {"first-half": full[:R, :D], "second-half": full[:R, D:],  # a storage offset too
             "bucket-prefix": full.view(32, D)[:R], "bucket-of-halves": full[:, :D][:R]}[view]
    assert d.shape[1] == D and d.stride(1) == 1
    if view in ("first-half", "second-half", "bucket-of-halves"):
        assert not d.is_contiguous() and d.stride(0) == 2 * D  # what the old wrapper refused
    before = full.clone()
    t = {k: v.clone() for k, v in a.items() if k != "d"}
    fused_update_triton(d=d, **t, block=128)
    r = {k: v.clone() for k, v in a.items() if k != "d"}
    fused_update_torch(d=d.contiguous(), **r)
    assert torch.equal(t["y"], r["y"]) and torch.equal(t["hist"], r["hist"])
    assert torch.equal(full, before)  # d is read only; the other half untouched


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(d=torch.randn(a["d"].shape[0], 2 * 64)[:, ::2]), r"d must be rows of 64 contiguous values "
                                                                           r"\(inner stride 1.*strides \(128, 2\)"),
    (lambda a: a.update(d=a["d"].t().contiguous().t()), r"d must be rows .*inner stride 1.*strides \(1, 8\)"),
    (lambda a: a.update(d=torch.randn(8 * 64).as_strided((8, 64), (32, 1))), r"row stride >= 64.*strides \(32, 1\)"),
    (lambda a: a.update(y=torch.randn(4, 128)[:, :64]), r"y and hist must be contiguous \(updated in place\); "
                                                         r"got y strides \(128, 1\)"),
    (lambda a: a.update(hist=a["hist"].transpose(1, 2).contiguous().transpose(1, 2)), r"hist strides \(128, 1, 2\)"),
])
def test_layouts_refused_name_the_layout(change, match):
    a = make(4, 64, 2, F32, F32)
    change(a)
    with pytest.raises(ValueError, match=match):
        fused_update_triton(**a)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(hist=a["hist"].to(BF16)), "hist dtype"),
    (lambda a: a.update(d=a["d"][:, :-1].contiguous()), "d must be"),
    (lambda a: a.update(d=a["d"][:2]), "d must be"),
    (lambda a: a.update(b=a["b"][:, :1]), "hist must be"),
    (lambda a: a.update(slot=a["slot"].int()), "slot must be"),
    (lambda a: a.update(w=a["w"].double()), "w must be"),
    (lambda a: a.update(c=a["c"][:2]), "c must be"),
    (lambda a: a.update(y=a["y"].t().contiguous().t()), "contiguous"),
    (lambda a: a.update(y=a["y"].int(), hist=a["hist"].int()), "y and d must be"),
])
def test_validation(change, match):
    a = make(4, 64, 2, F32, F32)
    change(a)
    with pytest.raises(ValueError, match=match):
        fused_update_triton(**a)


# -- through the executor ------------------------------------------------------------------------------

def _executor_run(update, out_dtype):
    """Mixed step counts and solvers, CFG rows, joining mid-way and leaving; the network's output in
    `out_dtype` with a float32 state (as a bf16/fp16 network would give it)."""
    from stride_diffusion.solvers import GaussianMixture, Stepper, make_table, seeded_noise
    from stride_diffusion.solvers.schedules import VPLinearSchedule

    gmm = GaussianMixture.random(VPLinearSchedule(), "eps", num_classes=4, per_class=2, dim=12, seed=0, shape=(3, 2, 2))

    class Net:
        schedule, param, num_classes, shape = gmm.schedule, gmm.param, gmm.num_classes, gmm.shape

        def __call__(self, x, t, s, label):
            return gmm(x, t, s, label).to(out_dtype)

    s = gmm.schedule
    tabs = [make_table(n, s, "eps", k) for n, k in (("dpmpp-3m", 6), ("euler", 2), ("unipc", 4), ("ipndm", 8))]
    st = Stepper(Net(), window=max(t.window for t in tabs), update=update)
    st.add(tabs, seeded_noise(range(4), gmm.shape), [0, 1, 2, 3], [1.0, 2.0, 3.0, 1.5], ids=list("abcd"))
    done = {}
    for k in range(12):
        if k == 2:
            st.add([tabs[2], tabs[1]], seeded_noise([9, 10], gmm.shape), [3, 0], [2.0, 1.0], ids=list("ef"))
        if k == 3:
            st.remove(["d"])
        st.step()
        done.update(st.pop_done())
    assert set(done) == set("abcef") and len(st) == 0
    return done


@pytest.mark.parametrize("out_dtype", [F32, BF16, F16])
def test_stepper_with_the_triton_update(out_dtype):
    t = _executor_run(fused_update_triton, out_dtype)
    r = _executor_run(fused_update_torch, out_dtype)
    for k in r:
        torch.testing.assert_close(t[k], r[k], rtol=1e-5, atol=1e-5)

"""Previews (service/previews.py): the clean-image estimate from one step's history entry, exact
against a float64 reference for every solver basis (velocity, x0, eps) with and without guidance;
the linear latent -> RGB fit; the choice of the cheapest decoder."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stride_diffusion.service.images import quantize
from stride_diffusion.service.models import Registry, analytic_entry
from stride_diffusion.service.previews import Previews, cheapest_decoder, estimate, shrink
from stride_diffusion.solvers.adapters.decoders import fit_latent_rgb
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.executor import Stepper, seeded_noise
from stride_diffusion.solvers.param import to_x0_eps


def reference_x0(model, table, noise, label, w, k):
    """float64: run k evaluations, then x0 from the (guided) output at evaluation k."""
    st = Stepper(model, table.window, dtype=torch.float64)
    st.add([table], noise.double(), [label], [w])
    for _ in range(k):
        st.step()
    y = st.y.reshape(1, *model.shape)
    tau = table.tau[k:k + 1]
    out = model(y, tau, table.s[k:k + 1], torch.tensor([label]))
    if w != 1:
        u = model(y, tau, table.s[k:k + 1], torch.tensor([model.num_classes]))
        out = u + w * (out - u)
    (ax, bx), _ = to_x0_eps(model.param, model.schedule.alpha(tau), model.schedule.sigma(tau))
    return ax * y + bx * out


@pytest.mark.parametrize("solver", ["euler", "dpmpp-2m", "ipndm"])  # velocity, x0 and eps history entries
def test_the_estimate_is_the_models_x0_at_that_step(solver):
    e = analytic_entry("gmm")
    m = e.model
    tables = [make_table(solver, m.schedule, m.param, 6), make_table(solver, m.schedule, m.param, 4)]
    noise = seeded_noise([3, 4, 5], m.shape, dtype=torch.float64)
    labels, ws = [1, 2, 7], [1.0, 2.5, 1.0]
    st = Stepper(m, max(t.window for t in tables), dtype=torch.float64)
    st.add([tables[0], tables[1], tables[0]], noise, labels, ws, ids=[("a", 0), ("b", 0), ("c", 0)])
    pv = Previews(Registry([e]), {"gmm": "gmm"})
    pv.want("a", 2)
    pv.want("b", 1)  # "c" wants none
    jobs = {"a", "b", "c"}
    seen = []
    for _ in range(6):
        pending = pv.before("gmm", st, jobs)
        st.step()
        if pending is None:
            continue
        x0 = estimate(pending, st)
        for row, i, k in zip(x0, pending[1], pending[2]):
            j = "abc".index(st.ids[i][0])
            ref = reference_x0(m, tables[j % 2], noise[j:j + 1], labels[j], ws[j], k)[0]
            torch.testing.assert_close(row, ref, rtol=1e-9, atol=1e-9)
            seen.append((st.ids[i][0], k + 1))
    # a every 2 steps and b every step, never on the last step (the image comes then); c never
    assert seen == [("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 4)]


def test_previews_decode_small_through_the_pixel_models_identity():
    e = analytic_entry("gmm")
    pv = Previews(Registry([e]), {"gmm": "gmm"})
    x0 = torch.linspace(-2, 2, 64).reshape(1, 1, 8, 8)
    px = pv.pixels("gmm", x0)
    assert px.shape == (1, 8, 8, 1) and torch.equal(px, quantize(x0, e.data_range))
    big = shrink(torch.rand(2, 3, 256, 200))
    assert tuple(big.shape) == (2, 3, 64, 50)


class LinearDecoder:
    """A 'VAE' that is a linear map per latent pixel, upsampled 4x: the fit must recover it."""

    kind = "vae"

    def __init__(self, w, b):
        self.w, self.b = w, b

    def decode(self, z):
        rgb = torch.einsum("bchw,co->bohw", z, self.w) + self.b[:, None, None]
        return F.interpolate(rgb, scale_factor=4, mode="nearest")


def test_fit_latent_rgb_recovers_a_linear_decoder():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(4, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    fit = fit_latent_rgb(LinearDecoder(w, b), (4, 16, 16))
    assert fit["kind"] == "linear" and fit["fit_rms"] < 1e-4
    np.testing.assert_allclose(fit["weight"], w.numpy(), atol=1e-5)
    np.testing.assert_allclose(fit["bias"], b.numpy(), atol=1e-5)


def test_the_cheapest_decoder_identity_then_tiny_then_the_fitted_map_then_the_own():
    class E:
        def __init__(self, kind, tiny=False, preview=None):
            self.decoder = type("D", (), {"kind": kind})()
            self.decoders = {kind: self.decoder, **({"tiny": "TINY"} if tiny else {})}
            self.meta = {"adapter": {"decoder": {"kind": kind, **({"preview": preview} if preview else {})}}}

    lin = {"kind": "linear", "weight": [[1, 0, 0]] * 4, "bias": [0, 0, 0]}
    assert cheapest_decoder(E("identity")) == (None, None)
    assert cheapest_decoder(E("vae", tiny=True, preview=lin)) == ("TINY", None)
    assert cheapest_decoder(E("vae", preview=lin)) == (None, (lin["weight"], lin["bias"]))
    own = E("vae")
    assert cheapest_decoder(own) == (own.decoder, None)


def test_without_a_preview_request_the_engine_never_enters_the_preview_path(monkeypatch):
    from stride_diffusion.service.engine import Engine
    from stride_diffusion.service.jobs import Job

    e = analytic_entry("gmm")
    eng = Engine(Registry([e]), [4])
    calls = []
    monkeypatch.setattr(eng.previews, "before", lambda *a: calls.append(a))
    job = Job("plain", "gmm", 4, e.samplers.resolve(4).name, 1, 2, 0, 1.0, "png", 1e12, 0.0)
    eng.add(job, e.samplers.resolve(4).table(4), 0, 2, 1)
    done = []
    while eng.busy:
        out = eng.step()
        eng.release(out)
        done += out
    assert len(done) == 2 and calls == [] and eng.previews.take() == []
    job2 = Job("seen", "gmm", 4, job.solver, 1, 1, 0, 1.0, "png", 1e12, 0.0, preview=2)
    eng.add(job2, e.samplers.resolve(4).table(4), 0, 1, 1)
    while eng.busy:
        eng.release(eng.step())
    assert calls  # the same engine with a preview request does enter it

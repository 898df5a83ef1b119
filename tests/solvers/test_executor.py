"""The executor: per-sample tables, guidance, batch independence, the secant time argument."""
import pytest
import torch

from stride_diffusion.solvers import (
    SOLVERS,
    GaussianMixture,
    Stepper,
    Table,
    make_table,
    sample,
    seeded_noise,
)
from stride_diffusion.solvers.schedules import FlowSchedule, VPLinearSchedule


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(VPLinearSchedule(), "eps", num_classes=4, per_class=2, dim=12, seed=0, shape=(3, 2, 2))


def test_same_seed_same_sample_alone_and_in_a_mixed_batch(gmm):
    s = gmm.schedule
    reqs = [(SOLVERS[i % len(SOLVERS)], 2 + i % 9, 1.0 + (i % 3) * 0.75, i % 4, 1000 + i) for i in range(16)]
    tables = [make_table(sv, s, "eps", n) for sv, n, *_ in reqs]
    noise = seeded_noise([r[4] for r in reqs], gmm.shape)
    labels = torch.tensor([r[3] for r in reqs])
    w = torch.tensor([r[2] for r in reqs])
    batch = sample(gmm, tables, noise, labels, w)
    for i in (0, 5, 11):
        alone = sample(gmm, tables[i], seeded_noise([reqs[i][4]], gmm.shape), labels[i:i + 1], w[i])
        assert torch.equal(alone[0], batch[i])


def test_guidance_is_the_cfg_combination(gmm):
    """With guidance w the sampler integrates u + w (c - u); check against a model that does it itself."""
    class Guided:
        schedule, param, num_classes, shape, guidance_input = gmm.schedule, "eps", gmm.num_classes, gmm.shape, True

        def __call__(self, x, t, s, label, w):
            c, u = gmm(x, t, s, label), gmm(x, t, s, torch.full_like(label, gmm.num_classes))
            return u + w.reshape(-1, 1, 1, 1).to(c.dtype) * (c - u)

    tab = make_table("dpmpp-2m", gmm.schedule, "eps", 6)
    noise, labels, w = seeded_noise([1, 2, 3], gmm.shape), torch.tensor([0, 3, 1]), torch.tensor([1.0, 2.5, 4.0])
    a = sample(gmm, tab, noise, labels, w)
    b = sample(Guided(), tab, noise, labels, w)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a[1] - sample(gmm, tab, noise[1:2], labels[1:2], 1.0)[0]).abs().max() > 1e-2


def test_guidance_scale_one_skips_the_unconditional_branch(gmm):
    st = Stepper(gmm, window=1)
    st.add([make_table("euler", gmm.schedule, "eps", 3)] * 4, seeded_noise(range(4), gmm.shape),
           torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 2.0, 1.0]))
    st.step()
    assert st.evaluations == 5  # 4 conditional rows + 1 unconditional


def test_samples_join_between_steps(gmm):
    """A sample added while others are mid-way ends exactly as if it had run alone."""
    tab4, tab7 = make_table("unipc", gmm.schedule, "eps", 4), make_table("ipndm", gmm.schedule, "eps", 7)
    st = Stepper(gmm, window=max(tab4.window, tab7.window))
    st.add([tab7, tab7], seeded_noise([1, 2], gmm.shape), torch.tensor([0, 1]), 2.0, ids=["a", "b"])
    st.step(), st.step()
    st.add([tab4], seeded_noise([3], gmm.shape), torch.tensor([2]), 1.5, ids=["c"])
    done = {}
    while len(st):
        st.step()
        done.update(dict(st.pop_done()))
    assert set(done) == {"a", "b", "c"}
    torch.testing.assert_close(done["c"], sample(gmm, tab4, seeded_noise([3], gmm.shape), torch.tensor([2]), 1.5)[0],
                               rtol=0, atol=0)
    torch.testing.assert_close(done["a"], sample(gmm, tab7, seeded_noise([1], gmm.shape), torch.tensor([0]), 2.0)[0],
                               rtol=0, atol=0)


def test_secant_models_receive_the_landing_time():
    seen = []

    class Secant:
        schedule, param, num_classes, shape = FlowSchedule(t_min=0.0, t_max=1.0), "flow", 2, (4,)

        def __call__(self, x, t, s, label):
            seen.append((t.tolist(), s.tolist()))
            return torch.zeros_like(x)

    tab = make_table("euler", Secant.schedule, "flow", 4)
    sample(Secant(), tab, torch.zeros(2, 4), torch.tensor([0, 1]))
    assert [t[0] for t, _ in seen] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [s[0] for _, s in seen] == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_euler_on_a_constant_velocity_is_exact():
    class Const:
        schedule, param, num_classes, shape = FlowSchedule(), "flow", 1, (3,)

        def __call__(self, x, t, s, label):
            return torch.ones_like(x) * torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)

    tab = make_table("euler", Const.schedule, "flow", 5)
    y = sample(Const(), tab, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0]))
    dt = Const.schedule.t_min - Const.schedule.t_max
    torch.testing.assert_close(y[0], dt * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))


def test_table_json_round_trip_and_refusals(gmm):
    tab = make_table("dpmpp-3m", gmm.schedule, "eps", 9)
    back = Table.from_json(tab.to_json())
    for k in ("tau", "s", "hx", "hd", "c", "b"):
        assert torch.equal(getattr(back, k), getattr(tab, k))
    with pytest.raises(ValueError, match="format"):
        Table.from_json({**tab.to_json(), "format": "stride.table/0"})
    with pytest.raises(ValueError, match="b\\[k, j\\] must be 0"):
        Table([1.0, 0.5], [0.5, 0.0], [0, 0], [1, 1], [1, 1], [[1.0, 1.0], [1.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        Table([1.0], [0.0], [0], [1], [float("nan")], [[1.0]], 1.0)
    with pytest.raises(ValueError, match="allowed"):
        make_table("rk45", gmm.schedule, "eps", 4)


def test_window_too_small_is_refused(gmm):
    st = Stepper(gmm, window=1)
    with pytest.raises(ValueError, match="window"):
        st.add([make_table("dpmpp-3m", gmm.schedule, "eps", 9)], seeded_noise([0], gmm.shape), [0], 1.0)


def test_mixture_modes_are_reached_with_their_weights():
    """Multi-modal check: 16-step UniPC samples of a 2-component class land on both components in
    proportion to their weights (0.25 / 0.75), and never on another class's components."""
    s = VPLinearSchedule()
    means = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]], dtype=torch.float64)
    m = GaussianMixture(s, "eps", means, 0.3, [0, 0, 1, 1], weights=[1.0, 3.0, 1.0, 1.0])
    n = 800
    y = sample(m, make_table("unipc", s, "eps", 16), seeded_noise(range(n), m.shape, dtype=torch.float64),
               torch.zeros(n, dtype=torch.long))
    comp = torch.cdist(y, means).argmin(1)
    assert (comp <= 1).all()
    frac = (comp == 0).double().mean().item()
    assert abs(frac - 0.25) < 0.05  # 3.5 binomial standard deviations

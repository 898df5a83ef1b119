"""`solver=pipeline` against diffusers' own scheduler loop: each scheduler config as diffusers saves
it (save_pretrained, read back as the importer records it), stepped by `set_timesteps(n)` +
`step(...)` on a fixed analytic denoiser, and stride's pipeline table from the same noise, agree
within 1e-5 of the sample's scale at several step counts."""
import json
import math

import numpy as np
import pytest
import torch
from tiny_models import dit_pipeline

from stride_diffusion.offline.importer import import_diffusers
from stride_diffusion.solvers import VPSchedule, sample
from stride_diffusion.solvers.adapters import discrete_index
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.grids import make_grid, spaced_timesteps
from stride_diffusion.solvers.samplers import load_samplers
from stride_diffusion.solvers.samplers.pipeline import check_scheduler, scheduler_table

diffusers = pytest.importorskip("diffusers")
N = 1000
SHAPE = (3, 4, 4)


class Analytic:
    """A smooth nonlinear eps / v / x0 'network' of (x, timestep index), the same for both loops."""

    num_classes, shape = 10, SHAPE

    def __init__(self, schedule, param="eps"):
        self.schedule, self.param = schedule, param
        g = torch.Generator().manual_seed(5)
        self.w = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5

    def index_out(self, x, i):
        i = torch.as_tensor(i, dtype=torch.float64).reshape(-1, *[1] * len(SHAPE))
        x = x.double()
        return torch.tanh(x * self.w) * torch.cos(i / 300) + 0.3 * x * torch.sin(i / 500) + 0.1 * self.w

    def __call__(self, x, t, s, label):
        return self.index_out(x.reshape(-1, *SHAPE), discrete_index(torch.as_tensor(t).reshape(-1), N)).to(x.dtype)


def saved(tmp_path, cls, **cfg):
    """A scheduler as save_pretrained writes it, and the config as the importer stores it."""
    sch = getattr(diffusers, cls)(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **cfg)
    sch.save_pretrained(tmp_path / "scheduler")
    cfg = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    return getattr(diffusers, cls).from_pretrained(tmp_path / "scheduler"), cfg


def diffusers_loop(sch, model, noise, n):
    sch.set_timesteps(n)
    x = noise.float() * sch.init_noise_sigma
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        out = model.index_out(inp, float(t)).float()
        x = sch.step(out, t, x).prev_sample
    return x.double()


CASES = {  # (class, config): the defaults and the options a user's folder carries
    "ddim-leading-offset1": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "ddim-trailing-alpha1": ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    "ddim-linspace": ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "linspace"}),
    "dpm2m-zero": ("DPMSolverMultistepScheduler", {}),
    "dpm2m-sigma_min-leading-offset1": ("DPMSolverMultistepScheduler", {
        "final_sigmas_type": "sigma_min", "timestep_spacing": "leading", "steps_offset": 1}),
    "dpm2m-trailing-no-lof": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing",
                                                              "lower_order_final": False}),
    "dpm2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm3m-sigma_min": ("DPMSolverMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    "dpm3m-karras-zero": ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    "unipc-bh2": ("UniPCMultistepScheduler", {}),
    "unipc-bh1-sigma_min": ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "unipc3-karras-trailing": ("UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True,
                                                           "timestep_spacing": "trailing"}),
    "unipc-no-corrector-2": ("UniPCMultistepScheduler", {"disable_corrector": [2]}),
    "euler-linspace": ("EulerDiscreteScheduler", {}),
    "euler-leading-offset1-sigma_min": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1,
                                                                   "final_sigmas_type": "sigma_min"}),
    "euler-karras-trailing": ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("param", ["eps", "v"])
def test_pipeline_table_matches_the_schedulers_loop(tmp_path, case, param):
    cls, cfg = CASES[case]
    pt = {"eps": "epsilon", "v": "v_prediction"}[param]
    sch, saved_cfg = saved(tmp_path, cls, prediction_type=pt, **cfg)
    assert check_scheduler(saved_cfg) == ([], [])
    model = Analytic(VPSchedule(), param)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (3, 4, 7, 10):
        ref = diffusers_loop(sch, model, noise, n)
        tab = scheduler_table(saved_cfg, model.schedule, param, n)
        assert tab.nfe == n
        got = sample(model, tab, noise, torch.zeros(2, dtype=torch.long))
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, (case, n, err)


def test_the_final_noise_level_and_offset_are_not_dropped():
    """The cases above would agree without the final-step rule or steps_offset only by accident:
    the tables differ from the ones with the rule flipped."""
    s = VPSchedule()
    base = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}
    zero = scheduler_table({**base, "final_sigmas_type": "zero"}, s, "eps", 7)
    smin = scheduler_table({**base, "final_sigmas_type": "sigma_min"}, s, "eps", 7)
    assert zero.c[-1] == 0 and smin.c[-1] > 0
    lead = {**base, "timestep_spacing": "leading"}
    assert scheduler_table({**lead, "steps_offset": 1}, s, "eps", 7).meta["timesteps"] == \
        [t + 1 for t in scheduler_table(lead, s, "eps", 7).meta["timesteps"]]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_named_diffusers_grids_are_the_multistep_schedulers_timesteps(spacing):
    s = VPSchedule()
    sch = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, final_sigmas_type="sigma_min")
    for n in (4, 7, 9):
        sch.set_timesteps(n)
        g = make_grid(spacing, s, n)
        assert [round(float(t) * N - 1) for t in g[:-1]] == sch.timesteps.tolist()
        assert float(g[-1]) == s.t_min  # lands on the chain's first step (final_sigmas_type='sigma_min')
    # integers where stride's uniform grid is fractional
    assert not np.allclose(spaced_timesteps("linspace", 7, N), (torch.linspace(1, 1 / N, 8)[:-1] * N - 1).numpy())


def test_refused_and_warned_options():
    errors, _ = check_scheduler({"_class_name": "DDIMScheduler", "clip_sample": True, "thresholding": True})
    assert len(errors) == 2 and "clip_sample=true" in errors[1] and "thresholding=true" in errors[0]
    errors, _ = check_scheduler({"_class_name": "DDIMScheduler"})  # diffusers' DDIM default clips
    assert errors and "clip_sample" in errors[0]
    _, warns = check_scheduler({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"})
    assert warns and "dpmsolver++" in warns[0] and "deterministic" in warns[0]
    _, warns = check_scheduler({"_class_name": "PNDMScheduler"})
    assert "no 'pipeline' sampler" in warns[0]
    _, warns = check_scheduler({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True})
    assert "use_exponential_sigmas=True" in warns[0]


def test_imported_dit_offers_pipeline_that_matches_dit_pipeline(tmp_path):
    """The whole path: a tiny DiT pipeline folder with UniPC (trailing), imported by the importer,
    served as `pipeline` by the sampler set, against DiTPipeline with the same noise."""
    sch = diffusers.UniPCMultistepScheduler(beta_schedule="linear", timestep_spacing="trailing")
    pipe = dit_pipeline(tmp_path / "pipe", num_classes=1000, scheduler=sch)
    art = load_artifact(import_diffusers(tmp_path / "pipe", tmp_path / "art"))
    meta = json.loads((tmp_path / "art" / "model.json").read_text())
    assert meta["data"]["source"]["scheduler"]["timestep_spacing"] == "trailing"
    assert meta["data"]["source"]["scheduler_class"] == "UniPCMultistepScheduler"
    ss = load_samplers(art)
    assert "pipeline" in ss.names() and ss["pipeline"].grid.startswith("UniPCMultistepScheduler: trailing")
    seen, decode = {}, pipe.vae.decode

    def spy(z, **kw):
        seen["z"] = z
        return decode(z, **kw)

    pipe.vae.decode = spy
    labels = [1, 7]
    pipe(labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
         output_type="pt")
    ref = seen["z"] * pipe.vae.config.scaling_factor
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    got = sample(art.model, ss["pipeline"].table(5), noise, torch.tensor(labels), 2.0)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert math.isfinite(float(got.abs().max()))


def test_diffusers_grid_names_are_offered_on_a_discrete_chain_only():
    from stride_diffusion.solvers import FlowSchedule
    from stride_diffusion.solvers.samplers import SolverError

    vp, flow = load_samplers(Analytic(VPSchedule())), load_samplers(Analytic(FlowSchedule(), "flow"))
    assert vp["unipc/trailing"].grid == "trailing" and vp["unipc"].grid == "karras"
    assert vp["unipc/trailing"].table(5).tau.tolist() == [(t + 1) / N for t in spaced_timesteps("trailing", 5, N)]
    with pytest.raises(SolverError, match="uniform\\|karras\\|logsnr\\)"):
        flow["unipc/trailing"]
    with pytest.raises(ValueError, match="discrete VP chain"):
        make_grid("trailing", FlowSchedule(), 5)

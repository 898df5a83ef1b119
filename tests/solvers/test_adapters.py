"""Adapters against diffusers' own samplers: the same tiny random networks, noise, classes, guidance
and time grid (the scheduler's timesteps) give the same final latents and decoded images, within
1e-4 in float32. This is the proof that time map, output handling, null class, CFG and the VAE
scaling are right (DESIGN section 8)."""
import pytest
import torch
from tiny_models import ddim, dit_pipeline, dpm, grid_from_scheduler, unet_pipeline

from stride_diffusion.offline.importer import import_diffusers
from stride_diffusion.solvers import sample
from stride_diffusion.solvers.adapters import discrete_index
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.builders import build

STEPS = 10
LABELS = [1, 7, 3]


def close(a, ref, tol=1e-4):
    """Within tol of the reference's scale: random networks' latents reach ~1e2 (their eps is no
    estimate of the noise, so x0 = (x - sigma eps) / alpha is large), where float32 resolves ~1e-5."""
    err = float((a - ref).abs().max() / ref.abs().max().clamp(min=1.0))
    print(f"scaled error {err:.2e} (scale {float(ref.abs().max()):.3g})")
    assert err < tol


def stride_run(art, solver, scheduler, noise, labels, w):
    """stride on the scheduler's grid from the same x_T: diffusers starts at unit noise, stride at
    sigma(t_max) * noise, so the noise is divided by that."""
    tab = build(solver, art.schedule, art.model.param, grid_from_scheduler(scheduler))
    lat = sample(art.model, tab, noise / tab.init, torch.tensor(labels), w)
    return lat, art.decoder.decode(lat)


@pytest.mark.parametrize("sched,solver", [(ddim, "ddim"), (dpm, "dpmpp-2m")])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_dit_matches_dit_pipeline(tmp_path, sched, solver, w):
    # DiTPipeline's null class is hard-wired to 1000 (ImageNet): a 1000-class tiny DiT
    pipe = dit_pipeline(tmp_path / "pipe", num_classes=1000, scheduler=sched())
    art = load_artifact(import_diffusers(tmp_path / "pipe", tmp_path / "art"))
    seen, decode = {}, pipe.vae.decode

    def spy(z, **kw):  # the pipeline's final latents, as it hands them to the VAE
        seen["z"] = z
        return decode(z, **kw)

    pipe.vae.decode = spy
    g = torch.Generator().manual_seed(0)
    images = pipe(LABELS, guidance_scale=w, generator=g, num_inference_steps=STEPS, output_type="pt").images
    ref_lat = seen["z"] * pipe.vae.config.scaling_factor
    noise = torch.randn((len(LABELS), 4, 8, 8), generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(STEPS)
    lat, img = stride_run(art, solver, pipe.scheduler, noise, LABELS, w)
    assert ref_lat.abs().max() > 0.1  # not a trivially small comparison
    close(lat, ref_lat)
    close(img * 0.5 + 0.5, images)


def unet_reference(unet, scheduler, noise, labels, w, null):
    """A class-conditional UNet2DModel through a diffusers scheduler, CFG as DiTPipeline does it."""
    x = noise.clone()
    lab = torch.tensor(labels)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if w != 1:
                out = unet(torch.cat([x, x]), t, class_labels=torch.cat([lab, torch.full_like(lab, null)])).sample
                c, u = out.chunk(2)
                out = u + w * (c - u)
            else:
                out = unet(x, t, class_labels=lab).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


@pytest.mark.parametrize("sched,solver", [(ddim, "ddim"), (dpm, "dpmpp-2m")])
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_unet_matches_diffusers_scheduler(tmp_path, sched, solver, w):
    # Stable Diffusion's betas and v-prediction: exercises the scheduler-config import, not only DiT's
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}
    pipe = unet_pipeline(tmp_path / "pipe", scheduler=sched(**kw))
    art = load_artifact(import_diffusers(tmp_path / "pipe", tmp_path / "art"))
    assert art.model.param == "v" and art.model.num_classes == 10 and art.model.null_class == 10
    noise = torch.randn((len(LABELS), 3, 8, 8), generator=torch.Generator().manual_seed(1))
    pipe.scheduler.set_timesteps(STEPS)
    ref = unet_reference(pipe.unet, pipe.scheduler, noise, LABELS, w, null=10)
    lat, img = stride_run(art, solver, pipe.scheduler, noise, LABELS, w)
    assert ref.abs().max() > 0.1
    close(lat, ref)
    assert torch.equal(img, lat.clamp(-1, 1))  # pixel model: the identity decoder


def test_discrete_index_snaps_float32_times_to_the_schedulers_integers():
    i = torch.arange(1000, dtype=torch.float64)
    t32 = ((i + 1) / 1000).float()  # what the executor passes: the times in float32
    assert torch.equal(discrete_index(t32, 1000), i.float())
    half = discrete_index(torch.tensor([0.5005]), 1000)  # between steps: fractional, not snapped
    torch.testing.assert_close(half, torch.tensor([499.5]))


def test_reduced_precision_keeps_float32_outputs(tmp_path):
    dit_pipeline(tmp_path / "pipe")
    art = import_diffusers(tmp_path / "pipe", tmp_path / "art")
    full, half = load_artifact(art), load_artifact(art, dtype="bf16")
    assert next(half.model.net.parameters()).dtype == torch.bfloat16 and half.model.dtype == "bfloat16"
    assert next(half.decoder.vae.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, lab = torch.tensor([0.5, 0.3]), torch.tensor([1, 10])
    a, b = full.model(x, t, None, lab), half.model(x, t, None, lab)
    assert b.dtype == torch.float32 and half.decoder.decode(x).dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05  # bf16 rounding, not a different network


def test_null_class_maps_to_the_networks_index(tmp_path):
    # a UNet whose null embedding is row 0: stride's null row (num_classes) must reach the network as 0
    pipe = unet_pipeline(tmp_path / "pipe")
    art = load_artifact(import_diffusers(tmp_path / "pipe", tmp_path / "art", null_class=0))
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4])
    with torch.no_grad():
        want = pipe.unet(x, discrete_index(t, 1000), class_labels=torch.tensor([0])).sample
    torch.testing.assert_close(art.model(x, t, None, torch.tensor([10])), want)


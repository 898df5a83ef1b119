"""Imported pipelines: the folder's own scheduler (`pipeline`) against stride's samplers, as RMSE to
the converged teacher at NFE 4-10 (same noise and classes; teacher: dpmpp-2m on 500 uniform steps).

    python benchmarks/pipeline_grids.py                       # tiny random DiT folders, one per scheduler
    python benchmarks/pipeline_grids.py --artifact artifacts/digits-vp   # a trained VP artifact

Tiny DiT: diffusers' DiTTransformer2DModel (2 layers, 8x8x4 latents, random weights) saved with
each scheduler as a DiTPipeline folder and imported by `stride offline import diffusers`. Its RMSE
is relative to the teacher's RMS (random networks' latents are large); the artifact's is plain.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from stride_diffusion.solvers import make_table, sample
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.samplers import load_samplers

NFES = (4, 5, 6, 7, 8, 10)
STRIDE = ("ddim", "dpmpp-2m", "unipc")  # on stride's default grids
NAMED = ("dpmpp-2m/linspace", "dpmpp-2m/trailing", "unipc/linspace", "unipc/trailing")


def tiny_dit_folder(path: Path, scheduler):
    import diffusers
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1).eval()
    diffusers.DiTPipeline(transformer=net, vae=vae, scheduler=scheduler).save_pretrained(path)


def folders():
    import diffusers
    betas = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    return {
        "DPMSolverMultistep (defaults)": diffusers.DPMSolverMultistepScheduler(**betas),
        "UniPCMultistep (defaults)": diffusers.UniPCMultistepScheduler(**betas),
        "DDIM (leading, clip_sample off)": diffusers.DDIMScheduler(**betas, clip_sample=False),
    }


def measure(art, names, samples: int, guidance: float, relative: bool) -> dict:
    ss = load_samplers(art)
    m = art.model
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((samples, *m.shape), generator=g, dtype=torch.float64)
    labels = torch.arange(samples) % m.num_classes
    with torch.no_grad():
        ref = sample(m, make_table("dpmpp-2m/uniform", m.schedule, m.param, 500), noise, labels, guidance)
        scale = float(ref.pow(2).mean().sqrt()) if relative else 1.0
        out = {}
        for name in names:
            out[name] = {n: float((sample(m, ss[name].table(n), noise, labels, guidance) - ref).pow(2).mean().sqrt())
                         / scale for n in NFES}
    return out


def table(title: str, res: dict, grids: dict) -> str:
    lines = [f"**{title}**", "", "| sampler | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|---|" + "---|" * len(NFES)]
    for name, row in res.items():
        lines.append(f"| `{name}` | {grids[name]} | " + " | ".join(f"{row[n]:.4f}" for n in NFES) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=None, help="a VP artifact instead of the tiny DiT folders")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=1.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.artifact:
        art = load_artifact(a.artifact)
        ss = load_samplers(art)
        names = [*STRIDE, *NAMED]
        print(table(a.artifact, measure(art, names, a.samples, a.guidance, False), {n: ss[n].grid for n in names}))
        return
    from stride_diffusion.offline.importer import import_diffusers
    with tempfile.TemporaryDirectory() as d:
        for title, sch in folders().items():
            src, out = Path(d) / title.split()[0], Path(d) / (title.split()[0] + "-art")
            tiny_dit_folder(src, sch)
            art = load_artifact(import_diffusers(src, out))
            ss = load_samplers(art)
            names = ["pipeline", *STRIDE, *NAMED]
            res = measure(art, names, a.samples, a.guidance, True)
            print(table(f"tiny DiT, {title}", res, {n: ss[n].grid for n in names}), "\n")


if __name__ == "__main__":
    main()

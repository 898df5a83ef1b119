"""The tiny decoder's quality cost: RMSE and PSNR of its images against the full VAE's, on the same
latents, and the time of each.

The latents are the model's own samples (the served sampler for `--steps`, the model's default
guidance, classes drawn in turn, seeds 0..n-1), so the comparison is on what the service decodes.
Images in [0, 1] (as the service quantises them): RMSE over every pixel and channel, PSNR = 20
log10(1 / RMSE), both per image, reported as mean and worst. Time: ms per image of each decoder at
`--batch`, in the artifact's dtype (or --dtype), on --device.

With real weights (an artifact imported with `--tiny-decoder`, e.g. DiT-XL/2 + the SD VAE +
madebyollin/taesd) the numbers are the cost of decoder=tiny:

    stride offline import diffusers DiT-XL-2-256 --name dit-xl --tiny-decoder taesd/
    python benchmarks/tiny_decoder.py --artifact artifacts/dit-xl --device cuda --out benchmarks/results/tiny_decoder.md

`--tiny` builds a tiny random-weight pair to exercise the script: its numbers mean nothing (two
random decoders agree on nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import publish  # benchmarks/report.py

from stride_diffusion.service.models import ModelEntry
from stride_diffusion.solvers import sample, seeded_noise


def tiny_artifact(tmp: str) -> str:
    """A tiny DiT pipeline with a tiny VAE and a tiny AutoencoderTiny, imported (random weights)."""
    import diffusers

    from stride_diffusion.offline.importer import import_diffusers

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_num_groups=4)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  layers_per_block=1)
    taesd = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                      num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    sched = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=sched).save_pretrained(os.path.join(tmp, "pipe"))
    taesd.save_pretrained(os.path.join(tmp, "taesd"))
    return str(import_diffusers(os.path.join(tmp, "pipe"), os.path.join(tmp, "art"),
                                tiny_decoder=os.path.join(tmp, "taesd")))


def timed(dec, z, device, reps: int) -> float:
    dec.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dec.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / reps / z.shape[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", help="an artifact imported with --tiny-decoder")
    ap.add_argument("--tiny", action="store_true", help="a tiny random-weight artifact (the script's smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="network and decoders (default: the artifact's)")
    ap.add_argument("--n", type=int, default=64, help="images")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="images per sampling and decoding call")
    ap.add_argument("--reps", type=int, default=5, help="timed decode calls per decoder")
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    if not a.artifact and not a.tiny:
        ap.error("give --artifact DIR (imported with --tiny-decoder) or --tiny")
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="stride-tiny-decoder-") as tmp:
        path = a.artifact or tiny_artifact(tmp)
        e = ModelEntry.from_artifact(path, a.device, a.dtype, steps=[a.steps])
        if e.tiny_decoder is None:
            raise SystemExit(f"{path} has no tiny decoder: import it with --tiny-decoder DIR")
        s, _ = e.samplers.best(a.steps)
        table, w = s.table(a.steps), e.default_guidance
        rmse, psnr, lat = [], [], []
        with torch.inference_mode():
            for i in range(0, a.n, a.batch):
                seeds = list(range(i, min(a.n, i + a.batch)))
                labels = torch.tensor([k % e.num_classes for k in seeds], device=device)
                z = sample(e.model, table, seeded_noise(seeds, e.shape, device=device), labels, w)
                lat.append(z)
                full = (e.decoder.decode(z).float() + 1) / 2
                tiny = (e.tiny_decoder.decode(z).float() + 1) / 2
                err = ((full - tiny) ** 2).flatten(1).mean(1).sqrt()
                rmse += err.tolist()
                psnr += [20 * math.log10(1 / max(v, 1e-12)) for v in err.tolist()]
            z = torch.cat(lat)[: a.batch]
            ms = {k: 1e3 * timed(dec, z, device, a.reps) for k, dec in (("vae", e.decoder), ("tiny", e.tiny_decoder))}
    report = {"artifact": "tiny random-weight pair (numbers mean nothing)" if a.tiny else path, "device": str(device),
              "dtype": e.decoder.dtype, "sampler": s.name, "steps": a.steps, "guidance": w, "n": len(rmse),
              "rmse_mean": statistics.fmean(rmse), "rmse_worst": max(rmse), "psnr_mean_db": statistics.fmean(psnr),
              "psnr_worst_db": min(psnr), "ms_per_image": ms, "batch": min(a.batch, a.n),
              "image_shape": list(e.decoder.image_shape)}
    text = "\n".join([
        "# Tiny decoder (AutoencoderTiny) against the full VAE, same latents", "",
        f"- artifact: {report['artifact']}; {report['n']} images {'x'.join(map(str, report['image_shape']))}, "
        f"{s.name} at {a.steps} steps, guidance {w:g}; {report['dtype']} on {device}", "",
        "| decoder | ms/image (batch " + str(report["batch"]) + ") | RMSE vs vae, mean / worst | PSNR dB, mean / worst |",
        "|---|---:|---:|---:|",
        f"| vae | {ms['vae']:.2f} | - | - |",
        f"| tiny | {ms['tiny']:.2f} | {report['rmse_mean']:.4f} / {report['rmse_worst']:.4f} | "
        f"{report['psnr_mean_db']:.1f} / {report['psnr_worst_db']:.1f} |", "",
        "Images in [0, 1]; PSNR = 20 log10(1 / RMSE) per image.", ""])
    publish(text, report, a.out)
    return report


if __name__ == "__main__":
    main()

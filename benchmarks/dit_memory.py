"""Memory of DiT-XL/2 + the SD VAE in stride, from the real configs (random weights, no download).

    python benchmarks/dit_memory.py --out benchmarks/results/dit_memory_cpu.md

Parameter counts are exact (the diffusers classes built on the meta device with facebook/DiT-XL-2-256's
transformer/ and vae/ configs). Activation memory is measured as the peak resident-set growth of a
fresh process over its loaded weights, per call, on the CPU in float32:
  - a no-grad forward (sampling; CFG rows count as rows),
  - a forward + backward to the input through frozen weights (what `stride offline search` keeps per
    unrolled evaluation),
  - a forward + backward into the weights (one graph-carrying call of `stride offline secant`),
  - the VAE decode of 32x32x4 latents to 256x256 RGB.
On a GPU the allocator and fused attention differ; take these as the order of magnitude per row.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

DIT = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
       "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero"}
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
       "layers_per_block": 2, "latent_channels": 4, "sample_size": 256}


def counts() -> dict:
    import diffusers
    import torch

    with torch.device("meta"):
        dit, vae = diffusers.DiTTransformer2DModel(**DIT), diffusers.AutoencoderKL(**VAE)
    def n(m):
        return sum(p.numel() for p in m.parameters())
    emb = n(dit.transformer_blocks[0].norm1.emb)
    D = dit.inner_dim
    return {"dit_diffusers": n(dit), "dit_embedder_per_block": emb, "dit_unique": n(dit) - (DIT["num_layers"] - 1) * emb,
            "vae": n(vae), "vae_decoder": n(vae.decoder) + n(vae.post_quant_conv),
            "secant_extra": 2 * (256 * D + D + D * D + D) + D}  # temb2 + wemb (TimestepEmbedding) + gate


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(what: str, batch: int) -> None:
    """One measurement in this (fresh) process; prints json."""
    import diffusers
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if what == "vae_decode":
        net = diffusers.AutoencoderKL(**VAE).eval().requires_grad_(False)
        x = torch.randn(batch, 4, 32, 32)
    else:
        net = diffusers.DiTTransformer2DModel(**DIT).eval().requires_grad_(what == "dit_train")
        x = torch.randn(batch, 4, 32, 32, requires_grad=what == "dit_grad_input")
    t, y = torch.full((batch,), 500.0), torch.zeros(batch, dtype=torch.long)
    base = rss_mb()
    t0 = time.time()
    if what == "vae_decode":
        with torch.no_grad():
            net.decode(x)
    elif what == "dit_forward":
        with torch.no_grad():
            net(x, t, class_labels=y)
    else:
        net(x, t, class_labels=y).sample.square().mean().backward()
    print(json.dumps({"what": what, "batch": batch, "peak_over_weights_mb": round(rss_mb() - base, 1),
                      "seconds": round(time.time() - t0, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]))
    import torch

    c = counts()
    runs = []
    for what, batches in (("dit_forward", (1, 4)), ("dit_grad_input", (1, 2)), ("dit_train", (1, 2)),
                          ("vae_decode", (1, 2))):
        for b in batches:
            out = subprocess.run([sys.executable, __file__, "--child", what, str(b)], check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(runs[-1], file=sys.stderr)
    per_row = {}
    for what in ("dit_forward", "dit_grad_input", "dit_train", "vae_decode"):
        (b1, m1), (b2, m2) = [(r["batch"], r["peak_over_weights_mb"]) for r in runs if r["what"] == what]
        per_row[what] = round((m2 - m1) / (b2 - b1), 1)  # the slope: fixed workspace cancels
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "params": c, "runs": runs, "per_row_mb": per_row}
    md = [f"# DiT-XL/2 + SD VAE memory ({res['date']}, {res['machine']}, torch {res['torch']}, CPU float32)", "",
          "| network | parameters | fp32 | bf16 |", "|---|---:|---:|---:|"]
    for k, label in (("dit_diffusers", "DiT-XL/2, diffusers layout (embedder copied into each of 28 blocks)"),
                     ("dit_unique", "DiT-XL/2, one embedder (the paper's 675M)"),
                     ("vae", "SD VAE (AutoencoderKL), whole"), ("vae_decoder", "SD VAE, decoder half"),
                     ("secant_extra", "secant DiT's added end-time / guidance embeddings")):
        md.append(f"| {label} | {c[k]:,} | {c[k] * 4 / 2**30:.2f} GiB | {c[k] * 2 / 2**30:.2f} GiB |")
    md += ["", "| call | batch | peak RSS over weights (MiB) | seconds |", "|---|---:|---:|---:|"]
    md += [f"| {r['what']} | {r['batch']} | {r['peak_over_weights_mb']} | {r['seconds']} |" for r in runs]
    md += ["", "Per row (slope between the two batches, MiB): " +
           ", ".join(f"{k} {v}" for k, v in per_row.items()), ""]
    text = "\n".join(md)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
        with open(a.out.rsplit(".", 1)[0] + ".json", "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Tiny random networks of the real diffusers classes, saved as a user's folders would be."""
from __future__ import annotations

import torch

diffusers = __import__("pytest").importorskip("diffusers")


def tiny_dit(num_classes=10, channels=4, size=8, out_channels=None, seed=0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=out_channels or 2 * channels,
        num_layers=2, sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=4).eval()


def tiny_vae(latent_channels=4, seed=1):
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1).eval()


def tiny_taesd(latent_channels=4, seed=3):
    """An AutoencoderTiny (the TAESD layout) that upsamples 2x, like tiny_vae's decoder."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=latent_channels).eval()


def tiny_unet(num_class_embeds=11, channels=3, size=(8, 8), seed=2):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds).eval()


def ddim(**kw):
    """DDIM ending on the chain's first step (set_alpha_to_one=False: sigma > 0 there, as stride's VP)."""
    return diffusers.DDIMScheduler(**{"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                      "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, **kw})


def dpm(**kw):
    return diffusers.DPMSolverMultistepScheduler(**{"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                                    "final_sigmas_type": "sigma_min", **kw})


def dit_pipeline(path, num_classes=10, scheduler=None, seed=0):
    pipe = diffusers.DiTPipeline(transformer=tiny_dit(num_classes, seed=seed), vae=tiny_vae(), scheduler=scheduler or ddim())
    pipe.save_pretrained(path)
    return pipe


def unet_pipeline(path, scheduler=None, **kw):
    """A class-conditional pixel UNet saved as a DDPMPipeline folder (unet/ + scheduler/)."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(**kw), scheduler=scheduler or ddim())
    pipe.save_pretrained(path)
    return pipe


def grid_from_scheduler(scheduler, n_train=1000) -> torch.Tensor:
    """stride times of a diffusers scheduler's steps: index i sits at t = (i + 1) / n (VPSchedule), and
    the last step lands on the chain's first index (set_alpha_to_one=False / final_sigmas_type='sigma_min')."""
    ts = [int(t) for t in scheduler.timesteps]
    return torch.tensor([(i + 1) / n_train for i in ts] + [1 / n_train], dtype=torch.float64)


def diffusers_to_dit(sd: dict, depth: int) -> dict:
    """The inverse of the importer's key map, written independently: DiT repository layout."""
    b0 = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "t_embedder.mlp.0.weight": sd[b0 + "timestep_embedder.linear_1.weight"],
           "t_embedder.mlp.0.bias": sd[b0 + "timestep_embedder.linear_1.bias"],
           "t_embedder.mlp.2.weight": sd[b0 + "timestep_embedder.linear_2.weight"],
           "t_embedder.mlp.2.bias": sd[b0 + "timestep_embedder.linear_2.bias"],
           "y_embedder.embedding_table.weight": sd[b0 + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
           "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for i in range(depth):
        n, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([sd[f"{n}attn1.to_{c}.{p}"] for c in "qkv"])
            out[f"{b}attn.proj.{p}"] = sd[f"{n}attn1.to_out.0.{p}"]
            out[f"{b}mlp.fc1.{p}"] = sd[f"{n}ff.net.0.proj.{p}"]
            out[f"{b}mlp.fc2.{p}"] = sd[f"{n}ff.net.2.{p}"]
            out[f"{b}adaLN_modulation.1.{p}"] = sd[f"{n}norm1.linear.{p}"]
    return out


def sit_checkpoint(d, seed=3):
    """A tiny SiT as its authors save it: a DiT-layout .pt (one shared class embedder) in d/SiT-tiny.pt,
    with a tiny VAE folder in d/vae. The weights are perturbed: diffusers zero-initialises DiT's output
    layers, and a network that outputs zeros tests nothing."""
    net = tiny_dit(seed=seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.transformer_blocks[1].norm1.emb.load_state_dict(net.transformer_blocks[0].norm1.emb.state_dict())
    sd = diffusers_to_dit(net.state_dict(), 2)
    sd["pos_embed"] = net.pos_embed.pos_embed.clone()
    torch.save(sd, d / "SiT-tiny.pt")
    tiny_vae().save_pretrained(d / "vae")
    return d / "SiT-tiny.pt"

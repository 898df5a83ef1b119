"""Decoders: the stage between the sampler's last step and the image.

    decoder.decode(latents)  float32 [B, *model.shape] -> float32 [B, C_img, H, W] in [-1, 1]
    decoder.image_shape      (C_img, H, W), C_img 1 (grayscale) or 3 (RGB)

Identity for pixel models (the data range is mapped onto [-1, 1]); a VAE for latent models:
`vae.decode(z / scaling_factor + shift_factor)`, as diffusers' pipelines do (shift 0 when the VAE
has none: the Stable Diffusion VAE). The VAE may run in bfloat16 / float16; its output is float32.
"""
from __future__ import annotations

import torch

from .base import dtype_name, to_dtype


class IdentityDecoder:
    kind = "identity"

    def __init__(self, shape, data_range=(-1.0, 1.0)):
        self.image_shape = tuple(int(d) for d in shape)
        self.lo, self.hi = (float(v) for v in data_range)
        self.dtype = "float32"

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().reshape(x.shape[0], *self.image_shape)
        if (self.lo, self.hi) != (-1.0, 1.0):
            x = (x - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0
        return x.clamp(-1, 1)

    def to_json(self) -> dict:
        return {"kind": self.kind}


class VAEDecoder:
    """diffusers AutoencoderKL's decoder half."""

    kind = "vae"

    def __init__(self, vae, latent_shape, scaling_factor: float, shift_factor: float | None = None,
                 dtype: str = "float32"):
        self.vae, self.dtype = vae.eval().requires_grad_(False), dtype_name(dtype)
        to_dtype(self.vae, self.dtype)
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor or 0.0)
        _, h, w = latent_shape
        f = 2 ** (len(vae.config.block_out_channels) - 1)  # each down block but the last halves the size
        self.image_shape = (int(vae.config.out_channels), h * f, w * f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = z.to(device=p.device, dtype=torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(p.dtype)).sample.float().clamp(-1, 1)

    def to_json(self) -> dict:
        return {"kind": self.kind, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "dtype": self.dtype, "image_shape": list(self.image_shape)}

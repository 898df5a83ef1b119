"""Decoders: the stage between the sampler's last step and the image.

    decoder.decode(latents)  float32 [B, *model.shape] -> float32 [B, C_img, H, W] in [-1, 1]
    decoder.image_shape      (C_img, H, W), C_img 1 (grayscale) or 3 (RGB)

Identity for pixel models (the data range is mapped onto [-1, 1]); a VAE for latent models:
`vae.decode(z / scaling_factor + shift_factor)`, as diffusers' pipelines do (shift 0 when the VAE
has none: the Stable Diffusion VAE). The VAE may run in bfloat16 / float16; its output is float32.
A latent model may also carry a tiny decoder (`TinyDecoder`: diffusers' AutoencoderTiny, the TAESD
layout) beside its VAE, which a request selects with decoder=tiny: a fraction of the VAE's cost, at
a cost in quality (benchmarks/tiny_decoder.py measures it against the VAE on the same latents).

`optimize` (the worker calls it once, at load): channels_last weights and inputs (cuDNN's fast
layout for these convolutions on CUDA) and `torch.compile` of the decode, with the batch dimension
dynamic (one graph for batch 1, one for every batch >= 2: decoded batches vary with what finishes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
        f = self.upscale(vae.config)
        self.image_shape = (int(vae.config.out_channels), h * f, w * f)
        self.channels_last, self.compiled = False, None

    @staticmethod
    def upscale(config) -> int:
        return 2 ** (len(config.block_out_channels) - 1)  # each down block but the last halves the size

    def optimize(self, channels_last: bool = False, compile: bool = False, compile_mode: str = "default"):
        """channels_last weights and inputs; torch.compile of the decode (batch dimension dynamic)."""
        if channels_last:
            torch.nn.Module.to(self.vae, memory_format=torch.channels_last)
            self.channels_last = True
        if compile and self.compiled is None:
            from stride_diffusion.solvers.network import compile_fn

            self.compiled = compile_fn(self._decode, compile_mode, shapes=2, dynamic=None)
        return self

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, return_dict=False)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        p = next(self.vae.parameters())
        z = (z.to(device=p.device, dtype=torch.float32) / self.scaling_factor + self.shift_factor).to(p.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None:
            torch._dynamo.maybe_mark_dynamic(z, 0)  # one graph for every batch >= 2
            return self.compiled(z).float().clamp(-1, 1)
        return self._decode(z).float().clamp(-1, 1)

    def to_json(self) -> dict:
        return {"kind": self.kind, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "dtype": self.dtype, "image_shape": list(self.image_shape)}


class TinyDecoder(VAEDecoder):
    """diffusers AutoencoderTiny's decoder half (TAESD): decodes the diffusion latents as they are
    (its scaling factor is 1; diffusers' pipelines divide by it all the same, and so does this)."""

    kind = "tiny"

    @staticmethod
    def upscale(config) -> int:
        return int(config.upsampling_scaling_factor) ** (len(config.num_decoder_blocks) - 1)


FIT_SIDE = 32  # latents decoded per side when fitting the linear map (a latent 256x256 image at factor 8)


@torch.no_grad()
def fit_latent_rgb(decoder, latent_shape, count: int = 2, seed: int = 0) -> dict:
    """A linear latent -> RGB map for previews, fitted once per VAE: decode `count` standard normal
    latents (the model's latent scale; at most FIT_SIDE a side), average-pool the images to the
    latents' size, and solve least squares [z, 1] @ [W; b] = rgb. Returns the decoder record's
    'preview' entry (images in [-1, 1]) with the fit's RMS error."""
    C = latent_shape[0]
    h, w = min(latent_shape[1], FIT_SIDE), min(latent_shape[2], FIT_SIDE)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(count, C, h, w, generator=g)
    img = decoder.decode(z).float().cpu()
    img = F.adaptive_avg_pool2d(img, (h, w))
    X = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(count * h * w, 1)], 1).double()
    Y = img.permute(0, 2, 3, 1).reshape(-1, img.shape[1]).double()
    sol = torch.linalg.lstsq(X, Y).solution
    rms = float((X @ sol - Y).pow(2).mean().sqrt())
    return {"kind": "linear", "weight": [[round(float(v), 6) for v in r] for r in sol[:C]],
            "bias": [round(float(v), 6) for v in sol[C]], "fit_rms": round(rms, 4)}

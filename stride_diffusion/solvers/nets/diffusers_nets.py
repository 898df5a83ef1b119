"""Networks from diffusers (the optional `stride[diffusers]` extra), built from their config dicts.

diffusers is imported only when such an artifact is loaded, so stride's own models need nothing
beyond torch.
"""
from __future__ import annotations

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "UNet2DModel", "AutoencoderKL", "AutoencoderTiny")
PREFIX = "diffusers."


def build_diffusers(kind: str, config: dict):
    name = kind[len(PREFIX):]
    if name not in DIFFUSERS_CLASSES:
        raise ValueError(f"unknown diffusers architecture {kind!r}; allowed: "
                         f"{[PREFIX + c for c in DIFFUSERS_CLASSES]}")
    try:
        import diffusers
    except ImportError as e:
        raise ValueError(f"architecture {kind!r} needs diffusers: pip install 'stride[diffusers]'") from e
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, name).from_config(cfg)


def set_time_freq_shift(net, shift: float) -> None:
    """Set the frequency shift of every sinusoidal timestep embedding in `net`. diffusers' DiT uses
    exp(-log(10000) i / (half - 1)) (shift 1); the DiT repository's checkpoints were trained with
    exp(-log(10000) i / half) (shift 0)."""
    for m in net.modules():
        if type(m).__name__ == "Timesteps":
            m.downscale_freq_shift = shift

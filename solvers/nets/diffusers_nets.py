"""Networks from diffusers (the optional `stride[diffusers]` extra), built from their config dicts.

diffusers is imported only when such an artifact is loaded, so stride's own models need nothing
beyond torch.
"""
from __future__ import annotations

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "UNet2DModel", "AutoencoderKL")
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

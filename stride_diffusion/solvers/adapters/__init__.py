"""Adapters: networks trained elsewhere as stride's model, and decoders from latents to images.

In the spirit of k-diffusion's `external.py`: one small wrapper per convention, one contract out
(see `base.py` for the model contract, `decoders.py` for the decoder's). A new network convention
is one file here plus an entry in `ADAPTERS`; the executor, the service and the offline tools do
not change.

    kind     time map        adapter          networks
    stride   identity        StrideNet        stride's own (solvers.nets)
    dit      discrete        DiscreteIndex    DiT (diffusers DiTTransformer2DModel): index t * n - 1
    unet2d   discrete        DiscreteIndex    diffusers UNet2DModel with class embeddings
    sit      reversed-flow   ReversedFlow     SiT (on DiTTransformer2DModel): time 1 - t, minus its velocity

model.json's `adapter` section names the kind and its time map (checked against each other), the
null class, output channels, latent shape, decoder, dtype and class names; `ADAPTERS[kind]` wraps
the network.
"""
from .base import DTYPES, Adapter, dtype_name
from .decoders import IdentityDecoder, TinyDecoder, VAEDecoder
from .discrete import DiscreteIndex, discrete_index
from .reversed_flow import ReversedFlow
from .stride_net import StrideNet

ADAPTERS = {"stride": StrideNet, "dit": DiscreteIndex, "unet2d": DiscreteIndex, "sit": ReversedFlow}
TIME_MAPS = sorted({cls.time_map for cls in ADAPTERS.values()})


def adapter_class(kind: str, time_map: str | None = None):
    """The adapter of a network kind; ValueError naming the allowed ones, or when `time_map` is
    given and is not that kind's."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown network kind {kind!r}; allowed: {sorted(ADAPTERS)}")
    cls = ADAPTERS[kind]
    if time_map is not None and time_map != cls.time_map:
        raise ValueError(f"time map {time_map!r} is not the one of kind {kind!r} ({cls.time_map!r}); "
                         f"allowed time maps: {TIME_MAPS}")
    return cls


__all__ = [
    "ADAPTERS",
    "DTYPES",
    "TIME_MAPS",
    "Adapter",
    "DiscreteIndex",
    "IdentityDecoder",
    "ReversedFlow",
    "StrideNet",
    "TinyDecoder",
    "VAEDecoder",
    "adapter_class",
    "discrete_index",
    "dtype_name",
]

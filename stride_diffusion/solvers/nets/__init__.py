"""Networks that artifacts need, built from their config dicts by name."""
from .classifier import Classifier, classifier_config
from .diffusers_nets import PREFIX as DIFFUSERS_PREFIX
from .diffusers_nets import build_diffusers
from .unet import UNet, unet_config

ARCHITECTURES = {"unet": UNet, "classifier": Classifier}


def build_net(kind: str, config: dict):
    """stride's own nets by name; 'diffusers.<Class>' builds that diffusers class from its config."""
    if kind.startswith(DIFFUSERS_PREFIX):
        return build_diffusers(kind, config)
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {kind!r}; allowed: {sorted(ARCHITECTURES)} or diffusers.<Class>")
    return ARCHITECTURES[kind](config)


__all__ = ["ARCHITECTURES", "Classifier", "UNet", "build_net", "classifier_config", "unet_config"]

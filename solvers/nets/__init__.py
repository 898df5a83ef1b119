"""Networks that artifacts need, built from their config dicts by name."""
from .classifier import Classifier, classifier_config
from .unet import UNet, unet_config

ARCHITECTURES = {"unet": UNet, "classifier": Classifier}


def build_net(kind: str, config: dict):
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {kind!r}; allowed: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[kind](config)


__all__ = ["ARCHITECTURES", "Classifier", "UNet", "build_net", "classifier_config", "unet_config"]

"""A small CNN classifier whose penultimate features define the offline Fréchet distance."""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

DEFAULTS = {"in_channels": 1, "image_size": 16, "num_classes": 10,
            "channels": [32, 64, 128], "feature_dim": 64, "dropout": 0.2}


def classifier_config(cfg: dict | None = None) -> dict:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown classifier config keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    out["channels"] = [int(c) for c in out["channels"]]
    return out


class Classifier(nn.Module):
    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = cfg = classifier_config(config)
        layers, c = [], cfg["in_channels"]
        for i, co in enumerate(cfg["channels"]):
            layers += [nn.Conv2d(c, co, 3, padding=1), nn.BatchNorm2d(co), nn.SiLU()]
            if i < len(cfg["channels"]) - 1:
                layers.append(nn.MaxPool2d(2))
            c = co
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, cfg["feature_dim"])
        self.drop = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(cfg["feature_dim"], cfg["num_classes"])

    def features(self, x):
        """Penultimate features [B, feature_dim] (post-activation, pre-dropout)."""
        return F.silu(self.fc(self.body(x).mean((2, 3))))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))

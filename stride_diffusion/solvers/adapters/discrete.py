"""Networks trained on DDPM's discrete chain (DiT, diffusers UNet2DModel): time is the step index.

solvers.schedules.VPSchedule puts step i (0-based) at t = (i + 1) / n, so the index is t * n - 1.
Fractional indices go through the sinusoidal embedding unchanged (DPM-Solver's discrete wrapper
does the same). Times reach the adapter in float32, which cannot resolve an index better than
~1e-4 near t = 1, so an index within 1e-3 of an integer is snapped to it: a grid built from a
diffusers scheduler's integer timesteps then feeds the network exactly those integers.

Learned-sigma outputs (DiT: 2C channels, eps then variance) keep the first C channels.
"""
from __future__ import annotations

import torch

from .base import Adapter

SNAP = 1e-3


def discrete_index(t: torch.Tensor, n: int) -> torch.Tensor:
    i = t.double() * n - 1
    r = i.round()
    return torch.where((i - r).abs() < SNAP, r, i).float()


class DiscreteIndex(Adapter):
    time_map = "discrete"

    def __init__(self, net, schedule, param, shape, num_classes, **kw):
        if schedule.name != "vp":
            raise ValueError(f"time map 'discrete' needs the discrete VP schedule, got {schedule!r}")
        super().__init__(net, schedule, param, shape, num_classes, **kw)

    def forward(self, x, t, s, label):
        out = self.net(x, discrete_index(t, self.schedule.n), class_labels=label).sample
        return out[:, : self.shape[0]]

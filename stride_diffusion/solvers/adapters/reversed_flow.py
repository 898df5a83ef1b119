"""SiT: rectified flow with time running the other way (noise at 0, data at 1).

SiT's x_t = t' x1 + (1 - t') x0 with x1 data and x0 noise, and it predicts d x_t / d t' = x1 - x0.
In stride's flow convention x = (1 - t) data + t noise, so t' = 1 - t and stride's flow output
(noise - data) is minus SiT's velocity. Learned-sigma outputs keep the first C channels.
"""
from __future__ import annotations

from .base import Adapter


class ReversedFlow(Adapter):
    time_map = "reversed-flow"

    def __init__(self, net, schedule, param, shape, num_classes, **kw):
        if schedule.name != "flow" or param != "flow":
            raise ValueError(f"time map 'reversed-flow' needs the flow schedule and param, got {schedule!r}, {param!r}")
        super().__init__(net, schedule, param, shape, num_classes, **kw)

    def forward(self, x, t, s, label):
        out = self.net(x, 1 - t, class_labels=label).sample
        return -out[:, : self.shape[0]]

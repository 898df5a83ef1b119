"""stride's own networks (solvers.nets): they take stride time and the label directly."""
from __future__ import annotations

from .base import Adapter


class StrideNet(Adapter):
    time_map = "identity"

    def forward(self, x, t, s, label):
        return self.net(x, t, label, s)

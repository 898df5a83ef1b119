"""The adapter base: a network trained elsewhere as stride's model, and the one place where dtype
and shape are handled.

An adapter is a model in the sense of `solvers.contracts` (the contract is written there):
`model(x, t, s, label) -> out` with `schedule`, `param`, `num_classes`, `shape`, and
`guidance_input = False` (both CFG branches go into one call), `guidance_range = None`, `net` (the
wrapped network). On top of it an adapter carries `time_map` (its kind's time convention),
`null_class` (the network's own null index), `secant`, `sha256` (of the weights), `device` and
`dtype`. It maps the contract onto one network convention: its time variable, its output, its
null-class index and label dtype. The network may run in bfloat16 / float16 (`dtype`); the input is
cast to it and the output back to x's dtype, so solver state and coefficients never leave float32.
"""
from __future__ import annotations

import torch

from ..param import check_param
from ..schedules import Schedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def dtype_name(name: str) -> str:
    """'fp32' | 'bf16' | 'fp16' or the torch names -> the torch name; ValueError otherwise."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPE_ALIASES)} or {sorted(DTYPES)}")
    return name


def to_dtype(net, dtype: str) -> None:
    """Cast the weights (torch's own Module.to: diffusers' override warns about every cast)."""
    torch.nn.Module.to(net, DTYPES[dtype])


class Adapter:
    """Base adapter: subclasses define `forward(x, t, s, label)` on the network's own terms."""

    guidance_input = False
    guidance_range = None
    time_map = "identity"

    def __init__(self, net, schedule: Schedule, param: str, shape, num_classes: int, *, secant: bool = False,
                 sha256: str | None = None, null_class: int | None = None, dtype: str = "float32"):
        self.net, self.schedule, self.param = net, schedule, check_param(param)
        self.shape, self.num_classes = tuple(int(d) for d in shape), int(num_classes)
        self.null_class = self.num_classes if null_class is None else int(null_class)
        self.secant, self.sha256 = secant, sha256
        self.dtype = dtype_name(dtype)
        to_dtype(self.net, self.dtype)
        self.channels_last = False

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to_channels_last(self) -> Adapter:
        """NHWC weights and inputs: the layout in which oneDNN runs small convolutions fastest on the CPU."""
        if len(self.shape) == 3:
            self.net.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    def labels(self, label) -> torch.Tensor:
        """stride's null row (num_classes) -> the network's own null index."""
        lab = torch.as_tensor(label, device=self.device).long()
        if self.null_class != self.num_classes:
            lab = torch.where(lab == self.num_classes, torch.full_like(lab, self.null_class), lab)
        return lab

    def forward(self, x, t, s, label):
        raise NotImplementedError

    def __call__(self, x, t, s, label):
        B = x.shape[0]
        dev = self.device
        t = torch.as_tensor(t, device=dev).to(torch.float32).expand(B)
        s = torch.as_tensor(s, device=dev).to(torch.float32).expand(B) if self.secant else None
        x_in = x.reshape(B, *self.shape).to(DTYPES[self.dtype])
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        out = self.forward(x_in, t, s, self.labels(label))
        return out.to(x.dtype).reshape(x.shape)

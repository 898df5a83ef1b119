"""The model contract: what the executor calls, and what every model it runs provides.

A model (a `Denoiser`) is any callable

    model(x, t, s, label) -> out          guidance_input False (the default)
    model(x, t, s, label, w) -> out       guidance_input True

x      [B, *shape] (or [B, prod(shape)]) state in the Stepper's dtype (float32; float64 for reference
       runs); `out` has x's shape, and x's dtype or the network's own low precision
       (`solvers.network.Network`): the fused update reads it as is
t, s   [B] (or scalar) times on the model's schedule: t where the step starts, s where it ends
       (only secant models read s)
label  [B] int64 class indices; label == num_classes is the null class of classifier-free guidance
w      [B] guidance scales (guidance_input models only)

with the attributes

  schedule        solvers.schedules.Schedule: the time variable and the noise levels
  param           'eps' | 'x0' | 'v' | 'flow' (solvers.param): what `out` is
  num_classes     int: the real classes, 0..num_classes-1
  shape           tuple: one sample, (C, H, W) (H != W allowed) or (D,)

and these optional capabilities. A model without one has the default, which the helpers below
supply (the one place that knows them). stride's own models (the adapters, the analytic mixture,
the secant model, `Network`) define guidance_input, guidance_range and net explicitly, so code that
holds one of those may read them directly.

  guidance_input  bool, default False. True: the model takes the scale as `w`, and a guided step
                  costs one evaluation. False: the executor puts the conditional and the null-class
                  row of a guided sample into the same call (two rows per guided sample).
  guidance_range  (lo, hi) or None, default None: the scales a guidance_input model was trained on
                  (its network clamps outside them); None: any scale (classifier-free guidance).
  net             torch.nn.Module or None, default None: the weights. `Network` casts them to a lower
                  precision, and the model runs on their device.
  dtype           adapters only: the name (adapters.DTYPES) of the dtype an adapter casts its input
                  to; `Network` updates it when it casts `net` (Network's own `dtype` is the torch
                  dtype it runs in). Default None: the model takes x as it comes.

Adapters add their own attributes (`time_map`, `null_class`, `sha256`, `secant`, `device`): the
adapter contract in `solvers.adapters.base`, not the executor's.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .schedules import Schedule

REQUIRED = ("schedule", "param", "num_classes", "shape")


@runtime_checkable
class Denoiser(Protocol):
    """A model as the executor calls it (the module docstring is the contract); `w` is passed only
    to a model with guidance_input True."""

    schedule: Schedule
    param: str
    num_classes: int
    shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, label: torch.Tensor,
                 /, *w: torch.Tensor) -> torch.Tensor: ...


def check_model(model) -> None:
    """TypeError naming what a model lacks of the contract (its required attributes, callable)."""
    missing = [k for k in REQUIRED if not hasattr(model, k)]
    if missing or not callable(model):
        what = f"attributes {missing}" if missing else "__call__"
        raise TypeError(f"{type(model).__name__} is not a model: it lacks {what} (see solvers.contracts)")


# -- the optional capabilities, with their defaults ---------------------------------------------------

def guidance_input(model) -> bool:
    """True when the model takes the guidance scale as its fifth argument (default False)."""
    return bool(getattr(model, "guidance_input", False))


def guidance_range(model) -> tuple[float, float] | None:
    """The scales a guidance_input model was trained on; None for any other model (any scale)."""
    r = getattr(model, "guidance_range", None)
    return (float(r[0]), float(r[1])) if r is not None and guidance_input(model) else None


def network(model) -> torch.nn.Module | None:
    """The model's weights (default None: an analytic model, or a model that keeps them private)."""
    return getattr(model, "net", None)


def device_of(model, default="cpu") -> torch.device:
    """Where the model runs: its weights' device, or `default` for a model without weights."""
    net = network(model)
    p = next(net.parameters(), None) if net is not None else None
    return p.device if p is not None else torch.device(default)


def input_dtype(model) -> str | None:
    """The dtype name an adapter casts its input to (default None: the model takes x as it comes)."""
    d = getattr(model, "dtype", None)
    return d if isinstance(d, str) else None

"""Training data for an imported model: the teacher's own samples.

An artifact trained by stride records its data split (model.json `data.source`); an imported network
comes without its data. Secant distillation needs clean samples x0 only to place its start points
x_t = (1 - t) x0 + t eps on the teacher's distribution, so a pool of the teacher's converged samples
(classes balanced, unguided) stands in. Seeds 40_000_000 + i, disjoint from evaluation
(10_000_000 +), held-out selection (20_000_000 +) and D-ODE fitting (30_000_000 +).
"""
from __future__ import annotations

import sys

import torch

from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.contracts import device_of
from stride_diffusion.solvers.executor import sample, seeded_noise

POOL_SEED = 40_000_000


def has_data(meta: dict) -> bool:
    """Whether model.json names a data split stride can rebuild (offline.data.data_from_source)."""
    return "dataset" in (meta.get("data", {}).get("source") or {})


def teacher_pool(model, n: int, solver: str = "dpmpp-3m:32", batch: int = 64, seed0: int = POOL_SEED,
                 log=None):
    """(x0 [n, *shape], labels [n]) on the CPU: `solver` (name:nfe) from seeds seed0 + i, class i mod K."""
    log = sys.stderr if log is None else log  # per call: a test may swap sys.stderr
    name, nfe = solver.split(":") if ":" in solver else (solver, "")
    if not nfe.isdigit():
        raise ValueError(f"--pool-solver must be solver:nfe, e.g. dpmpp-3m:32, got {solver!r}")
    if n < 1:
        raise ValueError(f"--pool must be >= 1, got {n}")
    tab = make_table(name, model.schedule, model.param, int(nfe))
    dev = device_of(model)
    labels = torch.arange(n) % model.num_classes
    xs = []
    for i in range(0, n, batch):
        noise = seeded_noise(range(seed0 + i, seed0 + min(n, i + batch)), model.shape, device=dev)
        xs.append(sample(model, tab, noise, labels[i:i + batch].to(dev)).cpu())
        print(f"teacher pool {min(n, i + batch)}/{n} ({solver})", file=log, flush=True)
    return torch.cat(xs), labels

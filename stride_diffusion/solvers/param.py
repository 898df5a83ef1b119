"""Parameterisations of a network's output, and the exact linear maps between them.

With x = alpha * x0 + sigma * eps, every quantity a solver uses is `A * x + B * out` for scalars
(A, B) that depend on the parameterisation and on (alpha, sigma):

    eps   out = eps
    x0    out = x0
    v     out = alpha * eps - sigma * x0          (VP velocity; general form below)
    flow  out = eps - x0                          (rectified-flow velocity, SiT)
"""
from __future__ import annotations

PARAMS = ("eps", "x0", "v", "flow")
QUANTITIES = ("eps", "x0", "v", "flow", "velocity")


def check_param(p: str) -> str:
    if p not in PARAMS:
        raise ValueError(f"unknown parameterisation {p!r}; allowed: {list(PARAMS)}")
    return p


def to_x0_eps(param: str, alpha, sigma):
    """((A_x0, B_x0), (A_eps, B_eps)) with x0 = A_x0 x + B_x0 out and eps = A_eps x + B_eps out."""
    a, s = alpha, sigma
    if param == "eps":
        return (1 / a, -s / a), (0 * a, 1 + 0 * a)
    if param == "x0":
        return (0 * a, 1 + 0 * a), (1 / s, -a / s)
    if param == "v":
        n = a * a + s * s
        return (a / n, -s / n), (s / n, a / n)
    if param == "flow":
        n = a + s
        return (1 / n, -s / n), (1 / n, a / n)
    check_param(param)


def convert(param: str, target: str, alpha, sigma, dalpha=None, dsigma=None):
    """(A, B) with target = A * x + B * out. 'velocity' is dx/dt and needs (alpha', sigma')."""
    (ax, bx), (ae, be) = to_x0_eps(param, alpha, sigma)
    a, s = alpha, sigma
    if target == "x0":
        return ax, bx
    if target == "eps":
        return ae, be
    if target == "v":
        return a * ae - s * ax, a * be - s * bx
    if target == "flow":
        return ae - ax, be - bx
    if target == "velocity":
        if dalpha is None or dsigma is None:
            raise ValueError("target 'velocity' needs the schedule derivatives")
        return dalpha * ax + dsigma * ae, dalpha * bx + dsigma * be
    raise ValueError(f"unknown quantity {target!r}; allowed: {list(QUANTITIES)}")

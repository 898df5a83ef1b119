"""The imported folder's own scheduler as a sampler: `solver=pipeline` on an artifact imported from a
diffusers folder samples as that folder's scheduler does, at any step count.

model.json keeps the folder's scheduler config (data.source.scheduler). `scheduler_table` reads it
as diffusers does (the class's defaults for missing keys) and writes what the scheduler's
`set_timesteps(n)` + `step` loop computes as one stride table: the network is evaluated at the
scheduler's timesteps (i -> t = (i + 1) / N), and the coefficients use the scheduler's own noise
levels, final step included (sigma = 0 for final_sigmas_type 'zero' / set_alpha_to_one). Start
and end as diffusers' loop: y_0 = init_noise_sigma * noise in the model-input scale, and the
returned sample is the scheduler's state (Euler's is x / alpha).

    DDIMScheduler                  DDIM; its step lands on timestep - N // n, as diffusers' does
    DPMSolverMultistepScheduler    DPM-Solver++ 1-3M (midpoint), lower_order_final, euler_at_final,
                                   karras sigmas; the 3M term as published
    UniPCMultistepScheduler        UniPC bh1 / bh2, predictor-corrector, disable_corrector, karras
    EulerDiscreteScheduler         Euler in sigma (= DDIM on its noise levels), karras, fractional
                                   timesteps as it interpolates them

`check_scheduler` says which options cannot be honoured; the importer refuses or warns with it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..builders import Ctx, ddim, dpmpp, unipc
from ..grids import karras_sigmas, sigma_to_t, spaced_timesteps, train_abar
from ..schedules import F64
from ..table import Table
from .base import Sampler

# the keys stride reads, with diffusers' defaults (what from_pretrained fills in for a missing key)
DEFAULTS = {
    "DDIMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                      "clip_sample": True, "thresholding": False},
    "DPMSolverMultistepScheduler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "final_sigmas_type": "zero", "thresholding": False, "lambda_min_clipped": -math.inf},
    "UniPCMultistepScheduler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2, "solver_type": "bh2",
        "predict_x0": True, "lower_order_final": True, "disable_corrector": [], "use_karras_sigmas": False,
        "final_sigmas_type": "zero", "thresholding": False, "sigma_min": None, "sigma_max": None},
    "EulerDiscreteScheduler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "interpolation_type": "linear",
        "use_karras_sigmas": False, "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete"},
}
SCHEDULERS = tuple(DEFAULTS)
# sigma spacings and variants stride does not reproduce: (key, the value diffusers runs by default)
NOT_REPRODUCED = (("use_exponential_sigmas", False), ("use_beta_sigmas", False), ("use_lu_lambdas", False),
                  ("use_flow_sigmas", False), ("use_dynamic_shifting", False), ("solver_p", None),
                  ("interpolation_type", "linear"), ("timestep_type", "discrete"), ("predict_x0", True),
                  ("solver_type", None), ("lambda_min_clipped", -math.inf), ("shift_terminal", None))


def settings(cfg: dict) -> dict:
    """The folder's scheduler config with its class's defaults filled in."""
    return {**DEFAULTS[cfg["_class_name"]], **cfg}


def check_scheduler(cfg: dict | None) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for importing a folder with this scheduler config. Refused: per-step
    nonlinear clipping of x0, which no sampler of stride can do and which changes every sample
    where it acts. Warned, with what stride does instead: stochastic variants (their ODE
    counterpart), and schedulers or options `pipeline` does not reproduce (it is then not offered)."""
    if not cfg:
        return [], ["the folder has no scheduler/scheduler_config.json: stride uses DDPM's linear betas and "
                    "eps prediction, and offers no 'pipeline' sampler"]
    cls, errors, warns = cfg.get("_class_name"), [], []
    edit = "copy the folder (cp -rL) and set it to false in scheduler/scheduler_config.json to import without it"
    for key in ("thresholding", "clip_sample"):
        default = DEFAULTS.get(cls, {}).get(key, False)
        if cfg.get(key, default if cls in DEFAULTS else False):
            errors.append(f"scheduler option {key}=true: stride's samplers are linear in the network output and "
                          f"cannot {'threshold' if key == 'thresholding' else 'clip'} x0 at every step; {edit} "
                          "(samples then differ from the folder's pipeline wherever it would have clipped)")
    if cls not in DEFAULTS:
        warns.append(f"scheduler {cls}: stride does not reproduce it, so no 'pipeline' sampler is offered; "
                     f"reproduced: {list(SCHEDULERS)}. stride's own samplers (ddim, dpmpp-2m, unipc, ...) serve it, "
                     "and name/linspace|leading|trailing puts them on diffusers' timestep spacings")
        return errors, warns
    s = settings(cfg)
    if str(s.get("algorithm_type", "dpmsolver++")) != "dpmsolver++":
        warns.append(f"scheduler option algorithm_type={s['algorithm_type']!r}: stride's samplers are deterministic "
                     "ODE solvers; 'pipeline' runs 'dpmsolver++' (the data-prediction ODE solver) on the same grid "
                     "and order, so its samples differ from the folder's pipeline")
    off = _not_reproduced(cfg)
    if cls == "UniPCMultistepScheduler" and not s["lower_order_final"] and s["final_sigmas_type"] == "zero":
        warns.append("scheduler option lower_order_final=false with final_sigmas_type='zero': diffusers' last "
                     "UniPC step of order > 1 onto sigma = 0 multiplies 0 by infinity; 'pipeline' takes it first order")
    if off:
        warns.append(f"scheduler {cls} option {', '.join(off)}: not reproduced by stride, so no 'pipeline' sampler "
                     "is offered; stride's own samplers serve the model")
    return errors, warns


def _not_reproduced(cfg: dict) -> list[str]:
    """'key=value' of the options that keep `pipeline` from reproducing the scheduler: a NOT_REPRODUCED
    key away from diffusers' default, except the solver types stride has."""
    known = {("DPMSolverMultistepScheduler", "midpoint"), ("UniPCMultistepScheduler", "bh1"),
             ("UniPCMultistepScheduler", "bh2")}
    return [f"{k}={cfg[k]!r}" for k, v in NOT_REPRODUCED if k in cfg and cfg[k] != v
            and not (k == "solver_type" and (cfg.get("_class_name"), cfg[k]) in known)]


def reproduced(cfg: dict | None) -> bool:
    """Whether `pipeline` reproduces this scheduler config (SDE variants: by their ODE counterpart)."""
    return bool(cfg) and cfg.get("_class_name") in DEFAULTS and not check_scheduler(cfg)[0] \
        and not _not_reproduced(cfg)


def _alpha_sigma(ve_sigma):
    """VP (alpha, sigma) of a VE sigma, as diffusers' _sigma_to_alpha_sigma_t."""
    s = torch.as_tensor(np.asarray(ve_sigma, dtype=np.float64), dtype=F64)
    a = 1 / torch.sqrt(s ** 2 + 1)
    return a, s * a


def scheduler_table(cfg: dict, schedule, param: str, n: int) -> Table:
    """The table of the diffusers scheduler `cfg` (class `_class_name`) run for n steps."""
    if schedule.name != "vp":
        raise ValueError(f"a diffusers scheduler runs a discrete VP chain, not {schedule!r}")
    s, cls = settings(cfg), cfg["_class_name"]
    N = schedule.n
    abar = train_abar(schedule)
    train_sig = np.sqrt((1 - abar) / abar)
    spacing, offset = s["timestep_spacing"], int(s["steps_offset"] or 0)
    init, out_scale, land, kw = 1.0, 1.0, None, {}
    if cls == "DDIMScheduler":
        ts = spaced_timesteps(spacing, n, N, offset, "ddim").astype(np.int64)
        prev = ts - N // n
        final = 1.0 if s["set_alpha_to_one"] else float(abar[0])
        a_land = np.array([abar[p] if p >= 0 else final for p in prev])
        t_land = [(p + 1) / N if p >= 0 else (0.0 if s["set_alpha_to_one"] else 1 / N) for p in prev]
        alpha = torch.tensor([*np.sqrt(abar[ts]), math.sqrt(a_land[-1])], dtype=F64)
        sigma = torch.tensor([*np.sqrt(1 - abar[ts]), math.sqrt(1 - a_land[-1])], dtype=F64)
        land = (torch.tensor(np.sqrt(a_land)), torch.tensor(np.sqrt(1 - a_land)))
        grid = torch.tensor([*(ts + 1) / N, t_land[-1]], dtype=F64)
        build = ddim
    else:
        rule = "euler" if cls == "EulerDiscreteScheduler" else "multistep"
        ts = spaced_timesteps(spacing, n, N, offset, rule)
        sig = np.interp(ts, np.arange(N), train_sig)
        if s["use_karras_sigmas"]:
            if cls == "DPMSolverMultistepScheduler":  # the whole chain's range
                hi, lo = train_sig[-1], train_sig[0]
            else:  # the config's, else the spaced sigmas' ends
                hi = s["sigma_max"] if s["sigma_max"] is not None else (sig[0] if rule == "euler" else train_sig[-1])
                lo = s["sigma_min"] if s["sigma_min"] is not None else (sig[-1] if rule == "euler" else train_sig[0])
            sig = karras_sigmas(float(hi), float(lo), n)
            ts = sigma_to_t(sig, np.log(train_sig))
            if cls == "UniPCMultistepScheduler" or (rule == "multistep" and s.get("beta_schedule") != "squaredcos_cap_v2"):
                ts = ts.round()
        if s["final_sigmas_type"] == "zero":
            last, t_last = 0.0, 0.0
        else:  # UniPC's karras grid ends on its own last sigma
            karras_end = cls == "UniPCMultistepScheduler" and s["use_karras_sigmas"]
            last, t_last = float(sig[-1] if karras_end else train_sig[0]), 1 / N
        ve = np.concatenate([sig, [last]]).astype(np.float32)  # diffusers keeps its sigmas in float32
        alpha, sigma = _alpha_sigma(ve)
        grid = torch.tensor([*(ts + 1) / N, t_last], dtype=F64)
        zero_end = last == 0.0
        if cls == "DPMSolverMultistepScheduler":
            kw = {"order": int(s["solver_order"]), "lower_order_final": bool(s["lower_order_final"]) and n < 15,
                  "published_d2": True, "first_order_final": zero_end or bool(s["euler_at_final"])}
            build = dpmpp
        elif cls == "UniPCMultistepScheduler":
            kw = {"order": int(s["solver_order"]), "lower_order_final": bool(s["lower_order_final"]),
                  "variant": s["solver_type"], "disable_corrector": tuple(s["disable_corrector"] or ()),
                  "first_order_final": zero_end}  # order > 1 onto sigma = 0 is 0 * inf in diffusers
            build = unipc
        else:  # Euler in the VE sigma with x0 = x - sigma eps: DDIM on these noise levels
            build = ddim
            init = float(sigma[0]) if spacing in ("linspace", "trailing") else 1.0  # init_noise_sigma / sqrt(s^2+1)
            out_scale = 1 / float(alpha[-1])  # the scheduler's state is x / alpha
    tab = build(Ctx(schedule, param, grid, alpha, sigma, land), **kw)
    c, b = tab.c.clone(), tab.b.clone()
    c[-1], b[-1] = c[-1] * out_scale, b[-1] * out_scale
    meta = {**tab.meta, "scheduler": cls, "timesteps": [float(t) for t in ts], "grid": describe_grid(cfg)}
    return Table(tab.tau, tab.s, tab.hx, tab.hd, c, b, init, "pipeline", meta)


def describe_grid(cfg: dict) -> str:
    """The grid in words: spacing, karras, final noise level (what /solvers shows)."""
    s, cls = settings(cfg), cfg["_class_name"]
    parts = [str(s["timestep_spacing"])]
    if s["steps_offset"]:
        parts.append(f"steps_offset={s['steps_offset']}")
    if s.get("use_karras_sigmas"):
        parts.append("karras")
    if cls == "DDIMScheduler":
        parts.append("final alpha=1" if s["set_alpha_to_one"] else "final sigma_min")
    else:
        parts.append(f"final {'sigma=0' if s['final_sigmas_type'] == 'zero' else 'sigma_min'}")
    return f"{cls}: " + ", ".join(parts)


class PipelineSampler(Sampler):
    family = "pipeline"

    def __init__(self, name: str, model, scheduler: dict):
        super().__init__(name, model)
        self.scheduler = scheduler
        self.grid = describe_grid(scheduler)

    def build(self, n: int) -> Table:
        return scheduler_table(self.scheduler, self.model.schedule, self.model.param, n)


def load(model, art=None) -> list[Sampler]:
    cfg = ((art.meta.get("data") or {}).get("source") or {}).get("scheduler") if art else None
    return [PipelineSampler("pipeline", model, cfg)] if reproduced(cfg) and model.schedule.name == "vp" else []

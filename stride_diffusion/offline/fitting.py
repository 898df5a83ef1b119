"""The toolkit every fit shares (search, dode, grids): the frozen model and its device, the
held-out selection set and converged references on it, differentiable unrolling of a table, teacher
trajectories, and the error and timing measures the solver files record."""
from __future__ import annotations

import time

import torch

from stride_diffusion.solvers import contracts, make_table, sample, seeded_noise
from stride_diffusion.solvers.artifact import default_guidance, load_artifact
from stride_diffusion.solvers.builders import build
from stride_diffusion.solvers.learned import absolute
from stride_diffusion.solvers.schedules import F64

from .seeds import SELECTION_BASE, selection_set


def _vec(v, n, dtype):
    v = torch.as_tensor(v)
    return (v.expand(n) if v.ndim == 0 else v).to(dtype)


def model_call(model, y, t, s, labels, guidance=1.0):
    """One (guided) model output for flat states y [B, D]; t, s scalars or [B] (may carry grad)."""
    B = y.shape[0]
    t, s, x = _vec(t, B, y.dtype), _vec(s, B, y.dtype), y.reshape(B, *model.shape)
    if guidance == 1:
        return model(x, t, s, labels).reshape(B, -1).to(y.dtype)
    null = torch.full_like(labels, model.num_classes)  # both CFG branches in one call, as the executor
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([s, s]), torch.cat([labels, null]))
    out = out.reshape(2 * B, -1)
    d, u = out[:B].to(y.dtype), out[B:].to(y.dtype)
    return u + guidance * (d - u)


def coeffs_of(table) -> dict:
    """A Table as the absolute-index coefficient dict `unroll` takes."""
    return {"tau": table.tau, "s": table.s, "hx": table.hx, "hd": table.hd, "c": table.c,
            "B": absolute(table), "init": torch.tensor(table.init, dtype=F64)}


def unroll(model, co: dict, noise, labels, guidance=1.0, states=False):
    """The table algebra of solvers.executor as plain (differentiable) torch ops: gradients reach
    every coefficient and, through the network's time input, the evaluation times."""
    Bn = noise.shape[0]
    dt = noise.dtype
    y = co["init"].to(dt) * noise.reshape(Bn, -1)
    hs, ys = [], [y]
    Bm, dense = co["B"], co["B"].requires_grad  # a learned B keeps its zeros in the graph
    for k in range(len(co["tau"])):
        d = model_call(model, y, co["tau"][k], co["s"][k], labels, guidance)
        hs.append(co["hx"][k].to(dt) * y + co["hd"][k].to(dt) * d)
        acc = [Bm[k, j].to(dt) * hs[j] for j in range(k + 1) if dense or Bm[k, j] != 0]
        y = co["c"][k].to(dt) * y + sum(acc)
        ys.append(y)
    return ys if states else y


def trajectory(model, table, noise, labels, guidance=1.0):
    """(times [M], states [M, B, D]) of a classic table: the start and every distinct landing time
    (for a time visited twice, as Heun's predictor and corrector, the later state)."""
    with torch.no_grad():
        ys = unroll(model, coeffs_of(table), noise, labels, guidance, states=True)
    times, out = [float(table.tau[0])], [ys[0]]
    for k, s in enumerate(table.s.tolist()):
        if s == times[-1]:
            out[-1] = ys[k + 1]
        else:
            times.append(s), out.append(ys[k + 1])
    return torch.tensor(times, dtype=F64), torch.stack(out)


def interp(times, states, t):
    """The trajectory at time t (a scalar tensor, possibly with grad), linear between nodes."""
    with torch.no_grad():
        i = int(torch.searchsorted(-times, -t.detach().reshape(1), right=True).clamp(1, len(times) - 1))
    t0, t1 = times[i - 1], times[i]
    w = ((t0 - t.to(F64)) / (t0 - t1)).to(states.dtype)
    return states[i - 1] + w * (states[i] - states[i - 1])


def rmse(a, b) -> float:
    d = a.reshape(a.shape[0], -1).double() - b.reshape(b.shape[0], -1).double()
    return float(d.pow(2).mean().sqrt())


def device_of(model) -> torch.device:
    return contracts.device_of(model)


def heldout(model, n: int, dtype=torch.float32):
    """The selection set's first n seeds: what every fit keeps or compares its iterates on."""
    dev = device_of(model)  # drawn on the CPU (seeded_noise), so the same on every device
    noise = seeded_noise(selection_set(n), model.shape, device=dev, dtype=dtype)
    labels = (torch.arange(n) % model.num_classes).to(dev)  # uniform classes
    return noise, labels


def reference(model, noise, labels, guidance=1.0, solver="dpmpp-3m/logsnr", nfe=128):
    """A converged solution of the same ODE from the same noise (check with --ref-nfe x 2)."""
    return sample(model, make_table(solver, model.schedule, model.param, nfe), noise, labels, guidance)


def load_model(path, device="cpu"):
    """(model, sha256 of its weights, artifact) via solvers.artifact (the network comes frozen)."""
    art = load_artifact(str(path), device)
    return art.model, art.sha256, art


def cfg_scale(art, cfg=None) -> float:
    """The CFG-on metrics' scale: --cfg, else the artifact's default guidance, else 2."""
    if cfg is not None:
        return float(cfg)
    g = default_guidance(art)
    return g if g != 1 else 2.0


def cpu_s() -> float:
    return time.process_time()


def metrics_for(model, tab, vn, vl, ref, ref_cfg, cfg, classic=None, classic_cfg=None) -> dict:
    """Held-out trajectory error of `tab` (CFG off and on) and, optionally, of the classic solvers."""
    m = {"heldout_rmse": rmse(sample(model, tab, vn, vl), ref),
         f"heldout_rmse_cfg{cfg:g}": rmse(sample(model, tab, vn, vl, cfg), ref_cfg),
         "heldout_seeds": f"{SELECTION_BASE}..{SELECTION_BASE + len(vn) - 1}",
         "heldout_labels": "i mod num_classes"}
    if classic:
        best = min(classic, key=classic.get)
        m.update(classic=classic, best_classic=best, best_classic_rmse=classic[best])
    if classic_cfg:
        m[f"classic_cfg{cfg:g}"] = classic_cfg
    return m


def references(model, args):
    """(noise, labels, ref, ref with CFG, ref vs its half-NFE solve) on the held-out seeds."""
    vn, vl = heldout(model, args.val)
    ref = reference(model, vn, vl, 1.0, args.ref, args.ref_nfe)
    ref_cfg = reference(model, vn, vl, args.cfg, args.ref, args.ref_nfe)
    conv = rmse(reference(model, vn, vl, 1.0, args.ref, args.ref_nfe // 2), ref)
    return vn, vl, ref, ref_cfg, conv


def refine(schedule, grid, C: int) -> torch.Tensor:
    """C - 1 extra times inside each interval of `grid`, uniform in log-SNR; the grid's own times
    are kept exactly, so student and teacher meet at the same noise levels."""
    g = torch.as_tensor(grid, dtype=F64)
    lam = schedule.lam(g)
    pts = [g[:1]]
    for i in range(len(g) - 1):
        inner = schedule.t_of_lam(torch.linspace(float(lam[i]), float(lam[i + 1]), C + 1, dtype=F64)[1:-1])
        pts += [inner, g[i + 1: i + 2]]
    out = torch.cat(pts)
    if not bool((out[1:] < out[:-1]).all()):
        raise ValueError("refined grid is not strictly decreasing (grid too fine for this C?)")
    return out


def teacher_trajectory(model, grid, noise, labels, C=8, teacher="dpmpp-2m", guidance=1.0):
    """(times, states) of the teacher on `grid` refined C times."""
    return trajectory(model, build(teacher, model.schedule, model.param, refine(model.schedule, grid, C)),
                      noise, labels, guidance)


def targets_at(T, X, times) -> torch.Tensor:
    """The teacher states at the student's landing times (which the refined grid contains): [N, B, D]."""
    idx = [int(torch.argmin((T - s).abs())) for s in times]
    if not all(abs(float(T[i]) - s) < 1e-12 for i, s in zip(idx, times)):
        raise RuntimeError("teacher grid does not contain the student's times")
    return X[idx]

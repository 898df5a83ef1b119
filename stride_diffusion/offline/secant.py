"""`stride offline secant ARTIFACT`: turn a flow model into a secant model (Liu & Yue 2025,
arXiv 2505.14502) and measure it.

stride's time runs the other way from the paper's code: t = 1 is noise, t = 0 data,
x_t = (1 - t) x0 + t eps, u = eps - x0 is the per-sample dx/dt, and a generation step goes from t to
s < t. f = f_theta(x, t, s, y[, w]) is the average dx/dt over [t, s]; sg = stop-gradient.

    sdei  x_r^ = x_t + (r - t) sg f(x_t, t, r)    target = teacher^w(x_r^, r)     pred = f(x_t, t, s)
    sdee  x_t^ = x_r + (t - r) sg f(x_r, r, t)    target = teacher^w(x_r, r)      pred = f(x_t^, t, s)
    stee  x_t^ = x_r + (t - r) sg f(x_r, r, t)    target = u                      pred = f(x_t^, t, s)
    stei  x_r^ = x_t + (r - t) sg f(x_t, t, r)    target = sg f(x_r^, r, r)       pred = f(x_t, t, s)
          + lambda |f(x_tau, tau, tau) - u|^2     (teacher-free, as the paper's notes describe it; the
          released code uses the frozen teacher for this target)

Gradients reach only the final f call (and STEI's tangent term); the Picard estimate and the
teacher are computed without a graph. (t, s): d ~ U[0, 1/N) with N drawn per sample from --steps,
t on the N-step grid {1, 1 - 1/N, ..., 1/N} (the reported best) or continuous, s = t - d; the EE
losses also train the reversed pair (s, t) with probability 1/2, since their Picard estimate asks
for the data -> noise secant f(x_r, r, t). r = t + U(0, 1) (s - t). The distillation losses with a
guidance input draw w ~ U[1, w_max] per sample (a share --p-unguided exactly at 1, the scale
served unguided) and distil the guided teacher (labels never dropped);
without it, and for the training losses, labels drop to the null class with p = 0.1 and CFG is
applied at inference with two branches.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from stride_diffusion.solvers.artifact import default_guidance, load_artifact, read_json, write_json
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.samplers import rows_per_image
from stride_diffusion.solvers.secant import LOSSES, load_secant, save_secant, secant_from_teacher

from .argtypes import float_pair, ints
from .protocol import Protocol, make_seed_sets, mean_std, scores, secant_rows

F64 = torch.float64


# -- the losses ------------------------------------------------------------------------------------

def _b(v, x):
    return v.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def interp(x0, eps, t):
    return (1 - _b(t, x0)) * x0 + _b(t, x0) * eps


def sdei(f, teacher, x0, eps, y, w, t, s, r, **_):
    xt = interp(x0, eps, t)
    with torch.no_grad():
        xr = xt + _b(r - t, xt) * f(xt, t, r, y, w)  # Picard estimate of the interior point
        target = teacher(xr, r, y, w)
    return F.mse_loss(f(xt, t, s, y, w), target)


def sdee(f, teacher, x0, eps, y, w, t, s, r, **_):
    xr = interp(x0, eps, r)
    with torch.no_grad():
        xt = xr + _b(t - r, xr) * f(xr, r, t, y, w)  # Picard estimate of the start point
        target = teacher(xr, r, y, w)
    return F.mse_loss(f(xt, t, s, y, w), target)


def stee(f, teacher, x0, eps, y, w, t, s, r, **_):
    xr = interp(x0, eps, r)
    with torch.no_grad():
        xt = xr + _b(t - r, xr) * f(xr, r, t, y, w)
    return F.mse_loss(f(xt, t, s, y, w), eps - x0)  # E[u | x_r] = v(x_r, r): same minimiser


def stei(f, teacher, x0, eps, y, w, t, s, r, tau, lam=1.0, **_):
    xt = interp(x0, eps, t)
    with torch.no_grad():
        xr = xt + _b(r - t, xt) * f(xt, t, r, y, w)
        target = f(xr, r, r, y, w)  # the student's own tangent
    xtau = interp(x0, eps, tau)
    return F.mse_loss(f(xt, t, s, y, w), target) + lam * F.mse_loss(f(xtau, tau, tau, y, w), eps - x0)


def tangent_loss(f, teacher, x0, eps, y, w, tau):
    """The teacher's velocity as the target of the student's tangent f(x, tau, tau): keeps the short
    secants, which every Picard estimate is built from, on the teacher's field."""
    xtau = interp(x0, eps, tau)
    with torch.no_grad():
        target = teacher(xtau, tau, y, w)
    return F.mse_loss(f(xtau, tau, tau, y, w), target)


LOSS_FNS = {"sdei": sdei, "stee": stee, "sdee": sdee, "stei": stei}
assert tuple(LOSS_FNS) == LOSSES


def sample_times(B: int, steps, g: torch.Generator, both: bool = False, grid: bool = True) -> dict:
    """t, s, r (and STEI's tau) for B samples; see the module docstring."""
    u = lambda: torch.rand(B, generator=g, dtype=F64)
    N = torch.as_tensor(list(steps), dtype=F64)[torch.randint(len(steps), (B,), generator=g)]
    d = u() / N
    t = 1 - (u() * N).floor() / N if grid else d + (1 - d) * u()  # grid: uniform over the N start points
    s = t - d
    if both:
        flip = u() < 0.5
        t, s = torch.where(flip, s, t), torch.where(flip, t, s)
    r = t + u() * (s - t)
    return {"t": t.float(), "s": s.float(), "r": r.float(), "tau": u().float()}


def sample_guidance(B: int, w_max: float, p_unguided: float, g: torch.Generator) -> torch.Tensor:
    """Per-sample guidance scales: w ~ U[1, w_max], except a share p_unguided at w = 1 exactly (the
    unguided ODE sits on the edge of the range, where a uniform draw rarely lands)."""
    w = 1 + (w_max - 1) * torch.rand(B, generator=g)
    if p_unguided:  # no extra draw otherwise: runs without it keep their random stream
        w = torch.where(torch.rand(B, generator=g) < p_unguided, torch.ones_like(w), w)
    return w


def teacher_velocity(model):
    """A flow-parameterised teacher (out = dx/dt) as v(x, t, y, w): CFG in one doubled batch."""
    def v(x, t, y, w=None):
        if w is None:
            return model(x, t, t, y)
        null = torch.full_like(y, model.num_classes)
        c, uc = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return uc + _b(w, x) * (c - uc)
    return v


def student(net):
    return lambda x, t, s, y, w: net(x, t, y, s, w)


# -- training ----------------------------------------------------------------------------------------

@dataclass
class Settings:
    """The defaults are the recipe measured best on artifacts/digits (docs/results.md, "Secant models"); the CLI takes them."""
    loss: str = "sdei"
    n_steps: list = field(default_factory=lambda: [1, 2, 4, 8])  # sampling step counts trained for
    steps: int = 4000  # optimiser steps
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 100
    lr_decay: str = "cosine"  # none | cosine (to 0 at `steps`)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    start: str = "grid"  # grid | continuous
    guidance_input: bool = True  # distillation only
    w_max: float = 3.0
    p_unguided: float | None = None  # share of samples at w = 1 exactly; None: 0.5 with a guidance input, else 0
    label_dropout: float = 0.1
    stei_lambda: float = 1.0
    tangent: float | None = None  # + tangent * |f(x, tau, tau) - teacher(x, tau)|^2; None: 1 to distil, else 0
    init: str = ""  # start from this secant file in the artifact instead of the teacher's tangent
    pool: int = 1024  # imported models (no data split): this many teacher samples stand in for data
    pool_solver: str = "dpmpp-3m:32"
    teacher_sha256: str = ""
    ckpt_every: int = 250
    log_every: int = 50


def resolve_settings(st: Settings) -> None:
    """Fill the loss-dependent defaults, then refuse what cannot train."""
    if st.tangent is None:
        st.tangent = 1.0 if st.loss.startswith("sd") else 0.0
    if st.p_unguided is None:
        st.p_unguided = 0.5 if st.guidance_input else 0.0
    if st.loss not in LOSSES:
        raise ValueError(f"unknown secant loss {st.loss!r}; allowed: {list(LOSSES)}")
    if st.lr_decay not in ("none", "cosine"):
        raise ValueError(f"--lr-decay must be 'none' or 'cosine', got {st.lr_decay!r}")
    if st.start not in ("grid", "continuous"):
        raise ValueError(f"--start must be 'grid' or 'continuous', got {st.start!r}")
    if not st.n_steps or min(st.n_steps) < 1:
        raise ValueError(f"--steps must list step counts >= 1, got {st.n_steps}")
    if st.guidance_input and st.loss.startswith("st"):
        raise ValueError(f"{st.loss} trains from data without a teacher, so it has no guided target; "
                         "use CFG at inference (--no-guidance-input) or a distillation loss (sdei, sdee)")
    if st.tangent and not st.loss.startswith("sd"):
        raise ValueError(f"--tangent anchors the tangent to the teacher: distillation losses only (sdei, sdee), "
                         f"not {st.loss}")
    if st.guidance_input and not st.w_max > 1:
        raise ValueError(f"--w-max must be > 1, got {st.w_max}")
    if not 0 <= st.p_unguided <= 1 or (st.p_unguided and not st.guidance_input):
        raise ValueError(f"--p-unguided must lie in [0, 1] and needs a guidance input, got {st.p_unguided}")


def warm_start(net, art, name: str) -> dict:
    """Load secant file `name` (same teacher, architecture and guidance range) into `net`; its record."""
    src = load_secant(art.path, art.sha256, device=art.model.device, name=name)
    if src.net.config != net.config or src.guidance_range != net.guidance_range:
        raise ValueError(f"--init {name}: its net ({src.net.config}, guidance range {src.guidance_range}) "
                         f"differs from this run's ({net.config}, {net.guidance_range}); match --w-max and "
                         "--guidance-input to it")
    net.load_state_dict(src.net.state_dict())  # load_weights already cast to float32
    m = src.meta
    return {"name": name, "sha256": src.sha256, "loss": m.get("loss"), "steps": m.get("steps"),
            "iterations_total": m.get("iterations_total", m.get("iterations", 0)),
            "cpu_minutes_total": m.get("cpu_minutes_total", m.get("cpu_minutes", 0.0))}


def train_secant(artifact, st: Settings, name: str = "secant", ckpt_dir=None, resume=False, threads=None,
                 dtype="float16", command=None, log=None, device="cpu") -> dict:
    log = sys.stderr if log is None else log  # per call: a test may swap sys.stderr
    from stride_diffusion.offline.data import data_from_source
    from stride_diffusion.offline.progress import Progress
    from stride_diffusion.offline.seeds import stream_seed
    from stride_diffusion.offline.teacher_data import has_data, teacher_pool
    from stride_diffusion.offline.train import learning_rate, load_ckpt, optimise, save_ckpt

    if threads:
        torch.set_num_threads(threads)
    art = load_artifact(artifact, device)
    m = art.model
    if m.schedule.name != "flow" or m.param != "flow":
        raise ValueError(f"{art.path}: secant conversion needs a flow-schedule model with 'flow' output (its "
                         f"weights become the secant net's tangent); this one is {m.schedule.name}/{m.param}")
    st.teacher_sha256 = art.sha256
    resolve_settings(st)
    if has_data(art.meta):
        data = data_from_source(art.meta["data"]["source"])
        x_all, y_all = data.train_x, data.train_y
    else:  # an imported network: its own samples stand in for the data it was trained on
        x_all, y_all = teacher_pool(m, st.pool, st.pool_solver, log=log)
    torch.manual_seed(stream_seed("secant", st.seed))
    net = secant_from_teacher(m, (1.0, st.w_max) if st.guidance_input else None).to(m.device).train()
    init = warm_start(net, art, st.init) if st.init else None
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=st.lr, betas=(0.9, 0.99), weight_decay=st.weight_decay)
    g = torch.Generator().manual_seed(stream_seed("secant", st.seed))
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else Path("runs") / f"{art.name}-{name}"
    step, wall, cpu, loss_avg = 0, 0.0, 0.0, None
    if resume and (ckpt_dir / "state.json").exists():
        step, wall, loss_avg = load_ckpt(ckpt_dir, net, ema, opt, g, st, net.config)
        cpu = read_json(ckpt_dir / "cpu.json")["cpu_s"]
        print(f"resumed from {ckpt_dir} at step {step}", file=log)
    loss_fn, f, v = LOSS_FNS[st.loss], student(net), teacher_velocity(m)
    both, K = st.loss.endswith("ee"), m.num_classes
    dev = m.device
    bar = Progress("secant", st.steps, log)
    bar.bar.update(step)
    t0, c0, seen = time.time(), time.process_time(), 0
    while step < st.steps:
        idx = torch.randint(0, len(x_all), (st.batch,), generator=g)
        x0, y = x_all[idx].to(dev), y_all[idx].to(dev)
        eps = torch.randn(x0.shape, generator=g).to(dev)
        tm = {k: v.to(dev) for k, v in sample_times(st.batch, st.n_steps, g, both, st.start == "grid").items()}
        if st.guidance_input:  # distil the guided ODE at a per-sample scale; no label dropout
            w = sample_guidance(st.batch, st.w_max, st.p_unguided, g).to(dev)
        else:
            w = None
            drop = (torch.rand(st.batch, generator=g) < st.label_dropout).to(dev)
            y = torch.where(drop, torch.full_like(y, K), y)
        lr = learning_rate(st.lr, step, st.warmup, st.lr_decay, st.steps)  # cosine: anneal the Picard targets' noise
        loss = loss_fn(f, v, x0, eps, y, w, lam=st.stei_lambda, **tm)
        if st.tangent:
            loss = loss + st.tangent * tangent_loss(f, v, x0, eps, y, w, tm["tau"])
        li = optimise(net, ema, opt, loss, lr, st.grad_clip, st.ema, step)
        step += 1
        loss_avg = li if loss_avg is None else 0.98 * loss_avg + 0.02 * li
        seen += st.batch
        bar(f"loss {loss_avg:.4f} {seen / max(time.time() - t0, 1e-9):.0f} img/s")
        if step % st.ckpt_every == 0 or step == st.steps:
            save_ckpt(ckpt_dir, step, net, ema, opt, g, st, net.config, wall + time.time() - t0, loss_avg)
            write_json(ckpt_dir / "cpu.json", {"cpu_s": cpu + time.process_time() - c0})
    wall, cpu = wall + time.time() - t0, cpu + time.process_time() - c0
    s = asdict(st)
    for k in ("ckpt_every", "log_every", "teacher_sha256"):
        s.pop(k)
    s["iterations"], s["steps"] = s.pop("steps"), s.pop("n_steps")  # the file's names: no clash with 'steps'
    for k in ("init", "tangent", "p_unguided"):  # recorded only when used
        if not s[k]:
            s.pop(k)
    if has_data(art.meta):
        s.pop("pool"), s.pop("pool_solver")
    info = {"loss": st.loss, "steps": sorted(st.n_steps), "iterations": st.steps, "settings": s,
            "optimizer": "AdamW(betas=(0.9, 0.99)) from the teacher's weights, linear warm-up, "
                         f"lr decay {st.lr_decay}",
            "weights_saved": "EMA", "final_loss_ema": loss_avg, "wall_time_s": round(wall, 1),
            "cpu_minutes": round(cpu / 60, 2), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "command": command}
    if init:  # the file's cost is the whole chain's
        info["init"] = init
        info["cpu_minutes_total"] = round(info["cpu_minutes"] + init["cpu_minutes_total"], 2)
        info["iterations_total"] = st.steps + init["iterations_total"]
    info["device"] = str(dev)
    meta = save_secant(art.path, name, ema, m.shape, K, art.sha256, info, dtype)
    print(f"wrote {art.path / name}.json ({wall / 60:.1f} min wall, {cpu / 60:.1f} CPU min)", file=log)
    return meta


# -- evaluation ----------------------------------------------------------------------------------------

def evaluate_secant(artifact, names=None, steps=(1, 2, 4, 8), compare=(), compare_nfe=(1, 2, 4, 8), n=None,
                    seed_sets=None, guidance=None, interval=None, reference=None,
                    cache=".cache/stride/eval", batch=500, write=True, log=None, device="cpu",
                    on="evaluation") -> dict:
    """The secant rows through offline/protocol.py's Protocol (same seeds, classes, classifier, cached
    reference and samples), optionally beside classic solvers; writes them into each <name>.json under
    'eval'. Unset n / seed sets / guidance / reference come from the artifact's eval.json, so the rows
    are comparable with its rows (FD's bias depends on n), else 500 x 3, the default guidance,
    dpmpp-3m/logsnr:128."""
    log = sys.stderr if log is None else log  # per call: a test may swap sys.stderr
    art = load_artifact(artifact, device)
    ev0 = art.eval or {}
    g = float(guidance if guidance is not None else ev0.get("guidance", default_guidance(art)))
    firsts = [s["first_seed"] for s in ev0.get("seed_sets", [])] if n is None and seed_sets is None else None
    n = n or ev0.get("n", 500)
    seed_sets = seed_sets or len(firsts or []) or 3
    if reference is None:
        ref = ev0.get("reference", {})
        solver = ref.get("solver", "dpmpp-3m")
        solver = solver if "/" in solver else f"{solver}/{ref.get('grid', 'logsnr')}"
        reference = f"{solver}:{ref.get('nfe', 128)}"
    p = Protocol(art, n, make_seed_sets(n, seed_sets, firsts or None), cache, batch)
    if on == "selection":  # a probe that chooses: one set of n selection seeds
        p = p.selection()
    elif on != "evaluation":
        raise ValueError(f"on must be 'evaluation' or 'selection', got {on!r}")
    ref_solver, ref_nfe = reference.split(":")
    x_ref = p.reference(ref_solver, int(ref_nfe), g)
    rows = [r for r, _ in secant_rows(p, g, x_ref, steps, names, interval, log)]
    classic = []
    for solver in compare:
        for k in compare_nfe:
            t0 = time.time()
            x = p.samples(make_table(solver, p.model.schedule, p.model.param, k), g)
            r = p.row(solver, k, p.score(x, x_ref), {"evaluations": k * rows_per_image(p.model, g),
                                                     "seconds": round(time.time() - t0, 1)})
            classic.append(r)
            print(f"{solver:>12} nfe {k:>2}  evals {r['evaluations']:>2}  {scores(r)}", file=log, flush=True)
    ref_mean, ref_std = mean_std(p.ref_fd) if p.ref_fd else (None, None)
    ev = {"guidance": g, "guidance_interval": interval, "n": n, "seeds": on,
          "seed_sets": [{"first_seed": s[0], "count": len(s)} for s in p.sets],
          "labels": f"seed index i -> class i mod {p.K} (balanced)",
          "reference": {"solver": ref_solver, "nfe": int(ref_nfe), "fd": ref_mean, "fd_std": ref_std,
                        "note": "the teacher's converged solve on FlowSchedule() (t 0.999 -> 0.001); "
                                "secant runs 1 -> 0"},
          "model_sha256": art.sha256,
          "classifier_sha256": art.classifier_meta["weights"]["sha256"] if art.classifier is not None else None}
    if write:
        for name in {r["solver"] for r in rows}:
            f = art.path / f"{name}.json"
            d = read_json(f)
            d["eval"] = {**ev, "rows": [r for r in rows if r["solver"] == name]}
            write_json(f, d)
    return {**ev, "rows": rows, "classic": classic}


# -- CLI ---------------------------------------------------------------------------------------------

def add_parser(subparsers):
    p = subparsers.add_parser("secant", help="convert a flow model into a secant model (few-step sampler)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--loss", default="sdei", choices=list(LOSSES))
    p.add_argument("--steps", type=ints, default=[1, 2, 4, 8],
                   help="sampling step counts to train for, e.g. 4 or 1,2,4,8")
    p.add_argument("--name", default=None,
                   help="file stem in the artifact (default: secant for sdei, secant-<loss> otherwise)")
    d = Settings()
    p.add_argument("--iters", type=int, default=d.steps, help="optimiser steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-decay", default=d.lr_decay, choices=["none", "cosine"])
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", default="grid", choices=["grid", "continuous"],
                   help="start times on the N-step grid or anywhere")
    gi = p.add_mutually_exclusive_group()
    gi.add_argument("--guidance-input", dest="guidance_input", action="store_true", default=None,
                    help="learn the guided secant for w in [1, --w-max]: 1 evaluation per step (sdei/sdee; "
                         "their default)")
    gi.add_argument("--no-guidance-input", dest="guidance_input", action="store_false",
                    help="CFG at inference (2 evaluations per guided step)")
    p.add_argument("--w-max", type=float, default=d.w_max)
    p.add_argument("--p-unguided", type=float, default=None,
                   help="with a guidance input: share of training samples at w = 1 exactly, the scale "
                        "unguided serving uses; the rest draw w ~ U[1, --w-max] (default 0.5, 0 without one)")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--stei-lambda", type=float, default=1.0)
    p.add_argument("--tangent", type=float, default=None,
                   help="sdei/sdee: add this weight times |f(x, tau, tau) - teacher(x, tau)|^2, the tangent "
                        "anchor (default 1 for them, 0 otherwise)")
    p.add_argument("--init", default="", metavar="NAME",
                   help="start from secant file NAME in the artifact (e.g. to continue or specialise a "
                        "conversion with a new schedule or --steps) instead of the teacher's tangent")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="stored weights")
    p.add_argument("--ckpt-dir", default=None, help="checkpoints (default runs/<artifact>-<name>)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device of the teacher and the secant net, e.g. cuda")
    p.add_argument("--pool", type=int, default=d.pool,
                   help="imported models (no data split in model.json): teacher samples that stand in for "
                        "the training data")
    p.add_argument("--pool-solver", default=d.pool_solver, help="solver:nfe that draws the teacher samples")
    e = p.add_argument_group("evaluation (after training, or alone with --eval-only)")
    e.add_argument("--no-eval", action="store_true")
    e.add_argument("--eval-only", action="store_true", help="measure the existing secant files; no training")
    e.add_argument("--eval-steps", type=ints, default=[1, 2, 4, 8])
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the artifact's default)")
    e.add_argument("--guidance-interval", type=float_pair, default=None,
                   help="lo,hi: guide only for lo <= t <= hi")
    e.add_argument("--compare", default="", help="classic solvers to measure beside it, e.g. euler,dpmpp-2m")
    e.add_argument("--compare-nfe", type=ints, default=[1, 2, 4, 8])
    e.add_argument("--n", type=int, default=None, help="per seed set (default: eval.json's, else 500)")
    e.add_argument("--seed-sets", type=int, default=None, help="default: eval.json's, else 3")
    e.add_argument("--reference", default=None,
                   help="solver:nfe of the teacher's converged solve (default: eval.json's, else "
                        "dpmpp-3m/logsnr:128)")
    e.add_argument("--cache", default=".cache/stride/eval")
    e.add_argument("--report", default=None, help="also write the measured rows to this json file")
    e.add_argument("--on", choices=("evaluation", "selection"), default="evaluation",
                   help="selection: a recipe probe, measured on the selection seeds and written only to "
                        "--report (choices are made there; evaluation seeds are for reported rows)")
    p.set_defaults(func=run)
    return p


def run(a, command=None) -> int:
    name = a.name or ("secant" if a.loss == "sdei" else f"secant-{a.loss}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.eval_only:
        gi = a.loss.startswith("sd") if a.guidance_input is None else a.guidance_input
        st = Settings(loss=a.loss, n_steps=a.steps, steps=a.iters, batch=a.batch, lr=a.lr,
                      lr_decay=a.lr_decay, ema=a.ema, seed=a.seed, start=a.start, guidance_input=gi,
                      w_max=a.w_max, p_unguided=a.p_unguided, label_dropout=a.label_dropout,
                      stei_lambda=a.stei_lambda, init=a.init, tangent=a.tangent, pool=a.pool,
                      pool_solver=a.pool_solver, ckpt_every=a.ckpt_every, log_every=a.log_every)
        train_secant(a.artifact, st, name, a.ckpt_dir, a.resume, a.threads, a.dtype, command, device=a.device)
    if not a.no_eval:
        names = [name] if not a.eval_only or a.name else None  # --eval-only alone: every secant file
        compare = [s for s in a.compare.split(",") if s]
        res = evaluate_secant(a.artifact, names, a.eval_steps, compare, a.compare_nfe, a.n, a.seed_sets,
                              a.guidance, a.guidance_interval, a.reference, a.cache, device=a.device,
                              write=a.on == "evaluation", on=a.on)
        if a.report:
            Path(a.report).parent.mkdir(parents=True, exist_ok=True)
            Path(a.report).write_text(json.dumps(res, indent=1) + "\n")
    return 0

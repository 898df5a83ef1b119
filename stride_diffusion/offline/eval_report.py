"""eval.json as people read it: eval.md (every table) and eval/*.png (metric against NFE, sample grids)."""
from __future__ import annotations

import re
from pathlib import Path

import torch


@torch.no_grad()
def shown(art, x, most: int = 16) -> torch.Tensor:
    """The first min(K, most) samples (one per class) as images: decoded (a latent model's VAE) on the CPU."""
    return art.decoder.decode(x[:min(art.model.num_classes, most)]).cpu()


def family(name: str) -> str:
    """Learned solvers are fitted per NFE (searched-nfe4, dode-heun-nfe4): one column, line and grid each."""
    return re.sub(r"-nfe\d+$", "", name)


def _pm(m, s, p=3):
    return "–" if m is None else f"{m:.{p}f} ± {s:.{p}f}"


def markdown(ev: dict) -> str:
    rows = ev["rows"]
    col = lambda r: family(r["solver"])
    solvers = list(dict.fromkeys(col(r) for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    at = {(col(r), r["nfe"]): r for r in rows}
    ref, fl, te = ev["reference"], ev["floor"], ev["teacher"]
    sets = len(ev["seed_sets"])
    out = [f"# Sampler quality: {ev['model']}", "",
           f"Guidance {ev['guidance']:g} (the default); {ev['n']} samples x {sets} seed sets "
           f"(first seeds {', '.join(str(s['first_seed']) for s in ev['seed_sets'])}), classes balanced; "
           "mean ± std over the seed sets.", "",
           f"- reference (teacher): {ref['solver']} at {ref['nfe']} NFE ({ref['grid']} grid); "
           f"RMSE to {ref['solver']} at {ref['nfe'] // 2} NFE: {ref['converged_rmse']:.2e}",
           f"- teacher FD {_pm(te['fd'], te['fd_std'])}, KID {_pm(te.get('kid'), te.get('kid_std'), 4)}, "
           f"accuracy {_pm(te['acc'], te['acc_std'])}",
           f"- floor (real train vs held-out) FD {_pm(fl['fd'], fl['fd_std'])} (ratio {fl['fd_ratio']:.2f}), "
           f"KID {_pm(fl.get('kid'), fl.get('kid_std'), 4)}; classifier accuracy on held-out real {fl['acc']:.3f}"
           if fl else
           "- no classifier / data split (an imported model): RMSE only; best = lowest RMSE", ""]
    keys = (("fd_ratio", "FD / teacher FD", 2), ("kid", "KID (unbiased; real images: 0)", 4), ("fd", "FD", 2),
            ("rmse", "RMSE vs reference", 3), ("acc", "class accuracy", 3))
    for key, title, p in keys if fl else keys[3:4]:
        out += [f"## {title}", "", "| NFE | " + " | ".join(solvers) + " |", "|---:|" + "---:|" * len(solvers)]
        for nfe in nfes:
            cells = []
            for s in solvers:
                r = at.get((s, nfe))
                cells.append("" if r is None else _pm(r.get(key), r.get(key + "_std"), p))
            out.append(f"| {nfe} | " + " | ".join(cells) + " |")
        out.append("")
    out += [f"## Best sampler per NFE ({ev['best_criterion']})", "",
            "| NFE | sampler | FD | RMSE | acc |", "|---:|---|---:|---:|---:|"]
    for nfe, b in sorted(ev["best"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {nfe} | {b['solver']} | {_pm(b['fd'], 0, 2).split(' ')[0]} | {b['rmse']:.3f} | "
                   f"{_pm(b['acc'], 0).split(' ')[0]} |")
    if ev.get("guidance_sweep"):
        sw = ev["guidance_sweep"][0]
        out += ["", f"## Guidance sweep ({sw['solver']} at {sw['nfe']} NFE)", "",
                "| guidance | FD | acc |", "|---:|---:|---:|"]
        for r in ev["guidance_sweep"]:
            out.append(f"| {r['guidance']:g} | {_pm(r['fd'], r['fd_std'], 2)} | {_pm(r['acc'], r['acc_std'])} |")
    out += ["", "Plots: eval/rmse.png, eval/fd.png, eval/fd_ratio.png, eval/acc.png; "
            "samples: eval/samples-<solver>.png", ""]
    return "\n".join(out)


def figures(d: Path, ev: dict, grids: dict, x_ref, class_names):
    from stride_diffusion.offline.plot import image_grid, line_plot

    d.mkdir(parents=True, exist_ok=True)
    by = {}
    for r in ev["rows"]:
        by.setdefault(family(r["solver"]), []).append(r)
    te, fl = ev["teacher"], ev["floor"]
    specs = [("rmse", "RMSE vs reference", True, {}),
             ("fd", "Frechet distance (classifier features)", True,
              {"teacher": te["fd"], "real floor": fl["fd"]} if fl else {}),
             ("fd_ratio", "FD / teacher FD", True, {"teacher": 1.0}),
             ("acc", "class accuracy", False, {"teacher": te["acc"], "real": fl["acc"]} if fl else {})]
    for key, title, logy, h in specs if fl else specs[:1]:
        series = {s: [(r["nfe"], r[key], r[key + "_std"]) for r in rs] for s, rs in by.items()}
        line_plot(d / f"{key}.png", series, f"{ev['model']}: {title} (guidance {ev['guidance']:g})",
                  "NFE", key, logy=logy, hlines=h)
    ref = ev["reference"]
    for solver, rs in grids.items():
        rows = [x for _, x in rs] + [x_ref]
        labels = [f"NFE {nfe}" for nfe, _ in rs] + [f"ref {ref['nfe']}"]
        image_grid(d / f"samples-{solver.replace('/', '-')}.png", rows, labels,
                   title=f"{ev['model']} · {solver} · classes {' '.join(class_names[: len(x_ref)])}")

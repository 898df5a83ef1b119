"""Print the README's evaluation tables from an artifact's eval.json (so they are regenerated, not typed).

    python scripts/readme_tables.py artifacts/digits

Tables: classic samplers (FD / teacher FD, evaluation seeds); learned solvers against the grid
baselines with the choice of "best" made on the selection set; the grid each classic solver does
best on (for builders.default_grid); secant files; KID of the teacher, real images and the best
samplers; the per-w guidance tables when eval.json has them.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NFES = (3, 4, 5, 6, 8, 10)


def fam(name: str) -> str:
    return re.sub(r"-nfe\d+$", "", name)


def cell(r, bold=False) -> str:
    if r is None:
        return ""
    s = f"{r['fd_ratio']:.2f} ± {r['fd_ratio_std']:.2f}"
    return f"**{s}**" if bold else s


def classic_table(ev) -> list:
    rows = [r for r in ev["rows"] if not r.get("learned") and not r.get("secant")]
    cols = list(dict.fromkeys(r["solver"] for r in rows))
    at = {(r["solver"], r["nfe"]): r for r in rows}
    out = ["| NFE | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for n in sorted({r["nfe"] for r in rows}):
        best = min((at[(c, n)] for c in cols if (c, n) in at), key=lambda r: r["selection_fd"])
        out.append(f"| {n} | " + " | ".join(cell(at.get((c, n)), at.get((c, n)) is best) for c in cols) + " |")
    return out


def chosen(rows, pred):
    """The row with the lowest selection-set FD among those `pred` accepts (None if none)."""
    rs = [r for r in rows if pred(r)]
    return min(rs, key=lambda r: r["selection_fd"]) if rs else None


def learned_table(ev) -> list:
    rows = [r for r in ev["rows"] if not r.get("secant")]
    out = [("| NFE | best classic | best grid baseline | searched | D-ODE ddim | D-ODE heun | D-ODE 2M "
            "| searched vs best of the others |"),
           "|---:|---|---|---:|---:|---:|---:|---|"]
    for n in NFES:
        at_n = [r for r in rows if r["nfe"] == n]
        cl = chosen(at_n, lambda r: not r.get("learned"))
        bl = chosen(at_n, lambda r: fam(r["solver"]).startswith(("gits-", "ld3-")))
        se = chosen(at_n, lambda r: fam(r["solver"]) == "searched")
        dd = {b: chosen(at_n, lambda r, b=b: fam(r["solver"]) == f"dode-{b}") for b in ("ddim", "heun", "dpmpp-2m")}
        others = [r for r in (cl, bl) if r is not None]
        if se is None:
            verdict = "-"
        else:
            rival = min(others, key=lambda r: r["fd_ratio"])
            d = se["fd_ratio"] - rival["fd_ratio"]
            tie = abs(d) <= max(se["fd_ratio_std"], rival["fd_ratio_std"])
            verdict = ("wins" if d < 0 else "loses") + (" (within 1 std)" if tie else "") + \
                f" vs {fam(rival['solver'])} {rival['fd_ratio']:.2f}"
        fmt = lambda r: "" if r is None else f"{r['fd_ratio']:.2f} ({fam(r['solver'])})"
        out.append(f"| {n} | {fmt(cl)} | {fmt(bl)} | {cell(se)} | {cell(dd['ddim'])} | {cell(dd['heun'])} | "
                   f"{cell(dd['dpmpp-2m'])} | {verdict} |")
    return out


def baseline_table(ev) -> list:
    rows = [r for r in ev["rows"] if fam(r["solver"]).startswith(("gits-", "ld3-"))]
    cols = list(dict.fromkeys(fam(r["solver"]) for r in rows))
    at = {(fam(r["solver"]), r["nfe"]): r for r in rows}
    out = ["| NFE | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    for n in NFES:
        out.append(f"| {n} | " + " | ".join(cell(at.get((c, n))) for c in cols) + " |")
    return out


def grid_table(ev) -> list:
    """Mean FD ratio over NFE 3-10 of each classic solver per grid (evaluation) and the selection FD sum."""
    rows = [r for r in ev["rows"] if not r.get("learned") and not r.get("secant") and r["nfe"] in NFES]
    by = {}
    for r in rows:
        s, _, g = r["solver"].partition("/")
        by.setdefault(s, {}).setdefault(g or r.get("grid") or "default", []).append(r)
    out = ["| solver | grid | mean FD / teacher, NFE 3-10 (evaluation) | mean selection FD |",
           "|---|---|---:|---:|"]
    for s, gs in by.items():
        if len(gs) < 2:
            continue
        for g, rs in gs.items():
            out.append(f"| {s} | {g} | {sum(r['fd_ratio'] for r in rs) / len(rs):.2f} | "
                       f"{sum(r['selection_fd'] for r in rs) / len(rs):.3f} |")
    return out


def secant_table(ev) -> list:
    """FD / teacher FD of every secant file at its step counts (evaluation seeds), bold = the lowest."""
    rows = [r for r in ev["rows"] if r.get("secant")]
    names = list(dict.fromkeys(r["solver"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    at = {(r["solver"], r["steps"]): r for r in rows}
    low = {k: min((at[(n, k)] for n in names if (n, k) in at), key=lambda r: r["fd_ratio"]) for k in steps}
    out = ["| file | " + " | ".join(f"{k} step{'s' if k > 1 else ''}" for k in steps) + " |",
           "|---|" + "---:|" * len(steps)]
    for n in names:
        out.append(f"| {n} | " + " | ".join(cell(at.get((n, k)), at.get((n, k)) is low[k]) for k in steps) + " |")
    return out


def kid(r) -> str:
    return "" if r is None else f"{1e3 * r['kid']:.1f} ± {1e3 * r['kid_std']:.1f}"


def kid_table(ev) -> list:
    """KID x 1000 (evaluation seeds) of the teacher, real images and, per NFE, the best classic sampler and
    the searched solver (both chosen on the selection set)."""
    te, fl = ev["teacher"], ev["floor"]
    out = [f"KID x 1000: teacher {kid(te)}, real images (the floor) {kid(fl)}", "",
           "| NFE | best classic | KID x 1000 | searched KID x 1000 |", "|---:|---|---:|---:|"]
    for n in NFES:
        at_n = [r for r in ev["rows"] if r["nfe"] == n and not r.get("secant")]
        cl = chosen(at_n, lambda r: not r.get("learned"))
        se = chosen(at_n, lambda r: fam(r["solver"]) == "searched")
        out.append(f"| {n} | {cl['solver']} | {kid(cl)} | {kid(se)} |")
    return out


def main(path) -> None:
    ev = json.loads((Path(path) / "eval.json").read_text())
    te, fl = ev["teacher"], ev["floor"]
    print(f"teacher FD {te['fd']:.3f} ± {te['fd_std']:.3f}, KID {kid(te)} e-3, acc {te['acc']:.3f}; floor "
          f"{fl['fd']:.3f} ± {fl['fd_std']:.3f} (ratio {fl['fd_ratio']:.2f}), KID {kid(fl)} e-3, real acc {fl['acc']:.3f}; "
          f"selection teacher FD {ev['selection_set']['teacher_fd']:.3f}; guidance {ev['guidance']:g}; "
          f"sweep {[(r['guidance'], round(r['fd'], 3)) for r in ev['guidance_sweep']]}\n")
    for title, t in (("classic", classic_table(ev)), ("learned", learned_table(ev)),
                     ("baselines", baseline_table(ev)), ("grids", grid_table(ev)), ("secant", secant_table(ev)),
                     ("kid", kid_table(ev))):
        print(f"## {title}\n\n" + "\n".join(t) + "\n")
    print("best:", {k: (v["solver"], round(v["fd_ratio"], 2)) for k, v in ev["best"].items()})
    if "guidance_tables" in ev:
        from stride_diffusion.offline.guidance_eval import markdown

        print("\n## guidance\n\n" + markdown(ev["guidance_tables"]))


if __name__ == "__main__":
    main(sys.argv[1])

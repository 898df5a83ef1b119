"""`stride offline eval-guidance`: one table per classifier-free guidance scale w.

At each w, on the evaluation seeds (rows) and the selection seeds (choices):
  teacher   DPM-Solver++ 3M at `--reference` steps with CFG at w (converged: RMSE to half the steps)
  classic   every `--solvers` entry at `--steps`; the best per NFE is chosen on the selection set
  learned   solvers fitted at this w: ARTIFACT/solvers/* for w = 1, `--guided-dir`/w<w>/* otherwise
            (searched and D-ODE files, `stride offline search|dode --guidance w --out ...`)
  secant    the artifact's secant files with a guidance input (one evaluation per step)
NFE counts every network call: a CFG step costs 2 (both branches), a guidance-input secant step 1.
FD ratios are to the teacher's FD at the same w and seeds. The claims it checks (`claims`): no
learned sampler worse than Euler at equal NFE; the searched solver within 10% of the teacher at
NFE 8. Written into eval.json under `guidance_tables` (the other keys are kept).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from stride_diffusion.solvers.artifact import load_artifact, load_solvers, read_json, write_json
from stride_diffusion.solvers.builders import make_table
from stride_diffusion.solvers.secant import load_secant, secant_names

from .protocol import Protocol, make_seed_sets, sampling_code_version, secant_rows


def _steps_of(tab) -> int:
    return tab.nfe


def table_at(art, w: float, *, n: int, sets: int, solvers, steps, guided_dir, reference, secants, cache,
             batch, log) -> dict:
    p = Protocol(art, n, make_seed_sets(n, sets), cache, batch)
    sel = p.selection()
    cfg = 1 if w == 1 else 2
    ref_solver, ref_nfe = reference.split(":")
    t0 = time.time()
    x_ref = p.reference(ref_solver, int(ref_nfe), w)
    x_half = p.reference(ref_solver, int(ref_nfe) // 2, w, first_set_only=True)
    conv = float((x_half - x_ref[:n]).double().pow(2).mean().sqrt())
    sel_ref = sel.reference(ref_solver, int(ref_nfe), w)
    teacher = p.row(f"{ref_solver}:{ref_nfe}", int(ref_nfe) * cfg, p.score(x_ref))
    teacher.update(converged_rmse=conv, steps=int(ref_nfe))
    print(f"w={w:g}: teacher fd {teacher['fd']:.3f} (converged rmse {conv:.1e}, {time.time() - t0:.0f}s)",
          file=log, flush=True)
    rows = []

    def add(name, tab, kind):
        x = p.samples(tab, w)
        r = p.row(name, _steps_of(tab) * cfg, p.score(x, x_ref),
                  {"steps": _steps_of(tab), "kind": kind, "selection_fd": sel.fd_of(sel.samples(tab, w))})
        rows.append(r)
        print(f"w={w:g} {name:>22} steps {r['steps']:>2} nfe {r['nfe']:>2}  fd ratio {r['fd_ratio']:.2f}"
              f"  rmse {r['rmse']:.4f}", file=log, flush=True)

    m = p.model
    for s in solvers:
        for k in steps:
            add(s, make_table(s, m.schedule, m.param, k), "classic")
    d = art.path / "solvers" if w == 1 else Path(guided_dir) / f"w{w:g}"
    for name, tab in sorted(load_solvers(d, art.sha256).items()):
        if name.startswith(("searched-", "dode-")):
            add(name, tab, "searched" if name.startswith("searched-") else "dode")
    sel_sec = {(r["solver"], r["steps"]): r["fd"] for r, _ in secant_rows(sel, w, sel_ref, (1, 2, 4, 8), secants)}
    for r, _ in secant_rows(p, w, x_ref, (1, 2, 4, 8), secants):
        r.update(kind="secant", selection_fd=sel_sec[(r["solver"], r["steps"])])
        rows.append(r)
    # the best classic per NFE, chosen on the selection set
    best = {}
    for r in rows:
        if r["kind"] == "classic":
            b = best.get(r["nfe"])
            if b is None or r["selection_fd"] < b["selection_fd"]:
                best[r["nfe"]] = r
    return {"guidance": w, "n": n, "seed_sets": [{"first_seed": s[0], "count": len(s)} for s in p.sets],
            "selection_first_seed": sel.sets[0][0], "teacher": teacher, "floor": p.floor(),
            "best_classic": {str(k): v["solver"] for k, v in sorted(best.items())},
            "rows": rows, "claims": claims(rows)}


def claims(rows) -> dict:
    """Learned rows worse (higher mean FD) than Euler at the same NFE, and the searched rows at NFE 8."""
    euler = {r["nfe"]: r for r in rows if r["solver"] == "euler"}
    worse = []
    for r in rows:
        if r["kind"] in ("searched", "dode", "secant"):
            e = euler.get(r["nfe"]) or euler.get(r["nfe"] + 1)  # a 1-call secant step vs Euler's 2-call step
            if e is not None and r["fd"] > e["fd"]:
                worse.append({"solver": r["solver"], "nfe": r["nfe"], "fd_ratio": r["fd_ratio"],
                              "euler_fd_ratio": e["fd_ratio"]})
    at8 = [{"solver": r["solver"], "fd_ratio": r["fd_ratio"], "within_10pct": r["fd_ratio"] <= 1.10}
           for r in rows if r["kind"] == "searched" and r["nfe"] == 8]
    return {"learned_worse_than_euler": worse, "searched_at_nfe8": at8}


def evaluate_guidance(artifact, ws=(1, 1.5, 2, 3, 4), n=300, sets=1, solvers=None, steps=(2, 3, 4, 5, 8),
                      guided_dir=None, reference="dpmpp-3m/logsnr:128", secants=None, cache=".cache/stride/eval",
                      batch=500, threads=None, log=None, command=None) -> dict:
    log = sys.stderr if log is None else log  # per call: a test may swap sys.stderr
    if threads:
        torch.set_num_threads(threads)
    art = load_artifact(artifact)
    flow = art.model.schedule.name == "flow"
    solvers = solvers or (["euler", "heun", "dpmpp-2m/uniform", "dpmpp-2m/logsnr", "unipc/logsnr", "ipndm"] if flow
                          else ["euler", "ddim/logsnr", "dpmpp-2m/logsnr", "unipc/logsnr", "ipndm"])
    guided_dir = guided_dir or art.path / "guided"
    t0 = time.time()
    tables = [table_at(art, float(w), n=n, sets=sets, solvers=solvers, steps=steps, guided_dir=guided_dir,
                       reference=reference, secants=secants, cache=cache, batch=batch, log=log) for w in ws]
    f = art.path / "eval.json"
    ev = read_json(f)
    ev["guidance_tables"] = {"protocol": f"{n} samples x {sets} evaluation seed set(s) per w; best classic and "
                                         "every choice on the selection set",
                             "nfe": "network calls per sample, both CFG branches counted",
                             "classifier_sha256": ev.get("classifier_sha256"), "sampling_code": sampling_code_version(),
                             "wall_time_s": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
                             "command": command, "tables": tables}
    write_json(f, ev)
    return ev["guidance_tables"]


def markdown(gt: dict) -> str:
    """One table per w: FD / teacher FD (evaluation seeds) per sampler family and NFE."""
    out = []
    for t in gt["tables"]:
        rows = t["rows"]
        fam = lambda r: r["solver"].rsplit("-nfe", 1)[0]
        cols = list(dict.fromkeys(fam(r) for r in rows))
        nfes = sorted({r["nfe"] for r in rows})
        at = {(fam(r), r["nfe"]): r for r in rows}
        te, fl = t["teacher"], t.get("floor")
        real = f"; real images FD {fl['fd']:.3f}, KID {fl['kid']:.4f}" if fl else ""
        out += [(f"**w = {t['guidance']:g}**: teacher FD {te['fd']:.3f}, KID {te['kid']:.4f} (NFE {te['nfe']}, converged "
                 f"RMSE {te['converged_rmse']:.1e}){real}; cells: FD / teacher FD"
                 f"{' ± std over the seed sets' if len(t['seed_sets']) > 1 else ''} (steps)"), "",
                "| NFE | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        for k in nfes:
            cells = []
            for c in cols:
                r = at.get((c, k))
                std = f" ± {r['fd_ratio_std']:.2f}" if r and len(t["seed_sets"]) > 1 else ""
                cells.append("" if r is None else f"{r['fd_ratio']:.2f}{std} ({r['steps']})")
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        cl = t["claims"]
        worse = ", ".join("{solver}@{nfe}".format(**x) for x in cl["learned_worse_than_euler"]) or "none"
        at8 = ", ".join("{:.2f}".format(x["fd_ratio"]) for x in cl["searched_at_nfe8"]) or "-"
        out += ["", f"learned worse than Euler at equal NFE: {worse}; searched at NFE 8: {at8}", ""]
    return "\n".join(out)


def add_parser(subparsers):
    p = subparsers.add_parser("eval-guidance", help="one quality table per CFG scale -> eval.json guidance_tables",
                              description=__doc__)
    p.add_argument("artifact")
    p.add_argument("--w", default="1,1.5,2,3,4", help="guidance scales")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed-sets", type=int, default=1)
    p.add_argument("--solvers", default=None, help="classic solvers (default: per schedule family)")
    p.add_argument("--steps", default="2,3,4,5,8", help="classic steps (NFE = steps x 2 under CFG)")
    p.add_argument("--guided-dir", default=None, help="per-w solver files (default ARTIFACT/guided)")
    p.add_argument("--secants", default=None, help="secant files (default: every guidance-input one)")
    p.add_argument("--reference", default="dpmpp-3m/logsnr:128")
    p.add_argument("--cache", default=".cache/stride/eval")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)
    return p


def run(a, command=None) -> int:
    art = load_artifact(a.artifact)
    secants = a.secants.split(",") if a.secants else [
        s for s in secant_names(art.path) if load_secant(art.path, art.sha256, name=s).guidance_input]
    gt = evaluate_guidance(a.artifact, [float(v) for v in a.w.split(",")], a.n, a.seed_sets,
                           a.solvers.split(",") if a.solvers else None, [int(v) for v in a.steps.split(",")],
                           a.guided_dir, a.reference, secants, a.cache, threads=a.threads,
                           command=command)
    md = markdown(gt)
    (Path(a.artifact) / "eval-guidance.md").write_text(md + "\n")
    print(md)
    print(json.dumps({t["guidance"]: t["claims"] for t in gt["tables"]}, indent=1))
    return 0

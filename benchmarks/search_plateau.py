"""The solver search's plateau rule and warm start on the analytic mixture: RMSE to the exact ODE
solution, iterations and CPU seconds per NFE, for the stop-on-first-plateau rule it replaced, a
fixed 1000-iteration run, and the rules measured for the default (docs/offline.md has the table).

A 64-D class-conditional Gaussian mixture, 10 classes of one component each (scale 0.05, seed 0),
so `exact_solution` gives the probability-flow ODE's endpoint; the search's defaults otherwise
(batch 12, teacher dpmpp-2m/logsnr x64, 64 selection seeds, one thread).

    python benchmarks/search_plateau.py --schedule flow --nfe 3,4,5,6,8,10
    python benchmarks/search_plateau.py --schedule vp --rules fixed-1000 --nfe 3,4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stride_diffusion.offline.fitting import heldout
from stride_diffusion.offline.search import search
from stride_diffusion.solvers import GaussianMixture
from stride_diffusion.solvers.schedules import F64, FlowSchedule, VPSchedule

RULES = {  # name -> search() keywords
    "first-plateau": dict(iters=300, patience=40, decays=0, warm=False),  # the rule it replaced
    "fixed-1000": dict(iters=1000, patience=10 ** 9, decays=0, warm=False),
    "p40-d2-cold": dict(iters=300, patience=40, decays=2, warm=False),
    "p20-d2-warm": dict(iters=300, patience=20, decays=2),
    "p40-d2-warm": dict(iters=300, patience=40, decays=2),
    "no-pool": dict(pool=None),  # the default with a fresh teacher batch every iteration
    "default": dict(),  # patience 40, 3 decays of 0.3, cap 600, warm starts racing, 100 teacher batches
}


def mixture(kind: str):
    sch, param = (FlowSchedule(), "flow") if kind == "flow" else (VPSchedule("linear"), "eps")
    m = GaussianMixture.random(sch, param, num_classes=10, per_class=1, dim=64, seed=0, scale=0.05)
    vn, vl = heldout(m, 64)
    y0 = vn.reshape(len(vn), -1).double() * sch.sigma(torch.tensor(sch.t_max, dtype=F64))
    return m, m.exact_solution(y0, sch.t_max, sch.t_min, vl)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", choices=("flow", "vp"), default="flow")
    p.add_argument("--nfe", default="3,4,5,6,8,10")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma list of {list(RULES)}")
    a = p.parse_args()
    torch.set_num_threads(1)
    m, ref = mixture(a.schedule)
    nfes = [int(x) for x in a.nfe.split(",")]
    print(f"| rule | {' | '.join(f'NFE {n}' for n in nfes)} | CPU s, all NFEs |")
    print("|---|" + "---:|" * (len(nfes) + 1))
    for rule in a.rules.split(","):
        t0 = time.process_time()
        res = search(m, nfes, ref=ref, log=lambda *_, **__: None, **RULES[rule])
        cells = [f"{res[n]['best_rmse']:.5f} ({res[n]['iters_run']})" for n in nfes]
        print(f"| {rule} | {' | '.join(cells)} | {time.process_time() - t0:.1f} |", flush=True)
        print(json.dumps({"rule": rule, "schedule": a.schedule, "cpu_s": {n: round(r["cpu_s"], 2) for n, r in res.items()},
                          "start": {n: r["init"] for n, r in res.items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()

"""The solver search's plateau rule and starts on the analytic mixture: RMSE to the exact ODE solution
on 1000 evaluation seeds (the search chooses on its selection seeds; both are reported), iterations
and CPU seconds per NFE, for the stop-on-first-plateau rule it replaced, a fixed 1000-iteration run,
and the rules measured for the default (docs/offline.md has the table).

A 64-D class-conditional Gaussian mixture, 10 classes of one component each (scale 0.05, seed 0),
so `exact_solution` gives the probability-flow ODE's endpoint; the search's defaults otherwise
(batch 12, teacher dpmpp-2m/logsnr x64, 64 selection seeds, one thread).

    python benchmarks/search_plateau.py --schedule flow --nfe 3,4,5,6,8,10
    python benchmarks/search_plateau.py --schedule vp --rules fixed-1000 --nfe 3,4 --seed 1
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
from stride_diffusion.offline.seeds import evaluation_sets, stream_seed
from stride_diffusion.solvers import GaussianMixture, sample
from stride_diffusion.solvers.executor import seeded_noise
from stride_diffusion.solvers.learned import searched_table
from stride_diffusion.solvers.schedules import F64, FlowSchedule, VPSchedule

RULES = {  # name -> search() keywords
    "first-plateau": dict(iters=300, patience=40, decays=0, warm=False, pool=None, val=64, val_every=10),  # before
    "fixed-1000": dict(iters=1000, patience=10 ** 9, decays=0, warm=False, pool=None, val=64, val_every=10),
    "cold": dict(warm=False),  # the default with every NFE from --init alone
    "no-pool": dict(pool=None),  # the default with a fresh teacher batch every iteration
    "val-256": dict(val=256, val_every=20),  # the default choosing on 256 selection seeds every 20 iterations
    "default": dict(),  # patience 40, 3 decays of 0.3, cap 600, two racing starts, 100 teacher batches
}


def mixture(kind: str):
    sch, param = (FlowSchedule(), "flow") if kind == "flow" else (VPSchedule("linear"), "eps")
    return GaussianMixture.random(sch, param, num_classes=10, per_class=1, dim=64, seed=0, scale=0.05)


def exact(m, noise, labels):
    sch = m.schedule
    y0 = noise.reshape(len(noise), -1).double() * sch.sigma(torch.tensor(sch.t_max, dtype=F64))
    return m.exact_solution(y0, sch.t_max, sch.t_min, labels)


def evaluation(m, n=1000):
    noise = seeded_noise(evaluation_sets(n, 1)[0], m.shape)
    labels = torch.arange(n) % m.num_classes
    return noise, labels, exact(m, noise, labels)


def eval_rmse(m, r, ev) -> float:
    tab = searched_table(m.schedule, m.param, r["form"], r["grid"], r["M"])
    x = sample(m, tab, ev[0], ev[1])
    return float((x.reshape(len(x), -1).double() - ev[2]).pow(2).mean().sqrt())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", choices=("flow", "vp"), default="flow")
    p.add_argument("--nfe", default="3,4,5,6,8,10")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma list of {list(RULES)}")
    p.add_argument("--seed", type=int, default=0, help="training stream: offset into the search range")
    a = p.parse_args()
    torch.set_num_threads(1)
    m = mixture(a.schedule)
    ev = evaluation(m)
    nfes = [int(x) for x in a.nfe.split(",")]
    print(f"evaluation RMSE (selection RMSE) [iterations of the kept start], {a.schedule}, search seed {a.seed}")
    print(f"| rule | {' | '.join(f'NFE {n}' for n in nfes)} | CPU s, all NFEs |")
    print("|---|" + "---:|" * (len(nfes) + 1))
    for rule in a.rules.split(","):
        t0 = time.process_time()
        kw = {"val": 64, **RULES[rule]}
        ref = exact(m, *heldout(m, kw["val"]))
        res = search(m, nfes, ref=ref, seed=stream_seed("search", a.seed), log=lambda *_, **__: None, **kw)
        cpu = time.process_time() - t0
        cells = [f"{eval_rmse(m, res[n], ev):.5f} ({res[n]['best_rmse']:.5f}) [{res[n]['iters_run']}]" for n in nfes]
        print(f"| {rule} | {' | '.join(cells)} | {cpu:.1f} |", flush=True)
        print(json.dumps({"rule": rule, "schedule": a.schedule, "cpu_s": {n: round(r["cpu_s"], 2) for n, r in res.items()},
                          "start": {n: r["init"] for n, r in res.items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()

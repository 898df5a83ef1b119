"""How finely the demo's judge can rank samplers: KID - the floor's KID per evaluation seed set, with the
standard error that the 180-image reference itself contributes (stride_diffusion/offline/metrics.py: kid_reference_se).

    python scripts/kid_resolution.py artifacts/digits [--nfe 4,8,10]

Rows: the teacher and, at each NFE, the sampler eval.json's `best` serves. Samples come from the
evaluation cache (.cache/stride/eval), or are recomputed exactly as `stride offline eval` made them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stride_diffusion.offline.metrics import features, kid, kid_reference_se
from stride_diffusion.offline.protocol import Protocol
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.builders import make_table


def main(argv=None) -> None:
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("artifact")
    a.add_argument("--nfe", default="4,8,10")
    a = a.parse_args(argv)
    torch.set_num_threads(1)
    art = load_artifact(a.artifact)
    ev = json.loads((Path(a.artifact) / "eval.json").read_text())
    n, g = ev["n"], ev["guidance"]
    p = Protocol(art, n, [list(range(s["first_seed"], s["first_seed"] + s["count"])) for s in ev["seed_sets"]])
    ref = ev["reference"]
    rows = {f"teacher ({ref['solver']}:{ref['nfe']})": p.reference(ref["solver"], ref["nfe"], g)}
    m = p.model
    for k in a.nfe.split(","):
        name = ev["best"][k]["solver"]
        tab = art.solvers[name] if name in art.solvers else make_table(name, m.schedule, m.param, int(k))
        if name.startswith("secant"):
            continue  # a secant file's samples are not a table run; rank it with offline eval's rows instead
        rows[f"{name} @ {k}"] = p.samples(tab, g)
    print(f"{a.artifact}: KID - floor KID (x 1000) ± the reference's standard error, per evaluation seed set")
    for j in range(len(p.sets)):
        f_real = features(p.clf, p.real_images(j))
        cells = []
        for name, x in rows.items():
            f = features(p.clf, x[j * n:(j + 1) * n])
            d = kid(f, p.f_real) - kid(f_real, p.f_real)
            cells.append(f"{name}: {1e3 * d:+.1f} ± {1e3 * kid_reference_se(f, f_real, p.f_real):.1f}")
        print(f"set {j}: " + "; ".join(cells))


if __name__ == "__main__":
    main()

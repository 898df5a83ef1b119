"""The batch contract on the trained digits network (docs/serving.md, "Batch contract"): an image does
not depend on what else is in its batch beyond one grey level per pixel (floating-point reassociation
in batched convolutions), and the same batch gives the same bytes every time."""
import numpy as np
import pytest
import torch

from stride_diffusion.service.encode import encode
from stride_diffusion.service.images import quantize
from stride_diffusion.service.models import ModelEntry
from stride_diffusion.solvers import Stepper, seeded_noise


@pytest.fixture(scope="module")
def digits():
    return ModelEntry.from_artifact("artifacts/digits", steps=[2, 4])


def run(e, reqs):
    """reqs: (solver, steps, label, guidance, seed) -> uint8 images [n, H, W, 1], through the Stepper as
    the worker runs it (samples of different tables in one model call, leaving when done)."""
    out, by_net = {}, {}
    for i, r in enumerate(reqs):
        by_net.setdefault(e.stepper_key(r[0]), []).append(i)
    tables = [e.samplers[r[0]].table(r[1]) for r in reqs]  # outside inference mode (some tables are built with autograd)
    with torch.inference_mode():
        for idx in by_net.values():
            m = e.samplers[reqs[idx[0]][0]].model
            tabs = [tables[i] for i in idx]
            st = Stepper(m, max(t.window for t in tabs))
            st.add(tabs, seeded_noise([reqs[i][4] for i in idx], e.shape), [reqs[i][2] for i in idx],
                   [reqs[i][3] for i in idx], ids=idx)
            while len(st):
                st.step()
                ids, y = st.pop_done_batch()
                out.update(zip(ids, quantize(y, e.data_range).numpy()))
    return np.stack([out[i] for i in range(len(reqs))])


def test_alone_vs_mixed_batch_within_one_grey_level(digits):
    e = digits
    # a served secant network (guidance input) and the base U-Net with two CFG branches
    sec = next(s.name for s in e.samplers if s.network)
    targets = [(sec if k % 2 else "dpmpp-2m", 4, k % 10, 1.0 + (k % 3) * 0.5, 100 + k) for k in range(24)]
    alone = np.concatenate([run(e, [r]) for r in targets])
    others = [(e.samplers.resolve(2).name, 2, k % 10, 2.0, 900 + k) for k in range(12)] + \
             [("dpmpp-2m", 4, k % 10, 1.5, 950 + k) for k in range(12)]
    mixed = run(e, others[:6] + targets[:12] + others[6:] + targets[12:])
    mixed = np.concatenate([mixed[6:18], mixed[-12:]])
    diff = np.abs(alone.astype(int) - mixed.astype(int))
    assert diff.max() <= 1, diff.max()
    frac = (diff > 0).mean()
    assert frac < 0.01, frac  # measured on this CPU: 0 (the same bytes); 1% of images per the design notes
    # the same composition again: byte-identical, pixels and every encoding
    again = np.concatenate([run(e, [r]) for r in targets])
    assert np.array_equal(again, alone)
    for fmt in ("png", "jpeg", "webp"):
        assert encode(alone[:3], fmt) == encode(again[:3], fmt)

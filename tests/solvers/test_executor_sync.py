"""The executor never reads device memory inside a step: counted on the CPU with a
TorchFunctionMode, and run on the meta device, where any read-back raises."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from stride_diffusion.solvers import Stepper, make_table, seeded_noise
from stride_diffusion.solvers.schedules import FlowSchedule
from stride_diffusion.solvers.update import fused_update_torch

# Tensor methods that make the host wait for the device (or copy device memory to the host)
SYNCS = {"item", "tolist", "cpu", "nonzero", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class Linear:
    """out = a(t) * x + e[label]: a network that itself never syncs, on any device."""
    schedule, param, num_classes, shape = FlowSchedule(), "flow", 3, (2, 3)

    def __init__(self, device):
        g = torch.Generator().manual_seed(0)
        self.e = torch.randn(4, 6, generator=g).to(device)

    def __call__(self, x, t, s, label):
        return (1 + t)[:, None, None] * x * 0.3 + self.e.index_select(0, label).view(-1, 2, 3)


def scenario(st, device, step_hook=lambda f: f()):
    """Mixed step counts and solvers, CFG rows, samples joining mid-way and leaving when done."""
    sch = Linear.schedule
    tabs = [make_table("euler", sch, "flow", 2), make_table("dpmpp-2m", sch, "flow", 5),
            make_table("dpmpp-3m", sch, "flow", 3)]
    done = {}
    st.add([tabs[0], tabs[1], tabs[2], tabs[1]], seeded_noise(range(4), Linear.shape, device), [0, 1, 2, 0],
           [1.0, 2.0, 1.0, 3.0], ids=list("abcd"))
    for k in range(7):
        if k == 1:
            st.add([tabs[2], tabs[0]], seeded_noise([7, 8], Linear.shape, device), [1, 2], [2.5, 1.0], ids=list("ef"))
        if k == 2:
            st.remove(["d"])

        def one():
            st.step()
            ids, y = st.pop_done_batch()
            done.update(zip(ids, y))
        step_hook(one)
    return done


def test_no_host_sync_inside_a_step():
    st = Stepper(Linear("cpu"), window=3, update=fused_update_torch)
    mode = CountSyncs()

    def counted(f):
        with mode:
            f()
    done = scenario(st, "cpu", counted)
    assert set(done) == set("abcef") and len(st) == 0
    assert st.evaluations > 0
    assert mode.seen == []


def test_the_counter_sees_a_sync():  # the instrument itself works
    mode = CountSyncs()
    with mode:
        x = torch.ones(3)
        x.nonzero(), x.sum().item(), bool(x[0])
    assert mode.seen == ["nonzero", "item", "__bool__"]


def test_runs_on_the_meta_device():
    """Meta tensors have no data: a step that read anything back would raise."""
    st = Stepper(Linear("meta"), window=3, device="meta", update=fused_update_torch)
    done = scenario(st, "meta")
    assert set(done) == set("abcef") and all(y.device.type == "meta" for y in done.values())
    with pytest.raises((RuntimeError, NotImplementedError)):
        st.y.sum().item()

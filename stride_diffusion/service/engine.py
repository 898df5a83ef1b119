"""The compute side of a worker: one Stepper per model, images joining and leaving between steps.

Every image is one sample in its model's Stepper with its own table, label, guidance and seeded
noise, so requests with different step counts and solvers share each model call, and the result of
a seed does not depend on what else is in the batch (up to the batch contract in docs/serving.md). Not
thread-safe: the worker calls add, drop, step and release from its step thread, and reads
rows/busy under its lock.

The samples a step finishes are decoded as one batch per decoder (the model's decoder: a VAE, or the
identity for pixel models; or the tiny decoder for requests that ask for it), quantised to uint8 on the device and copied to the host in one transfer (pinned
and asynchronous on CUDA, where the images are handed over one step later so that the copy
overlaps the next step). The worker hands raw pixels on; the API process encodes them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from stride_diffusion.solvers.contracts import network
from stride_diffusion.solvers.executor import Stepper, seeded_noise
from stride_diffusion.solvers.network import Network, dtype_of

from .images import quantize
from .metrics import Metrics
from .models import Registry
from .previews import Previews


def _low_precision(model) -> bool:
    """A network loaded in bf16/fp16 (--dtype, or as model.json records it): run it under autocast."""
    net = network(model)
    p = next(net.parameters(), None) if net is not None else None
    return p is not None and p.dtype != torch.float32


class FinishedImage(NamedTuple):
    """One image a step finished: its request, its index in the request, its uint8 pixels [H, W, C]."""

    job_id: str
    index: int
    pixels: np.ndarray


@dataclass
class Admitted:
    rows_per_image: int
    images: int  # admitted and not finished
    decoder: str | None = None  # the request's decoder (ModelEntry.decoders); None: the model's own


class Engine:
    def __init__(self, registry: Registry, steps_offered, device="cpu", metrics: Metrics | None = None,
                 dtype: str | None = None, graphs: bool = False, buckets=(), update: str | None = None,
                 static: bool = False, compile: bool = False, compile_mode: str = "default", sdpa: str = "auto",
                 fuse_qkv: bool = False):
        """dtype: the networks' precision (None: as loaded); graphs: CUDA graphs per batch bucket (CUDA
        only); static: the graph path's static bucket buffers without graphs (what the CPU can run of
        it); update: 'auto' | 'torch' | 'triton' (None: STRIDE_UPDATE); compile, compile_mode, sdpa,
        fuse_qkv: `solvers.network.Network`'s options (compile also compiles the decoders, which use
        channels_last on CUDA)."""
        self.registry, self.device, self.metrics = registry, torch.device(device), metrics
        dt = dtype_of(dtype) if dtype else None
        self.steppers, self.model_of = {}, {}
        opts = {"compile": compile, "compile_mode": compile_mode, "sdpa": sdpa, "fuse_qkv": fuse_qkv}
        wrap = static or compile or fuse_qkv or sdpa != "auto" or (graphs and self.device.type == "cuda")
        for e in registry:
            for k, (m, w) in e.steppers(steps_offered).items():
                if dt is not None or _low_precision(m) or wrap:
                    m = Network(m, dt, buckets, graphs, static=static, **opts)
                step_graph = isinstance(m, Network) and bool(m.buckets)  # solvers/step_graph.py
                self.steppers[k] = Stepper(m, w, self.device, update=update, step_graph=step_graph)
                self.model_of[k] = e.name  # metrics label
            for dec in e.decoders.values():
                if hasattr(dec, "optimize"):
                    dec.optimize(channels_last=self.device.type == "cuda", compile=compile, compile_mode=compile_mode)
        self.jobs: dict[str, Admitted] = {}
        self.previews = Previews(registry, self.model_of)  # streamed requests' previews (service/previews.py)
        self.incoming: dict[str, list] = {}  # stepper key -> admitted images not yet in the Stepper
        self.pending: list = []  # CUDA: (event, pinned host pixels, ids) copied during the next step
        self.timings: list = []  # CUDA: (histogram, start event, end event) not yet read back

    def networks(self) -> list:
        return [st.model for st in self.steppers.values() if isinstance(st.model, Network)]

    def capture_steps(self) -> float:
        """Capture every Stepper's whole-step graphs (CUDA with graphs; after the networks' own
        `capture`, before any request); returns the seconds it took."""
        t0 = time.perf_counter()
        for st in self.steppers.values():
            if st.graph is not None:
                st.graph.capture()
        return time.perf_counter() - t0

    @property
    def rows(self) -> int:
        return sum(a.rows_per_image * a.images for a in self.jobs.values())

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    def add(self, job, table, first: int, count: int, rows_per_image: int):
        """Admit images first..first+count-1 of `job`. They enter the Stepper at the start of the next
        step, all admissions of a step in one Stepper.add (one concatenation of the batch state)."""
        key = self.registry[job.model].stepper_key(job.solver)
        self.incoming.setdefault(key, []).append((job, table, first, count))
        a = self.jobs.setdefault(job.id, Admitted(rows_per_image, 0, getattr(job, "decoder", None)))
        a.images += count
        if getattr(job, "preview", 0):
            self.previews.want(job.id, job.preview)

    def _flush(self):
        for key, items in self.incoming.items():
            tables, seeds, labels, w, ids = [], [], [], [], []
            for job, table, first, count in items:
                tables += [table] * count
                seeds += range(job.seed + first, job.seed + first + count)
                labels += [job.label] * count
                w += [float(job.guidance)] * count
                ids += [(job.id, i) for i in range(first, first + count)]
            st = self.steppers[key]
            st.add(tables, seeded_noise(seeds, st.model.shape, device=self.device), labels, w, ids=ids)
        self.incoming.clear()

    def drop(self, job_id: str):
        """Remove a job's running images (expired or failed)."""
        if self.jobs.pop(job_id, None) is None:
            return
        for key in list(self.incoming):
            self.incoming[key] = [it for it in self.incoming[key] if it[0].id != job_id]
        for st in self.steppers.values():
            ids = [i for i in st.ids if i[0] == job_id]
            if ids:
                st.remove(ids)

    def progress(self, job_ids) -> dict[str, int]:
        """The fewest evaluations done by a running image of each job in `job_ids` (host lists: no
        device sync)."""
        out: dict[str, int] = {}
        for st in self.steppers.values():
            for (jid, _), k in zip(st.ids, st.k):
                if jid in job_ids and k < out.get(jid, k + 1):
                    out[jid] = k
        return out

    def pixels(self, key: str, y: torch.Tensor, decoder: str | None = None) -> torch.Tensor:
        """Finished states [F, *shape] -> uint8 images [F, H, W, C] on the device, through the model's
        decoder named `decoder` (None: its own)."""
        e = self.registry[self.model_of[key]]
        dec = e.decoders[decoder] if decoder is not None else e.decoder
        if dec.kind == "identity":  # a pixel model: straight from its data range
            return quantize(y.reshape(-1, *dec.image_shape), e.data_range)
        return quantize(dec.decode(y.float()), (-1.0, 1.0))

    def decode(self, key: str, ids: list, y: torch.Tensor) -> list[tuple[list, torch.Tensor]]:
        """Finished images (ids (job id, index), states) -> [(ids, uint8 pixels)], one batch per decoder
        their requests chose."""
        groups: dict = {}
        for i, (jid, _) in enumerate(ids):
            a = self.jobs.get(jid)
            groups.setdefault(a.decoder if a is not None else None, []).append(i)
        if len(groups) == 1:
            return [(ids, self.pixels(key, y, next(iter(groups))))]
        return [([ids[i] for i in rows], self.pixels(key, y[torch.tensor(rows, device=y.device)], name))
                for name, rows in groups.items()]

    def warm_decoders(self) -> float:
        """Decode once at batch 1 and 2 with every decoder of every model (compiles them: one graph
        for batch 1, one for the rest); returns the seconds it took."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for e in self.registry:
                key = next((k for k, name in self.model_of.items() if name == e.name), None)
                for dec in e.decoders if key is not None else ():
                    for b in (1, 2):
                        self.pixels(key, torch.zeros(b, *e.shape, device=self.device), dec)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def step(self) -> list[FinishedImage]:
        """One step of every model with running images; returns the images it finished. The caller
        passes them to `release`."""
        finished = []
        with torch.inference_mode():
            self._flush()
            for key, st in self.steppers.items():
                if not len(st):
                    continue
                name = self.model_of[key]
                t0, ev0 = self._clock(), st.evaluations
                pv = self.previews.before(key, st, self.jobs) if self.previews.every else None
                st.step()
                if pv is not None:
                    self.previews.after(pv, st)
                done = st.pop_done_batch()
                if self.metrics and st.evaluations > ev0:
                    rows = st.evaluations - ev0
                    self._observe(self.metrics.step_seconds.labels(name), t0)
                    self.metrics.batch_rows.labels(name).observe(rows)
                    self.metrics.evaluations.labels(name).inc(rows)
                    self.metrics.model_calls.labels(name).inc()
                if done.ids:
                    t1 = self._clock()
                    finished += self.decode(key, done.ids, done.states)
                    if self.metrics:
                        self._observe(self.metrics.decode_seconds.labels(name), t1)
            self._read_timings()
            if not finished and not self.pending:
                return []
            if self.device.type != "cuda":  # the quantised pixels are already host memory
                return [FinishedImage(jid, i, a) for ids, px in finished for (jid, i), a in zip(ids, px.numpy())]
            new = []
            for ids, px in finished:  # one pinned asynchronous copy per model
                host = torch.empty(px.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(px, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                new.append((ev, host, ids))
            ready, self.pending = self.pending, new
            if not any(len(st) for st in self.steppers.values()) and not self.incoming:
                ready, self.pending = ready + self.pending, []  # idle next: nothing to overlap with
            out = []
            for ev, host, ids in ready:
                ev.synchronize()
                out += [FinishedImage(jid, i, a) for (jid, i), a in zip(ids, host.numpy())]
            return out

    # Time splits: on CUDA the host returns from a launch long before the GPU is done, so a step is
    # timed by a pair of CUDA events, read back once the GPU has passed the second (query() does not
    # wait); elsewhere by the host clock.
    def _clock(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _observe(self, histogram, start):
        if self.device.type != "cuda":
            histogram.observe(time.perf_counter() - start)
            return
        self.timings.append((histogram, start, self._clock()))

    def _read_timings(self):
        while self.timings and self.timings[0][2].query():
            histogram, start, end = self.timings.pop(0)
            histogram.observe(start.elapsed_time(end) / 1e3)

    def release(self, done: list[FinishedImage]):
        """Account for finished images (separate from `step`, so that the worker can hold its lock
        while `rows` changes, and only then)."""
        for img in done:
            a = self.jobs.get(img.job_id)
            if a is not None:
                a.images -= 1
                if a.images == 0:
                    del self.jobs[img.job_id]

    def reset(self):
        """Forget everything (after a failed step): the caller answers the affected jobs."""
        for st in self.steppers.values():
            if len(st):
                st.remove(list(st.ids))
        self.jobs.clear()
        self.incoming.clear()
        self.pending.clear()
        self.timings.clear()

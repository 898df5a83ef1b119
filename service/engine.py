"""The compute side of a worker: one Stepper per model, images joining and leaving between steps.

Every image is one sample in its model's Stepper with its own table, label, guidance and seeded
noise, so requests with different step counts and solvers share each model call, and the result of
a seed does not depend on what else is in the batch. Not thread-safe: the worker calls add, drop,
step and release from its step thread, and reads rows/busy under its lock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from solvers.executor import Stepper, seeded_noise

from .metrics import Metrics
from .models import Registry


@dataclass
class Admitted:
    rows_per_image: int
    images: int  # admitted and not finished


class Engine:
    def __init__(self, registry: Registry, steps_offered, device="cpu", metrics: Metrics | None = None):
        self.registry, self.device, self.metrics = registry, torch.device(device), metrics
        self.steppers = {k: Stepper(m, w, self.device) for e in registry for k, (m, w) in e.steppers(steps_offered).items()}
        self.model_of = {k: e.name for e in registry for k in e.steppers(steps_offered)}  # metrics label
        self.jobs: dict[str, Admitted] = {}
        self.incoming: dict[str, list] = {}  # stepper key -> admitted images not yet in the Stepper

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
        a = self.jobs.setdefault(job.id, Admitted(rows_per_image, 0))
        a.images += count

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
            st.add(tables, seeded_noise(seeds, st.model.shape, device=self.device), labels,
                   torch.tensor(w, dtype=torch.float64), ids=ids)
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

    def step(self) -> list[tuple[str, int, torch.Tensor]]:
        """One step of every model with running images; returns the finished (job id, index, sample).
        The caller passes them to `release`."""
        done = []
        with torch.inference_mode():
            self._flush()
            for key, st in self.steppers.items():
                if not len(st):
                    continue
                name = self.model_of[key]
                t0, ev0 = time.perf_counter(), st.evaluations
                st.step()
                out = st.pop_done()
                if self.metrics and st.evaluations > ev0:
                    rows = st.evaluations - ev0
                    self.metrics.step_seconds.labels(name).observe(time.perf_counter() - t0)
                    self.metrics.batch_rows.labels(name).observe(rows)
                    self.metrics.evaluations.labels(name).inc(rows)
                    self.metrics.model_calls.labels(name).inc()
                done += [(jid, i, y.to("cpu", copy=True)) for (jid, i), y in out]
        return done

    def release(self, done):
        """Account for finished images (separate from `step`, so that the worker can hold its lock
        while `rows` changes, and only then)."""
        for jid, _, _ in done:
            a = self.jobs.get(jid)
            if a is not None:
                a.images -= 1
                if a.images == 0:
                    del self.jobs[jid]

    def reset(self):
        """Forget everything (after a failed step): the caller answers the affected jobs."""
        for st in self.steppers.values():
            if len(st):
                st.remove(list(st.ids))
        self.jobs.clear()
        self.incoming.clear()

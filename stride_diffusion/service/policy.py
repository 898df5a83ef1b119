"""The batching policy, a pure function: which waiting images join the running batch now.

A batch is counted in model rows (an image costs 2 rows with classifier-free guidance), never in
requests, and a request with many images is split across steps rather than overflowing a batch.
Because the executor lets samples join between steps, a busy worker admits at once (the next
step runs anyway); an idle one waits up to `max_wait` from the oldest arrival to fill the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Waiting:
    id: str
    rows_per_image: int  # 2 with guidance, else 1
    images_left: int  # images not yet admitted
    deadline: float  # absolute, same clock as `now`
    arrival: float


@dataclass
class Plan:
    admit: list[tuple[str, int]] = field(default_factory=list)  # (id, images to admit now), FIFO
    expired: list[str] = field(default_factory=list)  # deadline passed: answer 504, never compute
    wake: float | None = None  # when an idle worker should decide again, if it admitted nothing


def plan(waiting: list[Waiting], free_rows: int, busy: bool, max_batch: int, max_wait: float, now: float) -> Plan:
    out = Plan()
    live = []
    for w in sorted(waiting, key=lambda w: (w.arrival, w.id)):
        if w.deadline <= now:
            out.expired.append(w.id)
        else:
            live.append(w)
    if not live:
        return out
    if not busy:
        rows = sum(w.rows_per_image * w.images_left for w in live)
        fill_by = live[0].arrival + max_wait
        if rows < min(max_batch, free_rows) and now < fill_by:
            out.wake = min(fill_by, min(w.deadline for w in live))
            return out
    free = free_rows
    for w in live:  # FIFO; a later request may take rows the head cannot use (fill), never the reverse
        k = min(w.images_left, free // w.rows_per_image)
        if k > 0:
            out.admit.append((w.id, k))
            free -= k * w.rows_per_image
        if free <= 0:
            break
    return out


# -- admission by work ---------------------------------------------------------------------------
# A request costs rows x steps (n images x rows per image x steps): model-call rows, the unit a
# worker's throughput is measured in. What is queued or running ahead of a request must be done
# before it is, so at `rate` row-steps/s it finishes (queued + work) / rate from now at the soonest.
ADMIT_SHARE = 0.7  # of the deadline: the estimate leaves out partly filled batches, decoding, encoding, contention


def work_cap(rate: float | None, deadline_s: float) -> float:
    """Row-steps that may be queued or running, counting the new request, for it to finish within
    its deadline at the measured `rate` (row-steps/s of every worker of the model); 0: no rate yet."""
    return rate * ADMIT_SHARE * deadline_s if rate else 0.0


def over_capacity(queued: float, work: float, rate: float, deadline_s: float) -> str:
    """The refusal of a request of `work` row-steps behind `queued` ones: what it would wait."""
    return (f"over capacity: {queued:.0f} row-steps queued or running and this request's {work:.0f} take about "
            f"{(queued + work) / rate:.1f} s at the measured {rate:.0f} row-steps/s, past {ADMIT_SHARE:g} of the "
            f"{deadline_s:g} s deadline; retry later or ask for fewer images or steps")

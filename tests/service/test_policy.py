"""The batching policy is a pure function: rows not requests, FIFO, split large n, wait only when idle."""
from stride_diffusion.service.policy import Waiting, plan


def W(id, n=1, rows=1, arrival=0.0, deadline=100.0):
    return Waiting(id, rows, n, deadline, arrival)


def test_idle_waits_for_more_until_max_wait():
    p = plan([W("a", arrival=10.0)], free_rows=8, busy=False, max_batch=8, max_wait=0.005, now=10.001)
    assert p.admit == [] and abs(p.wake - 10.005) < 1e-9
    p = plan([W("a", arrival=10.0)], free_rows=8, busy=False, max_batch=8, max_wait=0.005, now=10.006)
    assert p.admit == [("a", 1)] and p.wake is None


def test_idle_starts_at_once_when_the_batch_is_full():
    p = plan([W("a", n=4, rows=2), W("b", n=1)], free_rows=8, busy=False, max_batch=8, max_wait=1.0, now=0.0)
    assert p.admit == [("a", 4)]  # 8 rows: full, no waiting; b waits for the next free row


def test_busy_admits_without_waiting():
    p = plan([W("a", arrival=5.0)], free_rows=3, busy=True, max_batch=8, max_wait=1.0, now=5.0)
    assert p.admit == [("a", 1)]


def test_counts_rows_not_requests():
    # guidance doubles rows: 3 guided images need 6 rows, only 4 free -> 2 admitted, 0 rows left for b
    p = plan([W("a", n=3, rows=2), W("b", n=1, arrival=1.0)], free_rows=4, busy=True, max_batch=8, max_wait=0, now=2.0)
    assert p.admit == [("a", 2)]


def test_large_request_is_split_not_overflowing():
    p = plan([W("big", n=100)], free_rows=16, busy=False, max_batch=16, max_wait=0, now=1.0)
    assert p.admit == [("big", 16)]


def test_fifo_then_fill():
    ws = [W("late", arrival=3.0), W("early", n=2, arrival=1.0), W("mid", n=5, arrival=2.0)]
    p = plan(ws, free_rows=4, busy=True, max_batch=8, max_wait=0, now=4.0)
    assert p.admit == [("early", 2), ("mid", 2)]
    # the head needs 2 rows but 1 is free: a later 1-row request uses it; the head keeps priority next time
    p = plan([W("guided", rows=2, arrival=1.0), W("plain", arrival=2.0)], free_rows=1, busy=True, max_batch=8,
             max_wait=0, now=3.0)
    assert p.admit == [("plain", 1)]


def test_expired_requests_are_never_admitted():
    ws = [W("old", deadline=1.0), W("ok", deadline=10.0, arrival=0.5)]
    p = plan(ws, free_rows=8, busy=True, max_batch=8, max_wait=0, now=2.0)
    assert p.expired == ["old"] and p.admit == [("ok", 1)]


def test_wake_no_later_than_a_deadline():
    p = plan([W("a", arrival=0.0, deadline=0.003)], free_rows=8, busy=False, max_batch=8, max_wait=0.010, now=0.001)
    assert p.admit == [] and abs(p.wake - 0.003) < 1e-12


def test_nothing_waiting():
    p = plan([], free_rows=8, busy=False, max_batch=8, max_wait=0.01, now=0.0)
    assert p.admit == [] and p.expired == [] and p.wake is None

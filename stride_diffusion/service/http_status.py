"""How a request that did not end OK is answered: the one place a worker's `Outcome` becomes an HTTP
status and a rejected-metric reason (the worker and the queues speak only in outcomes)."""
from __future__ import annotations

from .jobs import Outcome

REJECTED_STATUS = 503  # not admitted (Rejected): answered with Retry-After
# a request that did not end OK: the HTTP status it is answered with, and the rejected-metric reason
FAILURES = {
    Outcome.CANCELLED: (499, "cancelled"),
    Outcome.EXPIRED: (504, "deadline"),
    Outcome.FAILED: (500, "error"),
    Outcome.REFUSED: (500, "error"),
    Outcome.DEAD_LETTER: (500, "dead_letter"),
    Outcome.LOST: (503, "lost"),  # not run: answered with Retry-After
}

"""The progress reporter of every long offline job (training, secant, search, D-ODE): a tqdm bar.

`report(msg)` advances one unit and shows `msg`; `report(msg, final=True)` prints `msg` on its own
line, advances, and closes the bar once its total is reached. On a terminal the bar is redrawn in place; in
a log file tqdm writes at most one update per `log_interval` seconds.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, desc: str, total: int | None = None, stream=None, log_interval: float = 10.0):
        stream = stream or sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.bar = tqdm(total=total, desc=desc, file=stream, mininterval=0.2 if tty else log_interval,
                        dynamic_ncols=tty, ascii=not tty, leave=True)

    def __call__(self, msg: str = "", final: bool = False, advance: int = 1):
        if final:  # a result line of its own; counts as a unit of work
            self.bar.write(f"{self.bar.desc}: {msg}", file=self.bar.fp)
            self.bar.update(advance)
            if self.bar.total is not None and self.bar.n >= self.bar.total:
                self.bar.close()
            return
        self.bar.set_postfix_str(msg, refresh=False)
        self.bar.update(advance)

    def close(self):
        self.bar.close()

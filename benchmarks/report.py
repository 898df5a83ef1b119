"""The one way a benchmark hands over its figures: the Markdown report on stdout and, with --out,
that report in the file and its data beside it as JSON (what scripts/results_doc.py reads)."""
from __future__ import annotations

import json
import os


def publish(text: str, data, out: str | None) -> None:
    print(text)
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(data, f, indent=1, default=str)

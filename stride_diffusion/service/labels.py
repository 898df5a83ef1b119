"""Which class a request names: one rule for `/generate`'s `class_label` and the OpenAI route's `prompt`.

A label is a class index (an integral float counts, a bool never does) or a class name: the exact
name first, then the name ignoring case and surrounding space, so that a model with both `Tabby`
and `tabby` serves each. A string of digits is a name, not an index: the query string turns
`class_label=3` into a number before it gets here (`params._query_value`), a JSON string stays a string.
"""
from __future__ import annotations

import difflib


def class_index(names: list[str], label) -> int:
    """The index of the class `label` names in `names`; ValueError naming the allowed values."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(names):
            return label
    elif isinstance(label, str):
        if label in names:
            return names.index(label)
        low = [c.lower() for c in names]
        key = label.strip().lower()
        if key in low:
            return low.index(key)
    raise ValueError(f"class_label must be an integer in 0..{len(names) - 1} or one of the class names {names}")


def closest(names: list[str], text: str, n: int = 5) -> list[str]:
    """The `n` class names most like `text` (case ignored), best first: the suggestion for a name
    that matched none. Reads at most 100 characters of `text`, so the work is bounded."""
    low = [c.lower() for c in names]
    return [names[low.index(c)] for c in difflib.get_close_matches(text.strip().lower()[:100], low, n=n, cutoff=0.0)]

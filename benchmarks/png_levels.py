"""PNG zlib level against size and time: the numbers behind `--png-level` (service.encode).

One 256x256 RGB image encoded at levels 0..9 by the service's own `image_bytes` (`png_bytes`: the Up
filter on every row), one thread, the best of `--repeats` timings (the machine may be shared); and,
for comparison, by PIL (its per-row choice of filter, what the service used before). Two images: gradients plus Gaussian noise
of 4 grey levels (compresses about like a decoded photo-like sample; benchmarks/realsize.py's encode
part uses the same), and a smooth one (gradients only: flat regions, like many small-class samples).

    python benchmarks/png_levels.py --out benchmarks/results/png_levels_cpu.md
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import time
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import publish  # benchmarks/report.py

from stride_diffusion.service.encode import image_bytes


def test_images(size: int = 256) -> dict:
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    smooth = np.stack([(xx + yy) / 2, 255 - xx, yy], -1) * (256 / size)
    return {"noisy": np.clip(smooth + g.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8),
            "smooth": np.clip(smooth, 0, 255).astype(np.uint8)}


def pil_png(img, level: int, rle: bool = False) -> bytes:
    """PIL's PNG at `level` (with zlib's Z_RLE strategy when rle): comparison rows, not settings."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=level, **({"compress_type": zlib.Z_RLE} if rle else {}))
    return buf.getvalue()


PIL_ROWS = {"pil 1": dict(level=1), "pil 6": dict(level=6), "pil 1 rle": dict(level=1, rle=True)}


def measure(fn, min_s: float, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--min-seconds", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="markdown report; a .json beside it")
    a = ap.parse_args(argv)
    rows = []
    for name, img in test_images(a.size).items():
        for level in [*range(10), *PIL_ROWS]:
            fn = (lambda img=img, kw=PIL_ROWS[level]: pil_png(img, **kw)) if level in PIL_ROWS else \
                (lambda img=img, level=level: image_bytes(img, "png", png_level=level))
            s = measure(fn, a.min_seconds, a.repeats)
            rows.append({"image": name, "level": level, "ms": 1e3 * s, "bytes": len(fn())})
            print(f"{name} level {level}: {rows[-1]['ms']:.2f} ms  {rows[-1]['bytes']} bytes", flush=True)
    raw = a.size * a.size * 3
    lines = [f"# PNG level vs size and time ({a.size}x{a.size} RGB, one thread)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}; the best of {a.repeats} timings of >= {a.min_seconds} s each",
             f"- command: `python benchmarks/png_levels.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| level | noisy ms | noisy bytes | noisy ratio | smooth ms | smooth bytes | smooth ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["image"], r["level"]): r for r in rows}
    for level in [*range(10), *PIL_ROWS]:
        n, s = by[("noisy", level)], by[("smooth", level)]
        lines.append(f"| {level} | {n['ms']:.2f} | {n['bytes']} | {n['bytes'] / raw:.2f} | {s['ms']:.2f} | "
                     f"{s['bytes']} | {s['bytes'] / raw:.2f} |")
    lines += ["", f"Ratio: PNG bytes / raw bytes ({raw}). Levels 0..9: the service's writer (`png_bytes`, the Up "
              "filter on every row). `pil N`: PIL at level N (a filter chosen per row), what the service used "
              "before; `pil 1 rle`: with zlib's Z_RLE strategy. For comparison, not settings.", ""]
    text = "\n".join(lines)
    publish(text, {"size": a.size, "rows": rows}, a.out)
    return rows


if __name__ == "__main__":
    main()

"""Line plots and image grids with Pillow alone (matplotlib is not a dependency)."""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _nice_ticks(lo, hi, log):
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        ticks = [m * 10 ** e for e in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
        return ticks if len(ticks) >= 2 else [lo, hi]
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= 6:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v):
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def line_plot(path, series: dict, title: str, xlabel: str, ylabel: str, logx=True, logy=False,
              hlines: dict | None = None, size=(720, 460)):
    """series: name -> [(x, y, yerr or None)]; hlines: label -> y (dashed reference levels)."""
    W, H = size
    L, R, T, B = 70, 150, 36, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(13), _font(11)
    pts = [(x, y, e) for s in series.values() for x, y, e in s if y is not None and math.isfinite(y)]
    ys = [y for _, y, _ in pts] + list((hlines or {}).values())
    ys += [y + (e or 0) for _, y, e in pts] + [y - (e or 0) for _, y, e in pts]
    if logy:
        ys = [y for y in ys if y > 0]
    xs = [x for x, _, _ in pts]
    if not xs or not ys:
        img.save(path)
        return
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if logy:
        y0, y1 = y0 / 1.3, y1 * 1.3
    else:
        pad = 0.05 * (y1 - y0 or 1)
        y0, y1 = y0 - pad, y1 + pad
    if x0 == x1:
        x0, x1 = x0 / 2, x1 * 2
    tx = (lambda v: math.log(v)) if logx else (lambda v: v)
    ty = (lambda v: math.log(max(v, 1e-300))) if logy else (lambda v: v)
    px = lambda v: L + (tx(v) - tx(x0)) / (tx(x1) - tx(x0)) * (W - L - R)
    py = lambda v: H - B - (ty(v) - ty(y0)) / (ty(y1) - ty(y0)) * (H - T - B)
    d.rectangle([L, T, W - R, H - B], outline="black")
    xt = sorted({x for x, _, _ in pts})
    for v in xt:
        d.line([px(v), H - B, px(v), H - B + 4], fill="black")
        d.text((px(v), H - B + 6), _fmt(v), fill="black", font=fs, anchor="mt")
    for v in _nice_ticks(y0, y1, logy):
        if y0 <= v <= y1:
            d.line([L - 4, py(v), L, py(v)], fill="black")
            d.line([L, py(v), W - R, py(v)], fill="#e8e8e8")
            d.text((L - 6, py(v)), _fmt(v), fill="black", font=fs, anchor="rm")
    for i, (label, v) in enumerate((hlines or {}).items()):
        if logy and v <= 0:
            continue
        for xa in range(L, W - R, 10):
            d.line([xa, py(v), min(xa + 5, W - R), py(v)], fill="#444444")
        d.text((W - R - 4, py(v) - 2), label, fill="#444444", font=fs, anchor="rb")
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        s = sorted((x, y, e) for x, y, e in s if y is not None and math.isfinite(y) and (y > 0 or not logy))
        xy = [(px(x), py(y)) for x, y, _ in s]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for (x, y, e), (a, b) in zip(s, xy):
            d.ellipse([a - 3, b - 3, a + 3, b + 3], fill=c)
            if e:
                lo = y - e if not logy or y - e > 0 else y0
                d.line([a, py(lo), a, py(y + e)], fill=c)
        ly = T + 8 + 18 * i
        d.line([W - R + 12, ly, W - R + 32, ly], fill=c, width=3)
        d.text((W - R + 38, ly), name, fill="black", font=f, anchor="lm")
    d.text((L + (W - L - R) / 2, 10), title, fill="black", font=_font(15), anchor="mt")
    d.text((L + (W - L - R) / 2, H - 18), xlabel, fill="black", font=f, anchor="mt")
    lab = Image.new("RGB", (H - T - B, 16), "white")
    ImageDraw.Draw(lab).text(((H - T - B) / 2, 8), ylabel, fill="black", font=f, anchor="mm")
    img.paste(lab.rotate(90, expand=True), (4, T))
    img.save(path)


def to_uint8(x: torch.Tensor):
    """[C, H, W] in [-1, 1] -> PIL image."""
    a = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if a.shape[0] == 1:
        return Image.fromarray(a[0].numpy(), "L")
    return Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB")


def image_grid(path, rows: list, row_labels: list, scale: int = 3, pad: int = 2, label_w: int = 90,
               title=None):
    """rows: list of [N, C, H, W] tensors in [-1, 1], one grid row each; upscaled (nearest) for display."""
    n = max(len(r) for r in rows)
    _, _, h, w = rows[0].shape
    cw, ch = w * scale + pad, h * scale + pad
    top = 20 if title else 0
    img = Image.new("RGB", (label_w + n * cw + pad, top + len(rows) * ch + pad), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((4, 4), title, fill="black", font=_font(13))
    for i, (r, lab) in enumerate(zip(rows, row_labels)):
        y = top + pad + i * ch
        d.text((4, y + h * scale / 2), lab, fill="black", font=_font(12), anchor="lm")
        for j, x in enumerate(r):
            im = to_uint8(x).resize((w * scale, h * scale), Image.NEAREST)
            img.paste(im, (label_w + pad + j * cw, y))
    img.save(path)

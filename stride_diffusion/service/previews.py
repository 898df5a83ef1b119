"""Previews of streamed requests: the current clean-image estimate, small, through the cheapest decoder.

At evaluation k of a table the model saw the state y_k and its (guided) output g_k; the update
wrote the history entry h_k = hx_k y_k + hd_k g_k and overwrote y_k. With the model's
parameterisation, x0 = A_x0 y_k + B_x0 g_k (solvers.param.to_x0_eps at tau_k), so

    x0 = (A_x0 - B_x0 hx_k / hd_k) y_k + (B_x0 / hd_k) h_k,

exact from two rows per sample: y_k (copied just before the step, only for the samples that want a
preview at this step) and h_k (in the history ring after it). For an x0-basis solver (DDIM,
DPM-Solver++, UniPC) the first coefficient is zero and the preview is h_k itself. The step itself is
not touched: with no preview wanted, `Engine.step` pays one dict check.

Decoders, cheapest first: the identity (pixel models); the tiny decoder where the model has one; a
linear latent -> RGB map fitted once per VAE at import (`solvers.adapters.decoders.fit_latent_rgb`, stored in model.json as the
decoder record's `preview`); else the model's own decoder. The estimate is average-pooled to at
most PREVIEW_SIDE pixels a side and quantised on the device; the worker encodes the PNG on its
event loop, never in the step thread.
"""
from __future__ import annotations

import base64
import io
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stride_diffusion.solvers.param import to_x0_eps

from .images import quantize

log = logging.getLogger("stride.previews")
PREVIEW_SIDE = 64  # the largest side of a preview image, in pixels

# per-step coefficient row layout of solvers.executor (tau, s, hx, hd, ...)
_TAU, _HX, _HD = 0, 2, 3


def x0_coefficients(schedule, param: str, row) -> tuple[float, float] | None:
    """(p, q) with x0 = p y_k + q h_k for one evaluation's table row; None when h_k does not
    hold the output (hd = 0)."""
    tau, hx, hd = row[_TAU], row[_HX], row[_HD]
    if hd == 0:
        return None
    t = torch.tensor(tau, dtype=torch.float64)
    (ax, bx), _ = to_x0_eps(param, schedule.alpha(t), schedule.sigma(t))
    ax, bx = float(ax), float(bx)
    return ax - bx * hx / hd, bx / hd


class Previews:
    """The engine's preview side: which requests want one every how many steps, the rows to copy
    before a step, the estimates after it, and the finished previews until the worker takes them."""

    def __init__(self, registry, model_of: dict):
        self.registry, self.model_of = registry, model_of
        self.every: dict[str, int] = {}  # job id -> a preview every k steps
        self.ready: list = []  # (job id, image index, k, n, uint8 [h, w, C] on the host)
        # (id of a table's host rows, k) -> (those rows, x0_coefficients): holding the rows keeps the id theirs
        self._coef: dict = {}

    def want(self, job_id: str, every: int):
        self.every[job_id] = int(every)

    def before(self, key: str, st, jobs) -> tuple | None:
        """Before `st.step()`: copy y_k of the samples whose step k+1 < n is a multiple of their
        request's `every` (the last step's image comes anyway)."""
        self.every = {j: e for j, e in self.every.items() if j in jobs}
        rows, coef = [], []
        model = st.model
        for i, ((jid, _), k, n) in enumerate(zip(st.ids, st.k, st.n)):
            e = self.every.get(jid)
            if e is None or k >= n - 1 or (k + 1) % e:
                continue
            hit = self._coef.get((id(st.rows[i]), k))
            if hit is None:
                hit = self._coef[id(st.rows[i]), k] = (st.rows[i], x0_coefficients(model.schedule, model.param,
                                                                                    st.rows[i][k]))
            pq = hit[1]
            if pq is not None:
                rows.append(i)
                coef.append(pq)
        if not rows:
            return None
        idx = torch.tensor(rows, device=st.y.device)
        return key, rows, [st.k[i] for i in rows], idx, st.y.index_select(0, idx), coef

    def after(self, pending: tuple, st):
        """After the step: the copied samples' estimates, decoded small, ready for `take`."""
        key, rows, ks = pending[:3]
        try:
            px = self.pixels(self.model_of[key], estimate(pending, st)).cpu().numpy()
        except Exception:  # a preview must never fail the images: stop previews for these requests
            log.exception("preview failed; no more previews for these requests")
            for i in rows:
                self.every.pop(st.ids[i][0], None)
            return
        for i, k, a in zip(rows, ks, px):
            jid, index = st.ids[i]
            self.ready.append((jid, index, k + 1, st.n[i], a))

    def pixels(self, model: str, x0: torch.Tensor) -> torch.Tensor:
        """Clean-image estimates [B, *shape] -> small uint8 images [B, h, w, C] on the device."""
        e = self.registry[model]
        dec, lin = cheapest_decoder(e)
        if lin is not None:
            w, b = (torch.tensor(v, dtype=torch.float32, device=x0.device) for v in lin)
            img, lo_hi = torch.einsum("bchw,co->bohw", x0.float(), w) + b[:, None, None], (-1.0, 1.0)
        elif dec is None:  # a pixel model
            img, lo_hi = x0.reshape(-1, *e.image_shape).float(), e.data_range
        else:
            img, lo_hi = dec.decode(x0.float()), (-1.0, 1.0)
        return quantize(shrink(img), lo_hi)

    def take(self) -> list:
        out, self.ready = self.ready, []
        return out


def estimate(pending: tuple, st) -> torch.Tensor:
    """x0 [B, *shape] of the samples `Previews.before` copied, from their history entry of the step
    just run (in the state's precision: float64 states give float64 estimates)."""
    _, rows, ks, idx, y, coef = pending
    slot = torch.tensor([k % st.window for k in ks], device=idx.device)
    h = st.hist[idx, slot]
    f = torch.promote_types(y.dtype, torch.float32)
    c = torch.tensor(coef, dtype=f, device=y.device)
    return (c[:, :1] * y.to(f) + c[:, 1:] * h.to(f)).reshape(len(rows), *st.model.shape)


def cheapest_decoder(e) -> tuple:
    """(decoder, linear map) for previews of a model entry: (None, None) for a pixel model, (None,
    (W [C, 3], bias [3])) for a fitted linear map, else (decoder, None): the tiny decoder or the own."""
    if e.decoder.kind == "identity":
        return None, None
    if "tiny" in e.decoders:
        return e.decoders["tiny"], None
    lin = ((e.meta.get("adapter") or {}).get("decoder") or {}).get("preview")
    if lin and lin.get("kind") == "linear":
        return None, (lin["weight"], lin["bias"])
    return e.decoder, None


def shrink(img: torch.Tensor, side: int = PREVIEW_SIDE) -> torch.Tensor:
    """Average-pool [B, C, H, W] by the smallest integer factor that brings both sides to <= side."""
    f = math.ceil(max(img.shape[-2:]) / side)
    return img if f <= 1 else F.avg_pool2d(img, f, ceil_mode=True)


def encode(pixels: np.ndarray) -> str:
    """uint8 [h, w, C] -> base64 PNG (grey for one channel)."""
    a = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def event(job_id: str, index: int, k: int, n: int, pixels: np.ndarray) -> tuple[str, dict]:
    """A `preview` event of service/stream.py, ready for JSON (the transport may be Redis pub/sub)."""
    return job_id, {"event": "preview", "index": index, "k": k, "n": n, "media_type": "image/png",
                    "width": int(pixels.shape[1]), "height": int(pixels.shape[0]), "data": encode(pixels)}

"""A small class-conditional U-Net (ADM-style), sized entirely by its config dict.

Time is taken in the schedule's own units (flow t in [0, 1], VP t in (0, 1]) and scaled by
`time_scale` before the sinusoidal embedding, so both schedules see DDPM-like frequencies. The
class embedding has one extra row, index `num_classes`, the null class of classifier-free guidance.

`secant: true` adds the end-time input s of a secant model (solvers/secant.py):
emb = temb(t) + gate * (temb2(s) - temb2(t)). The bracket is exactly zero at s = t, so f(x, t, t) is
the instantaneous model whatever the weights; with temb2 a copy of temb and gate = 0
(`init_secant_from`), f(x, t, s) = v(x, t) for all s.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

DEFAULTS = {
    "in_channels": 1, "image_size": 16, "num_classes": 10,
    "channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_resolutions": [],
    "num_heads": 4, "emb_dim": 128, "dropout": 0.0, "time_scale": 1000.0, "secant": False,
}


def unet_config(cfg: dict | None = None) -> dict:
    """DEFAULTS overridden by `cfg`; unknown keys are an error, not silently ignored."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown U-Net config keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    out["channel_mult"] = [int(m) for m in out["channel_mult"]]
    out["attention_resolutions"] = [int(r) for r in out["attention_resolutions"]]
    if out["image_size"] % 2 ** (len(out["channel_mult"]) - 1):
        raise ValueError(f"image_size {out['image_size']} is not divisible by "
                         f"2^{len(out['channel_mult']) - 1} (channel_mult {out['channel_mult']})")
    return out


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, always float32: low-precision t collapses neighbouring steps."""
    with torch.autocast(t.device.type, enabled=False):
        t = t.float().reshape(-1)
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 8), c)


class TimeEmbed(nn.Module):
    def __init__(self, dim: int, time_scale: float):
        super().__init__()
        self.dim, self.time_scale = dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t * self.time_scale, self.dim))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift (ADM's use_scale_shift_norm)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)  # block starts as identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads, self.norm = heads, _norm(c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight), nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Level(nn.Module):
    """Res blocks (+ attention) at one resolution."""

    def __init__(self, cins, cout, emb_dim, dropout, attn, heads):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, cout, emb_dim, dropout) for c in cins)
        self.attn = nn.ModuleList((Attention(cout, heads) if attn else nn.Identity()) for _ in cins)


class UNet(nn.Module):
    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = cfg = unet_config(config)
        ch, E, mult = cfg["channels"], cfg["emb_dim"], cfg["channel_mult"]
        self.num_classes = cfg["num_classes"]
        self.temb = TimeEmbed(E, cfg["time_scale"])
        self.cemb = nn.Embedding(self.num_classes + 1, E)  # + the null class
        if cfg["secant"]:
            self.temb2 = TimeEmbed(E, cfg["time_scale"])
            self.gate = nn.Parameter(torch.zeros(E))
        self.inp = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)
        res, skips, c = cfg["image_size"], [ch], ch
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, m in enumerate(mult):
            cins = [c] + [ch * m] * (cfg["num_res_blocks"] - 1)
            attn = res in cfg["attention_resolutions"]
            self.down.append(Level(cins, ch * m, E, cfg["dropout"], attn, cfg["num_heads"]))
            c = ch * m
            skips += [c] * cfg["num_res_blocks"]
            if i < len(mult) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid1, self.mid_attn = ResBlock(c, c, E, cfg["dropout"]), Attention(c, cfg["num_heads"])
        self.mid2 = ResBlock(c, c, E, cfg["dropout"])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            cins = []
            for _ in range(cfg["num_res_blocks"] + 1):
                cins.append(c + skips.pop())
                c = ch * m
            attn = res in cfg["attention_resolutions"]
            self.up.append(Level(cins, ch * m, E, cfg["dropout"], attn, cfg["num_heads"]))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.out_norm, self.out = _norm(c), nn.Conv2d(c, cfg["in_channels"], 3, padding=1)
        nn.init.zeros_(self.out.weight), nn.init.zeros_(self.out.bias)

    def embed(self, t, label, s=None):
        emb = self.temb(t)
        if self.config["secant"]:
            s = t if s is None else s
            emb = emb + self.gate * (self.temb2(s) - self.temb2(t))  # exactly emb at s == t
        return emb + self.cemb(label)

    def forward(self, x, t, label, s=None):
        """x [B, C, H, W]; t, s [B] in schedule units; label [B] int (num_classes = null)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).float().expand(B)
        if s is not None:
            s = torch.as_tensor(s, device=x.device).float().expand(B)
        emb = self.embed(t, torch.as_tensor(label, device=x.device).long().expand(B), s).to(x.dtype)
        h = self.inp(x)
        hs = [h]
        for i, lvl in enumerate(self.down):
            for blk, att in zip(lvl.blocks, lvl.attn):
                h = att(blk(h, emb))
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, lvl in enumerate(self.up):
            for blk, att in zip(lvl.blocks, lvl.attn):
                h = att(blk(torch.cat([h, hs.pop()], 1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))

    @torch.no_grad()
    def init_secant_from(self, teacher_state: dict):
        """Load an ordinary model's weights into a secant net: temb2 = copy of temb, gate = 0, so
        that f(x, t, s) = v(x, t) for every s at init."""
        if not self.config["secant"]:
            raise ValueError("init_secant_from needs a U-Net built with secant: true")
        missing, unexpected = self.load_state_dict(teacher_state, strict=False)
        extra = [k for k in missing if not (k.startswith("temb2.") or k == "gate")]
        if extra or unexpected:
            raise ValueError(f"teacher weights do not match this architecture: "
                             f"missing {extra}, unexpected {unexpected}")
        self.temb2.load_state_dict(self.temb.state_dict())
        self.gate.zero_()
        return self

"""The secant net of a DiT-architecture flow teacher (SiT): diffusers' DiTTransformer2DModel with an
end-time input, the counterpart of solvers.nets.unet's `secant: true`.

DiT conditions every block and its final layer on c = temb(t) + yemb(y) (each block's
`norm1.emb`). The secant net adds, through a forward hook on each of those embedders,

    c += gate * (temb2(s) - temb2(t))   [+ wemb(w_norm) with a guidance input]

with temb2 a copy of the teacher's timestep MLP, gate = 0 and wemb's output layer = 0 at init, so
f(x, t, s, y, w) is the teacher's v(x, t, y) exactly for every s and w until trained; and the bracket
is exactly zero at s = t whatever the weights, so f(x, t, t) stays the tangent. The teacher's time
map (SiT: network time 1 - t, output minus its velocity, learned-sigma channels dropped) wraps the
network as in solvers.adapters.reversed_flow, so f's output is stride's flow output.
"""
from __future__ import annotations

import torch
from torch import nn

from .nets.diffusers_nets import build_diffusers, set_time_freq_shift

KIND = "secant-dit"
TIME_MAPS = ("reversed-flow",)  # a secant net distils a flow ODE: flow teachers only


def _cond_embedders(net):
    return [m for m in net.modules() if type(m).__name__ == "CombinedTimestepLabelEmbeddings"]


def _add_delta(module, args, out):
    """Forward hook on a DiT conditioning embedder: c + the end-time / guidance term of this call.
    The term lives on the hooked module (not in a closure), so deep copies (the EMA) stay separate."""
    d = getattr(module, "stride_delta", None)
    return out if d is None else out + d.to(out.dtype)


class SecantDiT(nn.Module):
    def __init__(self, config: dict, guidance_range: tuple[float, float] | None = None):
        super().__init__()
        if config.get("time_map") not in TIME_MAPS:
            raise ValueError(f"a DiT secant net needs a flow teacher; time map {config.get('time_map')!r} "
                             f"is not one of {list(TIME_MAPS)}")
        self.config = dict(config)
        self.net = build_diffusers("diffusers.DiTTransformer2DModel", config["dit"])
        set_time_freq_shift(self.net, config["time_freq_shift"])
        self.embedders = _cond_embedders(self.net)
        for m in self.embedders:
            m.register_forward_hook(_add_delta)
        D = self.net.inner_dim
        self.temb2 = type(self.embedders[0].timestep_embedder)(in_channels=256, time_embed_dim=D)
        self.gate = nn.Parameter(torch.zeros(D))
        self.guidance_range = None if guidance_range is None else tuple(float(v) for v in guidance_range)
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not hi > lo:
                raise ValueError(f"guidance range must have hi > lo, got {self.guidance_range}")
            self.wemb = type(self.temb2)(in_channels=256, time_embed_dim=D)
            nn.init.zeros_(self.wemb.linear_2.weight), nn.init.zeros_(self.wemb.linear_2.bias)

    def train(self, mode: bool = True):
        """The teacher's LabelEmbedding drops labels at random in training mode: it stays in eval
        (secant training draws its own null labels)."""
        super().train(mode)
        self.net.eval()
        return self

    def architecture(self) -> dict:
        return {"kind": KIND, "config": self.config}

    def _proj(self, tn, dtype):
        return self.embedders[0].time_proj(tn).to(dtype)

    def forward(self, x, t, label, s=None, w=None):
        """f(x, t, s, label, w) in stride's flow units; x [B, C, H, W], t, s, w [B]."""
        B, C = x.shape[0], int(self.config["keep_channels"])
        t = torch.as_tensor(t, device=x.device).float().expand(B)
        tn = 1 - t  # reversed flow: the network's time
        dt = self.gate.dtype
        delta = torch.zeros(B, self.gate.shape[0], device=x.device, dtype=dt)
        if s is not None:
            sn = 1 - torch.as_tensor(s, device=x.device).float().expand(B)
            delta = delta + self.gate * (self.temb2(self._proj(sn, dt)) - self.temb2(self._proj(tn, dt)))
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            w = torch.ones(B, device=x.device) if w is None else torch.as_tensor(w, device=x.device).float().expand(B)
            delta = delta + self.wemb(self._proj((w.clamp(lo, hi) - lo) / (hi - lo) * 1000, dt))
        lab = torch.as_tensor(label, device=x.device).long().expand(B)
        K, null = int(self.config["num_classes"]), int(self.config["null_class"])
        if null != K:
            lab = torch.where(lab == K, torch.full_like(lab, null), lab)
        for m in self.embedders:
            m.stride_delta = delta
        try:
            out = self.net(x, tn, class_labels=lab).sample
        finally:
            for m in self.embedders:
                m.stride_delta = None
        return -out[:, :C]

    @torch.no_grad()
    def init_secant_from(self, teacher_state: dict):
        """Teacher weights in; temb2 = copy of the teacher's timestep MLP, gate = 0, wemb's output 0."""
        self.net.load_state_dict(teacher_state, strict=True)
        self.temb2.load_state_dict(self.embedders[0].timestep_embedder.state_dict())
        self.gate.zero_()
        if self.guidance_range is not None:
            nn.init.zeros_(self.wemb.linear_2.weight), nn.init.zeros_(self.wemb.linear_2.bias)
        return self

    @classmethod
    def from_teacher(cls, model, guidance_range=None) -> SecantDiT:
        """`model`: an adapter (solvers.adapters) around a DiTTransformer2DModel with a flow time map."""
        if model.time_map not in TIME_MAPS:
            raise ValueError(f"a DiT secant net needs a flow teacher (time map in {list(TIME_MAPS)}); this "
                             f"model's is {model.time_map!r} on the {model.schedule.name} "
                             "schedule: import a SiT checkpoint (`stride offline import dit-checkpoint FILE "
                             "--schedule flow`)")
        net = model.net
        shift = float(_cond_embedders(net)[0].time_proj.downscale_freq_shift)
        cfg = {"dit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(net.config).items()
                       if not k.startswith("_")},
               "time_map": model.time_map, "time_freq_shift": shift, "keep_channels": model.shape[0],
               "num_classes": model.num_classes, "null_class": model.null_class}
        teacher = {k: v.float() for k, v in net.state_dict().items()}  # trained in float32
        return cls(cfg, guidance_range).to(next(net.parameters()).device).init_secant_from(teacher)

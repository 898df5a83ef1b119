"""Secant models (Liu & Yue 2025, arXiv 2505.14502): a network f(x, t, s, class[, w]) that predicts
the *average* velocity over [t, s], so one Euler step x_s = x_t + (s - t) f(x_t, t, s) lands on the
probability-flow ODE's solution. f(x, t, t) is the ordinary tangent v(x, t).

Time is stride's flow time on the full interval (t = 1 noise, t = 0 data; x_t = (1-t) x0 + t eps),
the output is in the 'flow' parameterisation (eps - x0 = dx/dt), so sampling is the executor's
ordinary Euler table on a uniform grid from 1 to 0: the table passes (tau_k, tau_{k+1}) = (t, s).

The network is the demo U-Net with its own end-time input (`secant: true`: emb = temb(t) +
gate * (temb2(s) - temb2(t)), gate = 0 at init) plus, optionally, a guidance-scale input
(emb += wemb(w_norm), last layer zero at init), so that at initialisation f(x, t, s, y, w) is the
teacher's v(x, t, y) exactly, for every s and w. With the guidance input a guided step costs one
evaluation; without it the executor batches the two CFG branches.
For a DiT-architecture flow teacher (SiT) the net is solvers.secant_dit.SecantDiT: the same
construction on DiT's conditioning embedding (`secant_from_teacher` picks by the teacher's network).

Files: <artifact>/<name>.json (FORMAT) + <name>.safetensors, keyed by the teacher's sha256.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .artifact import check_format, check_net_shape, load_weights, read_json, write_json, write_weights
from .builders import build
from .grids import explicit
from .nets.unet import TimeEmbed, UNet
from .schedules import F64, FlowSchedule
from .table import Table

FORMAT = "stride.secant/1"
LOSSES = ("sdei", "stee", "sdee", "stei")


def secant_schedule() -> FlowSchedule:
    return FlowSchedule(t_min=0.0, t_max=1.0)  # the secant is trained on all of [0, 1]


def secant_table(n: int) -> Table:
    """n uniform Euler steps from t = 1 to 0 (the paper's sampler; no special last step)."""
    if n < 1:
        raise ValueError(f"a secant sampler needs n >= 1 steps, got {n}")
    tab = build("euler", secant_schedule(), "flow", explicit(torch.linspace(1, 0, n + 1, dtype=F64)))
    tab.name, tab.meta["solver"], tab.meta["grid"] = "secant", "secant", "uniform"
    return tab


class SecantUNet(UNet):
    """The U-Net with the end-time input and, when `guidance_range = (lo, hi)`, a guidance input."""

    def __init__(self, config: dict, guidance_range: tuple[float, float] | None = None):
        super().__init__({**config, "secant": True})
        self.guidance_range = None if guidance_range is None else tuple(float(v) for v in guidance_range)
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not hi > lo:
                raise ValueError(f"guidance range must have hi > lo, got {self.guidance_range}")
            E = self.config["emb_dim"]
            self.wemb = TimeEmbed(E, 1000.0)  # w_norm in [0, 1], DDPM-like frequencies as for t
            torch.nn.init.zeros_(self.wemb.mlp[2].weight), torch.nn.init.zeros_(self.wemb.mlp[2].bias)
        self._w = None  # set only for the duration of forward()

    def embed(self, t, label, s=None):
        emb = super().embed(t, label, s)
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            w = torch.ones_like(t) if self._w is None else self._w
            emb = emb + self.wemb((w.clamp(lo, hi) - lo) / (hi - lo))  # outside the trained range: clamp
        return emb

    def forward(self, x, t, label, s=None, w=None):
        """f(x, t, s, label, w): the average dx/dt over [t, s]; w is ignored without a guidance input."""
        if self.guidance_range is not None and w is not None:
            self._w = torch.as_tensor(w, device=x.device).float().expand(x.shape[0])
        try:
            return super().forward(x, t, label, s)
        finally:
            self._w = None  # UNet.forward has no slot for w; one call at a time per module

    @torch.no_grad()
    def init_secant_from(self, teacher_state: dict):
        """Teacher weights in; temb2 = copy of temb, gate = 0, wemb's output layer = 0: f = v exactly."""
        missing, unexpected = self.load_state_dict(teacher_state, strict=False)
        new = ("temb2.", "gate", "wemb.")
        extra = [k for k in missing if not k.startswith(new)]
        if extra or unexpected:
            raise ValueError(f"teacher weights do not match this architecture: missing {extra}, "
                             f"unexpected {unexpected}")
        self.temb2.load_state_dict(self.temb.state_dict())
        self.gate.zero_()
        if self.guidance_range is not None:
            torch.nn.init.zeros_(self.wemb.mlp[2].weight), torch.nn.init.zeros_(self.wemb.mlp[2].bias)
        return self

    @classmethod
    def from_teacher(cls, teacher: UNet, guidance_range=None) -> SecantUNet:
        cfg = {k: v for k, v in teacher.config.items() if k != "secant"}
        return cls(cfg, guidance_range).init_secant_from(teacher.state_dict())

    def architecture(self) -> dict:
        return {"kind": "unet", "config": dict(self.config)}


def secant_from_teacher(model, guidance_range=None):
    """The secant net of a flow teacher (an adapter): stride's U-Net or a DiT-architecture one (SiT)."""
    from .secant_dit import SecantDiT

    if isinstance(model.net, UNet):
        return SecantUNet.from_teacher(model.net, guidance_range)
    if type(model.net).__name__ == "DiTTransformer2DModel":
        return SecantDiT.from_teacher(model, guidance_range)
    raise ValueError(f"no secant net for {type(model.net).__name__}; allowed: stride's U-Net, "
                     "diffusers DiTTransformer2DModel (flow teachers: SiT)")


class SecantModel:
    """A secant net as a model (solvers.contracts; flow schedule on [0, 1], 'flow' output = average dx/dt).

    `guidance_input` models take the scale as a fifth argument (one evaluation per guided step);
    a request's scale should lie in `guidance_range` (the net clamps to it as a last guard)."""

    param = "flow"

    def __init__(self, net: SecantUNet, shape, num_classes: int, meta: dict | None = None,
                 sha256: str | None = None):
        self.net, self.shape, self.num_classes = net, tuple(shape), int(num_classes)
        self.schedule = secant_schedule()
        self.guidance_range = net.guidance_range
        self.guidance_input = net.guidance_range is not None
        self.meta, self.sha256 = meta or {}, sha256

    @property
    def steps(self) -> list:
        """The step counts it was trained for (others run, but off its training distribution)."""
        return list(self.meta.get("steps", []))

    def table(self, n: int) -> Table:
        return secant_table(n)

    def __call__(self, x, t, s, label, w=None):
        B = x.shape[0]
        p = next(self.net.parameters())
        f = lambda v: torch.as_tensor(v, device=p.device).to(torch.float32).expand(B)
        label = torch.as_tensor(label, device=p.device)
        out = self.net(x.reshape(B, *self.shape).to(p.dtype), f(t), label, f(s), None if w is None else f(w))
        return out.to(x.dtype).reshape(x.shape)


# -- files -------------------------------------------------------------------------------------------

def save_secant(artifact_dir, name: str, net: SecantUNet, data_shape, num_classes: int, teacher_sha256: str,
                info: dict, dtype: str = "float16") -> dict:
    """Write <name>.safetensors, then <name>.json (last: a crash leaves no valid-looking file)."""
    d = Path(artifact_dir)
    rec = write_weights(d / f"{name}.safetensors", net.state_dict(), dtype)
    meta = {
        "format": FORMAT, "name": name,
        "architecture": net.architecture(),
        "guidance": {"input": net.guidance_range is not None,
                     "range": None if net.guidance_range is None else list(net.guidance_range)},
        "schedule": secant_schedule().to_json(), "param": "flow",
        "sampling": {"solver": "euler", "grid": "uniform", "from": 1.0, "to": 0.0,
                     "cfg": "guidance input (1 evaluation per step)" if net.guidance_range is not None
                     else "two branches (2 evaluations per guided step)"},
        "data": {"shape": [int(v) for v in data_shape], "num_classes": int(num_classes)},
        "teacher_sha256": teacher_sha256,
        "weights": rec,
        **info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(d / f"{name}.json", meta)
    return meta


def secant_names(artifact_dir) -> list:
    """The secant files in an artifact: secant.json, secant-<variant>.json."""
    d = Path(artifact_dir)
    stems = (f.stem for f in d.glob("secant*.json"))
    return sorted(s for s in stems if s == "secant" or s.startswith("secant-"))


def load_secant(artifact_dir, teacher_sha256: str, device="cpu", name: str = "secant",
                weights: bool = True) -> SecantModel:
    """Load <artifact_dir>/<name>.json + .safetensors; refuse (ValueError) a wrong format, a teacher
    other than `teacher_sha256`, changed weights or mismatched shapes. Never unpickles."""
    d = Path(artifact_dir)
    where = d / f"{name}.json"
    meta = read_json(where)
    check_format(meta, FORMAT, where)
    for k in ("architecture", "guidance", "data", "weights", "teacher_sha256"):
        if k not in meta:
            raise ValueError(f"{where}: field {k!r} is missing")
    if meta["teacher_sha256"] != teacher_sha256:
        raise ValueError(f"{where} was converted from teacher sha256 {meta['teacher_sha256']}, but the model "
                         f"is {teacher_sha256}; re-run `stride offline secant` on this model")
    arch, shape = meta["architecture"], [int(v) for v in meta["data"]["shape"]]
    kind, cfg = arch.get("kind"), arch.get("config", {})
    if kind not in ("unet", "secant-dit"):
        raise ValueError(f"{where}: unknown secant architecture {kind!r}; allowed: ['secant-dit', 'unet']")
    check_net_shape(arch if kind == "unet" else {"kind": "diffusers.DiTTransformer2DModel",
                                                 "config": cfg.get("dit", {})}, shape, where)
    if cfg.get("num_classes") != meta["data"]["num_classes"]:
        raise ValueError(f"{where}: {meta['data']['num_classes']} classes, but the architecture has "
                         f"num_classes={cfg.get('num_classes')}")
    rec = meta["weights"]
    g = meta["guidance"]
    gr = g.get("range") if g.get("input") else None

    def build():
        if kind == "unet":
            return SecantUNet({k: v for k, v in cfg.items() if k != "secant"}, gr)
        from .secant_dit import SecantDiT

        return SecantDiT(cfg, gr)

    if weights:
        net = load_weights(build(), d / rec["file"], rec["sha256"], where, device)
    else:  # metadata only (an API process): on the meta device, no file read
        with torch.device("meta"):
            net = build().eval().requires_grad_(False)
    return SecantModel(net, shape, meta["data"]["num_classes"], meta, rec["sha256"])

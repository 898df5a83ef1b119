"""What the service knows about a model: its name, class names, shape, decoder, data range, display
and default guidance, and its samplers (`solvers.samplers.SamplerSet`), which make every choice of
table, network and guidance.

An entry is built from an artifact directory (`solvers.artifact.load_artifact`) or given directly
(the analytic test model), so the service never depends on how a model was trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from stride_diffusion.solvers.contracts import guidance_input, guidance_range, input_dtype, network
from stride_diffusion.solvers.samplers import SamplerSet, load_samplers


@dataclass
class ModelEntry:
    name: str
    model: object  # the base network (solvers.contracts.Denoiser)
    class_names: list[str]
    meta: dict = field(default_factory=dict)
    samplers: SamplerSet | None = None  # None: the base network's classic samplers, nothing measured
    # finished samples -> images in [-1, 1] (solvers.adapters.decoders); identity over data_range if None
    decoder: object = None
    tiny_decoder: object = None  # a latent model's optional second decoder (AutoencoderTiny): decoder=tiny

    def __post_init__(self):
        if self.samplers is None:
            self.samplers = load_samplers(self.model)
        if self.decoder is None:
            from stride_diffusion.solvers.adapters import IdentityDecoder
            self.decoder = IdentityDecoder(self.shape, self.data_range)

    @classmethod
    def from_artifact(cls, path: str, device: str = "cpu", dtype: str | None = None, steps=None, variants=None,
                      weights: bool = True) -> ModelEntry:
        """`dtype`: the network's and decoder's (None: what the artifact records; 'fp8': bf16 with the
        transformer's token-wise linears in float8, `solvers.fp8`); `steps`, `variants`: which
        own-network samplers (secant) to load (`load_samplers`); weights=False reads metadata only
        (an API process)."""
        from stride_diffusion.solvers.artifact import default_guidance, load_artifact
        from stride_diffusion.solvers.fp8 import fp8_refusal, to_fp8

        fp8 = dtype == "fp8"
        if fp8 and weights and fp8_refusal(device):  # before reading gigabytes of weights
            raise ValueError(fp8_refusal(device))
        art = load_artifact(path, device, "bf16" if fp8 else dtype, weights=weights)
        if fp8 and weights:
            to_fp8(network(art.model), device)
        meta = dict(art.meta)
        data = meta.get("data", {})
        names = data.get("class_names") or meta.get("class_names") or list(range(art.model.num_classes))
        meta.setdefault("data_range", data.get("range", [-1.0, 1.0]))
        meta.setdefault("default_guidance", default_guidance(art))
        samplers = load_samplers(art, steps=steps, variants=variants, device=device, weights=weights)
        return cls(art.name, art.model, [str(c) for c in names], meta, samplers, decoder=art.decoder,
                   tiny_decoder=art.tiny_decoder)

    @property
    def display_scale(self) -> int:
        """Nearest-neighbour upscale of returned images (model.json 'display': {'scale': k}; default 1)."""
        return int((self.meta.get("display") or {}).get("scale", 1))

    # -- shape of the model -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.model.shape)

    @property
    def data_range(self) -> tuple[float, float]:
        lo, hi = self.meta.get("data_range", (-1.0, 1.0))
        return float(lo), float(hi)

    @property
    def default_guidance(self) -> float:
        return float(self.meta.get("default_guidance", self.meta.get("guidance", 1.0)))

    # -- networks ---------------------------------------------------------------------------
    def network_key(self, network: str) -> str:
        """The Stepper key of one of the model's networks ('' the base one)."""
        return f"{self.name}:{network}" if network else self.name

    def stepper_key(self, solver: str) -> str:
        return self.network_key(self.samplers[solver].network)

    def steppers(self, steps_offered) -> dict[str, tuple[object, int]]:
        """Stepper key -> (network, the history window every table it may run needs)."""
        return {self.network_key(k): v for k, v in self.samplers.networks(steps_offered).items()}

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.decoder.image_shape)

    @property
    def decoders(self) -> dict:
        """A request's `decoder` -> the decoder: the model's own under its kind (vae, identity) first,
        then 'tiny' when the artifact has one."""
        out = {self.decoder.kind: self.decoder}
        if self.tiny_decoder is not None:
            out[self.tiny_decoder.kind] = self.tiny_decoder
        return out

    def image_size(self) -> str:
        """The served image's 'WxH' in pixels, display upscale included."""
        _, h, w = self.image_shape
        return f"{w * self.display_scale}x{h * self.display_scale}"

    def describe(self, settings) -> dict:
        C, H, W = self.image_shape
        return {
            "name": self.name, "classes": self.class_names, "num_classes": self.num_classes,
            "shape": list(self.shape), "latent_shape": list(self.shape), "size": self.image_size(), "display_scale": self.display_scale,
            "image": {"width": W, "height": H, "channels": C},
            "dtype": input_dtype(self.model) or "float32", "decoder": self.decoder.kind,
            "decoders": list(self.decoders),
            "decoder_dtype": self.decoder.dtype,
            "schedule": self.model.schedule.to_json(), "param": self.model.param,
            "steps": settings.steps, "default_steps": settings.default_steps, "max_images": settings.max_images,
            "default_guidance": self.default_guidance, "solvers": self.samplers.names(),
            "guidance_ranges": {s: list(self.samplers[s].guidance_range or (0.0, settings.guidance_max))
                                for s in self.samplers.names()},
        }


class SlowModel:
    """A model that sleeps per call: makes batches long enough to kill a worker or miss a deadline."""

    def __init__(self, model, delay_s: float):
        self.inner, self.delay_s = model, delay_s
        self.schedule, self.param, self.num_classes, self.shape = model.schedule, model.param, model.num_classes, model.shape
        self.guidance_input, self.guidance_range = guidance_input(model), guidance_range(model)

    def __call__(self, *args):
        time.sleep(self.delay_s)
        return self.inner(*args)


def analytic_entry(spec: str = "gmm") -> ModelEntry:
    """The analytic model as a served model: 'gmm' or 'gmm:delay_ms=50' (10 classes, 1x8x8)."""
    from stride_diffusion.solvers.analytic import GaussianMixture
    from stride_diffusion.solvers.schedules import FlowSchedule

    kind, _, opts = spec.partition(":")
    if kind != "gmm":
        raise ValueError(f"unknown test model {spec!r}; allowed: 'gmm[:delay_ms=N]'")
    kw = dict(o.split("=", 1) for o in opts.split(",") if o)
    unknown = set(kw) - {"delay_ms"}
    if unknown:
        raise ValueError(f"unknown test model options {sorted(unknown)}; allowed: ['delay_ms']")
    m = GaussianMixture.random(FlowSchedule(), "flow", num_classes=10, per_class=1, dim=64, seed=0,
                               spread=2.0, scale=0.15, shape=(1, 8, 8))
    delay = float(kw.get("delay_ms", 0)) / 1e3
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return ModelEntry("gmm", SlowModel(m, delay) if delay else m, names, {"data_range": [-1.5, 1.5],
                                                                          "display": {"scale": 8}})


class Registry:
    """The served models by name; the first is the default."""

    def __init__(self, entries: list[ModelEntry]):
        if not entries:
            raise ValueError("no models to serve")
        self.entries = {e.name: e for e in entries}
        if len(self.entries) != len(entries):
            raise ValueError(f"duplicate model names: {[e.name for e in entries]}")
        self.default = entries[0].name

    def __getitem__(self, name: str) -> ModelEntry:
        return self.entries[name]

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __iter__(self):
        return iter(self.entries.values())

    def names(self) -> list[str]:
        return list(self.entries)


def load_registry(settings, device: str | None = None, weights: bool = True) -> Registry:
    import os

    if settings.test_model:
        return Registry([analytic_entry(settings.test_model)])
    dev = device or settings.device
    entries = []
    for path in settings.artifacts:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no artifact directory at {path!r}; train one (`stride offline ...`) or pass "
                                    f"--artifacts DIR")
        entries.append(ModelEntry.from_artifact(path, dev, settings.dtype, settings.steps, settings.variants, weights))
    return Registry(entries)


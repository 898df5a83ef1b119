"""Artifacts: a directory of json + safetensors that offline writes and the service reads.

    model.json / model.safetensors            the denoiser (format stride.model/1)
    decoder.safetensors                       an imported model's VAE, optional
    tiny_decoder.safetensors                  its tiny decoder (AutoencoderTiny, TAESD), optional
    classifier.json / classifier.safetensors  the quality classifier (stride.classifier/1), optional
    solvers/<name>.json                       learned solvers, optional (see SOLVER_LOADERS)
    eval.json                                 quality per sampler x NFE (stride.eval/1), optional

model.json's optional `adapter` section (written by `stride offline import`) says how the network
is called (solvers.adapters: kind, time map, null class, latent shape, dtype) and holds the decoder;
without it the network is one of stride's own and the decoder is the identity.

Loading never unpickles; it checks every file's format version, the sha256 of every weights file
and every tensor's shape, and refuses with a ValueError that names what it found and expected.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import learned
from .adapters import DTYPES, Adapter, IdentityDecoder, TinyDecoder, VAEDecoder, adapter_class, dtype_name
from .nets import build_net
from .nets.diffusers_nets import set_time_freq_shift
from .param import check_param
from .schedules import Schedule, schedule_from_json
from .table import FORMAT as TABLE_FORMAT
from .table import Table

MODEL_FORMAT = "stride.model/1"
CLASSIFIER_FORMAT = "stride.classifier/1"
EVAL_FORMAT = "stride.eval/1"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # readers never see half a file


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(d).__name__}")  # noqa: TRY004 (loaders raise ValueError)
    return d


def check_format(d: dict, expected: str, where) -> None:
    if d.get("format") != expected:
        raise ValueError(f"{where}: format {d.get('format')!r} is not supported; expected {expected!r}")


# -- weights -------------------------------------------------------------------------------------

def write_weights(path, state_dict: dict, dtype: str = "float32") -> dict:
    """Save tensors (floating ones cast to `dtype`) and return the json record of the file."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown weights dtype {dtype!r}; allowed: {sorted(DTYPES)}")
    sd = {k: (v.detach().to(DTYPES[dtype]) if v.is_floating_point() else v.detach()).contiguous().cpu()
          for k, v in state_dict.items()}
    path = Path(path)
    save_file(sd, str(path))
    return {"file": path.name, "sha256": sha256_file(path), "dtype": dtype,
            "params": int(sum(v.numel() for v in sd.values())), "bytes": path.stat().st_size}


def read_net(directory: Path, meta: dict, where: str, device="cpu", weights: bool = True) -> torch.nn.Module:
    """Build the net that `meta['architecture']` describes and load its checked weights (or, with
    weights=False, build it on the meta device: shapes and metadata, no file read, no memory)."""
    arch, rec = meta.get("architecture"), meta.get("weights")
    if not isinstance(arch, dict) or "kind" not in arch or "config" not in arch:
        raise ValueError(f"{where}: 'architecture' must be {{'kind': ..., 'config': {{...}}}}, "
                         f"found {arch!r}")
    if not isinstance(rec, dict) or "file" not in rec or "sha256" not in rec:
        raise ValueError(f"{where}: 'weights' must name the file and its sha256, found {rec!r}")
    if not weights:
        with torch.device("meta"):
            return build_net(arch["kind"], arch["config"]).eval().requires_grad_(False)
    return load_weights(build_net(arch["kind"], arch["config"]), directory / rec["file"], rec["sha256"], where, device)


def fill(net, sd: dict, where: str):
    """Load the state dict `sd` into `net` after checking names and shapes; the error names the tensor."""
    want = net.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the architecture: "
                         f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                             f"but the architecture in {where} expects {tuple(v.shape)}")
    net.load_state_dict({k: v.to(want[k].dtype) for k, v in sd.items()}, strict=True)
    return net.eval().requires_grad_(False)


def load_weights(net, wpath: Path, sha256: str, where, device="cpu"):
    """Fill `net` from a safetensors file after checking its sha256, names and shapes; never unpickles."""
    if not wpath.is_file():
        raise ValueError(f"{where}: weights file {wpath} is missing")
    digest = sha256_file(wpath)
    if digest != sha256:
        raise ValueError(f"{wpath}: sha256 is {digest}, but {where} expects {sha256} "
                         "(the weights were changed or replaced after the json was written)")
    try:
        sd = load_file(str(wpath), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{wpath}: not a readable safetensors file: {e}") from e
    fill(net, sd, f"{wpath} (for {where})")
    return net.to(device).eval().requires_grad_(False)


# -- shapes ----------------------------------------------------------------------------------------

def check_net_shape(arch: dict, shape, where) -> None:
    """The one check that a net takes data of `shape` [C, H, W]: stride's own nets are square
    (one `image_size`); a diffusers UNet needs H, W divisible by its downsampling, a DiT by its
    patch; every net the channels it was built for."""
    kind, cfg = arch.get("kind"), arch.get("config", {})
    shape = [int(d) for d in shape]
    if kind in ("unet", "classifier"):
        want = [cfg.get("in_channels"), cfg.get("image_size"), cfg.get("image_size")]
        if shape != want:
            raise ValueError(f"{where}: data shape {shape} does not match the architecture's "
                             f"[in_channels, image_size, image_size] = {want}")
        return
    if len(shape) != 3 or cfg.get("in_channels") != shape[0]:
        raise ValueError(f"{where}: data shape {shape} does not match the architecture's "
                         f"in_channels = {cfg.get('in_channels')} (expected [C, H, W])")
    if kind == "diffusers.UNet2DModel":
        f = 2 ** (len(cfg.get("down_block_types", ())) - 1)
    else:
        f = int(cfg.get("patch_size") or 1)
    if kind == "diffusers.DiTTransformer2DModel" and shape[1] != shape[2]:
        raise ValueError(f"{where}: data shape {shape}: diffusers' DiTTransformer2DModel unpatchifies square "
                         "latents only (H == W)")
    if shape[1] % f or shape[2] % f:
        raise ValueError(f"{where}: data shape {shape}: height and width must be multiples of {f} for {kind}")


# -- saving ----------------------------------------------------------------------------------------

def save_artifact(out_dir, net_config: dict, state_dict: dict, schedule: Schedule, param: str, data_shape,
                  class_names, training_info: dict, *, arch: str = "unet", data_source: dict | None = None,
                  dtype: str = "float32", sampling: dict | None = None) -> Path:
    """Write model.safetensors and model.json (last, so a crash leaves no valid-looking artifact)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(class_names) != net_config.get("num_classes", len(class_names)):
        raise ValueError(f"{len(class_names)} class names for a net with "
                         f"num_classes={net_config['num_classes']}")
    rec = write_weights(out / "model.safetensors", state_dict, dtype)
    meta = {
        "format": MODEL_FORMAT,
        "name": out.name,
        "architecture": {"kind": arch, "config": net_config},
        "schedule": schedule.to_json(),
        "param": check_param(param),
        "data": {"shape": [int(d) for d in data_shape], "range": [-1.0, 1.0],
                 "class_names": list(class_names), "num_classes": len(class_names),
                 "source": data_source or {}},
        "weights": rec,
        "sampling": sampling or {},
        "training": training_info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out / "model.json", meta)
    return out


def save_classifier(artifact_dir, config: dict, state_dict: dict, info: dict) -> dict:
    out = Path(artifact_dir)
    rec = write_weights(out / "classifier.safetensors", state_dict, "float32")
    meta = {"format": CLASSIFIER_FORMAT, "architecture": {"kind": "classifier", "config": config},
            "weights": rec, **info}
    write_json(out / "classifier.json", meta)
    return meta


# -- loading ---------------------------------------------------------------------------------------

# Solver files (solvers/<name>.json) by their format field -> fn(json dict, model sha256, where) -> Table.
def _table_file(d: dict, model_sha256: str, where: str) -> Table:
    tab = Table.from_json(d)
    h = d.get("model_sha256", tab.meta.get("model_sha256"))
    if h is not None and h != model_sha256:
        raise ValueError(f"{where} was made for model sha256 {h}, but the model has sha256 {model_sha256}; "
                         "re-run it on this model")
    return tab


SOLVER_LOADERS: dict[str, Callable[[dict, str, str], Table]] = {
    TABLE_FORMAT: _table_file,
    learned.FORMAT: learned.solver_from_json,  # searched and D-ODE solvers
}


def load_solvers(directory, model_sha256: str, strict: bool = True) -> dict:
    """name -> Table for every solver file in `directory` (absent directory: none), each checked
    against the weights it was fitted on. strict=False skips refused files with a warning."""
    out = {}
    root = Path(directory)
    for f in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            d = read_json(f)
            fmt = d.get("format")
            if fmt not in SOLVER_LOADERS:
                raise ValueError(f"{f}: format {fmt!r} is not supported; expected one of {sorted(SOLVER_LOADERS)}")
            out[f.stem] = SOLVER_LOADERS[fmt](d, model_sha256, str(f))
        except ValueError as e:
            if strict:
                raise
            warnings.warn(f"skipping {f}: {e}")
    return out


@dataclass
class Artifact:
    name: str
    path: Path
    model: Adapter  # the executor's model contract (solvers.adapters.base)
    meta: dict
    sha256: str  # of model.safetensors: what solver and eval files are keyed by
    eval: dict | None = None
    classifier: torch.nn.Module | None = None
    classifier_meta: dict | None = None
    solvers: dict = field(default_factory=dict)  # name -> Table
    decoder: object = None  # finished samples -> images (solvers.adapters.decoders); identity by default
    tiny_decoder: object = None  # the optional second decoder of a latent model (adapter 'tiny_decoder')

    @property
    def schedule(self) -> Schedule:
        return self.model.schedule

    @property
    def class_names(self) -> list:
        return self.meta["data"]["class_names"]


def _check_model_hash(d: dict, art: Artifact, where) -> None:
    h = d.get("model_sha256")
    if h is not None and h != art.sha256:
        raise ValueError(f"{where} was made for model sha256 {h}, but {art.path / 'model.safetensors'} "
                         f"has sha256 {art.sha256}; re-run it on this model")


def load_artifact(path, device="cpu", dtype: str | None = None, weights: bool = True) -> Artifact:
    """Load and check an artifact. `dtype` (fp32 | bf16 | fp16) overrides the one model.json's
    adapter section records for the network and the decoder; solver state stays float32.
    weights=False: metadata, solvers and eval with the nets on the meta device (what an API process
    needs: no weights read)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"artifact {str(path)!r} is not a directory")
    where = path / "model.json"
    meta = read_json(where)
    check_format(meta, MODEL_FORMAT, where)
    for k in ("architecture", "schedule", "param", "data", "weights"):
        if k not in meta:
            raise ValueError(f"{where}: field {k!r} is missing")
    arch, shape = meta["architecture"], [int(d) for d in meta["data"]["shape"]]
    ad = meta.get("adapter") or {"kind": "stride", "time_map": "identity"}
    cls = adapter_class(ad.get("kind"), ad.get("time_map"))
    dt = dtype_name(dtype or ad.get("dtype", "float32"))
    check_net_shape(arch, shape, where)
    num_classes = len(meta["data"]["class_names"])
    net_classes = arch["config"].get("num_classes") if ad["kind"] == "stride" else ad.get("num_classes")
    if net_classes != num_classes:
        raise ValueError(f"{where}: {num_classes} class names, but the network has num_classes={net_classes}")
    net = read_net(path, meta, str(where), device, weights)
    if ad.get("time_freq_shift") is not None:  # DiT repository checkpoints (see set_time_freq_shift)
        set_time_freq_shift(net, ad["time_freq_shift"])
    model = cls(net, schedule_from_json(meta["schedule"]), meta["param"], shape, num_classes,
                secant=bool(arch["config"].get("secant", False)), sha256=meta["weights"]["sha256"],
                null_class=ad.get("null_class"), dtype=dt)
    art = Artifact(path.name, path, model, meta, meta["weights"]["sha256"])
    art.decoder = read_decoder(path, meta, shape, str(where), device, dtype, weights)
    tiny = (meta.get("adapter") or {}).get("tiny_decoder")
    if tiny:
        art.tiny_decoder = read_decoder(path, meta, shape, f"{where} (tiny_decoder)", device, dtype, weights, tiny)
    if weights and (path / "classifier.json").exists():
        where = path / "classifier.json"
        cm = read_json(where)
        check_format(cm, CLASSIFIER_FORMAT, where)
        check_net_shape(cm["architecture"], shape, where)
        if cm["architecture"]["config"].get("num_classes") != num_classes:
            raise ValueError(f"{where}: classifier has {cm['architecture']['config'].get('num_classes')} classes, "
                             f"the model {num_classes}")
        art.classifier, art.classifier_meta = read_net(path, cm, str(where), device), cm
    if (path / "eval.json").exists():
        where = path / "eval.json"
        ev = read_json(where)
        check_format(ev, EVAL_FORMAT, where)
        _check_model_hash(ev, art, where)
        art.eval = ev
    art.solvers = load_solvers(path / "solvers", art.sha256)
    return art


def read_decoder(path: Path, meta: dict, shape, where: str, device="cpu", dtype: str | None = None,
                 weights: bool = True, record: dict | None = None):
    """A decoder record (default: the adapter section's `decoder`) -> a decoder; none means identity
    over the data range."""
    dec = record or (meta.get("adapter") or {}).get("decoder") or {"kind": "identity"}
    if dec.get("kind") == "identity":
        return IdentityDecoder(shape, meta["data"].get("range", (-1.0, 1.0)))
    cls = {"vae": VAEDecoder, "tiny": TinyDecoder}.get(dec.get("kind"))
    if cls is not None:
        vae = read_net(path, dec, f"{where} (decoder)", device, weights)
        return cls(vae, shape, dec["scaling_factor"], dec.get("shift_factor"),
                   dtype_name(dtype or dec.get("dtype", "float32")))
    raise ValueError(f"{where}: unknown decoder kind {dec.get('kind')!r}; allowed: ['identity', 'tiny', 'vae']")


def default_guidance(art: Artifact) -> float:
    """The guidance scale eval measured as the default, else model.json's, else 1 (no guidance)."""
    for src in (art.eval or {}, art.meta.get("sampling", {})):
        if src.get("default_guidance") is not None:
            return float(src["default_guidance"])
    return 1.0

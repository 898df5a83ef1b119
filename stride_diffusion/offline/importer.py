"""`stride offline import`: a pretrained network from elsewhere -> a stride artifact.

    import diffusers DIR        a diffusers pipeline folder (model_index.json with transformer/ or unet/,
                                scheduler/, vae/) or one model folder (config.json + weights)
    import dit-checkpoint FILE  an official DiT / SiT `.pt` state dict (the DiT repository's key layout),
                                mapped onto diffusers' DiTTransformer2DModel

The artifact is stride's usual model.json + model.safetensors, plus decoder.safetensors for a VAE
and tiny_decoder.safetensors for an optional tiny decoder beside it (--tiny-decoder: an
AutoencoderTiny folder, the TAESD layout; a request picks it with decoder=tiny).
model.json's `adapter` section records what the network needs (solvers.adapters): kind and time
map, output channels, null class, latent shape C x H x W, decoder, dtype, where the class names
came from, and the sha256 of every source weight file. Everything is read and checked before
anything is written; the artifact appears by one rename at the end, so bad input leaves nothing.
Never unpickles code: `.pt` / `.bin` files are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import inspect
import json
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from stride_diffusion.solvers.adapters import TIME_MAPS, adapter_class, dtype_name
from stride_diffusion.solvers.artifact import (
    MODEL_FORMAT,
    check_net_shape,
    fill,
    sha256_file,
    write_json,
    write_weights,
)
from stride_diffusion.solvers.nets.diffusers_nets import set_time_freq_shift
from stride_diffusion.solvers.samplers.pipeline import check_scheduler
from stride_diffusion.solvers.schedules import FlowSchedule, VPSchedule

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
NETWORKS = {"DiTTransformer2DModel": "dit", "Transformer2DModel": "dit", "UNet2DModel": "unet2d"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
DIT_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}  # DiT-XL, -L, -B, -S: heads are not in the weights


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ValueError("importing needs diffusers: pip install 'stride[diffusers]'") from e
    return diffusers


def warn(message: str) -> None:
    """What the import cannot honour, said on stderr where the user sees it (the import goes on)."""
    print(f"stride offline import: WARNING: {message}", file=sys.stderr)


def _clean(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


# -- reading weights ---------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict:
    """Tensors of a safetensors file, or of a `.pt` / `.bin` state dict read without unpickling code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own types
            raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses every global outside tensors and containers
        raise ValueError(
            f"{path} cannot be read without running its pickled code ({type(e).__name__}), and stride never does. "
            "Convert it where that code is available: load it there and save the plain tensors, e.g. "
            "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(state_dict, "
            "'weights.safetensors'); for a training checkpoint, save its 'ema' (or 'model') entry alone.") from e
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint: {e}") from e
    if isinstance(sd, dict) and set(sd) & {"model", "ema", "state_dict"} and not all(torch.is_tensor(v) for v in sd.values()):
        key = "ema" if "ema" in sd else ("model" if "model" in sd else "state_dict")  # training checkpoints
        sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors; save "
                         "model.state_dict() instead")
    return sd


def _model_folder(d: Path, what: str):
    """(class name, config, state dict, {file: sha256}) of a diffusers model folder."""
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{d} is not a diffusers {what} folder: {cfg_path.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # sharded
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [d / n for n in WEIGHT_NAMES if (d / n).is_file()][:1]
    if not files:
        raise ValueError(f"{d} is not a diffusers {what} folder: no weights file "
                         f"({' or '.join(WEIGHT_NAMES[:2])}) is there")
    sd = {}
    for f in files:
        sd.update(read_state_dict(f))
    return cfg.get("_class_name"), cfg, sd, {str(f.relative_to(d.parent)): sha256_file(f) for f in files}


# -- schedules ---------------------------------------------------------------------------------------

def schedule_from_scheduler(cfg: dict, where: str):
    """(schedule, param) from a diffusers scheduler config: the discrete VP chain it was trained on."""
    pt = cfg.get("prediction_type", "epsilon")
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"{where}: unknown prediction type {pt!r}; allowed: {sorted(PREDICTION_TYPES)}")
    bs = cfg.get("beta_schedule", "linear")
    if bs not in BETA_SCHEDULES:
        raise ValueError(f"{where}: beta schedule {bs!r} is not supported; allowed: {sorted(BETA_SCHEDULES)}")
    if cfg.get("trained_betas") is not None or cfg.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: trained_betas / rescale_betas_zero_snr are not supported")
    n = int(cfg.get("num_train_timesteps", 1000))
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    kind = BETA_SCHEDULES[bs]
    default = kind == "cosine" or (kind == "linear" and (b0, b1) == (1e-4, 0.02))
    sched = VPSchedule(kind, n) if default else VPSchedule(kind, n, beta_start=b0, beta_end=b1)
    return sched, PREDICTION_TYPES[pt]


# -- the pieces of an artifact -----------------------------------------------------------------------

def _id2label(d: dict, where: str) -> list:
    """Names by index from an id2label mapping: {"0": "tench", ...} (a pipeline's model_index.json, or
    one holding it under "id2label"), or ImageNet's class index {"0": ["n01440764", "tench"], ...}."""
    d = d.get("id2label", d)
    try:
        names = [d[str(i)] if str(i) in d else d[i] for i in range(len(d))]
    except KeyError as e:
        raise ValueError(f"{where}: id2label has no entry {e}; its keys must be 0..{len(d) - 1}") from e
    return [n[-1] if isinstance(n, list) and n else n for n in names]


def _class_names(num_classes: int, class_names_file, id2label) -> tuple[list, str]:
    if class_names_file:
        p = Path(class_names_file)
        if not p.is_file():
            raise ValueError(f"--class-names {p}: no such file")
        text = p.read_text()
        try:
            names = json.loads(text) if p.suffix == ".json" else [ln.strip() for ln in text.splitlines() if ln.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"--class-names {p}: not valid JSON ({e}); give a JSON list or id2label, or a "
                             "text file with one name a line") from e
        if isinstance(names, dict):
            names = _id2label(names, f"--class-names {p}")
        src = f"file {p.name}"
    elif id2label:
        names = _id2label(id2label, "model_index.json")
        src = "id2label"
    else:
        warn(f"the model has no class names (no id2label in its folder): its {num_classes} classes are named "
             f"0..{num_classes - 1}; pass --class-names FILE (one name a line, or JSON id2label) to name them")
        return [str(i) for i in range(num_classes)], "indices"
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names ({src}) for a network with {num_classes} classes")
    return [str(n) for n in names], src


def _vae(vae_dir, latent_shape, dtype: str):
    """(AutoencoderKL, decoder record without weights, {file: sha256}) or Nones without a VAE."""
    if vae_dir is None:
        return None, None, {}
    d = Path(vae_dir)
    cls, cfg, sd, shas = _model_folder(d, "VAE")
    if cls not in (None, "AutoencoderKL"):
        raise ValueError(f"{d}: a {cls} is not supported as a decoder; allowed: ['AutoencoderKL']")
    vae = fill(_diffusers().AutoencoderKL.from_config(_clean(cfg)), sd, str(d))
    if vae.config.latent_channels != latent_shape[0]:
        raise ValueError(f"{d}: the VAE has latent_channels={vae.config.latent_channels}, but the network's "
                         f"latents have {latent_shape[0]} channels")
    from stride_diffusion.solvers.adapters import VAEDecoder
    dec = VAEDecoder(vae, latent_shape, vae.config.scaling_factor, vae.config.shift_factor, dtype)
    rec = {"kind": "vae", "architecture": {"kind": "diffusers.AutoencoderKL", "config": _clean(vae.config)},
           "scaling_factor": dec.scaling_factor, "shift_factor": dec.shift_factor, "dtype": dtype,
           "image_shape": list(dec.image_shape)}
    from stride_diffusion.solvers.adapters.decoders import fit_latent_rgb
    rec["preview"] = fit_latent_rgb(dec, latent_shape)  # streamed previews: latents -> RGB, fitted once here
    return vae, rec, shas


def _tiny_decoder(tiny_dir, latent_shape, dtype: str, vae) -> tuple:
    """(AutoencoderTiny, tiny decoder record without weights, {file: sha256}) or Nones without one."""
    if tiny_dir is None:
        return None, None, {}
    d = Path(tiny_dir)
    if vae is None:
        raise ValueError(f"--tiny-decoder {d}: a tiny decoder goes beside a latent model's VAE, and this model has "
                         "none (--vae DIR, or a pipeline folder with vae/)")
    cls, cfg, sd, shas = _model_folder(d, "tiny decoder")
    if cls not in (None, "AutoencoderTiny"):
        raise ValueError(f"{d}: a {cls} is not supported as a tiny decoder; allowed: ['AutoencoderTiny']")
    cls = _diffusers().AutoencoderTiny
    known = inspect.signature(cls.__init__).parameters  # its config also records a derived block_out_channels
    tiny = fill(cls.from_config({k: v for k, v in _clean(cfg).items() if k in known}), sd, str(d))
    if tiny.config.latent_channels != latent_shape[0]:
        raise ValueError(f"{d}: the tiny decoder has latent_channels={tiny.config.latent_channels}, but the "
                         f"network's latents have {latent_shape[0]} channels")
    from stride_diffusion.solvers.adapters import TinyDecoder, VAEDecoder
    dec = TinyDecoder(tiny, latent_shape, tiny.config.scaling_factor, tiny.config.shift_factor, dtype)
    full = VAEDecoder.upscale(vae.config)
    if dec.upscale(tiny.config) != full or tiny.config.out_channels != vae.config.out_channels:
        raise ValueError(f"{d}: the tiny decoder makes {list(dec.image_shape)} images from these latents, the VAE "
                         f"{[vae.config.out_channels, latent_shape[1] * full, latent_shape[2] * full]}")
    config = {k: v for k, v in _clean(tiny.config).items() if k in known}
    rec = {"kind": "tiny", "architecture": {"kind": "diffusers.AutoencoderTiny", "config": config},
           "scaling_factor": dec.scaling_factor, "shift_factor": dec.shift_factor, "dtype": dtype,
           "image_shape": list(dec.image_shape)}
    return tiny, rec, shas


def write_artifact(out: Path, name: str | None, net, arch_kind: str, schedule, param: str, adapter: dict,
                   class_names: list, vae, decoder: dict | None, source: dict, command: str, tiny=None,
                   tiny_decoder: dict | None = None) -> Path:
    """Check the adapter by one call, then write everything into a temporary folder renamed to `out`."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out or remove it")
    shape = adapter["latent_shape"]
    arch = {"kind": arch_kind, "config": _clean(net.config)}
    check_net_shape(arch, shape, "the imported network")
    if decoder is None:
        C = shape[0]
        if C not in (1, 3):
            raise ValueError(f"a pixel model needs 1 or 3 channels to make images, this one has {C}; "
                             "a latent model needs its VAE (--vae DIR)")
        decoder = {"kind": "identity"}
    adapter = {**adapter, "decoder": decoder, **({"tiny_decoder": tiny_decoder} if tiny is not None else {})}
    model = adapter_class(adapter["kind"], adapter["time_map"])(
        net, schedule, param, shape, adapter["num_classes"], null_class=adapter["null_class"])
    with torch.no_grad():  # one evaluation: the network runs on these latents and gives their shape back
        x = torch.zeros(1, *shape)
        try:
            y = model(x, torch.tensor([0.5 * (schedule.t_min + schedule.t_max)]), None,
                      torch.tensor([model.null_class]))
        except RuntimeError as e:
            raise ValueError(f"the network does not run on latents of shape {shape}: {e}") from e
        if y.shape != x.shape:
            raise ValueError(f"the network returns shape {tuple(y.shape)} for latents {tuple(x.shape)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rec = write_weights(tmp / "model.safetensors", net.state_dict(), adapter["dtype"])
        if vae is not None:
            decoder["weights"] = write_weights(tmp / "decoder.safetensors", vae.state_dict(), decoder["dtype"])
        if tiny is not None:
            tiny_decoder["weights"] = write_weights(tmp / "tiny_decoder.safetensors", tiny.state_dict(),
                                                    tiny_decoder["dtype"])
        meta = {
            "format": MODEL_FORMAT, "name": name or out.name, "architecture": arch, "schedule": schedule.to_json(),
            "param": param,
            "data": {"shape": list(shape), "range": [-1.0, 1.0], "class_names": class_names,
                     "num_classes": len(class_names), "source": source},
            "weights": rec, "adapter": adapter, "sampling": {},
            "training": {"imported": True, "command": command},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(tmp / "model.json", meta)
        # mkdtemp makes 0700 (and the files 0600 under a strict umask): a container running as another
        # user, or a bind mount, could not read the artifact. World-readable as written, as `cp` would.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _adapter(kind: str, time_map: str | None, out_channels: int, num_classes: int, null_class, shape,
             dtype: str, names_src: str, embed_rows: int, **extra) -> dict:
    if time_map is not None and time_map not in TIME_MAPS:
        raise ValueError(f"unknown time map {time_map!r}; allowed: {TIME_MAPS}")
    tm = adapter_class(kind, time_map).time_map
    null = num_classes if null_class is None else int(null_class)
    if not 0 <= null < embed_rows:
        raise ValueError(f"null class {null} is outside the network's {embed_rows} label embeddings "
                         f"(0..{embed_rows - 1})")
    return {"kind": kind, "time_map": tm, "out_channels": int(out_channels), "keep_channels": int(shape[0]),
            "num_classes": int(num_classes), "null_class": null, "latent_shape": [int(v) for v in shape],
            "dtype": dtype, "class_names": names_src, **extra}


def _shape(arg, default) -> list:
    if arg is None:
        return [int(v) for v in default]
    try:
        s = [int(v) for v in str(arg).replace("x", ",").split(",")]
    except ValueError:
        s = []
    if len(s) != 3 or min(s) < 1:
        raise ValueError(f"--latent-shape {arg!r}: expected C,H,W (e.g. 4,32,32)")
    return s


# -- import diffusers ---------------------------------------------------------------------------------

def import_diffusers(src, out, *, name=None, dtype="float32", null_class=None, class_names=None, vae=None,
                     latent_shape=None, prediction_type=None, time_map=None, command="", tiny_decoder=None) -> Path:
    d = Path(src)
    if not d.is_dir():
        raise ValueError(f"{d} is not a folder")
    dtype = dtype_name(dtype)
    index, id2label, sched_cfg = d / "model_index.json", None, None
    if index.is_file():  # a pipeline folder
        mi = json.loads(index.read_text())
        id2label = mi.get("id2label")
        sub = next((s for s in ("transformer", "unet") if s in mi), None)
        if sub is None:
            raise ValueError(f"{index} names no 'transformer' or 'unet'; found {sorted(k for k in mi if not k.startswith('_'))}")
        net_dir = d / sub
        if (d / "scheduler" / "scheduler_config.json").is_file():
            sched_cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
        if vae is None and "vae" in mi:
            vae = d / "vae"
    elif (d / "config.json").is_file():
        net_dir = d
    else:
        raise ValueError(f"{d} is not a diffusers model: neither model_index.json nor config.json is there")
    cls, cfg, sd, shas = _model_folder(net_dir, "model")
    if cls not in NETWORKS:
        raise ValueError(f"{net_dir}: a {cls} is not supported; allowed: {sorted(NETWORKS)}")
    diffusers = _diffusers()
    if cls == "Transformer2DModel" and cfg.get("norm_type") != "ada_norm_zero":
        raise ValueError(f"{net_dir}: a Transformer2DModel with norm_type {cfg.get('norm_type')!r} is not the DiT "
                         "layout (ada_norm_zero) and is not supported")
    if NETWORKS[cls] == "dit":
        net_cls, arch_kind = diffusers.DiTTransformer2DModel, "diffusers.DiTTransformer2DModel"
        allowed = inspect.signature(net_cls.__init__).parameters  # the older Transformer2DModel has more keys
        net = net_cls.from_config({k: v for k, v in _clean(cfg).items() if k in allowed})
    else:
        net_cls, arch_kind = diffusers.UNet2DModel, "diffusers.UNet2DModel"
        net = net_cls.from_config(_clean(cfg))
    fill(net, sd, str(net_dir))
    c = net.config
    if NETWORKS[cls] == "dit":
        num_classes, rows = int(c.num_embeds_ada_norm), int(c.num_embeds_ada_norm) + 1
        default_shape, kind = (c.in_channels, c.sample_size, c.sample_size), "dit"
    else:
        if c.time_embedding_type != "positional":
            raise ValueError(f"{net_dir}: time_embedding_type {c.time_embedding_type!r} is not supported; "
                             "allowed: ['positional']")
        if c.num_class_embeds is None or c.class_embed_type is not None:
            raise ValueError(f"{net_dir}: not a class-conditional UNet2DModel (needs num_class_embeds and "
                             f"class_embed_type None; found {c.num_class_embeds}, {c.class_embed_type!r})")
        rows = int(c.num_class_embeds)
        num_classes = rows - 1  # the last embedding is the CFG null class unless --null-class says otherwise
        ss = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
        default_shape, kind = (c.in_channels, *ss), "unet2d"
    refused, notes = check_scheduler(sched_cfg)
    if refused:
        raise ValueError(f"{d / 'scheduler' / 'scheduler_config.json'}: " + "; ".join(refused))
    for note in notes:
        warn(note)
    if sched_cfg is not None:
        schedule, param = schedule_from_scheduler(sched_cfg, str(d / "scheduler" / "scheduler_config.json"))
    else:  # a bare model folder: DDPM's chain, the DiT / DDPM convention
        schedule, param = VPSchedule(), "eps"
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; allowed: {sorted(PREDICTION_TYPES)}")
        param = PREDICTION_TYPES[prediction_type]
    shape = _shape(latent_shape, default_shape)
    names, names_src = _class_names(num_classes, class_names, id2label)
    v, dec, vshas = _vae(vae, shape, dtype)
    tiny, tdec, tshas = _tiny_decoder(tiny_decoder, shape, dtype, v)
    adapter = _adapter(kind, time_map, c.out_channels, num_classes, null_class, shape, dtype, names_src, rows,
                       network=cls, sources=({**shas, **vshas, **tshas}))
    source = {"kind": "diffusers", "path": str(d.resolve()), "scheduler": sched_cfg,  # whole, for solver=pipeline
              "scheduler_class": (sched_cfg or {}).get("_class_name"), "scheduler_notes": notes}
    return write_artifact(Path(out), name, net, arch_kind, schedule, param, adapter, names, v, dec, source, command,
                          tiny, tdec)


# -- import dit-checkpoint -------------------------------------------------------------------------------

def dit_to_diffusers(sd: dict, depth: int) -> dict:
    """The DiT repository's keys (models.py) -> DiTTransformer2DModel's. The one timestep and label
    embedder of DiT is shared by every diffusers block, so it is copied into each."""
    sd = dict(sd)
    out = {"pos_embed.proj.weight": sd.pop("x_embedder.proj.weight"),
           "pos_embed.proj.bias": sd.pop("x_embedder.proj.bias"),
           "proj_out_1.weight": sd.pop("final_layer.adaLN_modulation.1.weight"),
           "proj_out_1.bias": sd.pop("final_layer.adaLN_modulation.1.bias"),
           "proj_out_2.weight": sd.pop("final_layer.linear.weight"),
           "proj_out_2.bias": sd.pop("final_layer.linear.bias")}
    emb = {"timestep_embedder.linear_1": "t_embedder.mlp.0", "timestep_embedder.linear_2": "t_embedder.mlp.2"}
    shared = {}
    for new, old in emb.items():
        for p in ("weight", "bias"):
            shared[f"{new}.{p}"] = sd.pop(f"{old}.{p}")
    shared["class_embedder.embedding_table.weight"] = sd.pop("y_embedder.embedding_table.weight")
    for i in range(depth):
        b, n = f"blocks.{i}.", f"transformer_blocks.{i}."
        for k, v in shared.items():
            out[n + "norm1.emb." + k] = v
        q, k_, v_ = sd.pop(b + "attn.qkv.weight").chunk(3)
        qb, kb, vb = sd.pop(b + "attn.qkv.bias").chunk(3)
        out.update({n + "attn1.to_q.weight": q, n + "attn1.to_k.weight": k_, n + "attn1.to_v.weight": v_,
                    n + "attn1.to_q.bias": qb, n + "attn1.to_k.bias": kb, n + "attn1.to_v.bias": vb})
        for new, old in (("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                         ("norm1.linear", "adaLN_modulation.1")):
            for p in ("weight", "bias"):
                out[f"{n}{new}.{p}"] = sd.pop(f"{b}{old}.{p}")
    sd.pop("pos_embed", None)  # fixed sin-cos; diffusers computes the same (checked by the importer)
    out.update(sd)  # anything left over is reported as unexpected by fill()
    return out


def import_dit_checkpoint(file, out, *, name=None, schedule="vp", vae=None, dtype="float32", null_class=None,
                          class_names=None, heads=None, latent_shape=None, time_map=None, command="",
                          tiny_decoder=None) -> Path:
    f = Path(file)
    if not f.is_file():
        raise ValueError(f"{f}: no such file")
    if schedule not in ("vp", "flow"):
        raise ValueError(f"unknown schedule {schedule!r}; allowed: ['flow', 'vp']")
    dtype = dtype_name(dtype)
    sd = read_state_dict(f)
    need = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    miss = [k for k in need if k not in sd]
    if miss:
        raise ValueError(f"{f} is not in the DiT repository's layout: tensors {miss} are missing")
    pw = sd["x_embedder.proj.weight"]
    hidden, C, p = pw.shape[0], pw.shape[1], pw.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    side = round(tokens ** 0.5) * p if tokens else None
    if side is None and latent_shape is None:
        raise ValueError(f"{f} has no pos_embed to read the latent size from; pass --latent-shape C,H,W")
    heads = heads or DIT_HEADS.get(hidden)
    if heads is None or hidden % heads:
        raise ValueError(f"hidden size {hidden}: pass --heads (the number of attention heads; it is not in the "
                         f"weights); known sizes: {DIT_HEADS}")
    diffusers = _diffusers()
    net = diffusers.DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=C, out_channels=out_ch,
        num_layers=depth, sample_size=side or _shape(latent_shape, None)[1], patch_size=p,
        num_embeds_ada_norm=rows - 1, norm_eps=1e-6)  # DiT's LayerNorms all use 1e-6 (diffusers' default: 1e-5)
    fill(net, dit_to_diffusers(sd, depth), str(f))
    if "pos_embed" in sd and not torch.allclose(sd["pos_embed"].float(), net.pos_embed.pos_embed, atol=1e-5):
        raise ValueError(f"{f}: tensor 'pos_embed' is not the sin-cos embedding DiT and diffusers compute")
    set_time_freq_shift(net, 0)  # DiT's embedding divides the frequencies by half, diffusers' by half - 1
    kind = "sit" if schedule == "flow" else "dit"
    sched, param = (FlowSchedule(), "flow") if schedule == "flow" else (VPSchedule(), "eps")
    shape = _shape(latent_shape, (C, side, side))
    names, names_src = _class_names(rows - 1, class_names, None)
    v, dec, vshas = _vae(vae, shape, dtype)
    tiny, tdec, tshas = _tiny_decoder(tiny_decoder, shape, dtype, v)
    adapter = _adapter(kind, time_map, out_ch, rows - 1, null_class, shape, dtype, names_src, rows,
                       network="DiT checkpoint", time_freq_shift=0,
                       sources={f.name: sha256_file(f), **vshas, **tshas})
    source = {"kind": "dit-checkpoint", "path": str(f.resolve())}
    return write_artifact(Path(out), name, net, "diffusers.DiTTransformer2DModel", sched, param, adapter, names, v, dec,
                          source, command, tiny, tdec)


# -- CLI ---------------------------------------------------------------------------------------------

def add_parser(subparsers):
    im = subparsers.add_parser("import", help="a pretrained network (diffusers folder, DiT/SiT checkpoint) -> an artifact")
    isub = im.add_subparsers(dest="source", required=True)
    idf = isub.add_parser("diffusers", help="a diffusers pipeline or model folder (DiT, class-conditional UNet2DModel)")
    idf.add_argument("dir")
    idf.add_argument("--prediction-type", default=None,
                     help="override the scheduler's (epsilon, v_prediction, sample)")
    idk = isub.add_parser("dit-checkpoint", help="an official DiT / SiT .pt state dict (DiT repository layout)")
    idk.add_argument("file")
    idk.add_argument("--schedule", default="vp", help="vp (DiT) or flow (SiT)")
    idk.add_argument("--heads", type=int, default=None, help="attention heads (default: from the hidden size)")
    for q in (idf, idk):
        q.add_argument("--name", required=True, help="the model's name (the artifact folder's)")
        q.add_argument("--out", default=None, help="artifact directory (default artifacts/NAME)")
        q.add_argument("--vae", default=None, help="AutoencoderKL folder (a pipeline's vae/ is found by itself)")
        q.add_argument("--tiny-decoder", default=None, metavar="DIR",
                       help="AutoencoderTiny folder (TAESD layout) kept beside the VAE; requests choose it with "
                            "decoder=tiny")
        q.add_argument("--dtype", default="fp32", help="network and decoder: fp32, bf16 or fp16")
        q.add_argument("--null-class", type=int, default=None,
                       help="the network's label index of the CFG null class (default: num_classes)")
        q.add_argument("--class-names", default=None, metavar="FILE",
                       help="one name a line, or JSON: a list, or id2label ({\"0\": \"tench\", ...}; ImageNet's "
                            "class index with [wnid, name] values too)")
        q.add_argument("--latent-shape", default=None, help="C,H,W when not the config's (non-square allowed)")
        q.add_argument("--time-map", default=None, help="check the kind's time map (discrete, reversed-flow)")
    im.set_defaults(func=run)
    return im


def run(a, command=None) -> int:
    out = a.out or f"artifacts/{a.name}"
    kw = {"name": a.name, "dtype": a.dtype, "null_class": a.null_class, "class_names": a.class_names, "vae": a.vae,
          "latent_shape": a.latent_shape, "time_map": a.time_map, "command": command,
          "tiny_decoder": a.tiny_decoder}
    if a.source == "diffusers":
        path = import_diffusers(a.dir, out, prediction_type=a.prediction_type, **kw)
    else:
        path = import_dit_checkpoint(a.file, out, schedule=a.schedule, heads=a.heads, **kw)
    print(f"wrote {path}")
    return 0

"""Training: the demo denoisers (rectified flow, or epsilon on discrete VP) and the classifier.

One seeded generator draws batches, times, noise and label dropout; it, the global RNG (dropout),
the weights, the EMA and the optimiser state are checkpointed as safetensors + json, so a resumed
run continues bit for bit where it stopped.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from stride_diffusion.offline.data import ImageSet, data_from_source, judge_split, load_data
from stride_diffusion.offline.progress import Progress
from stride_diffusion.offline.seeds import stream_seed
from stride_diffusion.solvers.artifact import read_json, save_artifact, save_classifier, write_json
from stride_diffusion.solvers.nets import Classifier, UNet, classifier_config, unet_config
from stride_diffusion.solvers.param import check_param, convert
from stride_diffusion.solvers.schedules import FlowSchedule, VPSchedule

PRESETS = {
    # tests and smoke runs: seconds on a CPU
    "tiny": {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "emb_dim": 32, "num_heads": 2},
    # the demo artifacts: 0.67M parameters, trained on one CPU thread
    "small": {"channels": 16, "channel_mult": [1, 2, 4], "num_res_blocks": 1, "emb_dim": 64, "num_heads": 4},
}
CKPT_FORMAT = "stride.train-state/1"
OBJECTIVES = {"flow": "rectified flow: x_t = (1-t) x0 + t eps",
              "vp": "DDPM, discrete linear betas: t = (i+1)/1000, i uniform in 0..999"}


def resolve_config(spec: str | dict | None, data: ImageSet) -> dict:
    """A preset name, a json string, or a json file; data-dependent keys come from the data."""
    if spec is None:
        spec = "small"
    if isinstance(spec, str):
        if spec in PRESETS:
            spec = PRESETS[spec]
        elif spec.lstrip().startswith("{"):
            spec = json.loads(spec)
        elif Path(spec).is_file():
            spec = json.loads(Path(spec).read_text())
        else:
            raise ValueError(f"--config {spec!r} is neither a preset {sorted(PRESETS)}, "
                             "a json object nor a json file")
    C, H, W = data.shape
    if H != W:
        raise ValueError(f"square images only, got {H}x{W}")
    return unet_config({**spec, "in_channels": C, "image_size": H, "num_classes": data.num_classes})


@dataclass
class Settings:
    schedule: str = "flow"  # flow | vp
    param: str = "flow"  # the network's output: flow | eps | x0 | v
    steps: int = 6000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    t_dist: str = "uniform"  # flow only: uniform | logit-normal
    label_dropout: float = 0.1
    ckpt_every: int = 500
    log_every: int = 50


def make_schedule(name: str):
    if name == "flow":
        return FlowSchedule()
    if name == "vp":
        return VPSchedule("linear", 1000)
    raise ValueError(f"unknown training schedule {name!r}; allowed: 'flow', 'vp'")


def sample_t(st: Settings, sched, n: int, g: torch.Generator) -> torch.Tensor:
    if st.schedule == "vp":  # the discrete chain: step i sits at t = (i + 1) / 1000
        return (torch.randint(0, sched.n, (n,), generator=g) + 1).double() / sched.n
    if st.t_dist == "uniform":
        return torch.rand(n, generator=g, dtype=torch.float64)
    if st.t_dist == "logit-normal":  # SD3's density: more weight mid-trajectory
        return torch.sigmoid(torch.randn(n, generator=g, dtype=torch.float64))
    raise ValueError(f"unknown t distribution {st.t_dist!r}; allowed: 'uniform', 'logit-normal'")


def loss_fn(net, x0, labels, st: Settings, sched, g: torch.Generator):
    B = x0.shape[0]
    t = sample_t(st, sched, B, g)
    eps = torch.randn(x0.shape, generator=g)
    drop = torch.rand(B, generator=g) < st.label_dropout
    labels = torch.where(drop, torch.full_like(labels, net.num_classes), labels)
    a, s = sched.alpha(t), sched.sigma(t)
    r = lambda v: v.float().reshape(B, 1, 1, 1)
    xt = r(a) * x0 + r(s) * eps
    # target = A x_t + B out evaluated at the true (x0, eps): out = (x0-or-eps-form - A x_t) / B
    ax, bx = convert(st.param, "x0", a, s)
    target = (x0 - r(ax) * xt) / r(bx)
    return F.mse_loss(net(xt, t.float(), labels), target)


# -- checkpoints ---------------------------------------------------------------------------------

def save_ckpt(d: Path, step, net, ema, opt, g, st: Settings, cfg, wall, loss_avg):
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    osd = opt.state_dict()
    for i, s in osd["state"].items():
        tensors |= {f"opt.{i}.{k}": v.reshape(-1) if v.ndim == 0 else v for k, v in s.items()}
    tensors["rng.generator"] = g.get_state()
    tensors["rng.global"] = torch.get_rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "state.safetensors.tmp"))
    os.replace(d / "state.safetensors.tmp", d / "state.safetensors")
    write_json(d / "state.json", {"format": CKPT_FORMAT, "step": step, "settings": asdict(st), "config": cfg,
                                  "wall_time_s": wall, "loss_avg": loss_avg,
                                  "param_groups": osd["param_groups"]})


def load_ckpt(d: Path, net, ema, opt, g, st: Settings, cfg):
    meta = read_json(d / "state.json")
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(f"{d / 'state.json'}: format {meta.get('format')!r} is not {CKPT_FORMAT!r}")
    if meta["config"] != cfg:
        raise ValueError(f"cannot resume: the checkpoint's net config {meta['config']} differs from {cfg}")
    old = {k: v for k, v in meta["settings"].items() if k not in ("steps", "ckpt_every", "log_every")}
    new = {k: v for k, v in asdict(st).items() if k in old}
    if old != new:
        diff = {k: (old[k], new[k]) for k in old if old[k] != new.get(k)}
        raise ValueError(f"cannot resume with different settings (checkpoint, now): {diff}")
    t = load_file(str(d / "state.safetensors"))
    net.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    state = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    g.set_state(t["rng.generator"])
    torch.set_rng_state(t["rng.global"])
    return meta["step"], meta["wall_time_s"], meta["loss_avg"]


def learning_rate(lr: float, step: int, warmup: int, decay: str = "none", total: int = 0) -> float:
    """Linear warm-up, then constant or cosine to 0 at `total` (EMA does the averaging either way)."""
    lr *= min(1.0, (step + 1) / max(1, warmup))
    return lr * 0.5 * (1 + math.cos(math.pi * step / total)) if decay == "cosine" else lr


def optimise(net, ema, opt, loss, lr: float, grad_clip: float, ema_decay: float, step: int) -> float:
    """One AdamW step with gradient clipping, then the EMA (its decay warms up as (1+k)/(10+k))."""
    for grp in opt.param_groups:
        grp["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)
    return loss.item()


def train(data: ImageSet, out, st: Settings, config="small", ckpt_dir=None, resume=False, threads=None,
          dtype="float32", progress_stream=None, command=None) -> Path:
    progress_stream = sys.stderr if progress_stream is None else progress_stream  # per call: a test may swap sys.stderr
    if threads:
        torch.set_num_threads(threads)
    check_param(st.param)
    sched = make_schedule(st.schedule)
    cfg = resolve_config(config, data)
    out = Path(out)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else Path("runs") / out.name
    torch.manual_seed(stream_seed("train", st.seed))
    net = UNet(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=st.lr, betas=(0.9, 0.99), weight_decay=st.weight_decay)
    g = torch.Generator().manual_seed(stream_seed("train", st.seed))
    step, wall, loss_avg = 0, 0.0, None
    if resume and (ckpt_dir / "state.json").exists():
        step, wall, loss_avg = load_ckpt(ckpt_dir, net, ema, opt, g, st, cfg)
        print(f"resumed from {ckpt_dir} at step {step}", file=progress_stream)
    x_all, y_all = data.train_x, data.train_y
    bar = Progress("train", st.steps, progress_stream)
    bar.bar.update(step)
    net.train()
    t0, seen = time.time(), 0
    while step < st.steps:
        idx = torch.randint(0, len(x_all), (st.batch,), generator=g)
        loss = loss_fn(net, x_all[idx], y_all[idx], st, sched, g)
        li = optimise(net, ema, opt, loss, learning_rate(st.lr, step, st.warmup), st.grad_clip, st.ema, step)
        step += 1
        loss_avg = li if loss_avg is None else 0.98 * loss_avg + 0.02 * li
        seen += st.batch
        now = time.time()
        bar(f"loss {loss_avg:.4f} {seen / max(now - t0, 1e-9):.0f} img/s")
        if step % st.ckpt_every == 0 or step == st.steps:
            save_ckpt(ckpt_dir, step, net, ema, opt, g, st, cfg, wall + now - t0, loss_avg)
    wall += time.time() - t0
    info = {
        "objective": OBJECTIVES[st.schedule], "target": st.param, **asdict(st),
        "optimizer": "AdamW(betas=(0.9, 0.99))", "lr_schedule": "linear warm-up, constant", "weights": "EMA",
        "wall_time_s": round(wall, 1), "final_loss_ema": loss_avg, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "command": command,
    }
    for k in ("ckpt_every", "log_every"):
        info.pop(k)
    return save_artifact(out, cfg, ema.state_dict(), sched, st.param, data.shape, data.class_names, info,
                         data_source=data.source, dtype=dtype)


# -- the classifier --------------------------------------------------------------------------------

def _shift(x, g, max_shift=1):
    """Random integer translations (zero background is -1): robustness to generated strokes."""
    B, _, H, W = x.shape
    p = max_shift
    xp = F.pad(x, (p, p, p, p), value=-1.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2, B), generator=g).tolist()
    return torch.stack([xp[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


@torch.no_grad()
def accuracy(clf, x, y, batch=512) -> float:
    clf.eval()
    pred = torch.cat([clf(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return (pred == y).float().mean().item()


def train_classifier(artifact, epochs=300, batch=64, lr=2e-3, seed=0, threads=None, min_acc=0.95,
                     config=None, progress_stream=None, reference=0.5) -> dict:
    """Fit the quality classifier on its part of the held-out images (offline/data.py: the generative
    model never saw them; the reference part stays unseen for FD and accuracy); refuse to write one
    that is too weak to judge samples."""
    progress_stream = sys.stderr if progress_stream is None else progress_stream  # per call: a test may swap sys.stderr
    if threads:
        torch.set_num_threads(threads)
    artifact = Path(artifact)
    meta = read_json(artifact / "model.json")
    data = data_from_source(meta["data"]["source"])
    js = judge_split(data, reference, seed=meta["data"]["source"]["split_seed"])
    C, H, _ = data.shape
    cfg = classifier_config({**(config or {}), "in_channels": C, "image_size": H,
                             "num_classes": data.num_classes})
    torch.manual_seed(stream_seed("train", seed))
    g = torch.Generator().manual_seed(stream_seed("train", seed))
    clf = Classifier(cfg)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    n = len(js.clf_x)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    t0, step = time.time(), 0
    for ep in range(epochs):
        clf.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            x = _shift(js.clf_x[idx], g)
            x = x + 0.05 * torch.randn(x.shape, generator=g)  # tolerate a little sampler noise
            loss = F.cross_entropy(clf(x), js.clf_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(), sched.step()
            step += 1
        if (ep + 1) % 50 == 0 or ep + 1 == epochs:
            acc = accuracy(clf, js.ref_x, js.ref_y)
            print(f"epoch {ep + 1}/{epochs}  loss {loss.item():.4f}  reference acc {acc:.4f}",
                  file=progress_stream, flush=True)
    acc = accuracy(clf, js.ref_x, js.ref_y)
    train_acc = accuracy(clf, js.clf_x, js.clf_y)
    # the gate reads every image it never saw (reference + the model's train split): ~1600 on digits,
    # where the reference alone (~180) moves by 0.5% an image
    unseen = accuracy(clf, torch.cat([js.ref_x, data.train_x]), torch.cat([js.ref_y, data.train_y]))
    if unseen < min_acc:
        raise RuntimeError(f"classifier accuracy on the images it never saw {unseen:.4f} < {min_acc}; not written")
    info = {"data": {"shape": list(data.shape), "num_classes": data.num_classes, "source": data.source,
                     "split": js.spec},
            "heldout_accuracy": acc, "unseen_accuracy": unseen, "train_accuracy": train_acc,
            "training": {"epochs": epochs, "batch": batch, "lr": lr, "seed": seed,
                         "augment": "shift 1px, noise 0.05", "wall_time_s": round(time.time() - t0, 1)}}
    return save_classifier(artifact, cfg, clf.eval().state_dict(), info)


# -- CLI ---------------------------------------------------------------------------------------------

def add_parser(subparsers):
    """`train` and `train-classifier`."""
    t = subparsers.add_parser("train", help="train a class-conditional denoiser and write an artifact")
    t.add_argument("--data", default="digits", help="'digits' or a folder of class sub-folders")
    t.add_argument("--image-size", type=int, default=16)
    t.add_argument("--channels", type=int, default=1, choices=[1, 3], help="folder data: 1 grayscale, 3 RGB")
    t.add_argument("--schedule", default="flow", choices=["flow", "vp"])
    t.add_argument("--param", default=None, choices=["flow", "eps", "x0", "v"],
                   help="network output (default: flow for --schedule flow, eps for vp)")
    t.add_argument("--out", required=True, help="artifact directory, e.g. artifacts/digits")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--t-dist", default="uniform", choices=["uniform", "logit-normal"])
    t.add_argument("--label-dropout", type=float, default=0.1)
    t.add_argument("--config", default="small", help="preset (tiny, small), json object or json file")
    t.add_argument("--ckpt-dir", default=None, help="checkpoints (default runs/<artifact name>)")
    t.add_argument("--ckpt-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="stored weights")
    t.set_defaults(func=run_train)

    c = subparsers.add_parser("train-classifier", help="train the quality classifier into an artifact")
    c.add_argument("artifact")
    c.add_argument("--epochs", type=int, default=300, help="passes over its ~180 images (digits)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--min-acc", type=float, default=0.95)
    c.set_defaults(func=run_classifier)


def run_train(a, command=None) -> int:
    param = a.param or {"flow": "flow", "vp": "eps"}[a.schedule]
    st = Settings(schedule=a.schedule, param=param, steps=a.steps, batch=a.batch, lr=a.lr, ema=a.ema,
                  seed=a.seed, t_dist=a.t_dist, label_dropout=a.label_dropout, ckpt_every=a.ckpt_every,
                  log_every=a.log_every)
    data = load_data(a.data, a.image_size, a.channels)
    out = train(data, a.out, st, a.config, a.ckpt_dir, a.resume, a.threads, a.dtype, command=command)
    print(f"wrote {out}")
    return 0


def run_classifier(a, command=None) -> int:
    m = train_classifier(a.artifact, epochs=a.epochs, seed=a.seed, threads=a.threads, min_acc=a.min_acc)
    print(f"wrote {a.artifact}/classifier.json (held-out accuracy {m['heldout_accuracy']:.4f})")
    return 0

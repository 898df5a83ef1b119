"""`stride offline ...`: train a demo model, train its classifier, evaluate its samplers."""
from __future__ import annotations

import argparse
import json
import shlex
import sys


def _floats(s):
    return [float(v) for v in s.split(",") if v]


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stride offline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a class-conditional denoiser and write an artifact")
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

    c = sub.add_parser("train-classifier", help="train the quality classifier into an artifact")
    c.add_argument("artifact")
    c.add_argument("--epochs", type=int, default=300, help="passes over its ~180 images (digits)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--min-acc", type=float, default=0.95)

    e = sub.add_parser("eval", help="quality per sampler x NFE -> eval.json, eval.md, plots")
    e.add_argument("artifact")
    e.add_argument("--solvers", default="euler,heun,ddim,dpmpp-2m,dpmpp-3m,unipc,ipndm")
    e.add_argument("--nfe", type=_ints, default=[1, 2, 3, 4, 5, 6, 8, 10, 16, 32])
    e.add_argument("--n", type=int, default=500, help="samples per seed set")
    e.add_argument("--seed-sets", type=int, default=3)
    e.add_argument("--seeds", type=_ints, default=None,
                   help="first seed of each set (default 10_000_000 + 1_000_000 j)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the artifact's default)")
    e.add_argument("--sweep", type=_floats, default=None,
                   help="also measure these guidance scales (with --sweep-with)")
    e.add_argument("--sweep-with", default="dpmpp-3m/logsnr:32", help="solver[/grid]:nfe for the guidance sweep")
    e.add_argument("--reference", default="dpmpp-3m/logsnr:128", help="solver[/grid]:nfe of the converged reference")
    e.add_argument("--cache", default=".cache/stride/eval")
    e.add_argument("--batch", type=int, default=1000)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda")
    e.add_argument("--no-images", action="store_true", help="skip plots and sample grids")
    e.add_argument("--no-learned", action="store_true", help="skip the learned solvers in <artifact>/solvers")
    e.add_argument("--secant-steps", type=_ints, default=[1, 2, 4, 8],
                   help="step counts for the artifact's secant models (0 skips them)")
    im = sub.add_parser("import", help="a pretrained network (diffusers folder, DiT/SiT checkpoint) -> an artifact")
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
        q.add_argument("--dtype", default="fp32", help="network and decoder: fp32, bf16 or fp16")
        q.add_argument("--null-class", type=int, default=None,
                       help="the network's label index of the CFG null class (default: num_classes)")
        q.add_argument("--class-names", default=None, help="file: one name a line, or a JSON list")
        q.add_argument("--latent-shape", default=None, help="C,H,W when not the config's (non-square allowed)")
        q.add_argument("--time-map", default=None, help="check the kind's time map (discrete, reversed-flow)")
    from stride_diffusion.offline import grid_search, guidance_eval, secant
    from stride_diffusion.offline.search import add_parsers  # search + dode

    add_parsers(sub)
    grid_search.add_parser(sub)
    guidance_eval.add_parser(sub)
    secant.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    try:
        return _run(a, "stride offline " + shlex.join(argv))
    except ValueError as e:  # bad input (flags, files, artifacts): the message, not a traceback
        print(f"stride offline {a.cmd}: {e}", file=sys.stderr)
        return 2


def check_device(name: str) -> str:
    """--device: a torch device this machine has; ValueError (exit 2) otherwise."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown --device {name!r}; e.g. cpu, cuda, cuda:1 ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _run(a, command: str) -> int:
    if getattr(a, "device", None) is not None:
        check_device(a.device)
    if a.cmd == "train":
        from stride_diffusion.offline.data import load_data
        from stride_diffusion.offline.train import Settings, train

        param = a.param or {"flow": "flow", "vp": "eps"}[a.schedule]
        st = Settings(schedule=a.schedule, param=param, steps=a.steps, batch=a.batch, lr=a.lr, ema=a.ema,
                      seed=a.seed, t_dist=a.t_dist, label_dropout=a.label_dropout, ckpt_every=a.ckpt_every,
                      log_every=a.log_every)
        data = load_data(a.data, a.image_size, a.channels)
        out = train(data, a.out, st, a.config, a.ckpt_dir, a.resume, a.threads, a.dtype, command=command)
        print(f"wrote {out}")
    elif a.cmd == "train-classifier":
        from stride_diffusion.offline.train import train_classifier

        m = train_classifier(a.artifact, epochs=a.epochs, seed=a.seed, threads=a.threads, min_acc=a.min_acc)
        print(f"wrote {a.artifact}/classifier.json (held-out accuracy {m['heldout_accuracy']:.4f})")
    elif a.cmd == "eval":
        from stride_diffusion.offline.evaluate import evaluate

        res = evaluate(a.artifact, solvers=a.solvers.split(","), nfes=a.nfe, n=a.n, seed_sets=a.seed_sets,
                       seeds=a.seeds, guidance=a.guidance, sweep=a.sweep, sweep_with=a.sweep_with,
                       reference=a.reference, cache=a.cache,
                       batch=a.batch, threads=a.threads, images=not a.no_images,
                       learned=not a.no_learned, secant_steps=[k for k in a.secant_steps if k > 0],
                       command=command, device=a.device)
        print(json.dumps({k: res[k] for k in ("guidance", "floor", "reference")}, indent=1))
    elif a.cmd == "import":
        from stride_diffusion.offline import importer

        out = a.out or f"artifacts/{a.name}"
        kw = {"name": a.name, "dtype": a.dtype, "null_class": a.null_class, "class_names": a.class_names, "vae": a.vae,
              "latent_shape": a.latent_shape, "time_map": a.time_map, "command": command}
        if a.source == "diffusers":
            path = importer.import_diffusers(a.dir, out, prediction_type=a.prediction_type, **kw)
        else:
            path = importer.import_dit_checkpoint(a.file, out, schedule=a.schedule, heads=a.heads, **kw)
        print(f"wrote {path}")
    elif a.cmd == "secant":
        from stride_diffusion.offline.secant import run

        return run(a, command=command)
    elif hasattr(a, "func"):  # subcommands that carry their own runner (search, dode, grids, eval-guidance)
        return a.func(a)
    return 0

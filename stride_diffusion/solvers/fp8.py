"""FP8 for a transformer's token-wise matmuls: torchao's float8 linear layers, dynamic and row-wise.

`--dtype fp8` loads the network in bfloat16, then gives every attention projection and
feed-forward linear of its transformer blocks a float8 (e4m3) weight scaled per output row; each
call scales its activations per row on the fly and multiplies in float8 with bfloat16 output
(torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`, torch._scaled_mm).
Those layers hold nearly all of a DiT's FLOPs (every token passes them); the embedders, the adaLN
modulation (one row per image) and the output projection stay bfloat16, as do the state and
the update (float32). Float8 matmuls need an Ada or Hopper GPU (compute capability 8.9+).

torchao is the optional extra `fp8` (`pip install 'stride-diffusion[fp8]'`).
"""
from __future__ import annotations

import torch

MIN_CAPABILITY = (8, 9)


def fp8_refusal(device) -> str | None:
    """Why `--dtype fp8` cannot run on `device` (None: it can)."""
    dev = torch.device(device)
    why = []
    if dev.type != "cuda":
        why.append(f"float8 matmuls need a CUDA GPU of compute capability 8.9+ (Ada, Hopper); the device is {dev}")
    else:
        cap = tuple(torch.cuda.get_device_capability(dev))
        if cap < MIN_CAPABILITY:
            why.append(f"float8 matmuls need compute capability 8.9+ (Ada, Hopper); {dev} is sm_{cap[0]}{cap[1]}")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        why.append("torchao is not installed (pip install 'stride-diffusion[fp8]')")
    if not why:
        return None
    return "--dtype fp8: " + "; ".join(why) + "; allowed here: fp32, bf16, fp16"


def fp8_layers(net: torch.nn.Module) -> list[str]:
    """The linear layers `to_fp8` converts: inside `transformer_blocks`, of an attention (`attn*`) or
    the feed-forward (`ff`), both sizes multiples of 16 (what row-wise float8 matmuls take)."""
    out = []
    for name, m in net.named_modules():
        parts = name.split(".")
        if (isinstance(m, torch.nn.Linear) and "transformer_blocks" in parts
                and any(p.startswith("attn") or p == "ff" for p in parts)
                and m.in_features % 16 == 0 and m.out_features % 16 == 0):
            out.append(name)
    return out


def to_fp8(net: torch.nn.Module | None, device) -> int:
    """Convert `net` (bfloat16, on `device`) in place; returns how many linear layers became float8.
    ValueError naming the reason where it cannot run, or when the network has no such layers."""
    why = fp8_refusal(device)
    if why:
        raise ValueError(why)
    names = set(fp8_layers(net)) if net is not None else set()
    if not names:
        raise ValueError(f"--dtype fp8: {type(net).__name__} has no attention or feed-forward linear layers in "
                         "transformer blocks (fp8 is for DiT / SiT transformers); allowed: fp32, bf16, fp16")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: fqn in names)
    return len(names)

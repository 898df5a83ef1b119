"""`--dtype fp8` (solvers/fp8.py): refused, naming why and what is allowed, off an sm_89+ GPU or
without torchao; the layers it converts; and, where torchao is installed (the `fp8` extra), the
conversion itself run on the CPU (torchao's float8 matmul has a CPU kernel; only its device check
is bypassed) against the bf16 network on the same seeds."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from tiny_models import tiny_dit

from stride_diffusion.solvers import fp8
from stride_diffusion.solvers.fp8 import fp8_layers, fp8_refusal, to_fp8

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def torchao_present(monkeypatch):
    """An importable `torchao.quantization` (the refusal only imports it)."""
    ao = types.ModuleType("torchao")
    ao.quantization = types.ModuleType("torchao.quantization")
    monkeypatch.setitem(sys.modules, "torchao", ao)
    monkeypatch.setitem(sys.modules, "torchao.quantization", ao.quantization)


@pytest.fixture
def torchao_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)


def test_refused_off_cuda(torchao_present):
    why = fp8_refusal("cpu")
    assert why.startswith("--dtype fp8:") and "compute capability 8.9+" in why and "the device is cpu" in why
    assert "torchao" not in why and why.endswith("allowed here: fp32, bf16, fp16")
    with pytest.raises(ValueError, match="the device is cpu"):
        to_fp8(tiny_dit().to(torch.bfloat16), "cpu")


@pytest.mark.parametrize("cap, ok", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_compute_capability(monkeypatch, torchao_present, cap, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: cap)
    why = fp8_refusal("cuda")
    assert (why is None) == ok, why
    if not ok:
        assert f"cuda is sm_{cap[0]}{cap[1]}" in why


def test_refused_without_torchao(monkeypatch, torchao_missing):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    why = fp8_refusal("cuda")
    assert "torchao is not installed" in why and "stride-diffusion[fp8]" in why
    assert "capability" not in why
    both = fp8_refusal("cpu")  # every reason at once
    assert "the device is cpu" in both and "torchao is not installed" in both


def test_the_layers_converted():
    net = tiny_dit()
    names = fp8_layers(net)
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert sorted(names) == sorted(f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block)
    linears = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = linears - set(names)  # embedders, adaLN modulation, output projection: bf16
    assert kept and all(".emb." in n or "norm" in n or n.startswith("proj_out") for n in kept), kept
    assert fp8_layers(torch.nn.Sequential(torch.nn.Linear(32, 32))) == []  # no transformer blocks


def test_a_network_without_transformer_blocks_is_refused(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_refusal", lambda device: None)
    with pytest.raises(ValueError, match="no attention or feed-forward linear layers.*allowed: fp32, bf16, fp16"):
        to_fp8(torch.nn.Sequential(torch.nn.Linear(32, 32)), "cuda")
    with pytest.raises(ValueError, match="no attention or feed-forward"):
        to_fp8(None, "cuda")  # a model without weights


def test_serve_refuses_fp8_here(capsys, torchao_missing):
    from service_fixtures import ROOT

    from stride_diffusion.service.cli import main

    assert main(["--artifacts", f"{ROOT}/artifacts/digits", "--dtype", "fp8", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stride serve: --dtype fp8:") and "torchao is not installed" in err


def test_fp8_sampling_against_bf16_on_the_cpu(monkeypatch):
    """The conversion with the real torchao: the chosen layers hold float8 weights, the rest bf16;
    4 steps with CFG through the Network wrapper stay near the bf16 samples on the same seeds."""
    pytest.importorskip("torchao.quantization")
    from stride_diffusion.solvers import make_table, sample, seeded_noise
    from stride_diffusion.solvers.adapters import DiscreteIndex
    from stride_diffusion.solvers.network import Network
    from stride_diffusion.solvers.schedules import VPSchedule

    monkeypatch.setattr(fp8, "fp8_refusal", lambda device: None)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)  # torchao's own device check
    out = {}
    for dt in ("bf16", "fp8"):
        net = tiny_dit(seed=3).to(torch.bfloat16)
        with torch.no_grad():  # a non-trivial function of its inputs
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if dt == "fp8":
            assert to_fp8(net, "cpu") == 12
            weights = {n: type(m.weight).__name__ for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)}
            assert {n for n, w in weights.items() if w == "Float8Tensor"} == set(fp8_layers(tiny_dit()))
        model = Network(DiscreteIndex(net, VPSchedule(), "eps", (4, 8, 8), 10))
        table = make_table("dpmpp-2m", model.schedule, model.param, 4)
        with torch.inference_mode():
            out[dt] = sample(model, table, seeded_noise(range(4), model.shape), torch.arange(4), 4.0)
    rel = float((out["fp8"] - out["bf16"]).pow(2).mean().sqrt() / out["bf16"].pow(2).mean().sqrt())
    assert 0 < rel < 0.1, rel

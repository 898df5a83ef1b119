"""The network's speed options on the CPU: torch.compile (inductor) per batch bucket with its cache on
disk, the attention backend (checked, not assumed), fused q/k/v projections, channels_last and a
compiled decoder, and the settings that reach the worker's Engine. What only a GPU can tell (CUDA
graphs replaying compiled kernels, flash/cuDNN attention, the speed) is benchmarks/gpu.sh's."""
import os

import pytest
import torch
from tiny_models import tiny_dit, tiny_taesd, tiny_unet, tiny_vae

from stride_diffusion.solvers.adapters import DiscreteIndex, TinyDecoder, VAEDecoder
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.network import Network, attention_kernels, fuse_attention_qkv, set_compile_cache
from stride_diffusion.solvers.schedules import VPSchedule


def dit_model(seed=0):
    return DiscreteIndex(tiny_dit(seed=seed), VPSchedule(), "eps", (4, 8, 8), 10)


def unet_model():
    return DiscreteIndex(tiny_unet(num_class_embeds=11, channels=3), VPSchedule(), "eps", (3, 8, 8), 10)


def inputs(model, B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, *model.shape, generator=g)
    return x, torch.linspace(0.2, 0.9, B), torch.zeros(B), torch.tensor([0, 3, 10, 5, 7][:B])


@pytest.mark.parametrize("make", [dit_model, unet_model], ids=["dit", "unet2d"])
def test_fused_qkv_gives_the_unfused_output_without_a_second_copy(make):
    model = make()
    args = inputs(model)
    with torch.inference_mode():
        ref = model(*args)
        net = Network(model, buckets=[4], static=True, fuse_qkv=True)
        got = net(*args)
    assert net.fused >= 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    attn = next(m for m in model.net.modules() if hasattr(m, "to_qkv"))
    assert type(attn.processor).__name__ == "FusedAttnProcessor2_0"
    assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()  # a view: the memory is spent once
    assert attn.to_v.weight.untyped_storage().data_ptr() == attn.to_qkv.weight.untyped_storage().data_ptr()
    assert fuse_attention_qkv(model.net) == 0  # idempotent


def test_fused_qkv_leaves_stride_own_nets_alone():
    digits = load_artifact("artifacts/digits").model
    assert Network(digits, fuse_qkv=True).fused == 0


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_is_checked_and_used(backend):
    """diffusers' DiT attention goes through scaled_dot_product_attention (AttnProcessor2_0): the
    check sees the backend torch dispatches each call to, and it is the one asked for."""
    model = dit_model()
    args = inputs(model)
    with torch.inference_mode():
        ref = model(*args)
        net = Network(model, buckets=[4], static=True, sdpa=backend)
        assert net.check_attention() == [backend]
        torch.testing.assert_close(net(*args), ref, rtol=1e-5, atol=1e-5)
        assert Network(model).check_attention() == ["flash"]  # auto on the CPU: torch's choice


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_an_sdpa_backend_that_cannot_run_is_refused_by_name(backend):
    net = Network(dit_model(), buckets=[2], static=True, sdpa=backend)
    with torch.inference_mode(), pytest.raises(ValueError, match=rf"sdpa={backend}: .* no {backend} kernel .* allowed"):
        net.capture()


def test_unknown_sdpa_backend_and_compile_mode_name_the_allowed():
    with pytest.raises(ValueError, match="allowed"):
        Network(dit_model(), sdpa="xformers")
    with pytest.raises(ValueError, match="allowed.*CUDA graph"):
        Network(dit_model(), buckets=[2], compile=True, compile_mode="reduce-overhead")


def test_attention_kernels_sees_no_attention_in_plain_code():
    assert attention_kernels(lambda: torch.ones(3) @ torch.ones(3)) == []


def test_channels_last_decoders_give_the_same_images():
    z = torch.randn(3, 4, 8, 8)
    for dec in (VAEDecoder(tiny_vae(), (4, 8, 8), 0.18215), TinyDecoder(tiny_taesd(), (4, 8, 8), 1.0)):
        with torch.inference_mode():
            ref = dec.decode(z)
            dec.optimize(channels_last=True)
            got = dec.decode(z)
        assert dec.channels_last and got.shape == ref.shape == (3, 3, 16, 16)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_network_and_decoder_match_eager_and_cache_on_disk(tmp_path, monkeypatch):
    """inductor on the CPU: one graph per bucket, compiled by capture() (warm-up) with its time, the
    compiled code written to the cache folder; the output is the eager one; calls of any row count
    up to a bucket reuse its graph (no recompilation while serving), larger ones run eagerly. The tiny
    decoder compiles with a dynamic batch: batch 1, then one graph for every batch >= 2."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    cache = tmp_path / "inductor"
    assert set_compile_cache(str(cache)) == str(cache) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    model = dit_model(seed=5)
    ref_model = dit_model(seed=5)
    net = Network(model, buckets=[4], compile=True, fuse_qkv=True)  # compile implies the static buckets
    assert net.static and net.compiled is not None and net.fused == 2
    with torch.inference_mode():
        net.capture()
        assert net.compile_seconds > 0 and net.attention == ["flash"]
        graphs = counters["stats"]["unique_graphs"]
        for B in (1, 3, 4):
            args = inputs(ref_model, B)
            torch.testing.assert_close(net(*args), ref_model(*args), rtol=1e-4, atol=1e-4)
        big = inputs(ref_model, 5)
        torch.testing.assert_close(net(*big), ref_model(*big), rtol=1e-4, atol=1e-4)  # past every bucket: eager
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after the warm-up
        assert any(cache.rglob("*")), "inductor wrote nothing to the cache folder"

        dec = TinyDecoder(tiny_taesd(), (4, 8, 8), 1.0)
        z = torch.randn(5, 4, 8, 8)
        want = dec.decode(z)
        dec.optimize(channels_last=True, compile=True)
        for B in (1, 2):
            torch.testing.assert_close(dec.decode(z[:B]), want[:B], rtol=1e-4, atol=1e-4)
        graphs = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(dec.decode(z), want, rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == graphs  # batch 5 ran the dynamic graph of batch 2


def test_settings_reach_the_engine_networks_and_decoders(tmp_path, monkeypatch):
    """--compile, --compile-mode, --compile-cache, --sdpa and --fuse-qkv from the command line to the
    worker's Networks and decoders (compilation itself stubbed: the slow test above runs it)."""
    from tiny_models import dit_pipeline

    from stride_diffusion.offline import cli as offline_cli
    from stride_diffusion.service import cli
    from stride_diffusion.service.metrics import Metrics
    from stride_diffusion.service.models import load_registry
    from stride_diffusion.service.worker import Worker
    from stride_diffusion.solvers import network as network_module

    dit_pipeline(tmp_path / "pipe")
    tiny_taesd().save_pretrained(tmp_path / "taesd")
    assert offline_cli.main(["import", "diffusers", str(tmp_path / "pipe"), "--name", "d", "--out",
                             str(tmp_path / "d"), "--tiny-decoder", str(tmp_path / "taesd")]) == 0
    compiled = []

    def fake_compile(fn, mode="default", shapes=1, dynamic=False):
        compiled.append((getattr(fn, "__self__", None), mode, dynamic))
        return fn

    monkeypatch.setattr(network_module, "compile_fn", fake_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    s = cli.settings_from(cli.parser().parse_args([
        "--artifacts", str(tmp_path / "d"), "--steps", "2", "--max-batch", "4", "--threads", "1", "--compile",
        "--compile-mode", "max-autotune-no-cudagraphs", "--compile-cache", str(tmp_path / "cache"), "--sdpa", "math",
        "--fuse-qkv", "--no-warmup"]))
    assert (s.compile, s.compile_mode, s.sdpa, s.fuse_qkv) == (True, "max-autotune-no-cudagraphs", "math", True)
    registry = load_registry(s)
    w = Worker(registry, s, None, Metrics())
    w.warm_up()
    nets = w.engine.networks()
    assert nets and all(n.compile and n.sdpa == "math" and n.fused == 2 and n.attention == ["math"] for n in nets)
    assert all(set(n.buckets) == {1, 2, 4} for n in nets)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
    e = next(iter(registry))
    assert set(e.decoders) == {"vae", "tiny"}
    owners = {type(o).__name__: (mode, dyn) for o, mode, dyn in compiled}
    assert owners == {"Network": ("max-autotune-no-cudagraphs", False),
                      "VAEDecoder": ("max-autotune-no-cudagraphs", None),
                      "TinyDecoder": ("max-autotune-no-cudagraphs", None)}
    assert all(not d.channels_last for d in e.decoders.values())  # channels_last on CUDA only

"""`stride offline import` as a user runs it: tiny random diffusers models saved with save_pretrained
(or a DiT-layout .pt), imported by the CLI, loaded, sampled and served; and the refusals: exit 2,
a message naming the problem, nothing written."""
import base64
import json
import math

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from service_fixtures import ApiServer
from tiny_models import ddim, diffusers_to_dit, dit_pipeline, tiny_dit, tiny_unet, tiny_vae

from stride_diffusion.offline import cli
from stride_diffusion.service import images
from stride_diffusion.service.models import ModelEntry, Registry
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.artifact import load_artifact, sha256_file

NAMES = ["cat", "dog", "owl", "fox", "elk", "bee", "ant", "cow", "emu", "yak"]


def run(*argv) -> int:
    return cli.main(["import", *map(str, argv)])


def nonsquare_unet(tmp_path):
    """A latent UNet2DModel on 4 x 8 x 6 latents (DDPMPipeline folder) and a separate VAE folder."""
    import diffusers
    diffusers.DDPMPipeline(unet=tiny_unet(channels=4, size=(8, 6)), scheduler=ddim()).save_pretrained(tmp_path / "unet")
    tiny_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
    return tmp_path / "unet"


def test_non_square_latents_import_sample_and_serve(tmp_path):
    src = nonsquare_unet(tmp_path)
    assert run("diffusers", src, "--name", "ns", "--out", tmp_path / "ns", "--vae", tmp_path / "vae",
               "--class-names", tmp_path / "names.txt") == 0
    meta = json.loads((tmp_path / "ns" / "model.json").read_text())
    ad = meta["adapter"]
    assert ad["latent_shape"] == [4, 8, 6] and ad["kind"] == "unet2d" and ad["time_map"] == "discrete"
    assert ad["decoder"]["image_shape"] == [3, 16, 12] and meta["data"]["class_names"] == NAMES
    # the sha256 of every source weight file, and of every weight file the artifact holds
    assert ad["sources"]["unet/diffusion_pytorch_model.safetensors"] == \
        sha256_file(src / "unet" / "diffusion_pytorch_model.safetensors")
    assert ad["sources"]["vae/diffusion_pytorch_model.safetensors"] == \
        sha256_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert ad["decoder"]["weights"]["sha256"] == sha256_file(tmp_path / "ns" / "decoder.safetensors")
    art = load_artifact(tmp_path / "ns")
    assert art.model.shape == (4, 8, 6) and art.decoder.image_shape == (3, 16, 12)
    lat = sample(art.model, make_table("dpmpp-2m", art.schedule, art.model.param, 4), seeded_noise([0, 1], (4, 8, 6)),
                 torch.tensor([0, 9]), 2.0)
    img = art.decoder.decode(lat)
    assert img.shape == (2, 3, 16, 12) and img.dtype == torch.float32 and bool(torch.isfinite(img).all())

    srv = ApiServer(Settings(artifacts=[str(tmp_path / "ns")], steps=[2, 4], max_batch=8, threads=1))
    try:
        r = httpx.post(srv.url + "/generate", params={"steps": 4, "class_label": "owl", "seed": 3}, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        a = images.decode(r.content)
        assert a.shape == (16, 12, 3)  # RGB at the decoded size (no display scale in model.json: 1)
        with torch.inference_mode():
            want = art.decoder.decode(sample(art.model, make_table("dpmpp-2m", art.schedule, art.model.param, 4),
                                             seeded_noise([3], (4, 8, 6)), torch.tensor([2])))
        w = ((want[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(a, w)
        m = httpx.get(srv.url + "/models").json()["models"][0]
        assert m["image"] == {"width": 12, "height": 16, "channels": 3} and m["latent_shape"] == [4, 8, 6]
        assert m["dtype"] == "float32" and m["classes"] == NAMES and m["decoder"] == "vae"
        # streamed previews through the linear latent -> RGB map fitted at import (latent resolution)
        lin = ad["decoder"]["preview"]
        assert lin["kind"] == "linear" and np.array(lin["weight"]).shape == (4, 3) and len(lin["bias"]) == 3
        body = {"steps": 4, "class_label": "owl", "seed": 3, "preview": True}
        with httpx.stream("POST", srv.url + "/generate/stream", json=body, timeout=60) as r:
            shots = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ") and '"k":' in line
                     and '"data":' in line]
        assert [d["k"] for d in shots] == [1, 2, 3]
        assert all(images.decode(base64.b64decode(d["data"])).shape == (8, 6, 3) for d in shots)
    finally:
        srv.stop()


def test_imported_dit_serves_decoded_rgb_and_auto_pick_without_eval(tmp_path):
    dit_pipeline(tmp_path / "pipe")
    (tmp_path / "names.json").write_text(json.dumps(NAMES))
    assert run("diffusers", tmp_path / "pipe", "--name", "dit", "--out", tmp_path / "dit", "--dtype", "bf16",
               "--class-names", tmp_path / "names.json") == 0
    entry = ModelEntry.from_artifact(str(tmp_path / "dit"))
    assert entry.samplers.rows == [] and entry.samplers.best(4)[1] is None  # no eval.json: a classic default
    assert entry.samplers.best(4)[0].name == "dpmpp-2m" and entry.samplers.best(1)[0].name == "ddim"
    srv = ApiServer(Settings(artifacts=[str(tmp_path / "dit")], steps=[1, 4], max_batch=8, threads=1), Registry([entry]))
    try:
        r = httpx.post(srv.url + "/generate?steps=4", json={"class_label": 3, "n": 2, "format": "json"}, timeout=60)
        assert r.status_code == 200 and r.json()["solver"] == "dpmpp-2m"
        r = httpx.post(srv.url + "/generate?steps=4", params={"class_label": "fox"}, timeout=60)
        assert r.status_code == 200 and images.decode(r.content).shape == (16, 16, 3)
        m = httpx.get(srv.url + "/models").json()["models"][0]
        assert m["dtype"] == "bfloat16" and m["decoder_dtype"] == "bfloat16" and m["classes"] == NAMES
        assert m["image"] == {"width": 16, "height": 16, "channels": 3}
        # the folder's own scheduler is a sampler; /solvers shows every sampler's grid
        sol = httpx.get(srv.url + "/solvers").json()["models"]["dit"]
        assert "pipeline" in sol["available"] and sol["grids"]["dpmpp-2m"] == "uniform"
        assert sol["grids"]["pipeline"] == "DDIMScheduler: leading, steps_offset=1, final sigma_min"
        assert set(sol["grids"]) == set(sol["available"]) - {"auto"}
        r = httpx.post(srv.url + "/generate?steps=4", json={"class_label": 3, "solver": "pipeline", "format": "json"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["solver"] == "pipeline"
    finally:
        srv.stop()


def dit_embedding(t, dim=256):
    """DiT repository's TimestepEmbedder.timestep_embedding (frequencies over half, not half - 1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def dit_reference(sd, x, t, y, depth, heads, p):
    """DiT's forward (facebookresearch/DiT models.py) written from its state dict: the check that
    the key map, qkv split, adaLN chunk order, LayerNorm eps and time embedding are all DiT's."""
    def lin(h, n):
        return F.linear(h, sd[n + ".weight"], sd[n + ".bias"])

    def ln(v):
        return F.layer_norm(v, (v.shape[-1],), eps=1e-6)

    def mod(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    B, _, H, W = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    D = h.shape[-1]
    c = lin(F.silu(lin(dit_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        b = f"blocks.{i}."
        sm, scm, gm, sf, scf, gf = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        q, k, v = lin(mod(ln(h), sm, scm), b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        h = h + gm[:, None] * lin(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        h = h + gf[:, None] * lin(F.gelu(lin(mod(ln(h), sf, scf), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")
    C = h.shape[-1] // (p * p)
    return h.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)  # unpatchify


@pytest.mark.parametrize("schedule", ["vp", "flow"])
def test_dit_checkpoint_round_trips_through_the_importer(tmp_path, schedule):
    net = tiny_dit()
    emb0 = net.transformer_blocks[0].norm1.emb.state_dict()
    net.transformer_blocks[1].norm1.emb.load_state_dict(emb0)  # DiT has one embedder that every block uses
    sd = diffusers_to_dit(net.state_dict(), 2)
    sd["pos_embed"] = net.pos_embed.pos_embed.clone()  # DiT saves its fixed sin-cos table too
    torch.save(sd, tmp_path / "DiT-tiny.pt")
    tiny_vae().save_pretrained(tmp_path / "vae")
    assert run("dit-checkpoint", tmp_path / "DiT-tiny.pt", "--vae", tmp_path / "vae", "--schedule", schedule,
               "--heads", 2, "--name", "ck", "--out", tmp_path / "ck") == 0
    art = load_artifact(tmp_path / "ck")
    got = art.model.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items()) and set(got) == set(net.state_dict())
    assert art.decoder.image_shape == (3, 16, 16)
    ad = json.loads((tmp_path / "ck" / "model.json").read_text())["adapter"]
    assert ad["sources"]["DiT-tiny.pt"] == sha256_file(tmp_path / "DiT-tiny.pt") and ad["time_freq_shift"] == 0
    # the adapter is DiT's own forward, with its conventions: DiT index t * 1000 - 1 / SiT time 1 - t
    # and minus its velocity; learned sigma dropped
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    st, lab = torch.tensor([0.25, 0.75]), torch.tensor([2, 10])
    with torch.no_grad():
        tt = st * 1000 - 1 if schedule == "vp" else 1 - st
        want = dit_reference(sd, x, tt, lab, 2, 2, 2)[:, :4] * (1 if schedule == "vp" else -1)
    assert art.model.param == ("eps" if schedule == "vp" else "flow")
    torch.testing.assert_close(art.model(x, st, None, lab), want)


class NotATensor:
    pass


def test_pickle_that_needs_code_is_refused(tmp_path, capsys):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pt")
    assert run("dit-checkpoint", tmp_path / "evil.pt", "--name", "x", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "without running its pickled code" in err and "state_dict" in err
    assert not (tmp_path / "x").exists()


def no_leftovers(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    dit_pipeline(tmp_path / "pipe")
    out = tmp_path / "out"

    def refused(*argv, says):
        assert run(*argv, "--name", "out", "--out", out) == 2
        err = capsys.readouterr().err
        assert all(s in err for s in says), err
        assert no_leftovers(tmp_path, "out")

    (tmp_path / "empty").mkdir()
    refused("diffusers", tmp_path / "empty", says=["not a diffusers model", "model_index.json", "config.json"])
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    refused("diffusers", tmp_path / "noweights", says=["no weights file", "diffusion_pytorch_model.safetensors"])

    cfg = tmp_path / "pipe" / "transformer" / "config.json"
    good = cfg.read_text()
    cfg.write_text(json.dumps({**json.loads(good), "num_embeds_ada_norm": 12}))
    refused("diffusers", tmp_path / "pipe", says=["class_embedder.embedding_table.weight", "(11, 16)", "(13, 16)"])
    cfg.write_text(good)

    sc = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    sgood = sc.read_text()
    sc.write_text(json.dumps({**json.loads(sgood), "prediction_type": "score"}))
    refused("diffusers", tmp_path / "pipe", says=["unknown prediction type 'score'", "epsilon", "v_prediction", "sample"])
    sc.write_text(sgood)

    refused("diffusers", tmp_path / "pipe", "--time-map", "cosmic", says=["unknown time map 'cosmic'", "discrete",
                                                                        "reversed-flow"])
    refused("diffusers", tmp_path / "pipe", "--time-map", "reversed-flow", says=["not the one of kind 'dit'"])
    refused("diffusers", tmp_path / "pipe", "--latent-shape", "4,8,6", says=["square latents only"])
    refused("diffusers", tmp_path / "pipe", "--dtype", "fp8", says=["unknown dtype 'fp8'", "bf16"])
    refused("diffusers", tmp_path / "pipe", "--null-class", "11", says=["null class 11", "0..10"])
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    refused("diffusers", tmp_path / "pipe", "--class-names", tmp_path / "three.txt", says=["3 class names", "10 classes"])
    refused("dit-checkpoint", tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors",
            says=["not in the DiT repository's layout", "x_embedder.proj.weight"])
    # an existing folder is never overwritten
    out.mkdir()
    assert run("diffusers", tmp_path / "pipe", "--name", "out", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and list(out.iterdir()) == []
    # and the good folder imports
    assert run("diffusers", tmp_path / "pipe", "--name", "ok", "--out", tmp_path / "ok") == 0


def test_loader_refuses_a_changed_adapter_section_or_decoder(tmp_path):
    dit_pipeline(tmp_path / "pipe")
    assert run("diffusers", tmp_path / "pipe", "--name", "a", "--out", tmp_path / "a") == 0
    mj = tmp_path / "a" / "model.json"
    good = json.loads(mj.read_text())

    def refused(meta, *says):
        mj.write_text(json.dumps(meta))
        with pytest.raises(ValueError) as e:
            load_artifact(tmp_path / "a")
        assert all(s in str(e.value) for s in says), str(e.value)

    refused({**good, "adapter": {**good["adapter"], "time_map": "reversed-flow"}}, "not the one of kind 'dit'",
            "discrete")
    refused({**good, "adapter": {**good["adapter"], "kind": "sdxl"}}, "unknown network kind 'sdxl'", "unet2d")
    refused({**good, "data": {**good["data"], "shape": [4, 7, 7]}}, "multiples of 2")
    mj.write_text(json.dumps(good))
    dec = tmp_path / "a" / "decoder.safetensors"
    dec.write_bytes(dec.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="decoder.safetensors: sha256 is"):
        load_artifact(tmp_path / "a")


def test_older_transformer2d_dit_layout_imports_as_dit(tmp_path):
    """diffusers < 0.28 saved DiT as Transformer2DModel (same tensors, a config with more keys)."""
    dit_pipeline(tmp_path / "pipe")
    cfg = tmp_path / "pipe" / "transformer" / "config.json"
    c = json.loads(cfg.read_text())
    assert run("diffusers", tmp_path / "pipe", "--name", "new", "--out", tmp_path / "new") == 0
    cfg.write_text(json.dumps({**c, "_class_name": "Transformer2DModel", "cross_attention_dim": None,
                               "use_linear_projection": False, "only_cross_attention": False}))
    assert run("diffusers", tmp_path / "pipe", "--name", "old", "--out", tmp_path / "old") == 0
    new, old = load_artifact(tmp_path / "new"), load_artifact(tmp_path / "old")
    assert new.sha256 == old.sha256 and old.model.shape == (4, 8, 8)
    cfg.write_text(json.dumps({**c, "_class_name": "Transformer2DModel", "norm_type": "layer_norm"}))
    assert run("diffusers", tmp_path / "pipe", "--name", "x", "--out", tmp_path / "x") == 2


def test_class_names_come_from_id2label(tmp_path):
    """facebook/DiT-XL-2-256's model_index.json carries ImageNet's id2label; DiTPipeline reads it."""
    dit_pipeline(tmp_path / "pipe")
    mi = tmp_path / "pipe" / "model_index.json"
    mi.write_text(json.dumps({**json.loads(mi.read_text()), "id2label": {str(i): n for i, n in enumerate(NAMES)}}))
    assert run("diffusers", tmp_path / "pipe", "--name", "a", "--out", tmp_path / "a") == 0
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["data"]["class_names"] == NAMES and meta["adapter"]["class_names"] == "id2label"


def test_a_truncated_checkpoint_is_named_as_such(tmp_path, capsys):
    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:40])
    assert run("dit-checkpoint", tmp_path / "cut.pt", "--name", "x", "--out", tmp_path / "x") == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err and no_leftovers(tmp_path, "x")


def test_imported_artifact_is_world_readable_under_a_strict_umask(tmp_path):
    """The Docker image runs as a non-root user: an artifact written 0700/0600 (mkdtemp) was unreadable there."""
    import os

    src = nonsquare_unet(tmp_path)
    old = os.umask(0o077)
    try:
        assert run("diffusers", src, "--name", "ns", "--out", tmp_path / "ns", "--vae", tmp_path / "vae",
                   "--class-names", tmp_path / "names.txt") == 0
    finally:
        os.umask(old)
    out = tmp_path / "ns"
    assert out.stat().st_mode & 0o777 == 0o755
    files = list(out.iterdir())
    assert files and all(f.stat().st_mode & 0o777 == 0o644 for f in files), [(f.name, oct(f.stat().st_mode)) for f in files]


def test_scheduler_options_stride_cannot_honour_are_refused_or_warned(tmp_path, capsys):
    """clip_sample / thresholding: exit 2 naming the option and the fix; an SDE variant: imported with
    a warning saying what `pipeline` runs instead; the whole config and its class are recorded."""
    import diffusers
    dit_pipeline(tmp_path / "pipe")
    sc = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    good = json.loads(sc.read_text())
    sc.write_text(json.dumps({**good, "clip_sample": True, "thresholding": True}))
    assert run("diffusers", tmp_path / "pipe", "--name", "x", "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "clip_sample=true" in err and "thresholding=true" in err and "set it to false" in err
    assert no_leftovers(tmp_path, "x")
    sde = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")
    sc.write_text(json.dumps({**dict(sde.config), "_class_name": "DPMSolverMultistepScheduler"}))
    assert run("diffusers", tmp_path / "pipe", "--name", "sde", "--out", tmp_path / "sde") == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "algorithm_type='sde-dpmsolver++'" in err and "runs 'dpmsolver++'" in err
    src = json.loads((tmp_path / "sde" / "model.json").read_text())["data"]["source"]
    assert src["scheduler_class"] == "DPMSolverMultistepScheduler" and src["scheduler"]["timestep_spacing"] == "trailing"
    assert any("sde-dpmsolver++" in n for n in src["scheduler_notes"])


def test_no_labels_warns_and_class_names_take_imagenet_style_json(tmp_path, capsys):
    dit_pipeline(tmp_path / "pipe")
    assert run("diffusers", tmp_path / "pipe", "--name", "a", "--out", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "no class names" in err and "--class-names" in err and "0..9" in err
    # ImageNet's class index ({"0": ["n01440764", "tench"]}) and a model_index.json-style {"id2label": ...}
    (tmp_path / "index.json").write_text(json.dumps({str(i): [f"n{i:08d}", n] for i, n in enumerate(NAMES)}))
    (tmp_path / "mi.json").write_text(json.dumps({"id2label": {str(i): n for i, n in enumerate(NAMES)}}))
    for f, out in (("index.json", "b"), ("mi.json", "c")):
        assert run("diffusers", tmp_path / "pipe", "--name", out, "--out", tmp_path / out,
                   "--class-names", tmp_path / f) == 0
        assert "no class names" not in capsys.readouterr().err
        meta = json.loads((tmp_path / out / "model.json").read_text())
        assert meta["data"]["class_names"] == NAMES and meta["adapter"]["class_names"] == f"file {f}"
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "b"}))
    assert run("diffusers", tmp_path / "pipe", "--name", "d", "--out", tmp_path / "d",
               "--class-names", tmp_path / "gap.json") == 2
    assert "id2label has no entry" in capsys.readouterr().err

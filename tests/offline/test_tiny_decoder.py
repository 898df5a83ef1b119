"""The tiny decoder (diffusers AutoencoderTiny, the TAESD layout) beside a latent model's VAE:
imported with `stride offline import ... --tiny-decoder DIR`, recorded with its sha256, chosen per
request with decoder=tiny, and decoded per decoder when requests that chose differently finish in
the same step."""
import json

import httpx
import numpy as np
import pytest
import torch
from service_fixtures import ApiServer
from tiny_models import dit_pipeline, tiny_taesd, tiny_vae, unet_pipeline

from stride_diffusion.offline import cli
from stride_diffusion.service import images
from stride_diffusion.service.engine import Engine
from stride_diffusion.service.jobs import Job
from stride_diffusion.service.models import ModelEntry, Registry
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers import sample, seeded_noise
from stride_diffusion.solvers.adapters import TinyDecoder
from stride_diffusion.solvers.artifact import load_artifact, sha256_file


def run(*argv) -> int:
    return cli.main(["import", *map(str, argv)])


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    dit_pipeline(d / "pipe")
    tiny_taesd().save_pretrained(d / "taesd")
    assert run("diffusers", d / "pipe", "--name", "t", "--out", d / "t", "--tiny-decoder", d / "taesd") == 0
    return d


def test_import_records_the_tiny_decoder_and_its_sha256(art_dir):
    meta = json.loads((art_dir / "t" / "model.json").read_text())
    tiny = meta["adapter"]["tiny_decoder"]
    assert tiny["kind"] == "tiny" and tiny["architecture"]["kind"] == "diffusers.AutoencoderTiny"
    assert tiny["weights"]["file"] == "tiny_decoder.safetensors"
    assert tiny["weights"]["sha256"] == sha256_file(art_dir / "t" / "tiny_decoder.safetensors")
    assert meta["adapter"]["sources"]["taesd/diffusion_pytorch_model.safetensors"] == \
        sha256_file(art_dir / "taesd" / "diffusion_pytorch_model.safetensors")
    assert tiny["image_shape"] == meta["adapter"]["decoder"]["image_shape"] == [3, 16, 16]
    art = load_artifact(art_dir / "t")
    assert isinstance(art.tiny_decoder, TinyDecoder) and art.tiny_decoder.image_shape == art.decoder.image_shape
    z = torch.randn(2, 4, 8, 8)
    img = art.tiny_decoder.decode(z)
    assert img.shape == (2, 3, 16, 16) and img.dtype == torch.float32 and float(img.abs().max()) <= 1
    want = tiny_taesd().decode(z).sample.clamp(-1, 1)  # the same weights, decoded by diffusers itself
    torch.testing.assert_close(img, want, rtol=1e-5, atol=1e-5)


def test_a_changed_tiny_decoder_file_is_refused(art_dir, tmp_path):
    import shutil

    shutil.copytree(art_dir / "t", tmp_path / "t")
    (tmp_path / "t" / "tiny_decoder.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="tiny_decoder.safetensors: sha256"):
        load_artifact(tmp_path / "t")


def test_tiny_decoder_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    dit_pipeline(tmp_path / "pipe")
    unet_pipeline(tmp_path / "pixels")  # a pixel model: no VAE to sit beside
    tiny_taesd().save_pretrained(tmp_path / "taesd")
    tiny_taesd(latent_channels=3).save_pretrained(tmp_path / "taesd3")
    tiny_vae().save_pretrained(tmp_path / "vae")

    def refused(src, tiny, says):
        assert run("diffusers", src, "--name", "x", "--out", tmp_path / "x", "--tiny-decoder", tiny) == 2
        err = capsys.readouterr().err
        assert all(s in err for s in says), err
        assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x.")]

    refused(tmp_path / "pixels", tmp_path / "taesd", ["beside a latent model's VAE", "--vae"])
    refused(tmp_path / "pipe", tmp_path / "taesd3", ["latent_channels=3", "4 channels"])
    refused(tmp_path / "pipe", tmp_path / "vae", ["AutoencoderKL is not supported as a tiny decoder",
                                                  "AutoencoderTiny"])
    refused(tmp_path / "pipe", tmp_path / "nowhere", ["not a diffusers tiny decoder folder"])


def test_job_carries_the_decoder_only_when_chosen():
    j = Job("a", "m", 2, "euler", 1, 1, 0, 1.0, "png", 1e18, 0.0)
    assert "decoder" not in json.loads(j.dumps())  # a worker of the previous version reads it too
    j.decoder = "tiny"
    assert Job.loads(j.dumps()) == j and json.loads(j.dumps())["decoder"] == "tiny"


def finish(eng):
    out = {}
    while eng.busy:
        done = eng.step()
        eng.release(done)
        out.update({(d.job_id, d.index): d.pixels for d in done})
    return out


def reference(e, table, seed, label, decoder):
    with torch.inference_mode():
        y = sample(e.model, table, seeded_noise([seed], e.shape), torch.tensor([label]))
        x = decoder.decode(y)
    return ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_engine_decodes_each_request_with_its_decoder_in_one_step(art_dir):
    e = ModelEntry.from_artifact(str(art_dir / "t"), steps=[2])
    eng = Engine(Registry([e]), [2])
    table = e.samplers["euler"].table(2)
    jobs = [Job("full", e.name, 2, "euler", 3, 2, 10, 1.0, "png", 1e18, 0.0),
            Job("tiny", e.name, 2, "euler", 3, 2, 10, 1.0, "png", 1e18, 0.0, decoder="tiny"),
            Job("own", e.name, 2, "euler", 5, 1, 7, 1.0, "png", 1e18, 0.0, decoder=None)]
    for j in jobs:
        eng.add(j, table, 0, j.n, 1)
    got = finish(eng)
    assert len(got) == 5
    for (jid, i), px in got.items():
        j = next(j for j in jobs if j.id == jid)
        dec = e.decoders[j.decoder] if j.decoder else e.decoder
        assert np.array_equal(px, reference(e, table, j.seed + i, j.label, dec)), (jid, i)
    assert not np.array_equal(got[("full", 0)], got[("tiny", 0)])  # same latents, another decoder


def test_service_offers_and_validates_decoder(art_dir):
    srv = ApiServer(Settings(artifacts=[str(art_dir / "t")], steps=[2], max_batch=8, threads=1))
    try:
        m = httpx.get(srv.url + "/models").json()["models"][0]
        assert m["decoders"] == ["vae", "tiny"] and m["decoder"] == "vae"
        e = srv.service.registry[m["name"]]
        for decoder in ("tiny", "vae"):
            r = httpx.post(srv.url + "/generate", json={"class_label": 4, "steps": 2, "seed": 9, "decoder": decoder,
                                                        "solver": "euler"}, timeout=60)
            assert r.status_code == 200, r.text
            want = reference(e, e.samplers["euler"].table(2), 9, 4, e.decoders[decoder])
            assert np.array_equal(images.decode(r.content), want), decoder
        r = httpx.post(srv.url + "/generate", json={"class_label": 4, "steps": 2, "decoder": "taesd"}, timeout=60)
        assert r.status_code == 422 and r.json()["field"] == "decoder" and r.json()["allowed"] == ["vae", "tiny"]
        assert "one of ['vae', 'tiny']" in r.json()["detail"]
        doc = httpx.get(srv.url + "/openapi.json").json()
        body = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["decoder"]["anyOf"][0]["enum"] == ["tiny", "vae"]
    finally:
        srv.stop()


def test_a_pixel_model_offers_only_its_own_decoder():
    from service_fixtures import GMM

    assert list(GMM.decoders) == ["identity"]
    from stride_diffusion.service.params import ApiError, parse

    s = Settings(test_model="gmm", steps=[2])
    with pytest.raises(ApiError) as err:
        parse({"class_label": 1, "decoder": "tiny"}, Registry([GMM]), s)
    assert err.value.status == 422 and err.value.allowed == ["identity"]
    assert parse({"class_label": 1, "decoder": "identity"}, Registry([GMM]), s).decoder is None  # its own, named


def test_quality_script_runs_at_tiny_size(tmp_path):
    """benchmarks/tiny_decoder.py: RMSE/PSNR of the tiny decoder against the VAE on the same latents
    (a random tiny pair here: the numbers only have to be there)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "tiny.md"
    p = subprocess.run([sys.executable, "benchmarks/tiny_decoder.py", "--tiny", "--n", "6", "--batch", "3", "--reps", "1",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "tiny.json").read_text())
    assert r["n"] == 6 and r["rmse_mean"] > 0 and r["psnr_worst_db"] <= r["psnr_mean_db"]
    assert set(r["ms_per_image"]) == {"vae", "tiny"} and "numbers mean nothing" in r["artifact"]
    assert "| tiny |" in out.read_text()

"""The offline tools on imported networks, as a user runs them: a tiny random diffusers DiT (VP, with
a VAE) and a tiny SiT (a DiT-layout checkpoint imported on the flow schedule) go through `stride
offline import`, then search, D-ODE, eval and secant conversion write files that the loader and
the service read; eval without a classifier writes RMSE rows and the auto-pick follows RMSE; the
DiT secant net is the teacher's tangent exactly at init."""
import json

import httpx
import pytest
import torch
from service_fixtures import ApiServer
from tiny_models import dit_pipeline, sit_checkpoint

from stride_diffusion.offline import cli
from stride_diffusion.service import images
from stride_diffusion.service.models import ModelEntry, Registry
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.artifact import load_artifact
from stride_diffusion.solvers.secant import (
    SecantModel,
    load_secant,
    save_secant,
    secant_from_teacher,
    secant_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    dit_pipeline(d / "pipe")
    return d / "pipe"


@pytest.fixture(scope="module")
def sit_ckpt(tmp_path_factory):
    """A DiT-layout .pt (one shared embedder, as DiT saves it) and a VAE folder."""
    d = tmp_path_factory.mktemp("sit")
    sit_checkpoint(d)
    return d


def imported_dit(pipe, tmp_path):
    assert cli.main(["import", "diffusers", str(pipe), "--name", "dit", "--out", str(tmp_path / "dit")]) == 0
    return tmp_path / "dit"


def imported_sit(sit_ckpt, tmp_path):
    assert cli.main(["import", "dit-checkpoint", str(sit_ckpt / "SiT-tiny.pt"), "--vae", str(sit_ckpt / "vae"),
                     "--schedule", "flow", "--heads", "2", "--name", "sit", "--out", str(tmp_path / "sit")]) == 0
    return tmp_path / "sit"


SMALL_REF = ["--ref-nfe", "16", "--val", "8", "--device", "cpu"]


def test_search_and_dode_on_an_imported_dit_write_solvers_the_service_loads(pipe, tmp_path):
    art_dir = imported_dit(pipe, tmp_path)
    assert cli.main(["search", str(art_dir), "--nfe", "4", "--iters", "2", "--batch", "4", "--val-every", "2",
                     "--teacher-nfe", "8", *SMALL_REF]) == 0
    assert cli.main(["dode", str(art_dir), "--base", "ddim", "--nfe", "4", "--batch", "8", "--scale", "2",
                     *SMALL_REF]) == 0
    art = load_artifact(art_dir)
    assert sorted(art.solvers) == ["dode-ddim-nfe4", "searched-nfe4"]
    d = json.loads((art_dir / "solvers" / "dode-ddim-nfe4.json").read_text())
    assert d["model_sha256"] == art.sha256
    # the closed-form lambda_k never does worse than lambda_k = 0 on the fitting samples
    m = d["metrics"]
    assert all(a <= b + 1e-9 for a, b in zip(m["fit_step_rmse_dode"], m["fit_step_rmse_base"]))
    assert m["fit_step_rmse_dode"][-1] < m["fit_step_rmse_base"][-1]
    # a per-guidance fit (written apart) is measured at the guidance it was fitted for
    assert cli.main(["dode", str(art_dir), "--base", "ddim", "--nfe", "4", "--batch", "8", "--scale", "2",
                     "--guidance", "3", "--out", str(tmp_path / "w3"), *SMALL_REF]) == 0
    g3 = json.loads((tmp_path / "w3" / "dode-ddim-nfe4.json").read_text())
    assert g3["fit"]["guidance"] == 3 and "heldout_rmse_cfg3" in g3["metrics"]
    entry = ModelEntry.from_artifact(str(art_dir))
    assert {"dode-ddim-nfe4", "searched-nfe4"} <= set(entry.samplers.names())
    noise, y = seeded_noise(range(3), entry.shape), torch.tensor([0, 4, 9])
    for name in ("dode-ddim-nfe4", "searched-nfe4"):
        x = sample(entry.model, entry.samplers[name].table(4), noise, y)
        img = entry.decoder.decode(x)
        assert img.shape == (3, 3, 16, 16) and torch.isfinite(img).all()


def test_eval_without_a_classifier_writes_rmse_rows_and_the_auto_pick_follows_rmse(pipe, tmp_path):
    art_dir = imported_dit(pipe, tmp_path)
    assert cli.main(["eval", str(art_dir), "--solvers", "euler,ddim,dpmpp-2m", "--nfe", "2,4", "--n", "6",
                     "--seed-sets", "2", "--reference", "dpmpp-3m:16", "--cache", str(tmp_path / "cache"),
                     "--device", "cpu"]) == 0
    ev = json.loads((art_dir / "eval.json").read_text())
    assert ev["floor"] is None and ev["best_criterion"].startswith("lowest rmse on the selection set")
    assert {(r["solver"], r["nfe"]) for r in ev["rows"]} == {(s, k) for s in ("euler", "ddim", "dpmpp-2m") for k in (2, 4)}
    assert all(r["fd"] is None and r["acc"] is None and r["rmse"] > 0 for r in ev["rows"])
    # the RMSE is the executor's samples against the reference solve, per seed set, averaged
    art = load_artifact(art_dir)
    sets = [range(s["first_seed"], s["first_seed"] + s["count"]) for s in ev["seed_sets"]]
    lab = torch.arange(6) % 10
    per_set = []
    for seeds in sets:
        noise = seeded_noise(seeds, art.model.shape)
        ref = sample(art.model, make_table("dpmpp-3m", art.schedule, art.model.param, 16), noise, lab)
        x = sample(art.model, make_table("ddim", art.schedule, art.model.param, 4), noise, lab)
        per_set.append(float((x - ref).double().pow(2).mean().sqrt()))
    row = next(r for r in ev["rows"] if (r["solver"], r["nfe"]) == ("ddim", 4))
    assert row["rmse"] == pytest.approx(sum(per_set) / 2, rel=1e-5)
    entry = ModelEntry.from_artifact(str(art_dir))
    for k in (2, 4):
        want = min((r for r in ev["rows"] if r["nfe"] == k), key=lambda r: r["selection_rmse"])["solver"]
        assert ev["best"][str(k)]["solver"] == want and entry.samplers.best(k)[0].name == want
    assert "RMSE only" in (art_dir / "eval.md").read_text()
    assert (art_dir / "eval" / "rmse.png").is_file() and (art_dir / "eval" / "samples-ddim.png").is_file()


@torch.no_grad()
def test_dit_secant_net_is_the_teacher_tangent_exactly_at_init(sit_ckpt, tmp_path):
    art = load_artifact(imported_sit(sit_ckpt, tmp_path))
    g = torch.Generator().manual_seed(0)
    x, t, s = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g)
    y, w = torch.tensor([0, 3, 9, 10]), 1 + 2 * torch.rand(4, generator=g)  # 10: the null class
    v = art.model(x, t, t, y)  # the teacher through its adapter (SiT: time 1 - t, minus its velocity)
    assert v.abs().max() > 0.1
    for gr in (None, (1.0, 3.0)):
        f = secant_from_teacher(art.model, gr).eval()
        assert torch.equal(f(x, t, y, t, w), v)  # f(x, t, t) = v
        assert torch.equal(f(x, t, y, s, w), v)  # and for every s and w until trained
    f.gate.normal_(generator=g), f.temb2.linear_1.weight.normal_(generator=g)  # as after training
    assert torch.equal(f(x, t, y, t, w), v) and not torch.allclose(f(x, t, y, s, w), v)
    # a file round trip keeps the function (float32 weights: bit for bit)
    save_secant(art.path, "secant-test", f, art.model.shape, 10, art.sha256, {}, "float32")
    sm = load_secant(art.path, art.sha256, name="secant-test")
    assert isinstance(sm, SecantModel) and sm.guidance_input
    assert torch.equal(sm(x, t, s, y, w), f(x, t, y, s, w))


def test_secant_refuses_a_vp_dit_teacher(pipe, tmp_path, capsys):
    art_dir = imported_dit(pipe, tmp_path)
    assert cli.main(["secant", str(art_dir), "--iters", "1", "--no-eval"]) == 2
    assert "flow-schedule model" in capsys.readouterr().err and not list(art_dir.glob("secant*"))


def test_secant_conversion_of_an_imported_sit_is_served(sit_ckpt, tmp_path):
    art_dir = imported_sit(sit_ckpt, tmp_path)
    assert cli.main(["secant", str(art_dir), "--steps", "2", "--iters", "3", "--batch", "4", "--pool", "8",
                     "--pool-solver", "euler:4", "--n", "4", "--seed-sets", "1", "--eval-steps", "1,2",
                     "--reference", "dpmpp-3m:8", "--cache", str(tmp_path / "cache"), "--device", "cpu",
                     "--ckpt-dir", str(tmp_path / "ck"), "--dtype", "float32"]) == 0
    meta = json.loads((art_dir / "secant.json").read_text())
    assert meta["architecture"]["kind"] == "secant-dit" and meta["settings"]["pool"] == 8
    assert [(r["steps"], r["fd"]) for r in meta["eval"]["rows"]] == [(1, None), (2, None)]
    art = load_artifact(art_dir)
    sm = load_secant(art_dir, art.sha256)
    assert (sm.net.gate != 0).any()  # trained: the end time now matters
    entry = ModelEntry.from_artifact(str(art_dir))
    assert entry.samplers.best(2)[0].name == "secant"  # its RMSE row is the only one at 2
    x = sample(entry.samplers["secant"].model, secant_table(2), seeded_noise(range(2), entry.shape), torch.tensor([1, 2]))
    assert torch.isfinite(x).all()
    srv = ApiServer(Settings(artifacts=[str(art_dir)], steps=[2], max_batch=4, threads=1), Registry([entry]))
    try:
        r = httpx.post(srv.url + "/generate?steps=2", json={"class_label": 1, "n": 2, "format": "json",
                                                             "solver": "secant"}, timeout=60)
        assert r.status_code == 200 and r.json()["solver"] == "secant"
        r = httpx.post(srv.url + "/generate", params={"steps": 2, "solver": "secant", "class_label": 1}, timeout=60)
        assert r.status_code == 200 and images.decode(r.content).shape == (16, 16, 3)  # display scale 1 (the default)
    finally:
        srv.stop()


def test_a_bad_device_exits_2_naming_it(pipe, tmp_path, capsys):
    art_dir = imported_dit(pipe, tmp_path)
    for cmd in ("search", "dode", "eval", "secant"):
        assert cli.main([cmd, str(art_dir), "--device", "gpu0"]) == 2
        assert "unknown --device 'gpu0'" in capsys.readouterr().err
    assert not (art_dir / "solvers").exists() and not (art_dir / "eval.json").exists()

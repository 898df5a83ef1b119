"""Artifact I/O: a round trip, and the loader's refusals with messages that say what is wrong."""
import json

import pytest
import torch
from safetensors.torch import save_file

from stride_diffusion.solvers import make_table, sample, seeded_noise
from stride_diffusion.solvers.adapters import StrideNet
from stride_diffusion.solvers.artifact import (
    load_artifact,
    save_artifact,
    save_classifier,
    sha256_file,
    write_json,
)
from stride_diffusion.solvers.nets import Classifier, UNet, classifier_config, unet_config
from stride_diffusion.solvers.schedules import FlowSchedule, VPSchedule

TINY = unet_config({"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "emb_dim": 32, "num_heads": 2})


def _randomize(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would hide every difference
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture
def art_dir(tmp_path):
    net = _randomize(UNet(TINY))
    d = save_artifact(tmp_path / "m", TINY, net.state_dict(), FlowSchedule(), "flow", (1, 16, 16),
                      [str(i) for i in range(10)], {"steps": 0})
    ccfg = classifier_config({"channels": [8, 8], "feature_dim": 8})
    save_classifier(d, ccfg, Classifier(ccfg).state_dict(), {"heldout_accuracy": 0.0})
    return d


def test_round_trip_and_protocol(art_dir):
    art = load_artifact(art_dir)
    m = art.model
    assert (m.num_classes, m.shape, m.param, m.guidance_input) == (10, (1, 16, 16), "flow", False)
    assert art.meta["format"] == "stride.model/1" and art.sha256 == sha256_file(art_dir / "model.safetensors")
    assert art.classifier is not None and art.eval is None and art.solvers == {}
    x = sample(m, make_table("dpmpp-2m", m.schedule, m.param, 3), seeded_noise([1, 2], m.shape), [0, 10], 2.0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    x64 = m(torch.zeros(2, 256, dtype=torch.float64), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]), torch.tensor([1, 2]))
    assert x64.dtype == torch.float64 and x64.shape == (2, 256)  # the executor's flat states


def test_refuses_wrong_hash(art_dir):
    net = _randomize(UNet(TINY), seed=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(art_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"sha256 is [0-9a-f]+, but .*model.json expects"):
        load_artifact(art_dir)


def test_refuses_wrong_format_version(art_dir):
    meta = json.loads((art_dir / "model.json").read_text())
    meta["format"] = "stride.model/2"
    write_json(art_dir / "model.json", meta)
    with pytest.raises(ValueError, match=r"format 'stride.model/2' is not supported; expected 'stride.model/1'"):
        load_artifact(art_dir)


@pytest.mark.parametrize("name", ["model.safetensors", "model.json"])
def test_refuses_missing_file(art_dir, name):
    (art_dir / name).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_artifact(art_dir)


def _resave(art_dir, sd, stem="model"):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(art_dir / f"{stem}.safetensors"))
    meta = json.loads((art_dir / f"{stem}.json").read_text())
    meta["weights"]["sha256"] = sha256_file(art_dir / f"{stem}.safetensors")  # a consistent hash: shape must catch it
    write_json(art_dir / f"{stem}.json", meta)


def test_refuses_wrong_shape(art_dir):
    sd = UNet(TINY).state_dict()
    sd["inp.weight"] = torch.zeros(8, 2, 3, 3)
    _resave(art_dir, sd)
    with pytest.raises(ValueError, match=r"tensor 'inp.weight' has shape \(8, 2, 3, 3\), but the architecture .* expects \(8, 1, 3, 3\)"):
        load_artifact(art_dir)


def test_refuses_missing_tensor(art_dir):
    sd = UNet(TINY).state_dict()
    del sd["out.bias"]
    _resave(art_dir, sd)
    with pytest.raises(ValueError, match=r"missing tensors \['out.bias'\]"):
        load_artifact(art_dir)


def test_refuses_data_shape_mismatch(art_dir):
    meta = json.loads((art_dir / "model.json").read_text())
    meta["data"]["shape"] = [3, 16, 16]
    write_json(art_dir / "model.json", meta)
    with pytest.raises(ValueError, match=r"data shape \[3, 16, 16\] does not match"):
        load_artifact(art_dir)


def test_refuses_classifier_with_wrong_hash(art_dir):
    ccfg = json.loads((art_dir / "classifier.json").read_text())["architecture"]["config"]
    c = Classifier(ccfg)
    with torch.no_grad():
        c.head.bias.add_(1)
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(art_dir / "classifier.safetensors"))
    with pytest.raises(ValueError, match=r"classifier.safetensors: sha256 is"):
        load_artifact(art_dir)


def test_refuses_eval_of_another_model(art_dir):
    write_json(art_dir / "eval.json", {"format": "stride.eval/1", "model_sha256": "0" * 64, "rows": []})
    with pytest.raises(ValueError, match="was made for model sha256 0+, but"):
        load_artifact(art_dir)
    write_json(art_dir / "eval.json", {"format": "stride.eval/0", "rows": []})
    with pytest.raises(ValueError, match="expected 'stride.eval/1'"):
        load_artifact(art_dir)


def test_solver_files(art_dir):
    art = load_artifact(art_dir)
    tab = make_table("euler", art.schedule, "flow", 2)
    (art_dir / "solvers").mkdir()
    d = tab.to_json()
    d["meta"]["model_sha256"] = art.sha256
    write_json(art_dir / "solvers" / "euler-2.json", d)
    assert load_artifact(art_dir).solvers["euler-2"].nfe == 2
    d["meta"]["model_sha256"] = "f" * 64
    write_json(art_dir / "solvers" / "euler-2.json", d)
    with pytest.raises(ValueError, match="was made for model sha256 f+"):
        load_artifact(art_dir)
    write_json(art_dir / "solvers" / "euler-2.json", {"format": "stride.unknown/9"})
    with pytest.raises(ValueError, match="format 'stride.unknown/9' is not supported"):
        load_artifact(art_dir)


def test_secant_init_identity():
    """f(x, t, s) = v(x, t) for every s when initialised from a teacher, and f(x, t, t) = v(x, t)
    exactly whatever the secant-only weights become."""
    teacher = _randomize(UNet(TINY)).eval()
    sec = UNet({**TINY, "secant": True}).eval().init_secant_from(teacher.state_dict())
    g = torch.Generator().manual_seed(0)
    x, t, s = torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g)
    y = torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        v = teacher(x, t, y)
        assert torch.equal(sec(x, t, y, s), v)
        assert torch.equal(sec(x, t, y, t), v)
        sec.gate.normal_(generator=g)
        for p in sec.temb2.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        assert torch.equal(sec(x, t, y, t), v)
        assert not torch.allclose(sec(x, t, y, s), v)
    m = StrideNet(sec, VPSchedule(), "eps", (1, 16, 16), 10, secant=True)
    assert torch.equal(m(x, t, t, y), v)


def test_init_secant_refuses_plain_net():
    with pytest.raises(ValueError, match="secant: true"):
        UNet(TINY).init_secant_from(UNet(TINY).state_dict())

"""Offline: the data split, the user-folder loader, the Fréchet distance, resume, and a tiny model
trained, given a classifier and evaluated end to end."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stride_diffusion.offline import cli
from stride_diffusion.offline.data import (
    classifier_judge_split,
    judge_split,
    load_digits,
    load_folder,
    stratified_split,
)
from stride_diffusion.offline.guidance_eval import markdown
from stride_diffusion.offline.metrics import fd_features, frechet_distance, kid, kid_reference_se
from stride_diffusion.offline.train import Settings, train
from stride_diffusion.solvers.artifact import load_artifact

TINY = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "emb_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_deterministic_and_stratified(digits):
    again = load_digits()
    assert torch.equal(digits.train_x, again.train_x) and torch.equal(digits.test_y, again.test_y)
    assert digits.shape == (1, 16, 16) and digits.num_classes == 10
    assert len(digits.train_x) + len(digits.test_x) == 1797
    assert digits.train_x.min() >= -1 and digits.train_x.max() <= 1 and digits.train_x.min() == -1
    tr, te = stratified_split(np.repeat(np.arange(10), 50), 0.2, 0)
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == 500
    n_all = torch.bincount(torch.cat([digits.train_y, digits.test_y]))
    n_te = torch.bincount(digits.test_y)
    assert ((n_te - 0.2 * n_all).abs() <= 0.5 + 1e-9).all()  # every class held out at 20%
    other = load_digits(seed=1)
    assert not torch.equal(other.test_y, digits.test_y) or not torch.equal(other.test_x, digits.test_x)


def _rows(x):
    """Images as a sorted list of byte strings: a multiset to compare splits by."""
    return sorted(r.numpy().tobytes() for r in x.reshape(len(x), -1))


def test_judge_split_partitions_the_held_out_images(digits):
    """The classifier trains on one part of the held-out images, FD is measured against the other:
    together they are exactly the held-out set, stratified, and none of it is a train image."""
    js = judge_split(digits, 0.5, 0)
    assert _rows(torch.cat([js.clf_x, js.ref_x])) == _rows(digits.test_x)
    assert len(js.clf_x) + len(js.ref_x) == len(digits.test_x) and abs(len(js.clf_x) - len(js.ref_x)) <= 10
    assert (torch.bincount(js.ref_y) - torch.bincount(js.clf_y)).abs().max() <= 1
    train = set(_rows(digits.train_x))
    assert not train & set(_rows(js.clf_x)) and not train & set(_rows(js.ref_x))
    assert js.spec == {"of": "held-out", "reference": 0.5, "seed": 0, "classifier_images": len(js.clf_x),
                       "reference_images": len(js.ref_x)}


def test_a_classifier_without_a_recorded_split_is_refused(digits):
    with pytest.raises(ValueError, match="no held-out split.*retrain it"):
        classifier_judge_split(digits, {"data": {}})


@pytest.mark.parametrize("name", ["digits", "digits-vp"])
def test_committed_floor_is_measured_on_images_the_classifier_never_saw(name):
    """eval.json's floor is recomputed from the committed classifier and data split: 500 real train
    images per seed set against the reference half of the held-out images, none of them seen by the
    classifier (its own half is disjoint), in FD and KID. Any drift (another classifier, split or
    estimator) fails."""
    from stride_diffusion.offline.metrics import fd_features, features, kid

    art = load_artifact(Path("artifacts") / name)
    ev = art.eval
    split = art.classifier_meta["data"]["split"]
    assert split["of"] == "held-out" and ev["classifier_sha256"] == art.classifier_meta["weights"]["sha256"]
    data = load_digits()
    js = classifier_judge_split(data, art.classifier_meta)
    assert not set(_rows(js.clf_x)) & (set(_rows(js.ref_x)) | set(_rows(data.train_x)))
    f_ref = features(art.classifier, js.ref_x)
    f_real = [features(art.classifier, data.train_x[torch.randperm(len(data.train_x),
                       generator=torch.Generator().manual_seed(j))[:ev["n"]]]) for j in range(len(ev["seed_sets"]))]
    assert ev["floor"]["fd"] == pytest.approx(float(np.mean([fd_features(f, f_ref) for f in f_real])), rel=1e-6)
    assert ev["floor"]["kid"] == pytest.approx(float(np.mean([kid(f, f_ref) for f in f_real])), rel=1e-6)
    assert f"{split['reference_images']} reference images" in ev["floor"]["what"]


def _write_images(root, classes=("cat", "dog"), per=3, mode="L"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            a = np.random.default_rng(i).integers(0, 256, (20, 24) + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f"{i}.png")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGB", 1)])
def test_folder_loader(tmp_path, mode, channels):
    _write_images(tmp_path, mode=mode)
    d = load_folder(tmp_path, size=8, channels=channels)
    assert d.class_names == ["cat", "dog"] and d.shape == (channels, 8, 8)
    assert len(d.train_x) == 4 and len(d.test_x) == 2 and sorted(d.test_y.tolist()) == [0, 1]
    assert d.train_x.min() >= -1 and d.train_x.max() <= 1


def test_folder_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*a' has no images"):
        load_folder(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png"):
        load_folder(tmp_path)


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    d = 6
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    # commuting covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    c1, c2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    exact = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert math.isclose(frechet_distance(mu1, c1, mu2, c2), exact, rel_tol=1e-9)
    # general covariances: tr sqrt(C1 C2) = sum sqrt(eig(C1 C2)) (real, positive)
    A, B = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    c1, c2 = A @ A.T + 0.1 * torch.eye(d), B @ B.T
    tr = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0).sqrt().sum()
    exact = float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace() - 2 * tr)
    assert math.isclose(frechet_distance(mu1, c1, mu2, c2), exact, rel_tol=1e-9)
    assert abs(frechet_distance(mu1, c1, mu1, c1)) < 1e-9
    # from samples: the estimator converges to the closed form
    x = mu1 + torch.randn(40000, d, generator=g, dtype=torch.float64) @ A.T
    y = mu2 + torch.randn(40000, d, generator=g, dtype=torch.float64) @ B.T
    exact = frechet_distance(mu1, A @ A.T, mu2, B @ B.T)
    assert abs(fd_features(x, y) - exact) < 0.05 * exact


def test_kid_is_unbiased_where_fd_rewards_a_less_diverse_set():
    """The floor's problem in miniature (d = 32, a 180-image reference, 300 samples, as the demo's
    judge): shrinking real samples by 0.95 lowers their FD to a finite reference, because FD's
    small-sample bias grows with the spread of what it measures; KID, unbiased in both sample sizes,
    reads real samples at 0 and the shrunk ones above them. Paired draws over 30 references."""
    d, m, n, t = 32, 180, 300, 30
    g = torch.Generator().manual_seed(0)
    d_fd, d_kid, k_real = [], [], []
    for _ in range(t):
        ref = torch.randn(m, d, generator=g, dtype=torch.float64)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        d_fd.append(fd_features(0.95 * x, ref) - fd_features(x, ref))
        d_kid.append(kid(0.95 * x, ref) - kid(x, ref))
        k_real.append(kid(x, ref))
    mean_se = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1) / len(v) ** 0.5))
    (f, fse), (k, kse), (r, rse) = mean_se(d_fd), mean_se(d_kid), mean_se(k_real)
    assert f < -3 * fse  # FD: the less diverse set scores better than real samples
    assert k > 3 * kse  # KID: it scores worse
    assert abs(r) < 3 * rse  # KID: real samples read 0


def test_kid_reference_se_is_the_spread_over_reference_draws():
    """Two fixed sample sets, 300 references of 180 drawn from the population: the spread of
    kid(x, ref) - kid(y, ref) over the references is what kid_reference_se reads off one of them."""
    d, n, m = 16, 300, 180
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.1
    diffs, ses = [], []
    for _ in range(300):
        ref = torch.randn(m, d, generator=g, dtype=torch.float64)
        diffs.append(kid(x, ref) - kid(y, ref))
        ses.append(kid_reference_se(x, y, ref))
    assert float(np.mean(ses)) == pytest.approx(float(np.std(diffs, ddof=1)), rel=0.15)


def test_resume_is_exact(digits, tmp_path):
    """Two steps, a checkpoint, two more: bit for bit the same as four in one go (dropout included)."""
    cfg = {**TINY, "dropout": 0.1}
    st = lambda n: Settings(schedule="vp", param="eps", steps=n, batch=4, ckpt_every=2, log_every=100)
    train(digits, tmp_path / "a", st(4), cfg, tmp_path / "ca")
    train(digits, tmp_path / "b", st(2), cfg, tmp_path / "cb")
    train(digits, tmp_path / "b", st(4), cfg, tmp_path / "cb", resume=True)
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"different settings .*'lr': \(0.001, 0.002\)"):
        train(digits, tmp_path / "b", Settings(schedule="vp", param="eps", steps=5, batch=4, lr=2e-3), cfg,
              tmp_path / "cb", resume=True)


def test_train_classify_evaluate_end_to_end(tmp_path):
    art = tmp_path / "artifacts" / "tiny"
    assert cli.main(["train", "--out", str(art), "--config", json.dumps(TINY), "--steps", "3", "--batch", "8",
                     "--ckpt-dir", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["train-classifier", str(art), "--epochs", "1", "--min-acc", "0"]) == 0
    assert cli.main(["eval", str(art), "--n", "10", "--seed-sets", "2", "--nfe", "1,3", "--solvers", "euler,heun,dpmpp-2m",
                     "--reference", "dpmpp-2m:4", "--guidance", "1.5", "--sweep", "1,1.5", "--sweep-with", "euler:2", "--cache", str(tmp_path / "cache")]) == 0
    for f in ("model.json", "model.safetensors", "classifier.json", "classifier.safetensors", "eval.json", "eval.md",
              "eval/fd.png", "eval/rmse.png", "eval/acc.png", "eval/fd_ratio.png", "eval/samples-heun.png"):
        assert (art / f).is_file(), f
    meta = json.loads((art / "model.json").read_text())
    assert meta["format"] == "stride.model/1" and meta["param"] == "flow" and meta["schedule"]["name"] == "flow"
    assert meta["data"]["shape"] == [1, 16, 16] and meta["training"]["steps"] == 3
    ev = json.loads((art / "eval.json").read_text())
    assert ev["format"] == "stride.eval/1" and ev["model_sha256"] == meta["weights"]["sha256"]
    assert ev["guidance"] == ev["default_guidance"] == 1.5 and len(ev["guidance_sweep"]) == 2
    assert len(ev["rows"]) == 6 and {r["solver"] for r in ev["rows"]} == {"euler", "heun", "dpmpp-2m"}
    for r in ev["rows"]:
        assert all(math.isfinite(r[k]) for k in ("rmse", "rmse_std", "fd", "fd_std", "fd_ratio", "fd_ratio_std", "acc",
                                                 "kid", "kid_std"))
    assert 0 <= ev["floor"]["fd"] < ev["teacher"]["fd"] and "converged_rmse" in ev["reference"]  # a 3-step model
    assert "| NFE |" in (art / "eval.md").read_text()
    assert list((tmp_path / "cache").glob("*.safetensors"))  # the reference solve is cached
    loaded = load_artifact(art)
    assert loaded.eval["rows"] == ev["rows"] and loaded.classifier is not None
    Image.open(art / "eval" / "fd.png").verify()

    # every row's samples are cached: a rerun computes nothing new and reproduces the rows
    cached = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) >= 2 + 2 + 6  # reference + its half, the sweep, the rows
    args = ["eval", str(art), "--n", "10", "--seed-sets", "2", "--nfe", "1,3", "--solvers", "euler,heun,dpmpp-2m",
            "--reference", "dpmpp-2m:4", "--sweep", "1,1.5", "--sweep-with", "euler:2", "--cache", str(tmp_path / "cache")]
    assert cli.main(args + ["--guidance", "1.5", "--no-images"]) == 0
    assert sorted((tmp_path / "cache").glob("*.safetensors")) == cached
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(json.loads((art / "eval.json").read_text())["rows"]) == strip(ev["rows"])
    # without --guidance the sweep's lowest-FD scale becomes the guidance and the measured default
    assert cli.main(args + ["--no-images"]) == 0
    ev2 = json.loads((art / "eval.json").read_text())
    assert ev2["guidance"] == ev2["default_guidance"] == min(ev2["guidance_sweep"], key=lambda r: r["fd"])["guidance"]

    # one table per guidance scale: CFG steps cost two calls, the teacher is its own 1.00, real images
    # and the teacher carry FD and KID
    assert cli.main(["eval-guidance", str(art), "--w", "1,2", "--n", "10", "--seed-sets", "2", "--solvers", "euler",
                     "--steps", "1,2", "--reference", "dpmpp-2m:4", "--cache", str(tmp_path / "cache")]) == 0
    gt = json.loads((art / "eval.json").read_text())["guidance_tables"]
    assert [t["guidance"] for t in gt["tables"]] == [1, 2] and gt["sampling_code"] == ev2["sampling_code"]
    for t, cfg in zip(gt["tables"], (1, 2)):
        assert [(r["solver"], r["steps"], r["nfe"]) for r in t["rows"]] == [("euler", 1, cfg), ("euler", 2, 2 * cfg)]
        assert t["teacher"]["fd_ratio"] == 1 and t["teacher"]["nfe"] == 4 * cfg
        assert all(math.isfinite(x[k]) for x in (t["teacher"], t["floor"]) for k in ("fd", "kid"))
    assert "**w = 2**" in (art / "eval-guidance.md").read_text()
    t = gt["tables"][0]  # a sampler family without a row at some NFE leaves its cell empty
    two = [t["rows"][0], {**t["rows"][1], "solver": "other"}]
    assert "| 2 |  | " in markdown({**gt, "tables": [{**t, "rows": two}]})
    # and survive a re-run of the main evaluation while they measure the same thing
    assert cli.main(args + ["--no-images"]) == 0
    assert json.loads((art / "eval.json").read_text())["guidance_tables"] == gt
    (art / "eval.json").write_text(json.dumps({**ev2, "guidance_tables": {**gt, "sampling_code": "other"}}))
    assert cli.main(args + ["--no-images"]) == 0
    assert "guidance_tables" not in json.loads((art / "eval.json").read_text())


def test_learning_rate_warms_up_then_decays_to_zero():
    from stride_diffusion.offline.train import learning_rate

    assert learning_rate(1.0, 0, 10) == pytest.approx(0.1) and learning_rate(1.0, 500, 10) == 1.0
    assert learning_rate(1.0, 50, 10, "cosine", 100) == pytest.approx(0.5)
    assert learning_rate(1.0, 99, 10, "cosine", 100) < 1e-3


def test_secant_rows_are_the_same_in_eval_and_in_secant_eval(tmp_path):
    """`stride offline eval` and `stride offline secant --eval-only` measure through one protocol:
    recomputed without the cache, the second reproduces the first's secant rows."""
    import io

    from stride_diffusion.offline.secant import Settings as SecantSettings
    from stride_diffusion.offline.secant import evaluate_secant, train_secant

    art = tmp_path / "tiny"
    assert cli.main(["train", "--out", str(art), "--config", json.dumps(TINY), "--steps", "2", "--batch", "8",
                     "--ckpt-dir", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["train-classifier", str(art), "--epochs", "1", "--min-acc", "0"]) == 0
    train_secant(art, SecantSettings(n_steps=[2], steps=2, batch=4, w_max=3.0), "secant-x", tmp_path / "ck",
                 log=io.StringIO())
    assert cli.main(["eval", str(art), "--n", "10", "--seed-sets", "2", "--nfe", "2", "--solvers", "euler",
                     "--reference", "dpmpp-2m:4", "--secant-steps", "1,2", "--no-images",
                     "--cache", str(tmp_path / "cache")]) == 0
    rows = [r for r in json.loads((art / "eval.json").read_text())["rows"] if r.get("secant")]
    res = evaluate_secant(art, steps=(1, 2), compare=["euler"], compare_nfe=[2], cache=None, write=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "selection_fd")} for r in rs]
    assert len(rows) == 2 and strip(res["rows"]) == strip(rows)
    euler = next(r for r in json.loads((art / "eval.json").read_text())["rows"] if r["solver"] == "euler")
    assert res["classic"][0]["fd_ratio"] == euler["fd_ratio"] and res["classic"][0]["rmse"] == euler["rmse"]

"""A sampler family is one file plus one registry line: the worked example in docs/samplers.md,
registered here (not in the product registry), served end to end by the unchanged service."""
import importlib.util
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_fixtures import ROOT, ApiServer, reference, tiny_artifact

from stride_diffusion.service import images
from stride_diffusion.service.models import ModelEntry, Registry
from stride_diffusion.service.params import ApiError, parse
from stride_diffusion.service.settings import Settings
from stride_diffusion.solvers.artifact import write_json
from stride_diffusion.solvers.samplers import FAMILIES
from stride_diffusion.solvers.samplers.base import best_row, rows_per_image

TIMES = [0.999, 0.6, 0.25, 0.001]  # three steps on the tiny model's flow schedule


def family_from_the_docs(directory: Path):
    """The docs' family file, imported as the module it says it is (its relative imports included)."""
    blocks = re.findall(r"```python\n(.*?)```", (Path(ROOT) / "docs" / "samplers.md").read_text(), re.DOTALL)
    assert '    "times",\n' in blocks  # the registry line the docs show
    f = directory / "times.py"
    f.write_text(next(b for b in blocks if "class TimesSampler" in b))
    spec = importlib.util.spec_from_file_location("stride_diffusion.solvers.samplers.times", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def times_family(monkeypatch, tmp_path):
    """The family registered (the registry line), and an artifact with one hand-written grid that
    eval.json measures best at 3 steps."""
    mod = family_from_the_docs(tmp_path)
    monkeypatch.setitem(FAMILIES, "times", mod.load)
    art = tiny_artifact(tmp_path / "tiny", eval_rows=[{"solver": "euler", "nfe": 3, "fd": 2.0},
                                                      {"solver": "mine", "nfe": 3, "fd": 1.0}])
    (art / "times").mkdir()
    write_json(art / "times" / "mine.json", {"solver": "euler", "times": TIMES})
    return art


def test_a_new_family_through_the_service_path(times_family):
    e = ModelEntry.from_artifact(str(times_family))
    s = e.samplers["mine"]
    assert s.family == "times" and s.network == "" and s.steps == (3,) and s.quality[0]["fd"] == 1.0
    assert "mine" in e.samplers.names() and e.describe(Settings(test_model="gmm"))["solvers"][-1] == "mine"
    settings = Settings(artifacts=[str(times_family)], steps=[2, 3, 4])
    p = parse({"class_label": "b", "solver": "mine"}, Registry([e]), settings)
    assert (p.solver, p.steps) == ("mine", 3)  # its step count, without asking
    assert parse({"class_label": 1, "steps": 3}, Registry([e]), settings).solver == "mine"  # the auto-pick
    with pytest.raises(ApiError, match="fitted for steps=3 only"):
        parse({"class_label": 1, "solver": "mine", "steps": 4}, Registry([e]), settings)
    tab = s.table(3)
    assert tab.nfe == 3 and np.allclose(tab.tau.numpy(), TIMES[:-1]) and e.stepper_key("mine") == e.name


def test_a_new_family_served_over_http(times_family):
    """/solvers and /generate know it with no change to the service; the image is the executor's."""
    settings = Settings(artifacts=[str(times_family)], steps=[2, 3], max_batch=4, threads=1)
    srv = ApiServer(settings)
    try:
        sol = httpx.get(srv.url + "/solvers").json()["models"]["tiny"]
        assert sol["steps"]["3"]["solver"] == "mine" and "mine" in sol["available"]
        r = httpx.post(srv.url + "/generate", json={"class_label": 2, "seed": 5, "solver": "mine"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-stride-solver"] == "mine", r.text
        entry = srv.service.registry["tiny"]
        assert np.array_equal(images.decode(r.content), reference(2, 5, 3, "mine", 1.0, entry, scale=1))
    finally:
        srv.stop()


def test_the_shared_rules():
    class Plain:
        guidance_input = False

    class Guided:
        guidance_input = True

    assert rows_per_image(Plain(), 1.0) == 1 and rows_per_image(Plain(), 2.0) == 2 and rows_per_image(Guided(), 2.0) == 1
    rows = [{"solver": "a", "fd": 1.0, "selection_fd": 3.0}, {"solver": "b", "fd": 2.0, "selection_fd": 2.0},
            {"solver": "c", "fd": None, "rmse": 0.01}, {"solver": "d", "fd": float("nan"), "rmse": 0.5}]
    assert best_row(rows)["solver"] == "b"  # the selection set's FD decides
    assert best_row(rows[2:])["solver"] == "c" and best_row([{"solver": "e", "fd": None}]) is None

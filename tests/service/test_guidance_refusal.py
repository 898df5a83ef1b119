"""Guidance honoured or refused: the auto-pick only chooses a sampler that honours the scale, an
explicit one that cannot is 422 naming its range."""

import numpy as np
import pytest
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import (
    reference,
)

from stride_diffusion.service import images


# -- 5. guidance honoured or refused ------------------------------------------------------------------
@pytest.mark.parametrize("guidance,solver", [(2.0, "secant-test"), (1.0, "secant-test"), (3.0, "secant-test"),
                                             (6.0, "dpmpp-2m"), (20.0, "dpmpp-2m"), (0.0, "dpmpp-2m")])
def test_auto_picks_only_a_sampler_that_honours_the_guidance(api, guidance, solver):
    r = post(api, {"class_label": 2, "seed": 5, "steps": 4, "guidance": guidance})
    assert r.status_code == 200, r.text
    assert r.headers["x-stride-solver"] == solver and float(r.headers["x-stride-guidance"]) == guidance
    if solver == "dpmpp-2m":  # the guidance was applied, not clamped: the image is the reference at that scale
        assert np.array_equal(images.decode(r.content), reference(2, 5, 4, "dpmpp-2m", guidance))


@pytest.mark.parametrize("guidance", [0.0, 0.5, 6.0, 20.0])
def test_an_explicit_sampler_that_cannot_honour_the_guidance_is_422_naming_its_range(api, guidance):
    r = post(api, json={"class_label": 2, "steps": 4, "guidance": guidance, "solver": "secant-test"})
    assert r.status_code == 422 and r.json()["field"] == "guidance" and r.json()["allowed"] == [1.0, 3.0]
    assert "[1, 3]" in r.json()["detail"]


def test_guidance_header_reports_the_default_when_none_is_asked(api):
    r = post(api, {"class_label": 2, "seed": 5, "steps": 4, "format": "json"})
    assert r.headers["x-stride-guidance"] == "1" and r.json()["guidance"] == 1.0



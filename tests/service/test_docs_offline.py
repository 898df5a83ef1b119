"""The API docs reference no external host and their assets are served from the package."""
import re

import httpx
import pytest
from hostile_api import STEPS, metrics, post, settings  # noqa: F401


# -- 7. docs without a CDN ----------------------------------------------------------------------------
def test_docs_reference_no_external_host_and_its_assets_are_served(api):
    html = httpx.get(api.url + "/docs").text
    assert "SwaggerUIBundle" in html
    assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.IGNORECASE), "a CDN or other host"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(assets)
    for a in assets:
        r = httpx.get(api.url + a)
        assert r.status_code == 200 and len(r.content) > 100, a
    assert "'validatorUrl': null" in html or '"validatorUrl": null' in html
    assert httpx.get(api.url + "/redoc").status_code == 404  # not offered: it would load fonts from a CDN
    # and an installed package carries the files (package data, not only the source tree)
    from stride_diffusion.service.openapi import DOC_FILES, STATIC

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data = tomllib.loads((STATIC.parents[3] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(STATIC.joinpath(f).is_file() for f in DOC_FILES)
    assert "static/swagger-ui/*" in data["stride_diffusion.service"]



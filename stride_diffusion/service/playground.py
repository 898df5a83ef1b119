"""GET /: the playground page, static files shipped inside the package (service/web).

No build step and nothing fetched from elsewhere: the Content-Security-Policy allows this origin
only (and data: URLs for the images), so the page works offline and a stray CDN link would fail
loudly in the browser test. It talks to the public API (/models, /solvers, /generate, /metrics).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'"


def mount(app: FastAPI):
    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(WEB / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=WEB), name="playground")

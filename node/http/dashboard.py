"""The dashboard: `GET /ui` and its two static files, shipped in the package (`ui/`) and
served from memory. No build step, nothing fetched from elsewhere at run time. The node's
root (`GET /`, what a browser opens given only the address) redirects to it.

The page is open to anyone who reaches the node, like the probes: it holds no data. Its
script reads the public API, which asks for the key (the page then prompts for it). A strict
Content-Security-Policy allows only this node's own scripts and styles (no inline script, no
other origin), so that nothing stored in a document's metadata can run in an operator's
browser even if it slipped past the page's own escaping.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from aquila.cluster.model.errors import NotFound

UI_DIR = Path(__file__).resolve().parent / "ui"
# File name → content type; nothing else under /ui is served.
FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always revalidated, so that an upgraded node serves its own page.
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, bytes]:
    return {name: (UI_DIR / name).read_bytes() for name in FILES}


def add_ui_routes(app: web.Application) -> None:
    files = _load()  # a few kilobytes, read once when the app is made

    def respond(name: str) -> web.Response:
        return web.Response(body=files[name], content_type=FILES[name], charset="utf-8",
                            headers=HEADERS)

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in FILES:
            raise NotFound(f"no file {name!r} in the dashboard")
        return respond(name)

    async def home(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/ui", **HEADERS})

    app.router.add_get("/", home)
    app.router.add_get("/ui", index)
    app.router.add_get("/ui/{file}", static)

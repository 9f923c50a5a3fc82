"""The operator console: static files shipped in the package (serve_app/console/static), served
at `/console` on the router's port. The page asks for the admin token and reads only the admin
API; every URL it uses is relative, so it also works behind a proxy under a path prefix
(`/prefix/console`). No file is fetched from anywhere else (no CDN)."""

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from serve_app.core.errors import RouterError

router = APIRouter()

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
# Read once: a handful of small files, answered from memory.
FILES: dict[str, tuple[bytes, str]] = {
    f.name: (f.read_bytes(), _TYPES[f.name[f.name.rfind(".") :]])
    for f in resources.files("serve_app.console").joinpath("static").iterdir()
    if f.name[f.name.rfind(".") :] in _TYPES
}
# The page runs only its own script and reads only this origin; it is never framed.
HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}


def _file(name: str) -> Response:
    if name not in FILES:
        raise RouterError(404, f"no console file {name!r}", code="not_found")
    body, media_type = FILES[name]
    return Response(body, media_type=media_type, headers=HEADERS)


@router.get("/console", include_in_schema=False)
async def console_page() -> Response:
    return _file("index.html")


@router.get("/console/", include_in_schema=False)
async def console_slash() -> Response:
    """The page's relative URLs assume `.../console`: send `.../console/` there."""
    return RedirectResponse("../console", status_code=308)


@router.get("/console/{name}", include_in_schema=False)
async def console_file(name: str) -> Response:
    return _file(name)

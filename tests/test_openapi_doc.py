"""docs/api/openapi.json is the app's OpenAPI document; regenerate it with
`python -m tests.test_openapi_doc` after changing an endpoint."""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.ingress.replica import api

DOC = Path(__file__).resolve().parent.parent / "docs" / "api" / "openapi.json"


def render() -> str:
    return json.dumps(api.openapi(), indent=2, sort_keys=True) + "\n"


def test_the_published_openapi_document_matches_the_app() -> None:
    assert DOC.read_text() == render(), "stale: run `python -m tests.test_openapi_doc`"


if __name__ == "__main__":
    DOC.write_text(render())

"""Records the real vLLM's answers that the dialect unit tests translate (tests/wire/):
`python -m tests.e2e.record_wire` after `make e2e` has made the environment and the model.

A chat completion unary and streamed (with usage), greedy, so a new recording differs from the
last only where vLLM's wire format changed; then the server's Prometheus page (the load gauges
the monitor scrapes)."""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import free_port
from tests.e2e.vllm_server import ROOT, SERVED_MODEL, VllmServer

WIRE = ROOT / "tests" / "wire"


REQUEST = {
    "model": SERVED_MODEL,
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 4,
    "temperature": 0,
}


def _post(url: str, body: dict) -> bytes:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


def main() -> None:
    server = VllmServer("record", free_port(), core=0)
    server.start()
    try:
        server.wait_ready()
        url = f"{server.url}/v1/chat/completions"
        (WIRE / "vllm_chat.json").write_bytes(_post(url, REQUEST))
        streamed = REQUEST | {"stream": True, "stream_options": {"include_usage": True}}
        (WIRE / "vllm_chat_stream.txt").write_bytes(_post(url, streamed))
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as resp:
            (WIRE / "vllm_metrics.txt").write_bytes(resp.read())
    finally:
        server.stop()


if __name__ == "__main__":
    main()

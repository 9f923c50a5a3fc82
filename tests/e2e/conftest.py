"""Two real vLLM servers for the session, and the router deployed in front of them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import deploy, free_port, provider
from tests.e2e.vllm_server import (
    MODEL_DIR,
    SERVED_MODEL,
    VLLM_PYTHON,
    VllmServer,
    stop_leftovers,
)

MODEL = "e2e/tiny"
STORE_ENV = "VLLM_ENABLE_RESPONSES_API_STORE"
MODEL_TYPE = "vllm_models"


@pytest.fixture(scope="session")
def vllm() -> Iterator[list[VllmServer]]:
    if not VLLM_PYTHON.exists() or not (MODEL_DIR / "base").exists():
        pytest.fail("no vLLM environment or tiny model: run the e2e tests with `make e2e`")
    stop_leftovers()  # of a run cut short, before their folders are reused
    cores = os.cpu_count() or 1
    # vllm-a keeps the Responses it makes (vLLM's in-memory store), vllm-b does not: the
    # router's Responses state is checked against both (test_vllm_responses.py).
    servers = [
        VllmServer("vllm-a", free_port(), core=0, env={STORE_ENV: "1"}),
        VllmServer("vllm-b", free_port(), core=1 % cores),
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def models_config(servers: list[VllmServer]) -> dict:
    providers = [
        provider(s.name, s.url, "vllm", model_path=SERVED_MODEL, input_size=256) for s in servers
    ]
    return {MODEL_TYPE: {MODEL: {"providers": providers}}, "active_models": {MODEL_TYPE: [MODEL]}}


@pytest.fixture(scope="session")
def router(serve_url: str, vllm: list[VllmServer]) -> str:
    deploy(serve_url, models_config(vllm))
    return serve_url

"""OpenAI Responses conversations through the router in front of two real vLLM servers, one
with vLLM's Responses store (vllm-a) and one without (vllm-b), both declared `responses_store`:
every continuation succeeds, on the server that made the response it continues (vllm-a from its
own store; vllm-b, which has nothing, given the whole conversation from the router's copy at
once), while the same continuations sent straight to the servers in turn fail where they land
on the other one."""

from __future__ import annotations

import itertools

import openai
import pytest

from tests.conftest import deploy
from tests.e2e.conftest import MODEL, MODEL_TYPE, models_config
from tests.e2e.test_vllm import post
from tests.e2e.vllm_server import SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e
# Odd requests per conversation: round_robin starts the next one on the other server.
TURNS = 4


@pytest.fixture(scope="module")
def router(serve_url: str, vllm: list[VllmServer]) -> str:
    config = models_config(vllm)
    for p in config[MODEL_TYPE][MODEL]["providers"]:
        p["responses_store"] = True
    config["routing"] = {MODEL_TYPE: {"strategy": "round_robin"}}
    deploy(serve_url, config)
    yield serve_url
    deploy(serve_url, models_config(vllm))  # as the other e2e modules expect it


def test_continuations_through_the_router_always_succeed(
    router: str, vllm: list[VllmServer]
) -> None:
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=60)
    body = {"model": MODEL, "max_output_tokens": 4, "temperature": 0}
    wrong, tried = 0, {"vllm-a": set(), "vllm-b": set()}
    for _ in range(5):  # 5 conversations of 1 + TURNS responses: 20 continuations
        raw = client.responses.with_raw_response.create(input="hello there", **body)
        response, maker = raw.parse(), raw.headers["x-router-provider"]
        counted = [response.usage.input_tokens]
        for turn in range(TURNS):
            raw = client.responses.with_raw_response.create(
                input=f"and {turn}?", previous_response_id=response.id, **body
            )
            assert raw.status_code == 200
            served = raw.headers["x-router-provider"]
            wrong += served != maker
            tried[served].add(raw.headers["x-router-attempts"])
            response = raw.parse()
            counted.append(response.usage.input_tokens)
            maker = served
        assert counted == sorted(counted) and len(set(counted)) == len(counted)  # history
    assert wrong == 0
    # vllm-a continued from its own store at once; vllm-b lacked it and was asked again.
    assert tried == {"vllm-a": {"1"}, "vllm-b": {"2"}}


def test_continuations_sent_straight_to_the_servers_in_turn_get_lost(
    vllm: list[VllmServer],
) -> None:
    """What the router saves a pool from: vLLM keeps a response only where it made it."""
    servers = itertools.cycle(vllm)
    body = {"model": SERVED_MODEL, "max_output_tokens": 4, "temperature": 0}
    status, first = post(f"{next(servers).url}/v1/responses", body | {"input": "hello there"})
    assert status == 200
    lost = 0
    previous = first["id"]
    for turn in range(4):
        status, doc = post(
            f"{next(servers).url}/v1/responses",
            body | {"input": f"and {turn}?", "previous_response_id": previous},
        )
        lost += status == 404
        if status == 200:
            previous = doc["id"]
    assert lost == 2  # the two that landed on vllm-b, which keeps nothing

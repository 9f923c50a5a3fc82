"""The Ollama, Responses and Anthropic dialects in front of real vLLM, through the official
clients. vLLM serves Responses and Messages itself, so each is checked twice: passed through
(`e2e/tiny`, api_type vllm) and translated by the router (`e2e/tiny-chat`, the same server
declared api_type openai, spoken to in chat completions): the translation must answer what
vLLM's own implementation answers."""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

from tests.conftest import deploy, provider
from tests.e2e.conftest import MODEL, MODEL_TYPE, models_config
from tests.e2e.test_vllm import post
from tests.e2e.vllm_server import SERVED_MODEL, VllmServer

pytestmark = pytest.mark.e2e
TRANSLATED = "e2e/tiny-chat"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def router(serve_url: str, vllm: list[VllmServer]) -> str:
    """Only vllm-a behind both names, so every answer is comparable with a direct call."""
    config = models_config(vllm[:1])
    chat = provider("chat-a", vllm[0].url, "openai", model_path=SERVED_MODEL, input_size=256)
    config[MODEL_TYPE][TRANSLATED] = {"providers": [chat]}
    config["active_models"][MODEL_TYPE].append(TRANSLATED)
    deploy(serve_url, config)
    yield serve_url
    deploy(serve_url, models_config(vllm))  # as the other e2e modules expect it


def test_anthropic_messages_passed_through_and_translated_answer_as_vllm_does(
    router: str, vllm: list[VllmServer]
) -> None:
    body = {"max_tokens": 8, "system": "You answer.", "messages": HELLO}
    greedy = {"temperature": 0}  # not a parameter of this client's create(): sent as extra
    status, direct = post(f"{vllm[0].url}/v1/messages", body | greedy | {"model": SERVED_MODEL})
    assert status == 200, direct
    client = anthropic.Anthropic(base_url=router, api_key="unused", max_retries=0, timeout=60)
    for model in (MODEL, TRANSLATED):
        reply = client.messages.create(model=model, extra_body=greedy, **body)
        assert reply.content[0].text == direct["content"][0]["text"], model
        assert reply.stop_reason == direct["stop_reason"], model
        assert reply.usage.input_tokens == direct["usage"]["input_tokens"], model
        assert reply.usage.output_tokens == direct["usage"]["output_tokens"], model
        with client.messages.stream(model=model, extra_body=greedy, **body) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == direct["content"][0]["text"] and final.stop_reason == direct["stop_reason"]
        assert final.usage.output_tokens == direct["usage"]["output_tokens"], model


def test_anthropic_count_tokens_counts_as_vllm_does(router: str, vllm: list[VllmServer]) -> None:
    body = {"system": "You answer.", "messages": HELLO}
    status, direct = post(f"{vllm[0].url}/v1/messages/count_tokens", body | {"model": SERVED_MODEL})
    assert status == 200, direct
    client = anthropic.Anthropic(base_url=router, api_key="unused", max_retries=0, timeout=60)
    for model in (MODEL, TRANSLATED):
        assert (
            client.messages.count_tokens(model=model, **body).input_tokens == direct["input_tokens"]
        )


def test_responses_passed_through_and_translated_answer_as_vllm_does(
    router: str, vllm: list[VllmServer]
) -> None:
    body = {
        "input": "hello there",
        "instructions": "You answer.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    status, direct = post(f"{vllm[0].url}/v1/responses", body | {"model": SERVED_MODEL})
    assert status == 200, direct
    text = "".join(
        part["text"]
        for item in direct["output"]
        if item["type"] == "message"
        for part in item["content"]
    )
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=60)
    for model in (MODEL, TRANSLATED):
        response = client.responses.create(model=model, **body)
        assert response.output_text == text, model
        assert response.usage is not None
        assert response.usage.input_tokens == direct["usage"]["input_tokens"], model
        assert response.usage.output_tokens == direct["usage"]["output_tokens"], model
        events = list(client.responses.create(model=model, stream=True, **body))
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert streamed == text and events[-1].type in ("response.completed", "response.incomplete")


def test_ollama_clients_reach_vllm_through_chat_completions(
    router: str, vllm: list[VllmServer]
) -> None:
    status, direct = post(
        f"{vllm[0].url}/v1/chat/completions",
        {"model": SERVED_MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0},
    )
    assert status == 200, direct
    client = ollama.Client(host=router, timeout=60)
    options = {"num_predict": 8, "temperature": 0}
    answer = client.chat(model=MODEL, messages=HELLO, options=options, stream=False)
    assert answer.message.content == direct["choices"][0]["message"]["content"]
    assert answer.prompt_eval_count == direct["usage"]["prompt_tokens"]
    assert answer.eval_count == direct["usage"]["completion_tokens"]
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(model=MODEL, messages=HELLO, options=options, stream=True)
    )
    assert streamed == answer.message.content
    assert MODEL in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=HELLO, stream=False)
    assert info.value.status_code == 404

"""Prompts as the server sees them (serve_app/routing/kv/tokens): the keys the router computes
for a request are the keys the index builds from the simulated vLLM's events for it (the engine
run in-process), with the e2e tiny model's tokenizer and chat template (tests/e2e/tiny_model.py),
and always with one trained here the same way (byte-level BPE, `tokenizers` only)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from jinja2.exceptions import TemplateError

from serve_app.demo.vllm_sim.engine import Engine, Request
from serve_app.demo.vllm_sim.profiles import TINY_CPU
from serve_app.routing.kv.index import BlockIndex
from serve_app.routing.kv.tokens import (
    HfTokenizer,
    PromptKeys,
    SimpleTokenizer,
    pieces,
    prompt_keys,
    prompt_tokens,
    tokenizer_for,
)
from tests.e2e.tiny_model import write_tokenizer

PROFILE = TINY_CPU.model_copy(update={"block_size": 16})
SENTENCES = [f"The quick brown fox jumps over the lazy dog {i}." for i in range(500)]
DOC = " ".join(SENTENCES[:40])
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder like the e2e tiny model's (tests/e2e/tiny_model.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(specials))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


@pytest.fixture(params=["trained", "e2e"])
def model(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The tokenizer trained here, or the e2e tiny model's (its tokenizer and chat template, as
    tests/e2e/tiny_model.py writes them, with `tokenizers` alone)."""
    if request.param == "trained":
        return request.getfixturevalue("trained")
    write_tokenizer(tmp_path)
    return tmp_path


def _serve(engine: Engine, prompt: list[int]) -> None:
    """One request through the simulated engine, to its end."""
    request = Request(f"r{len(prompt)}", prompt, [5, 6])
    engine.add(request)
    while request.finished_at is None:
        end = engine.next_event()
        engine.advance(end if end is not None else engine.clock)


def test_the_routers_keys_are_those_the_index_builds_from_the_engines_events(model: Path) -> None:
    """The simulator tokenizes as vLLM does (held to it by make e2e); its events fill the index;
    the router's keys for the same request body match every full prompt block."""
    tokenizer = tokenizer_for(str(model))
    engine, index = Engine(PROFILE), BlockIndex()
    # The user turns differ over full blocks, whatever the tokenizer's count for DOC.
    turn, other_turn = ({"role": "user", "content": text * 20} for text in ("Hi, ", "Another, "))
    first = {"messages": [{"role": "system", "content": DOC}, turn]}
    second = {"messages": [*first["messages"][:1], other_turn]}
    served = tokenizer.chat_prompt(first["messages"])  # what the server computes
    _serve(engine, served)
    index.apply("sim", engine.cache.take_events())
    keys = prompt_keys(prompt_tokens(tokenizer, first), PROFILE.block_size)
    assert len(keys) == len(served) // PROFILE.block_size > 20
    assert index.match(keys) == {"sim": len(keys)}
    other = prompt_keys(prompt_tokens(tokenizer, second), PROFILE.block_size)
    shared = next(i for i, (a, b) in enumerate(zip(keys, other, strict=False)) if a != b)
    assert 0 < shared < len(keys)
    assert index.match(other) == {"sim": shared}


def test_the_template_is_rendered_as_transformers_and_vllm_do(
    trained: Path, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes())
    config = json.loads((trained / "tokenizer_config.json").read_text())
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no') }}{% endif %}"
        "{{ bos_token }}{{ m['content'] }}|{% endfor %}{{ tools | tojson }}"
    )
    config["chat_template"] = [{"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = HfTokenizer(tmp_path)
    parts = [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]
    assert tokenizer.render([{"role": "user", "content": parts}], [{"n": "é"}]) == (
        '<s>a\nb|[{"n": "é"}]'
    )
    with pytest.raises(TemplateError):
        tokenizer.render([{"role": "bad", "content": ""}])
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert HfTokenizer(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"


def test_a_models_tokenizer_is_loaded_once(trained: Path) -> None:
    assert tokenizer_for(str(trained)) is tokenizer_for(str(trained))


def test_completion_prompts_as_text_or_ids_and_keys_leave_a_partial_block_out() -> None:
    simple = SimpleTokenizer()
    assert prompt_tokens(simple, {"prompt": "t5 t6 t7"}) == [5, 6, 7]
    assert prompt_tokens(simple, {"prompt": [9, 8]}) == [9, 8]
    assert prompt_tokens(simple, {"input": "x"}) == []
    assert len(prompt_keys(list(range(47)), 16)) == 2
    assert prompt_keys(list(range(32)), 16)[:1] == prompt_keys(list(range(16)), 16)
    assert prompt_keys(list(range(16)), 16, lora="a") != prompt_keys(list(range(16)), 16)


async def test_the_ingress_keys_of_a_body_and_what_it_cannot_render(
    trained: Path, tmp_path: Path
) -> None:
    """A chat body's keys and exact token count (an adapter's seeded with its name); a body the
    template refuses, or not a JSON object, has none (routed by load) instead of failing."""
    body = {"model": "m", "messages": [{"role": "user", "content": DOC}]}
    keys, tokens = await PromptKeys(str(trained), 16).of(orjson.dumps(body))
    ids = prompt_tokens(tokenizer_for(str(trained)), body)
    assert (keys, tokens) == (prompt_keys(ids, 16), len(ids)) and len(keys) > 10
    adapter, _ = await PromptKeys(str(trained), 16, lora="a1").of(orjson.dumps(body))
    assert adapter[0] != keys[0]
    (tmp_path / "tokenizer.json").write_bytes((trained / "tokenizer.json").read_bytes())
    config = json.loads((trained / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('no system role') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    refusing = PromptKeys(str(tmp_path), 16)
    assert await refusing.of(orjson.dumps(body)) == ([], 0)
    assert await PromptKeys(str(trained), 16).of(b"[1, 2]") == ([], 0)


async def test_keys_by_piece_equal_the_keys_of_the_whole_prompt_however_prompts_share(
    model: Path,
) -> None:
    """chat_keys_async keeps each piece's keys after what came before it: a conversation's
    turns, prompts that share a document and part ways inside a piece or a block, another
    block size, an adapter, each asked twice (from its kept chains the second time) give the
    keys prompt_keys gives for the whole prompt's ids."""
    tokenizer = HfTokenizer(model)
    doc = " ".join(SENTENCES[:300])  # about 15 pieces
    turns = [{"role": "user", "content": doc}]
    variants = [
        turns,
        [*turns, {"role": "assistant", "content": "ok."}, {"role": "user", "content": "And?"}],
        [{"role": "user", "content": doc[:7000] + " other words" + doc[7000:]}],
        [{"role": "user", "content": doc[:7001]}],
        [{"role": "system", "content": "be brief"}, *turns],
    ]
    # One character changed just before each cut: the piece after it is the same, and where
    # the change falls after the last full block, so is the key before it: only the ids after
    # that block differ.
    rendered = tokenizer.render(turns)
    start, at = rendered.index(doc), 0
    for piece in list(pieces(rendered))[:-1]:
        at += len(piece)
        j = at - start - 2  # the last character of the word before the cut, the "." kept
        digit = "7" if doc[j] != "7" else "8"
        variants.append([{"role": "user", "content": doc[:j] + digit + doc[j + 1 :]}])
    for _ in range(2):
        for messages in variants:
            ids = tokenizer.chat_prompt(messages)
            for block_size, lora in ((16, None), (32, None), (16, "sql@v1")):
                got = await tokenizer.chat_keys_async(messages, None, block_size, lora)
                assert got == (prompt_keys(ids, block_size, lora), len(ids))
    assert len(tokenizer._chains) > len(variants)  # the pieces' chains are kept

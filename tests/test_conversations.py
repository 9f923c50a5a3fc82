"""The responses store and conversation chains, without Ray or HTTP: what a continuation sends,
eviction by age and size, key isolation, a lost background response, the stream tap."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from serve_app.conversations.chain import (
    StoredResponse,
    TerminalTap,
    conversation,
    expanded,
    listed_items,
    page,
)
from serve_app.conversations.store import ResponseStore, finished


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _message(role: str, text: str) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def _record(
    response_id: str,
    created: float,
    owner: str = "k1",
    items: list | None = None,
    text: str = "answer",
    **extra: object,
) -> StoredResponse:
    response = {"id": response_id, "status": "completed", "output": [_message("assistant", text)]}
    return StoredResponse(
        id=response_id,
        owner=owner,
        model="m",
        created=created,
        input=items if items is not None else [_message("user", "q")],
        response=response,
        **extra,
    )


def test_a_turn_holds_the_whole_conversation_and_a_continuation_sends_it() -> None:
    first = _record("resp_1", 0.0, items=conversation(None, {"input": "hello"}))
    assert first.input == [{"type": "message", "role": "user", "content": "hello"}]
    doc = {
        "model": "m",
        "input": [_message("user", "and then?")],
        "previous_response_id": "resp_1",
        "instructions": "be brief",
    }
    items = conversation(first, doc)
    assert items == [*first.input, *first.response["output"], _message("user", "and then?")]
    sent = expanded(doc, items)
    assert "previous_response_id" not in sent and sent["input"] == items
    # This turn's instructions go; an earlier turn's never do (they are not input items).
    assert sent["instructions"] == "be brief"
    second = _record("resp_2", 1.0, items=items, text="the end")
    third = conversation(second, {"input": "bye"})
    assert third == [*items, _message("assistant", "the end"), third[-1]]
    assert third[-1] == {"type": "message", "role": "user", "content": "bye"}


def test_a_key_sees_only_its_own_responses_and_the_admin_sees_all(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r.db", ttl_s=100, max_bytes=1 << 20)
    store.put(_record("resp_a", store._clock(), owner="k1"))
    assert store.get("resp_a", "k1") is not None
    assert store.get("resp_a", "k2") is None and store.get("resp_a", "") is None
    assert store.get("resp_a", None) is not None  # the admin token
    assert not store.delete("resp_a", "k2") and store.get("resp_a", "k1") is not None
    assert store.delete("resp_a", "k1") and store.get("resp_a", None) is None
    assert store.count == 0 and store.total_bytes == 0


def test_responses_past_their_age_are_gone_and_evicted(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.db", ttl_s=60, max_bytes=1 << 20, clock=clock)
    store.put(_record("resp_old", clock.now))
    clock.now += 30
    store.put(_record("resp_new", clock.now))
    clock.now += 31
    assert store.get("resp_old", "k1") is None  # past its age even before it is evicted
    assert store.get("resp_new", "k1") is not None
    assert store.count == 2 and store.evict() == 1 and store.count == 1


def test_the_oldest_go_first_when_the_store_is_full(tmp_path: Path) -> None:
    clock = Clock()
    one = _record("resp_0", 0.0).size()
    store = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=3 * one + one // 2, clock=clock)
    for n in range(5):
        clock.now += 1
        store.put(_record(f"resp_{n}", clock.now))
    kept = [n for n in range(5) if store.get(f"resp_{n}", None) is not None]
    assert kept == [2, 3, 4] and store.total_bytes <= store.max_bytes
    # A response larger than the whole store is refused, and evicts nothing.
    assert not store.put(_record("resp_big", clock.now, text="x" * (4 * one)))
    assert store.count == 3
    # The bound holds across a restart: the file is read back with its sizes.
    again = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=store.max_bytes, clock=clock)
    assert (again.count, again.total_bytes) == (3, store.total_bytes)
    assert again.get("resp_4", "k1") == store.get("resp_4", "k1")


def test_processes_sharing_the_file_share_its_bound(tmp_path: Path) -> None:
    """The store actor and the ingress replicas on its node hold one file: a size total kept
    in the file, so a writer evicts the others' oldest too."""
    clock = Clock()
    one = _record("resp_0", 0.0).size()
    bound = 3 * one + one // 2
    actor = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=bound, clock=clock)
    replica = ResponseStore(tmp_path / "r.db", 1e9, bound, clock=clock, owner=False)
    for n in range(5):
        clock.now += 1
        (actor if n % 2 else replica).put(_record(f"resp_{n}", clock.now))
    assert replica.get("resp_3", "k1") is not None and actor.get("resp_4", "k1") is not None
    assert [n for n in range(5) if actor.get(f"resp_{n}", None)] == [2, 3, 4]
    assert actor.total_bytes == replica.total_bytes <= bound
    replica.checkpoint()  # harmless from any connection
    assert replica.delete("resp_2", "k1") and actor.get("resp_2", None) is None


def test_one_key_filling_the_store_evicts_its_own_never_another_within_its_share(
    tmp_path: Path,
) -> None:
    clock = Clock()
    one = _record("resp_f00", clock.now, owner="flood").size()
    store = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=6 * one, clock=clock)
    for n in range(2):
        clock.now += 1
        assert store.put(_record(f"resp_b{n}0", clock.now, owner="quiet"))
    for n in range(20):  # a flood from one key, all newer than the quiet key's two
        clock.now += 1
        assert store.put(_record(f"resp_f{n:02}", clock.now, owner="flood"))
    assert store.get("resp_b00", None) is not None and store.get("resp_b10", None) is not None
    kept = [n for n in range(20) if store.get(f"resp_f{n:02}", None) is not None]
    assert kept == [16, 17, 18, 19] and store.total_bytes <= store.max_bytes
    # A newcomer's share is made from those over theirs: the flood's oldest go.
    clock.now += 1
    assert store.put(_record("resp_c0", clock.now, owner="new"))
    assert store.get("resp_f16", None) is None and store.get("resp_b00", None) is not None
    # Nothing of another's within its share goes for one response that cannot fit its own.
    clock.now += 1
    big = _record("resp_big", clock.now, owner="new", text="x" * (3 * one))
    assert not store.put(big) and store.get("resp_big", None) is None
    assert store.get("resp_b00", None) is not None and store.get("resp_c0", None) is not None


def test_a_background_answer_past_its_keys_share_ends_failed_not_running(tmp_path: Path) -> None:
    clock = Clock()
    one = _record("resp_q0", clock.now, owner="quiet").size()
    store = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=4 * one, clock=clock)
    assert store.put(_record("resp_q0", clock.now, owner="quiet"))
    queued = _record("resp_bg", clock.now, owner="loud", background=True, expires=clock.now + 9)
    queued = queued.model_copy(update={"response": {**queued.response, "status": "queued"}})
    assert store.put(queued)
    answer = {
        **queued.response,
        "status": "completed",
        "output": [_message("assistant", "x" * 4 * one)],
    }
    ended = store.end(queued.model_copy(update={"response": answer, "expires": None}))
    assert ended.status == "failed" and ended.response["output"] == []
    assert ended.response["error"]["code"] == "server_error"
    kept = store.get("resp_bg", "loud")
    assert kept is not None and kept.status == "failed"
    assert store.get("resp_q0", "quiet") is not None  # the other key's, within its share
    small = {**queued.response, "status": "completed"}
    fits = _record("resp_bg2", clock.now, owner="loud").model_copy(update={"response": small})
    assert store.end(fits) == fits and store.get("resp_bg2", "loud") == fits


def test_a_stored_response_is_never_replaced_by_another_keys(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=1 << 20, clock=Clock())
    assert store.put(_record("resp_x", 1.0, owner="k1", text="mine"))
    assert not store.put(_record("resp_x", 2.0, owner="k2", text="theirs"))
    kept = store.get("resp_x", "k1")
    assert kept is not None and kept.response["output"][0]["content"][0]["text"] == "mine"
    assert store.get("resp_x", "k2") is None
    assert store.put(_record("resp_x", 3.0, owner="k1", text="mine again"))  # its own: replaced


def test_the_store_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "r.db"
    store = ResponseStore(path, ttl_s=1e9, max_bytes=1 << 20)
    store.put(_record("resp_x", 1.0))
    files = [path, path.with_name("r.db-wal"), path.with_name("r.db-shm")]
    assert all(f.exists() for f in files)
    assert [oct(f.stat().st_mode & 0o777) for f in files] == [oct(0o600)] * 3
    store.close()
    path.chmod(0o644)  # a file made before: made private when opened again
    ResponseStore(path, ttl_s=1e9, max_bytes=1 << 20).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_background_response_whose_runner_is_gone_reads_as_failed(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.db", ttl_s=1e9, max_bytes=1 << 20, clock=clock)
    running = _record("resp_bg", clock.now, background=True, expires=clock.now + 10)
    running = running.model_copy(update={"response": {**running.response, "status": "queued"}})
    store.put(running)
    assert store.get("resp_bg", "k1").status == "queued"
    clock.now += 11
    lost = store.get("resp_bg", "k1")
    assert lost.status == "failed" and lost.response["error"]["code"] == "server_error"
    assert store.get("resp_bg", None).status == "failed"  # kept so
    cancelled = finished(running, "cancelled")
    assert cancelled.status == "cancelled" and cancelled.expires is None


def test_input_items_have_ids_and_pages() -> None:
    items = [_message("user", "a"), {**_message("assistant", "b"), "id": "msg_b"}]
    items.append(_message("user", "c"))
    listed = listed_items(_record("resp_x1", 0.0, items=items))
    ids = [i["id"] for i in listed]
    assert ids[1] == "msg_b" and len(set(ids)) == 3
    assert listed_items(_record("resp_x1", 0.0, items=items)) == listed  # stable
    first = page(listed, "asc", None, 2)
    assert [i["id"] for i in first["data"]] == ids[:2] and first["has_more"]
    rest = page(listed, "asc", first["last_id"], 2)
    assert [i["id"] for i in rest["data"]] == ids[2:] and not rest["has_more"]
    assert page(listed, "desc", None, 20)["first_id"] == ids[-1]


def _sse(kind: str, doc: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind} | doc) + b"\n\n"


@pytest.mark.parametrize("cut", [1, 7, 40, 10_000])
def test_the_tap_finds_the_final_response_however_the_stream_is_cut(cut: int) -> None:
    final = {"id": "resp_s", "status": "completed", "output": [_message("assistant", "hi")]}
    stream = (
        _sse("response.created", {"response": {"id": "resp_s", "status": "in_progress"}})
        + _sse("response.output_text.delta", {"delta": "response.completed is only text"})
        + _sse("response.completed", {"response": final})
    )
    tap = TerminalTap()
    chunks = [stream[i : i + cut] for i in range(0, len(stream), cut)]
    ends = [tap.feed(chunk) for chunk in chunks]
    assert tap.response == final
    assert ends.index(True) == len(chunks) - 1 and ends.count(True) == 1

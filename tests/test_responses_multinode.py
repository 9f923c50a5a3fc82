"""The Responses store across two real Ray nodes (tests/multinode_responses.py, in its own
process): a replica on the store actor's node uses its file, one on the other node goes through
the actor; a conversation crosses between them, is read and deleted through the actor, and
goes on after Ray restarts the actor while the file is held open."""

from __future__ import annotations

import pytest

from tests.conftest import run_cluster_script

pytestmark = pytest.mark.serve

USER, ASSISTANT = "user", "assistant"


def _conversation(turns: int) -> list[str]:
    """The roles of a turn's items after `turns - 1` earlier turns."""
    return [USER, ASSISTANT] * (turns - 1) + [USER]


def test_the_store_serves_a_replica_on_another_node_through_its_actor() -> None:
    seen = run_cluster_script("tests.multinode_responses")
    near, far = seen["nodes"]
    assert near == seen["head"] == seen["store_node"] and far != seen["head"]
    assert seen["file"] == [True, False]  # only the replica beside the actor opens the file
    assert seen["roles"] == [_conversation(n) for n in (1, 2, 3)]
    assert seen["read"] == {"near resp_3": 200, "far resp_2": 200}
    assert seen["deleted"] is True
    assert seen["after_delete"] == {"near resp_1": 404, "far resp_1": 404}
    assert seen["restarted"] == {
        "far resp_3": 200,
        "far four": _conversation(4),
        "near resp_4": 200,
        "near five": _conversation(5),
        "far resp_5": 200,
    }
    assert seen["same_actor_restarted"] is True

"""Run by tests/test_responses_multinode.py in its own process: a two-node Ray cluster on one
machine. The Responses store's actor is on the head with its file; an ingress replica's store
client (Conversations, as the replica holds it) runs in an actor on the head, which uses the
file itself, and one on the worker node, which does not share the actor's node and goes
through the actor for everything. A conversation goes back and forth between them, is read
and deleted through the actor; then the store actor is killed and Ray restarts it while the
head's client holds the file open. Prints what each step saw as JSON."""

from __future__ import annotations

import json
import os
import tempfile

import orjson
import ray
from ray.cluster_utils import Cluster

from serve_app.cluster.registry.actor import NAMESPACE, RegistryRef
from serve_app.conversations.actor import responses_handle
from serve_app.conversations.service import Conversations
from serve_app.core.errors import RouterError
from serve_app.pickers.plan import PROVIDER_HEADER, Head, Unary

OWNER = "key-1"


@ray.remote(num_cpus=0)
class Replica:
    """An ingress replica's side of the store, on the node it is placed on."""

    def __init__(self, registry: RegistryRef, name: str) -> None:
        self._store = Conversations(lambda: responses_handle(registry), name)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def turn(self, text: str, previous: str | None, answer_id: str) -> list[str]:
        """A turn continuing `previous`, answered `answer_id`; the roles the provider got."""
        body = {"model": "m", "input": text}
        if previous is not None:
            body["previous_response_id"] = previous
        turn = await self._store.begin(orjson.dumps(body), OWNER)
        output = [{"type": "message", "role": "assistant", "content": f"re: {text}"}]
        answer = {"id": answer_id, "object": "response", "status": "completed", "output": output}
        head = Head(200, "application/json", {PROVIDER_HEADER: "p"})
        await self._store.record(turn, Unary(head, orjson.dumps(answer)), lambda _: False)
        return [str(item.get("role")) for item in turn.items]

    async def read(self, response_id: str) -> int:
        """What retrieving it answers: 200, or the error's status."""
        try:
            got = await self._store.get(response_id, OWNER)
        except RouterError as err:
            return err.status
        assert got["id"] == response_id
        return 200

    async def delete(self, response_id: str) -> bool:
        return (await self._store.delete(response_id, OWNER))["deleted"]

    async def uses_the_file(self) -> bool:
        """Whether this replica reads and writes the store's file itself."""
        return await self._store._file() is not None


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1, resources={"far": 1})
        ray.init(address=cluster.address, logging_level="error", log_to_driver=False)
        cluster.wait_for_nodes()
        print(json.dumps(scenario()))
    finally:
        ray.shutdown()
        cluster.shutdown()


def scenario() -> dict[str, object]:
    """What each step saw."""
    registry = RegistryRef(
        name="multinode-responses",
        path=os.path.join(tempfile.mkdtemp(prefix="multinode-"), "registry.json"),
    )
    head = ray.get_runtime_context().get_node_id()  # the driver runs on the head
    near = Replica.options(resources={"node:__internal_head__": 0.001}).remote(registry, "near")
    far = Replica.options(resources={"far": 0.1}).remote(registry, "far")
    report: dict[str, object] = {
        "head": head,
        "nodes": ray.get([near.node.remote(), far.node.remote()]),
        "file": ray.get([near.uses_the_file.remote(), far.uses_the_file.remote()]),
    }
    store = responses_handle(registry)
    report["store_node"] = ray.get(store.where.remote())[0]
    # Started far (through the actor), continued near (the file), continued far again.
    steps = [
        ray.get(far.turn.remote("one", None, "resp_1")),
        ray.get(near.turn.remote("two", "resp_1", "resp_2")),
        ray.get(far.turn.remote("three", "resp_2", "resp_3")),
    ]
    report["roles"] = steps
    report["read"] = {
        "near resp_3": ray.get(near.read.remote("resp_3")),
        "far resp_2": ray.get(far.read.remote("resp_2")),
    }
    report["deleted"] = ray.get(far.delete.remote("resp_1"))
    report["after_delete"] = {
        "near resp_1": ray.get(near.read.remote("resp_1")),
        "far resp_1": ray.get(far.read.remote("resp_1")),
    }
    # The store actor dies and Ray restarts it, while the near replica holds the file open.
    before = store._actor_id.hex()
    ray.kill(store, no_restart=False)
    report["restarted"] = {
        "far resp_3": ray.get(far.read.remote("resp_3")),  # the restarted actor reads the file
        "far four": ray.get(far.turn.remote("four", "resp_3", "resp_4")),
        "near resp_4": ray.get(near.read.remote("resp_4")),  # what it wrote, in the file
        "near five": ray.get(near.turn.remote("five", "resp_4", "resp_5")),
        "far resp_5": ray.get(far.read.remote("resp_5")),
    }
    actor = ray.get_actor(f"{registry.name}-responses", namespace=NAMESPACE)
    report["same_actor_restarted"] = actor._actor_id.hex() == before
    return report


if __name__ == "__main__":
    main()

"""Serve's request router for the picker deployments: calls about a plan (its outcomes, a slot
plan's next provider, a queued plan's wait) and plans the ingress addresses (flow control's
least waited replica) go to the replica their first argument names; every other call to two
random replicas, the less busy of which Serve picks (power of two choices).
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

# Picker methods whose first argument is the replica that booked the plan they are about.
OWNED_CALLS = frozenset({"next", "report", "wait", "plan_at"})


class PlanOwnerRouter(RequestRouter):
    """No FIFO mixin: it hands a replica chosen for one call to the oldest call waiting, which
    would send a report to a replica other than its owner."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.call_method in OWNED_CALLS:
            owner = pending_request.args[0]
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
            # The owner is gone: any replica answers (it knows no such plan).
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

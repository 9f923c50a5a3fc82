"""The ingress replica's door: which key a request carries, whether it may use the model, and
whether its limits allow it now. Leases of allowance from the limiter actor are spent locally,
so a request calls the actor only when its key's lease is spent or over (about once a second
per key and replica under steady load)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ray.actor import ActorHandle

from serve_app.access.keys import KeyRecord, parse_key, verify
from serve_app.access.ledger import LEASE_S, Grant, Refusal, Used
from serve_app.access.limiter import Usage
from serve_app.access.reserve import reservation
from serve_app.cluster.registry.manifest import Manifest
from serve_app.core.config import REQUIRE_KEYS_ENV, RouterConfig
from serve_app.core.errors import RouterError
from serve_app.core.metrics import Tally

log = logging.getLogger("ray.serve")

FLUSH_S = 0.25
# How many verified keys a replica remembers (the manifest's keys; more is a flood of guesses).
MAX_VERIFIED = 10_000
LIMITER_TIMEOUT_S = 2.0
RATELIMITED_METRIC = "llm_router_ratelimited"
TOKENS_METRIC = "llm_router_tokens"


def _unauthorized(message: str, code: str) -> RouterError:
    return RouterError(
        401,
        message,
        type="invalid_request_error",
        code=code,
        headers={"www-authenticate": "Bearer"},
    )


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The client key: `Authorization: Bearer <key>`, else `x-api-key` (Anthropic's clients)."""
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _unauthorized(
                "malformed Authorization header: expected `Bearer <key>`", "invalid_api_key"
            )
        return value.strip()
    return headers.get("x-api-key")


def _reset(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))}s"


def _headers(record: KeyRecord, grant: Grant, extra_requests: int, extra_tokens: int) -> dict:
    """OpenAI's x-ratelimit-* headers for what the key has left in its minute."""
    out: dict[str, str] = {}
    if record.rpm_limit is not None and grant.remaining_requests is not None:
        out["x-ratelimit-limit-requests"] = str(record.rpm_limit)
        out["x-ratelimit-remaining-requests"] = str(
            max(0, grant.remaining_requests + extra_requests)
        )
        out["x-ratelimit-reset-requests"] = _reset(grant.reset_s)
    if record.tpm_limit is not None and grant.remaining_tokens is not None:
        out["x-ratelimit-limit-tokens"] = str(record.tpm_limit)
        out["x-ratelimit-remaining-tokens"] = str(max(0, grant.remaining_tokens + extra_tokens))
        out["x-ratelimit-reset-tokens"] = _reset(grant.reset_s)
    return out


def _limited(record: KeyRecord, grant: Grant, refusal: Refusal) -> RouterError:
    headers = _headers(record, grant, 0, 0) | {"retry-after": str(math.ceil(refusal.retry_after_s))}
    if refusal.reason == "budget":
        return RouterError(
            429,
            f"key {record.name!r} has spent its token budget ({refusal.limit}) for this period",
            type="insufficient_quota",
            code="insufficient_quota",
            headers=headers,
        )
    what = "requests" if refusal.reason == "rpm" else "tokens"
    return RouterError(
        429,
        f"rate limit of key {record.name!r} reached: {refusal.limit} {what} per minute",
        type=what,
        code="rate_limit_exceeded",
        headers=headers,
    )


@dataclass
class _Allowance:
    """This replica's lease for one key: what is left of it, and what it used."""

    grant: Grant | None = None
    until: float = 0.0
    requests: int | None = None
    tokens: int | None = None
    budget: int | None = None
    used: Used = field(default_factory=Used)
    serial: int = 0  # which lease: an answer settles into its own lease if it is still held
    # One call to the limiter at a time per key: a second take would return the first's lease.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def adopt(self, grant: Grant, asked_at: float) -> None:
        self.serial += 1
        self.grant, self.until, self.used = grant, asked_at + LEASE_S, Used()
        self.requests, self.tokens, self.budget = grant.requests, grant.tokens, grant.budget

    def spend(self, tokens: int, now: float) -> bool:
        """One request of `tokens` from the lease, if it is current and has room."""
        if self.grant is None or now >= self.until:
            return False
        if (self.requests is not None and self.requests < 1) or (
            self.tokens is not None and self.tokens < tokens
        ):
            return False
        if self.budget is not None and self.budget < tokens:
            return False
        self.charge(1, tokens)
        return True

    def charge(self, requests: int, tokens: int) -> None:
        """Count against the lease: taken from what is left of it, added to what it used."""
        if self.requests is not None:
            self.requests -= requests
        if self.tokens is not None:
            self.tokens -= tokens
        if self.budget is not None:
            self.budget -= tokens
        u = self.used
        self.used = Used(u.requests + requests, u.tokens + tokens, u.budget + tokens)


PRIORITY_HEADER = "x-priority"


def flow_terms(admission: Admission | None, headers: Mapping[str, str]) -> dict[str, object]:
    """What flow control orders a request by (RequestMeta's priority, tenant, weight): its key's
    priority (or `x-priority`, for a key allowed to set it, at most its ceiling: a client
    cannot raise itself over the others' heads), the key's id and weight; nothing
    without a key (the routing's default_priority then)."""
    if admission is None:
        return {}
    record = admission.record
    priority = record.priority
    sent = headers.get(PRIORITY_HEADER)
    if sent is not None and record.set_priority:
        try:
            priority = int(sent)
        except ValueError:
            priority = 10_000
        if not -1000 <= priority <= 1000:
            raise RouterError(
                400,
                f"{PRIORITY_HEADER} must be an integer from -1000 to 1000",
                param=PRIORITY_HEADER,
            )
        priority = min(priority, record.priority_ceiling)
    return {"priority": priority, "tenant": record.id, "weight": record.weight}


class Admission(NamedTuple):
    record: KeyRecord
    window: int  # the limiter's minute the request was counted in
    estimate: int  # the prompt's estimate
    headers: dict[str, str]
    lease: int = 0  # the serial of the lease it was counted in
    reserved: int = 0  # tokens counted up front: the estimate and what it may generate


class Gate:
    def __init__(self, holder: str, limiter: Callable[[], ActorHandle], tally: Tally) -> None:
        """`holder`: this replica's name at the limiter; `limiter()`: a handle to it."""
        self._holder = holder
        self._make_limiter = limiter
        self._handle: ActorHandle | None = None
        self.tally = tally
        self._records: dict[str, KeyRecord] = {}
        self.required = False
        self._allowances: dict[str, _Allowance] = {}
        # (key id, model, window) -> prompt, completion, requests, estimated, correction: summed
        # between reports, so a report is a few rows whatever the request rate.
        self._reports: dict[tuple[str, str, int], list[int]] = {}
        # Keys seen and verified -> their record id (a repeat skips the parse and the hash).
        self._verified: dict[str, str] = {}
        self._flusher: asyncio.Task[None] | None = None

    def apply(self, manifest: Manifest, config: RouterConfig) -> None:
        """The manifest's keys, and `config` (its effective models config) says if they are
        required."""
        self._records = dict(manifest.keys)
        self._verified = {}
        env = os.environ.get(REQUIRE_KEYS_ENV, "").lower() in ("1", "true", "yes")
        self.required = env or config.auth.require_keys
        for key_id in list(self._allowances):
            if key_id not in self._records:  # revoked: nothing of it to give back
                del self._allowances[key_id]

    def lister(self, headers: Mapping[str, str]) -> Callable[[str, str | None], bool] | None:
        """Which models a request may see listed (`/v1/models`, `/api/tags`, ...): None when
        keys are not required (all); else its key's (401 as for inference), by a model's name
        or the model serving it (a role's)."""
        if not self.required:
            return None
        record = self._key(headers, time.time())
        return lambda name, root: record.allows(name) or (root is not None and record.allows(root))

    def owner(self, headers: Mapping[str, str]) -> str:
        """The id of the key a request carries ("" when keys are not required): what it owns
        (stored responses); 401 as for inference."""
        return self._key(headers, time.time()).id if self.required else ""

    def _key(self, headers: Mapping[str, str], now: float) -> KeyRecord:
        presented = presented_key(headers)
        if not presented:
            raise _unauthorized(
                "this router needs a key: send `Authorization: Bearer <key>`", "missing_api_key"
            )
        known = self._verified.get(presented)
        record = None if known is None else self._records.get(known)
        if record is None:
            parsed = parse_key(presented)
            record = None if parsed is None else self._records.get(parsed[0])
            if parsed is None or record is None or not verify(record, parsed[1]):
                raise _unauthorized("unknown API key", "invalid_api_key")
            if len(self._verified) < MAX_VERIFIED:
                self._verified[presented] = record.id
        if record.expired(now):
            raise _unauthorized(f"key {record.name!r} has expired", "expired_api_key")
        return record

    def _record(self, headers: Mapping[str, str], models: tuple[str, ...], now: float) -> KeyRecord:
        record = self._key(headers, now)
        if not any(record.allows(m) for m in models):
            raise RouterError(
                403,
                f"key {record.name!r} may not use model {models[0][:256]!r}",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
        return record

    async def admit(
        self,
        headers: Mapping[str, str],
        models: tuple[str, ...],
        prompt: int,
        output: Callable[[], int | None],
    ) -> Admission | None:
        """None when keys are not required; else the key's admission for a request naming
        `models` (as sent, and the model serving it: a key may list either), or RouterError
        (401, 403, 429; 503 if the limiter cannot be reached). `prompt`: its prompt estimate;
        `output()`: the most it may generate (reserve.py), read only for a key that limits
        tokens."""
        if not self.required:
            return None
        record = self._record(headers, models, time.time())
        if record.rpm_limit is None and record.tpm_limit is None and record.token_budget is None:
            return Admission(record, 0, prompt, {}, 0, prompt)
        tokens = prompt
        if record.tpm_limit is not None or record.token_budget is not None:
            tokens = reservation(prompt, output(), record.default_max_tokens)
        allowance = self._allowances.setdefault(record.id, _Allowance())
        if not allowance.spend(tokens, time.monotonic()):
            async with allowance.lock:
                asked_at = time.monotonic()
                if not allowance.spend(tokens, asked_at):  # another request may have renewed it
                    grant = await self._take(record, tokens, allowance.used)
                    if grant.refusal is not None:
                        allowance.grant, allowance.used = None, Used()
                        self.tally.inc(RATELIMITED_METRIC, (record.name, grant.refusal.reason))
                        raise _limited(record, grant, grant.refusal)
                    allowance.adopt(grant, asked_at)
                    allowance.spend(tokens, asked_at)
        grant = allowance.grant
        assert grant is not None
        headers = _headers(record, grant, allowance.requests or 0, allowance.tokens or 0)
        return Admission(record, grant.window, prompt, headers, allowance.serial, tokens)

    def _limiter(self) -> ActorHandle:
        if self._handle is None:
            self._handle = self._make_limiter()
        return self._handle

    async def _take(self, record: KeyRecord, tokens: int, used: Used) -> Grant:
        self._start()
        try:
            grant = await asyncio.wait_for(
                self._limiter().take.remote(record.id, self._holder, tokens, used),
                LIMITER_TIMEOUT_S,
            )
        except Exception as exc:
            self._handle = None
            log.warning("limiter call failed", extra={"reason": type(exc).__name__})
            raise RouterError(
                503,
                "the rate limiter is unavailable; retry",
                type="api_error",
                code="limiter_unavailable",
                headers={"retry-after": "1"},
            ) from None
        if grant is None:  # revoked between the manifest and the limiter
            raise _unauthorized("unknown API key", "invalid_api_key")
        return grant

    def settle(
        self, admission: Admission, model: str, prompt: int, completion: int, estimated: bool
    ) -> None:
        """What the answer really used: counted, and its difference from what was reserved
        charged to the lease it was counted in if this replica still holds it (it goes back with
        the lease), else reported to the limiter as a correction."""
        record = admission.record
        correction = prompt + completion - admission.reserved
        allowance = self._allowances.get(record.id)
        if (
            allowance is not None
            and allowance.grant is not None
            and allowance.serial == admission.lease
        ):
            allowance.charge(0, correction)
            correction = 0
        self.tally.inc(TOKENS_METRIC, (model, record.name, "prompt"), prompt)
        self.tally.inc(TOKENS_METRIC, (model, record.name, "completion"), completion)
        row = self._reports.setdefault((record.id, model, admission.window), [0, 0, 0, 0, 0])
        row[0] += prompt
        row[1] += completion
        row[2] += 1
        row[3] += int(estimated)
        row[4] += correction
        self._start()

    def _start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except Exception:
                self._handle = None

    async def flush(self) -> None:
        """Return leases whose time is up, with what they used; send the usage reports."""
        now = time.monotonic()
        limiter = self._limiter()
        for key_id, allowance in list(self._allowances.items()):
            if allowance.grant is None or now < allowance.until or allowance.lock.locked():
                continue
            async with allowance.lock:
                used, allowance.grant, allowance.used = allowance.used, None, Used()
                await asyncio.wait_for(
                    limiter.give_back.remote(key_id, self._holder, used), LIMITER_TIMEOUT_S
                )
        if self._reports:
            batch = [Usage(*where, *row) for where, row in self._reports.items()]
            self._reports = {}
            await asyncio.wait_for(limiter.report.remote(batch), LIMITER_TIMEOUT_S)

    def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()

"""The limiter's books (pure): per key, what was granted in the current minute (requests,
tokens) and budget period (tokens), handed to ingress replicas as short leases.

Exact across replicas: a grant never takes a key past its limits, so whatever replicas hold
adds up to at most the limit. A holder stops using a lease after LEASE_S and returns it with
what it used; the rest is free again. A lease never returned (its replica died) counts as used
in full once GRACE_S has passed: never over the limit. Leases are small when little is left,
so little sits unused in one replica while another is refused. Tokens are granted on what a
request may use (its prompt estimate and its max_tokens: reserve.py) and corrected from the
upstream's usage after the answer, so a key may pass its token limit only by what its requests
in flight use beyond that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from serve_app.access.keys import KeyRecord

WINDOW_S = 60.0
# A holder uses a lease this long (from before it asked), then returns it with what it used.
LEASE_S = 1.0
# A lease not returned this long after it was granted is taken as used in full.
GRACE_S = 5.0
# The largest share of what is left in a window that one lease takes.
LEASE_SHARE = 0.25
Reason = Literal["rpm", "tpm", "budget"]


class Refusal(NamedTuple):
    reason: Reason
    limit: int
    retry_after_s: float


class Used(NamedTuple):
    """What a holder used of its lease: requests, minute tokens, budget tokens (the upstreams'
    counts for answers already in, the estimate for those still running)."""

    requests: int = 0
    tokens: int = 0
    budget: int = 0


class Grant(NamedTuple):
    """Allowance for `holder` until the lease ends: requests, tokens (minute), budget tokens.
    Counts are None for what the key does not limit. `remaining_*`: what is left after it."""

    window: int
    requests: int | None
    tokens: int | None
    budget: int | None
    remaining_requests: int | None
    remaining_tokens: int | None
    reset_s: float
    refusal: Refusal | None = None


@dataclass
class _Lease:
    requests: int
    tokens: int
    budget: int
    until: float


@dataclass
class _Books:
    window: int = -1
    requests: int = 0
    tokens: int = 0
    budget_start: float = -1.0
    budget: int = 0
    leases: dict[str, _Lease] = field(default_factory=dict)
    takers: set[str] = field(default_factory=set)  # replicas that asked in this window


def _share(left: int, wanted: int) -> int:
    """How much of `left` one lease takes: at least `wanted`, at most a share of what is left."""
    return max(wanted, min(left, math.ceil(left * LEASE_SHARE)))


class Ledger:
    def __init__(self) -> None:
        self._books: dict[str, _Books] = {}
        # Tokens counted against budgets, kept across restarts: key id -> (period start, used).
        self.budgets: dict[str, tuple[float, int]] = {}

    def _books_of(self, record: KeyRecord, now: float) -> _Books:
        books = self._books.setdefault(record.id, _Books())
        for holder, lease in list(books.leases.items()):
            if lease.until <= now:  # never returned: counted as used in full
                del books.leases[holder]
        window = int(now // WINDOW_S)
        if books.window != window:
            books.window, books.requests, books.tokens = window, 0, 0
            books.takers = set()
            for lease in books.leases.values():  # leases of the last window count there only
                lease.requests = lease.tokens = 0
        start, _ = record.budget_window(now)
        if books.budget_start != start:
            saved_start, saved = self.budgets.get(record.id, (start, 0))
            books.budget_start, books.budget = start, saved if saved_start == start else 0
        return books

    def _release(self, books: _Books, holder: str, used: Used) -> None:
        """The lease ends: what it held is freed, what it used stays counted."""
        lease = books.leases.pop(holder)
        books.requests += min(used.requests, lease.requests) - lease.requests
        # Tokens as the upstreams counted them: more than the lease when answers ran long.
        books.tokens += used.tokens - lease.tokens
        books.budget += used.budget - lease.budget

    def take(self, record: KeyRecord, holder: str, tokens: int, used: Used, now: float) -> Grant:
        """A lease for one request of `tokens` (what it may use) and, room permitting, more;
        it replaces `holder`'s lease for the key, of which it `used` so much. A refusal when
        even one request does not fit."""
        books = self._books_of(record, now)
        books.takers.add(holder)
        if holder in books.leases:
            self._release(books, holder, used)
        reset = (books.window + 1) * WINDOW_S - now
        refusal = self._refusal(record, books, tokens, now, reset)
        if refusal is not None:
            return Grant(books.window, None, None, None, *self._left(record, books), reset, refusal)
        requests = (
            None if record.rpm_limit is None else _share(record.rpm_limit - books.requests, 1)
        )
        minute = (
            None if record.tpm_limit is None else _share(record.tpm_limit - books.tokens, tokens)
        )
        budget = (
            None
            if record.token_budget is None
            else _share(record.token_budget - books.budget, tokens)
        )
        lease = _Lease(requests or 0, minute or 0, budget or 0, now + GRACE_S)
        books.leases[holder] = lease
        books.requests += lease.requests
        books.tokens += lease.tokens
        books.budget += lease.budget
        self.budgets[record.id] = (books.budget_start, books.budget)
        return Grant(books.window, requests, minute, budget, *self._left(record, books), reset)

    def takers(self, record: KeyRecord, now: float) -> list[str]:
        """The replicas that asked for the key's allowance in this minute: an operator sees
        which ingress replicas share a key's limits. Reads only (an unused key's books stay
        unmade)."""
        books = self._books.get(record.id)
        if books is None or books.window != int(now // WINDOW_S):
            return []
        return sorted(books.takers)

    def _left(self, record: KeyRecord, books: _Books) -> tuple[int | None, int | None]:
        requests = None if record.rpm_limit is None else record.rpm_limit - books.requests
        tokens = None if record.tpm_limit is None else record.tpm_limit - books.tokens
        return requests, tokens

    def _refusal(
        self, record: KeyRecord, books: _Books, tokens: int, now: float, reset: float
    ) -> Refusal | None:
        if record.token_budget is not None and books.budget >= record.token_budget:
            _, end = record.budget_window(now)
            return Refusal("budget", record.token_budget, end - now)
        if record.rpm_limit is not None and books.requests >= record.rpm_limit:
            return Refusal("rpm", record.rpm_limit, reset)
        if (
            record.tpm_limit is not None
            and books.tokens + min(tokens, record.tpm_limit) > record.tpm_limit
        ):
            return Refusal("tpm", record.tpm_limit, reset)
        return None

    def give_back(self, record: KeyRecord, holder: str, used: Used, now: float) -> None:
        """`holder` is done with its lease, of which it used `used`."""
        books = self._books_of(record, now)
        if holder in books.leases:
            self._release(books, holder, used)
            self.budgets[record.id] = (books.budget_start, books.budget)

    def correct(self, record: KeyRecord, window: int, tokens: int, now: float) -> None:
        """The upstream used `tokens` more (or fewer, if negative) than was granted for them."""
        books = self._books_of(record, now)
        if window == books.window:
            books.tokens = max(0, books.tokens + tokens)
        books.budget = max(0, books.budget + tokens)
        self.budgets[record.id] = (books.budget_start, books.budget)

"""Client keys (pure): made, stored only as a salted hash, recognised in constant time.

A key reads `sk-sr-<id>-<secret>`: the id finds its record without trying every salt, the
secret is checked against the record's salted SHA-256 with `hmac.compare_digest`. Only the
record (no secret) is kept in the registry's manifest and shown by the admin API.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "sk-sr-"
_KEY = re.compile(r"^sk-sr-([0-9a-f]{16})-([A-Za-z0-9_-]{43})$")
BudgetPeriod = Literal["1h", "1d", "30d"]
PERIOD_S: dict[str, float] = {"1h": 3600.0, "1d": 86400.0, "30d": 30 * 86400.0}


class KeyLimits(BaseModel):
    """What a key may use; None: no limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$")
    models: tuple[str, ...] | None = Field(default=None, min_length=1)
    rpm_limit: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm_limit: int | None = Field(default=None, ge=1, le=10_000_000_000)
    token_budget: int | None = Field(default=None, ge=1, le=10**15)
    budget_period: BudgetPeriod | None = None
    expires_at: float | None = Field(default=None, gt=0)
    # Counted at admission, with the prompt, for a request that names no max_tokens (against
    # tpm_limit and token_budget until its real usage settles it); None: nothing more.
    default_max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    # Flow control: the key's requests wait by priority (higher first), then by fair share
    # between keys (`weight`); `set_priority`: its clients may send `x-priority` instead, at
    # most `max_priority` (None: the key's own priority).
    priority: int = Field(default=0, ge=-1000, le=1000)
    weight: float = Field(default=1.0, gt=0, le=1000)
    set_priority: bool = False
    max_priority: int | None = Field(default=None, ge=-1000, le=1000)

    @property
    def priority_ceiling(self) -> int:
        """The highest priority the key's clients may ask for with `x-priority`."""
        return self.priority if self.max_priority is None else self.max_priority


class KeyRecord(KeyLimits):
    id: str
    salt: str
    digest: str
    created: float

    def public(self) -> dict[str, object]:
        """What the admin API shows: everything but the salt and the hash."""
        return self.model_dump(exclude={"salt", "digest"})

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def budget_window(self, now: float) -> tuple[float, float]:
        """The current budget period [start, end): from the key's creation, period after
        period; without a period the budget is for the key's whole life."""
        if self.budget_period is None:
            return self.created, float("inf")
        length = PERIOD_S[self.budget_period]
        start = self.created + ((now - self.created) // length) * length
        return start, start + length


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def new_key(limits: KeyLimits, now: float) -> tuple[KeyRecord, str]:
    """A new record and the key itself (shown once, never stored)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    record = KeyRecord(
        **limits.model_dump(), id=key_id, salt=salt, digest=_digest(salt, secret), created=now
    )
    return record, f"{PREFIX}{key_id}-{secret}"


def parse_key(presented: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    match = _KEY.match(presented)
    return None if match is None else (match.group(1), match.group(2))


def verify(record: KeyRecord, secret: str) -> bool:
    return hmac.compare_digest(_digest(record.salt, secret), record.digest)

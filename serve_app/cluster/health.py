"""Circuit breaking per provider: pure state, driven by the monitor actor's probes and by trips
that picker replicas report after consecutive failed requests."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from serve_app.routing.load import LoadSignal


class Circuit(str, Enum):
    CLOSED = "closed"  # in service
    OPEN = "open"  # out of service until its cooldown ends
    HALF_OPEN = "half_open"  # cooldown over: one trial probe decides


CIRCUIT_LEVEL = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


@dataclass
class Breaker:
    failures_to_open: int
    cooldown_s: float
    state: Circuit = Circuit.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    reason: str = ""

    def _open(self, reason: str, now: float) -> None:
        self.state, self.opened_at, self.reason, self.failures = Circuit.OPEN, now, reason, 0

    def record(self, ok: bool, reason: str, now: float) -> bool:
        """A probe's result (the trial's, when half-open); True when the state changed."""
        if self.state is Circuit.OPEN:
            return False
        if ok:
            changed = self.state is not Circuit.CLOSED
            self.state, self.failures, self.reason = Circuit.CLOSED, 0, ""
            return changed
        self.failures += 1
        if self.state is Circuit.HALF_OPEN or self.failures >= self.failures_to_open:
            self._open(reason, now)
            return True
        return False

    def trip(self, reason: str, now: float) -> bool:
        """A replica saw `failures_to_open` requests fail in a row; True when it opened now."""
        if self.state is Circuit.OPEN:
            return False
        self._open(reason, now)
        return True

    def trial_due(self, now: float) -> bool:
        """Open past its cooldown: goes half-open, and the caller sends the one trial probe."""
        if self.state is Circuit.OPEN and now >= self.opened_at + self.cooldown_s:
            self.state = Circuit.HALF_OPEN
            return True
        return False


class HealthView(BaseModel):
    """What replicas follow: providers out of service (open or half-open), and the load
    signals of those that report any (routing.load), by id."""

    model_config = ConfigDict(frozen=True)

    version: int = 0
    out: dict[str, Circuit] = Field(default_factory=dict)
    load: dict[str, LoadSignal] = Field(default_factory=dict)

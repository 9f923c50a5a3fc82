"""The engine's scheduler and its simulated clock, as vLLM's V1 scheduler behaves (pure).

Each step: the running requests first, in arrival order, each its next tokens (the rest of its
prompt in chunks of what the step's token budget leaves, else one decode token); when the cache
has no room for one, the last running request is preempted (its blocks freed, recomputed from
scratch later, first in the queue). Then, if nothing was preempted, waiting requests join while
the budget and `max_num_seqs` allow: each looks up its longest cached prefix (at most all but the
last prompt token, which must be computed to sample), takes those blocks and new ones for what it
computes. Blocks that become full are cached when they are scheduled, as vLLM does. A step ends
after the profile's time for its work; a request whose tokens are all computed then samples one.

The clock is the caller's (`advance(until)`): nothing here sleeps, so tests drive it exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.demo.vllm_sim.kv_cache import Block, KVCache, chain_hashes
from serve_app.demo.vllm_sim.profiles import Profile
from serve_app.routing.kv.events import Event


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    output_plan: list[int]  # the tokens it will sample, one per step (max_tokens of them)
    arrival: float = 0.0
    intake: float = 0.0  # from its server's receipt to the engine: rendering, tokenizing
    all_token_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # of the full blocks of all_token_ids
    blocks: list[Block] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = -1  # the prefix hit at its first scheduling
    num_preemptions: int = 0
    token_times: list[float] = field(default_factory=list)
    finished_at: float | None = None
    finish_reason: str | None = None
    # Called after each sampled token but the last (a stream's), and at the end.
    on_token: Callable[[Request], None] | None = None
    on_finish: Callable[[Request], None] | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_output(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)


@dataclass
class Counters:
    """vLLM's counters: prefix-cache queries and hits in tokens, as its /metrics has them."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    steps: int = 0


@dataclass
class Step:
    scheduled: dict[Request, int]
    start: float
    end: float


class Engine:
    def __init__(
        self,
        profile: Profile,
        events: bool = True,
        on_events: Callable[[list[Event]], None] | None = None,
        on_finished: Callable[[Request], None] | None = None,
    ) -> None:
        self.profile = profile
        self.cache = KVCache(profile.num_gpu_blocks, profile.block_size, events)
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.counters = Counters()
        self.clock = 0.0
        self.step: Step | None = None
        self._on_events = on_events
        self._on_finished = on_finished

    def add(self, request: Request) -> None:
        """A request arrives now (the clock must have been advanced to now)."""
        request.arrival = self.clock
        request.hashes = chain_hashes(request.all_token_ids, self.profile.block_size, [])
        self.waiting.append(request)

    def next_event(self) -> float | None:
        """When the step in flight ends (None: idle until a request arrives)."""
        return self.step.end if self.step else None

    def advance(self, until: float) -> None:
        """Runs every step that ends by `until`; leaves the clock at `until` or, if a step is
        in flight then, at its start."""
        while True:
            if self.step is None:
                self.step = self._schedule()
                if self.step is None:
                    self.clock = max(self.clock, until)
                    return
            if self.step.end > until:
                return
            self.clock = self.step.end
            self._complete(self.step)
            self.step = None

    def _schedule(self) -> Step | None:
        budget = self.profile.max_num_batched_tokens
        scheduled: dict[Request, int] = {}
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(len(request.all_token_ids) - request.num_computed, budget)
            while not self._grow(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                scheduled[request] = n
                budget -= n
                i += 1
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.profile.max_num_seqs
        ):
            request = self.waiting[0]
            n = self._admit(request, budget)
            if n is None:
                break
            self.waiting.popleft()
            self.running.append(request)
            scheduled[request] = n
            budget -= n
        if not scheduled:
            self._drop_unfit()
            return None
        self.counters.steps += 1
        if self._on_events is not None and (events := self.cache.take_events()):
            self._on_events(events)
        return Step(scheduled, self.clock, self.clock + self._duration(scheduled))

    def _admit(self, request: Request, budget: int) -> int | None:
        """Takes the request's cached prefix and blocks for its next chunk; None: no room."""
        size = self.profile.block_size
        hit = self.cache.cached_prefix(request.hashes[: (len(request.all_token_ids) - 1) // size])
        computed = len(hit) * size
        n = min(len(request.all_token_ids) - computed, budget)
        needed = -(-(computed + n) // size) - len(hit)
        idle_hits = sum(1 for b in hit if b.ref_cnt == 0)  # leave the free queue when taken
        if needed > self.cache.num_free - idle_hits:
            return None
        self.cache.touch(hit)
        new = self.cache.allocate(needed)
        assert new is not None  # counted above
        request.blocks = [*hit, *new]
        request.num_computed = computed
        self.counters.prefix_queries += len(request.all_token_ids)
        self.counters.prefix_hits += computed
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = computed
            self.counters.prompt_tokens += len(request.prompt_token_ids)
            self.counters.cached_prompt_tokens += computed
        self._cache_full(request, len(hit), computed + n)
        return n

    def _grow(self, request: Request, n: int) -> bool:
        """Blocks for `n` more tokens of a running request; False: the cache is full."""
        size = self.profile.block_size
        needed = -(-(request.num_computed + n) // size) - len(request.blocks)
        if needed > 0:
            new = self.cache.allocate(needed)
            if new is None:
                return False
            request.blocks.extend(new)
        self._cache_full(request, request.num_computed // size, request.num_computed + n)
        return True

    def _cache_full(self, request: Request, cached_blocks: int, tokens: int) -> None:
        full = min(tokens // self.profile.block_size, len(request.hashes))
        self.cache.cache(request.blocks, request.hashes, request.all_token_ids, cached_blocks, full)

    def _preempt(self, request: Request) -> None:
        self.cache.free(request.blocks)
        request.blocks = []
        request.num_computed = 0
        request.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(request)

    def _drop_unfit(self) -> None:
        """Nothing runs and the first waiting request still finds no room: it never will."""
        if not self.running and self.waiting:
            request = self.waiting.popleft()
            self._finish(request, "abort")

    def _duration(self, scheduled: dict[Request, int]) -> float:
        prefill = pairs = decode = kv = 0
        for request, n in scheduled.items():
            if n == 1 and request.num_computed >= len(request.prompt_token_ids):
                decode += 1
                kv += request.num_computed
            else:
                prefill += n
                pairs += n * request.num_computed + n * (n + 1) // 2
        return self.profile.step_seconds(prefill, pairs, decode, kv)

    def _complete(self, step: Step) -> None:
        size = self.profile.block_size
        for request, n in step.scheduled.items():
            if request.finished_at is not None:  # aborted meanwhile
                continue
            request.num_computed += n
            if request.num_computed < len(request.all_token_ids):
                continue  # a prefill chunk: nothing to sample yet
            request.all_token_ids.append(request.output_plan[request.num_output])
            request.hashes = chain_hashes(request.all_token_ids, size, request.hashes)
            request.token_times.append(step.end)
            self.counters.generation_tokens += 1
            if request.num_output >= len(request.output_plan):
                self.running.remove(request)
                self.cache.free(request.blocks)
                request.blocks = []
                self._finish(request, "length")
            elif request.on_token is not None:
                request.on_token(request)

    def abort(self, request: Request) -> None:
        """The client went away: the request leaves the engine and frees its blocks."""
        if request.finished_at is not None:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self.cache.free(request.blocks)
        request.blocks = []
        self._finish(request, "abort")

    def _finish(self, request: Request, reason: str) -> None:
        request.finished_at = self.clock
        request.finish_reason = reason
        if reason == "length":
            self.counters.finished += 1
        if request.on_finish is not None:
            request.on_finish(request)
        if self._on_finished is not None:
            self._on_finished(request)

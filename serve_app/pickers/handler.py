"""llm-router's ModelHandler / ApiModelConfig / ApiModel, over the validated config.

The picker replicas plan every request through a ModelHandler, so these llm-router interfaces
and the served path are the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from serve_app.core.config import (
    LOAD_AWARE,
    ModelConfig,
    ProviderConfig,
    RouterConfig,
    RoutingConfig,
    StrategyName,
    default_strategy,
    load_config,
)
from serve_app.core.errors import adapter_unavailable, model_not_found
from serve_app.core.schemas import Endpoint, RequestMeta
from serve_app.routing.load import load_figure
from serve_app.routing.selection import (
    Candidates,
    ProviderState,
    candidate_tiers,
    initial_states,
    plan_attempts,
)
from serve_app.routing.strategies import KvView, Stats, Strategy, make_strategy, predicted_hit
from serve_app.upstreams.base import upstream_model

if TYPE_CHECKING:
    from serve_app.pickers.shared import SharedState

SECRET_FIELDS = frozenset({"api_token", "model_path"})


@dataclass(frozen=True)
class ApiModel:
    id: str
    api_host: str
    api_token: SecretStr
    api_type: str
    input_size: int
    model_path: str
    weight: float
    keep_alive: str | None
    tool_calling: bool

    @classmethod
    def from_config(cls, provider: ProviderConfig | dict[str, Any]) -> ApiModel:
        p = (
            provider
            if isinstance(provider, ProviderConfig)
            else ProviderConfig.model_validate(provider)
        )
        return cls(
            p.id,
            p.api_host,
            p.api_token,
            p.api_type,
            p.input_size,
            p.model_path,
            p.weight,
            p.keep_alive,
            p.tool_calling,
        )


def sanitized(provider: ProviderConfig) -> dict[str, Any]:
    """A provider's public view: no token, no upstream model path."""
    return provider.model_dump(exclude=set(SECRET_FIELDS))


class ApiModelConfig:
    """Active model name -> its configuration (llm-router's `models_configs`)."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.models_configs: dict[str, ModelConfig] = {}
        self.routing: dict[str, RoutingConfig] = {}
        for group in config.model_types.values():
            for name, model in group.models.items():
                self.models_configs[name] = model
                self.routing[name] = group.routing

    def active_names(self) -> dict[str, list[str]]:
        return {t: list(g.models) for t, g in self.config.model_types.items()}


class ModelHandler:
    def __init__(
        self,
        models_config_path: str | None = None,
        provider_chooser: StrategyName | None = None,
        *,
        config: RouterConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        previous: ModelHandler | None = None,
        default: StrategyName | None = None,
        unplaced: frozenset[str] = frozenset(),
    ) -> None:
        """`provider_chooser`: one strategy for every model; else each model type's routing
        strategy, else `default` (see config.default_strategy). `previous`: the handler this
        one replaces, so providers that stay keep their load and health, and models their
        strategy's state. `unplaced`: registered adapters loaded nowhere right now (answered
        503 adapter_unavailable, not 404)."""
        self.unplaced = unplaced
        self.api_model_config = ApiModelConfig(config or load_config(models_config_path))
        models = self.api_model_config.models_configs
        before = previous.states if previous else {}
        self.states: dict[str, ProviderState] = {
            pid: before.get(pid, state)
            for pid, state in initial_states(list(models.values())).items()
        }
        fallback = default_strategy(default)
        self.strategy_names: dict[str, StrategyName] = {
            name: provider_chooser or self.api_model_config.routing[name].strategy or fallback
            for name in models
        }
        self.strategies: dict[str, Strategy] = {}
        routing = self.api_model_config.routing
        for name, strategy in self.strategy_names.items():
            block_size = models[name].kv_block_size
            kept = (
                previous is not None
                and previous.strategy_names.get(name) == strategy
                and previous.api_model_config.routing.get(name) == routing[name]
                and getattr(previous.api_model_config.models_configs.get(name), "kv_block_size", 0)
                == block_size
            )
            self.strategies[name] = (
                previous.strategies[name]
                if previous and kept
                else make_strategy(strategy, routing[name], block_size=block_size)
            )
        self.clock = clock

    def _model(self, model_name: str) -> ModelConfig:
        model = self.api_model_config.models_configs.get(model_name)
        if model is None:
            if model_name in self.unplaced:
                raise adapter_unavailable(model_name)
            raise model_not_found(model_name)
        return model

    def candidates(self, meta: RequestMeta) -> Candidates:
        """The providers this request may go to (see selection.candidate_tiers)."""
        return candidate_tiers(meta.model, self._model(meta.model), meta, self.states, self.clock())

    def with_room(
        self, meta: RequestMeta, candidates: Candidates, max_load: float | None
    ) -> Candidates | None:
        """The candidates below `max_load` (their load figure, see routing.load); None when
        none is (the model is full). Last-resort candidates (all cooling down) are kept."""
        if max_load is None or candidates.last_resort:
            return candidates
        tiers = [
            [
                p
                for p in tier
                if load_figure(
                    self.states[p.id].in_flight,
                    self.states[p.id].signal,
                    upstream_model(p, meta.model),
                )
                < max_load
            ]
            for tier in candidates.tiers
        ]
        return Candidates(tiers) if any(tiers) else None

    def in_flight(self) -> dict[str, int]:
        """This handler's requests under way, per provider."""
        return {pid: s.in_flight for pid, s in self.states.items()}

    def stats(
        self,
        meta: RequestMeta,
        candidates: Candidates,
        prefix: Sequence[int] = (),
        shared: SharedState | None = None,
        kv: KvView | None = None,
    ) -> Stats:
        """What the model's strategy looks at for this request: in-flight counts, the shared
        counts (with `shared`), and for the load-aware strategies the load figures of candidates
        that report load, the prompt's text block hashes (meta.text_blocks) with the shared
        index, the session; for the cost (prefix_affinity, kv_aware) the candidates' load
        signals and the prompt's tokens; for kv_aware its KV block keys (`prefix`), what the
        engines hold of them (`kv`) and the prefill this replica queued on each."""
        in_flight = self.in_flight()
        stats = shared.stats(meta.model, in_flight) if shared else Stats(in_flight=in_flight)
        strategy = self.strategy_names[meta.model]
        if strategy not in LOAD_AWARE:
            return stats
        load = {}  # providers with signals (the others: their in-flight count)
        for tier in candidates.tiers:
            for p in tier:
                signal = self.states[p.id].signal
                if signal is not None:
                    load[p.id] = load_figure(in_flight[p.id], signal, upstream_model(p, meta.model))
        index = shared.index if shared else None
        stats = replace(
            stats, load=load, text_blocks=meta.text_blocks, index=index, session=meta.session
        )
        if strategy not in ("prefix_affinity", "kv_aware"):
            return stats
        providers = [p for tier in candidates.tiers for p in tier]
        signals = {p.id: s for p in providers if (s := self.states[p.id].signal) is not None}
        stats = replace(stats, signals=signals, prompt_tokens=meta.prompt_tokens)
        if strategy != "kv_aware":
            return stats
        held = self._predicted_hits(meta, kv.match(prefix)) if kv is not None and prefix else None
        return replace(
            stats,
            prefix=prefix,
            held=held,
            queued_prefill={p.id: self.states[p.id].queued_prefill for p in providers},
        )

    def _predicted_hits(self, meta: RequestMeta, held: Mapping[str, int]) -> dict[str, int]:
        """Per provider holding some of the prompt (`held`: its leading blocks, as the index
        matches them), the tokens its engine should report cached."""
        size = self._model(meta.model).kv_block_size
        return {pid: predicted_hit(n, size, meta.prompt_tokens) for pid, n in held.items()}

    def order(self, model_name: str, candidates: Candidates, stats: Stats) -> list[ProviderConfig]:
        """The candidates in the model's strategy order, capped per tier (plan_attempts)."""
        return plan_attempts(
            candidates,
            self.strategies[model_name],
            stats,
            self.api_model_config.routing[model_name].max_attempts,
        )

    def plan(self, meta: RequestMeta) -> list[ProviderConfig]:
        """Every provider to try for this request, by this handler's own counts."""
        candidates = self.candidates(meta)
        return self.order(meta.model, candidates, self.stats(meta, candidates))

    def get_model_provider(self, model_name: str) -> ApiModel:
        """The provider the strategy picks now for a small, tool-less request."""
        self._model(model_name)
        meta = RequestMeta(Endpoint.CHAT, model_name, False, 0, False, "")
        return ApiModel.from_config(self.plan(meta)[0])

    def list_active_models(self) -> dict[str, dict[str, dict[str, Any]]]:
        """By model type: each active model with its first primary provider, secrets removed."""
        return {
            group: {
                name: sanitized(self.api_model_config.models_configs[name].providers[0])
                for name in names
            }
            for group, names in self.api_model_config.active_names().items()
        }

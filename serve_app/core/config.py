"""llm-router's `models-config.json`, validated once so a bad file stops the router at start.

Only models listed in `active_models` are loaded and validated (as in llm-router: an unlisted
model is ignored even if present). Every problem is reported with the file and the JSON path of
the field.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

CONFIG_ENV = "LLM_ROUTER_MODELS_CONFIG"
DEFAULT_CONFIG_PATH = "configs/models-config.json"

ApiType = Literal["openai", "vllm", "ollama"]
STRATEGY_ENV = "LLM_ROUTER_BALANCE_STRATEGY"
# llm-router's strategies (balanced is its default), then this router's own.
StrategyName = Literal[
    "balanced",
    "weighted",
    "dynamic_weighted",
    "first_available",
    "first_available_optim",
    "first_available_optim_nworkers",
    "weighted_random",
    "round_robin",
    "least_in_flight",
    "least_loaded",
    "prefix_affinity",
    "session_affinity",
    "kv_aware",
]
DEFAULT_STRATEGY: StrategyName = "balanced"
# Strategies that hold a slot (a lease) on the provider for the whole request.
SLOT_STRATEGIES = frozenset(
    {"first_available", "first_available_optim", "first_available_optim_nworkers"}
)
# Strategies that look at upstream load signals (and prompt prefixes, sessions).
LOAD_AWARE = frozenset({"least_loaded", "prefix_affinity", "session_affinity", "kv_aware"})

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Go's time.ParseDuration (what Ollama accepts) or a plain number of seconds.
_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$|^-?\d+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Top-level keys that are not model types.
RESERVED_KEYS = frozenset({"active_models", "routing", "auth", "responses"})
REQUIRE_KEYS_ENV = "LLM_ROUTER_REQUIRE_KEYS"

log = logging.getLogger(__name__)


def duration_s(text: str) -> float:
    """A keep_alive value (validated by ProviderConfig) in seconds; negative means forever."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("-")
    if body.isdigit():
        return sign * float(body)
    return sign * sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(body))


class ConfigError(ValueError):
    """A config file that cannot be served; carries every problem found, not just the first."""

    def __init__(
        self, source: str, problems: list[tuple[str, str]], kind: str = "models config"
    ) -> None:
        self.source = source
        self.problems = problems
        # One line (file, JSON path, reason; every problem): what a terminal and a log show.
        found = "; ".join(f"{path}: {why}" for path, why in problems)
        super().__init__(f"invalid {kind} {source}: {found}")


def json_path(parts: Iterable[str | int]) -> str:
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}"
        else:
            out += f'["{part}"]'
    return out


def _expand_env(value: str) -> str:
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


def masked_tokens(raw: object) -> object:
    """A models config as the admin API may show it: every non-empty `api_token` replaced."""
    if isinstance(raw, dict):
        return {k: ("***" if k == "api_token" and v else masked_tokens(v)) for k, v in raw.items()}
    if isinstance(raw, list):
        return [masked_tokens(v) for v in raw]
    return raw


class KvEventsEndpoints(BaseModel):
    """A vLLM provider's `--kv-events-config` endpoints and topic, as given to vLLM
    (docs/routing-kv.md): where it publishes its KV-cache events and replays lost ones."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str = Field(pattern=r"^(tcp|ipc)://")
    replay_endpoint: str | None = Field(default=None, pattern=r"^(tcp|ipc)://")
    topic: str = ""


class KvAwareKnobs(BaseModel):
    """kv_aware's costs, in prompt tokens (routing/kv/score.py; defaults: a first cut for an
    H100 serving Llama-3.1-8B, where a step's overhead is worth about 200 prefill tokens and a
    decode of 8k tokens of context about 15 per step)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    waiting_request_tokens: float = Field(512.0, ge=0)
    running_request_tokens: float = Field(16.0, ge=0)
    saturation_threshold: float = Field(0.9, ge=0, lt=1)
    saturation_tokens: float = Field(8192.0, ge=0)


class ProviderConfig(BaseModel):
    """One upstream endpoint. Unknown keys are kept (llm-router's files may carry more)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    api_host: str
    api_token: SecretStr = SecretStr("")
    api_type: ApiType
    input_size: int = Field(gt=0)
    model_path: str = ""
    weight: float = Field(default=1.0, ge=0)
    keep_alive: str | None = None
    tool_calling: bool = False
    max_concurrency: int | None = Field(default=None, gt=0)
    # Parallel requests the provider takes under first_available_optim_nworkers.
    nworkers: int = 1
    # What first_available_optim calls a host (one model server); default: api_host's host:port.
    host: str | None = None
    # A vLLM server started with VLLM_ENABLE_RESPONSES_API_STORE=1 keeps the Responses it
    # makes: continuations of them go back to it first (docs/dialects.md).
    responses_store: bool = False
    # kv_aware: where this vLLM publishes its KV-cache events (its --kv-events-config).
    kv_events: KvEventsEndpoints | None = None

    @model_validator(mode="after")
    def _store_on_vllm(self) -> ProviderConfig:
        if self.responses_store and self.api_type != "vllm":
            raise ValueError("responses_store: only vllm providers keep responses")
        if self.kv_events is not None and self.api_type != "vllm":
            raise ValueError("kv_events: only vllm providers publish KV-cache events")
        return self

    @cached_property
    def host_key(self) -> str:
        return self.host or (urlsplit(self.api_host).netloc or self.api_host)

    @field_validator("nworkers", mode="before")
    @classmethod
    def _nworkers(cls, value: object) -> int:
        """llm-router's rule: a missing, invalid or non-positive value is 1, with a warning."""
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdigit():
            number = int(value)
        if number is None or number < 1:
            log.warning("provider nworkers %r is not a positive integer; using 1", value)
            return 1
        return number

    @field_validator("api_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return value

    @field_validator("api_token", mode="before")
    @classmethod
    def _token_from_env(cls, value: object) -> object:
        if value is None:
            return ""
        return _expand_env(value) if isinstance(value, str) else value

    @field_validator("input_size", mode="before")
    @classmethod
    def _numeric_string(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("must be an integer or a numeric string")
        if isinstance(value, str):
            if not value.strip().isdigit():
                raise ValueError("must be an integer or a numeric string")
            return int(value)
        return value

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if value is None or value == "":
            return None
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _DURATION.match(value):
            raise ValueError('must be null, "" or a duration such as "35m", "1h30m", "600"')
        return value


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    providers: list[ProviderConfig] = Field(min_length=1)
    providers_sleep: list[ProviderConfig] = Field(default_factory=list)
    # An active model that serves this one's requests when none of its providers can.
    fallback_model: str | None = Field(default=None, min_length=1)
    # kv_aware: a Hugging Face tokenizer folder on every router node (tokenizer.json,
    # tokenizer_config.json, the chat template) to render and tokenize prompts as the servers
    # do, and the servers' KV block size (vLLM's --block-size: 16 on GPUs).
    tokenizer: str | None = Field(default=None, min_length=1)
    kv_block_size: int = Field(default=16, ge=1, le=4096)

    def routes_by_text(self, strategy: StrategyName | None) -> bool:
        """Whether its requests carry their prompt's text block hashes (routing.prefix):
        under prefix_affinity, and under kv_aware with a tokenizer when a provider publishes no
        KV events (what that one holds is guessed from the text routed to it)."""
        if strategy == "prefix_affinity":
            return True
        everyone = (*self.providers, *self.providers_sleep)
        return (
            strategy == "kv_aware"
            and self.tokenizer is not None
            and any(p.kv_events is None for p in everyone)
        )


class Autoscaling(BaseModel):
    """Ray Serve's autoscaling of a deployment, under Serve's names; what is not set takes
    Serve's default (target_ongoing_requests 2, upscale_delay_s 30, downscale_delay_s 600,
    look_back_period_s 30, metrics_interval_s 10)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float | None = Field(default=None, gt=0)
    upscale_delay_s: float | None = Field(default=None, ge=0)
    downscale_delay_s: float | None = Field(default=None, ge=0)
    look_back_period_s: float | None = Field(default=None, gt=0)
    metrics_interval_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self

    def serve_config(self) -> dict[str, float]:
        """Serve's `autoscaling_config`."""
        return self.model_dump(exclude_none=True)


def replicas_options(num_replicas: int, autoscaling: Autoscaling | None) -> dict[str, object]:
    """A deployment's replica options: a fixed count, or Serve's autoscaling."""
    if autoscaling is None:
        return {"num_replicas": num_replicas}
    return {"num_replicas": "auto", "autoscaling_config": autoscaling.serve_config()}


def exclusive_with_autoscaling(model: BaseModel, count_field: str, autoscaling_field: str) -> None:
    """A fixed replica count and autoscaling are one or the other."""
    fields = model.model_fields_set
    if count_field in fields and getattr(model, autoscaling_field) is not None:
        raise ValueError(f"{count_field} and {autoscaling_field} exclude each other")


class RoutingConfig(BaseModel):
    """How one model type's picker deployment chooses, retries and times out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: $LLM_ROUTER_BALANCE_STRATEGY where the app is built, else `balanced`.
    strategy: StrategyName | None = None
    max_attempts: int = Field(default=3, ge=1, le=20)
    num_replicas: int = Field(default=1, ge=1)
    # Serve's autoscaling of this type's picker deployment instead of num_replicas.
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: int = Field(default=1000, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Covers the wait for the first byte and every gap between chunks after it.
    read_timeout_s: float = Field(default=300.0, gt=0)
    unhealthy_cooldown_s: float = Field(default=5.0, ge=0)
    # The whole request, failover included; a client's `x-request-timeout` may only shorten it.
    request_timeout_s: float = Field(default=600.0, gt=0)
    health_check_interval_s: float = Field(default=5.0, gt=0)
    health_check_timeout_s: float = Field(default=2.0, gt=0)
    # Consecutive failed probes (or requests, in one replica) that open a provider's circuit.
    circuit_failures: int = Field(default=3, ge=1)
    circuit_cooldown_s: float = Field(default=10.0, gt=0)
    # How long a replica being stopped (scale-down, redeploy) keeps serving what it has.
    drain_timeout_s: float = Field(default=60.0, ge=0)
    # first_available*: how long a request waits for a free provider before 503 (or fallback).
    wait_timeout_s: float = Field(default=60.0, gt=0)
    # A replica's slots return to the pool this long after it stops renewing them (it died).
    lease_s: float = Field(default=10.0, ge=1.0)
    # first_available_optim*: a host stays pinned to the model it served for this long idle.
    pin_ttl_s: float = Field(default=300.0, gt=0)
    # dynamic_weighted: weight of the newest latency sample in the moving average.
    latency_alpha: float = Field(default=0.3, gt=0, le=1)
    # prefix_affinity (and kv_aware's providers without KV events): prompts are hashed in
    # blocks of this many characters (UTF-8 bytes), and each provider's index keeps this many
    # recently routed block hashes.
    prefix_block_chars: int = Field(default=256, ge=16, le=65536)
    prefix_index_entries: int = Field(default=10000, ge=1, le=1_000_000)
    # prefix_affinity, session_affinity: their choice is taken only while its load (requests,
    # see routing.load) is at most this much above the least loaded candidate's (for
    # prefix_affinity an outer bound on its cost's choice).
    max_load_imbalance: float = Field(default=4.0, ge=0)
    # kv_aware, prefix_affinity: the costs they weigh a provider's cached prefix against its
    # queue with.
    kv_aware: KvAwareKnobs = KvAwareKnobs()
    # Flow control (docs/flow-control.md), on when set: a request for a model whose providers
    # are all full waits this long in its picker (capped by its own deadline), then 429.
    queue_timeout_s: float | None = Field(default=None, gt=0)
    # The waiting requests per model and picker replica: how many, how many body bytes.
    queue_max_requests: int = Field(default=1000, ge=1)
    queue_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # A provider is full at this load figure (upstream running + waiting, KV use; see
    # routing.load), besides its max_concurrency; None: by max_concurrency alone.
    max_load: float | None = Field(default=None, gt=0)
    # The priority of requests without a client key (keys have their own, default 0).
    default_priority: int = Field(default=0, ge=-1000, le=1000)
    # What an upstream may send (docs/dialects.md#upstream-bounds): a unary answer, whole, and
    # one event of a stream (an SSE event, an Ollama line); past them the client gets a 502.
    max_answer_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_event_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _replicas(self) -> RoutingConfig:
        exclusive_with_autoscaling(self, "num_replicas", "autoscaling")
        return self

    def picker_ongoing(self, models: int) -> int:
        """Calls a picker replica takes at once: max_ongoing_requests, plus with flow control
        room for every model's full queue (each waiting request holds a call there)."""
        waiting = self.queue_max_requests * models if self.queue_timeout_s is not None else 0
        return self.max_ongoing_requests + waiting


class ModelTypeConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    models: dict[str, ModelConfig]
    routing: RoutingConfig


class AuthConfig(BaseModel):
    """The models config's `auth` block."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Every inference request needs a client key (admin API: /api/v1/keys); also
    # $LLM_ROUTER_REQUIRE_KEYS=1.
    require_keys: bool = False


class ResponsesConfig(BaseModel):
    """The models config's `responses` block: how long and how much of the OpenAI Responses
    the router keeps for `previous_response_id` and the id routes (oldest evicted first)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_ttl_s: float = Field(default=30 * 86400.0, gt=0)  # OpenAI keeps them 30 days
    max_bytes: int = Field(default=1 << 30, ge=1)
    # Background responses running at once on one ingress replica, in all and of one key.
    max_background: int = Field(default=64, ge=1)
    max_background_per_key: int = Field(default=8, ge=1)


class RouterConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    model_types: dict[str, ModelTypeConfig]
    auth: AuthConfig = AuthConfig()
    responses: ResponsesConfig = ResponsesConfig()

    def model_type_of(self) -> dict[str, str]:
        return {m: t.name for t in self.model_types.values() for m in t.models}


_MODEL = TypeAdapter(ModelConfig)


def _problems(exc: ValidationError, prefix: list[str | int]) -> list[tuple[str, str]]:
    return [(json_path([*prefix, *err["loc"]]), err["msg"]) for err in exc.errors()]


def _routing(raw: object, types: set[str]) -> tuple[dict[str, RoutingConfig], list]:
    problems: list[tuple[str, str]] = []
    if raw is None:
        return {t: RoutingConfig() for t in types}, problems
    if not isinstance(raw, Mapping):
        return {}, [("$.routing", "must be an object of model type -> routing options")]
    default: dict[str, Any] = {}
    if "default" in raw:
        try:
            default = dict(raw["default"])
            RoutingConfig.model_validate(default)
        except (TypeError, ValueError) as exc:
            problems += _problem_list(exc, ["routing", "default"])
            default = {}
    out: dict[str, RoutingConfig] = {}
    for key in raw:
        if key != "default" and key not in types:
            problems.append((json_path(["routing", key]), "not an active model type"))
    for name in types:
        try:
            out[name] = RoutingConfig.model_validate({**default, **dict(raw.get(name) or {})})
        except (TypeError, ValueError) as exc:
            problems += _problem_list(exc, ["routing", name])
    return out, problems


def _problem_list(exc: Exception, prefix: list[str | int]) -> list[tuple[str, str]]:
    if isinstance(exc, ValidationError):
        return _problems(exc, prefix)
    return [(json_path(prefix), "must be an object")]


def parse_config(raw: object, source: str = "<memory>") -> RouterConfig:
    """Validate a decoded models-config document; raise ConfigError naming every bad field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(source, [("$", "must be a JSON object")])
    active = raw.get("active_models")
    if not isinstance(active, Mapping):
        why = "is required" if active is None else "must be an object of model type -> names"
        raise ConfigError(source, [("$.active_models", why)])

    problems: list[tuple[str, str]] = []
    models_by_type: dict[str, dict[str, ModelConfig]] = {}
    seen_models: dict[str, str] = {}
    for type_name, names in active.items():
        path = ["active_models", type_name]
        if type_name in RESERVED_KEYS or not isinstance(raw.get(type_name), Mapping):
            problems.append((json_path(path), "no model type of that name in the file"))
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append((json_path(path), "must be a list of model names"))
            continue
        loaded: dict[str, ModelConfig] = {}
        for i, model_name in enumerate(names):
            if model_name in seen_models:
                problems.append(
                    (json_path([*path, i]), f"model already active under {seen_models[model_name]}")
                )
                continue
            seen_models[model_name] = type_name
            if model_name not in raw[type_name]:
                problems.append((json_path([*path, i]), f"model not defined under {type_name}"))
                continue
            try:
                loaded[model_name] = _MODEL.validate_python(raw[type_name][model_name])
            except ValidationError as exc:
                problems += _problems(exc, [type_name, model_name])
        if loaded:
            models_by_type[type_name] = loaded

    problems += _duplicate_ids(models_by_type)
    problems += _fallback_problems(models_by_type)
    routing, routing_problems = _routing(raw.get("routing"), set(models_by_type))
    problems += routing_problems
    auth = AuthConfig()
    try:
        auth = AuthConfig.model_validate(raw.get("auth") or {})
    except ValidationError as exc:
        problems += _problems(exc, ["auth"])
    responses = ResponsesConfig()
    try:
        responses = ResponsesConfig.model_validate(raw.get("responses") or {})
    except ValidationError as exc:
        problems += _problems(exc, ["responses"])
    if problems:
        raise ConfigError(source, problems)
    if not models_by_type:
        raise ConfigError(source, [("$.active_models", "no active model")])
    return RouterConfig(
        source=source,
        model_types={
            t: ModelTypeConfig(name=t, models=m, routing=routing[t])
            for t, m in models_by_type.items()
        },
        auth=auth,
        responses=responses,
    )


def _duplicate_ids(models_by_type: dict[str, dict[str, ModelConfig]]) -> list[tuple[str, str]]:
    first_seen: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for type_name, models in models_by_type.items():
        for model_name, model in models.items():
            for tier in ("providers", "providers_sleep"):
                for i, provider in enumerate(getattr(model, tier)):
                    path = json_path([type_name, model_name, tier, i, "id"])
                    if provider.id in first_seen:
                        problems.append(
                            (
                                path,
                                f"duplicate provider id {provider.id!r} (first at "
                                f"{first_seen[provider.id]})",
                            )
                        )
                    else:
                        first_seen[provider.id] = path
    return problems


def _fallback_problems(models_by_type: dict[str, dict[str, ModelConfig]]) -> list:
    active = {name for models in models_by_type.values() for name in models}
    problems: list[tuple[str, str]] = []
    for type_name, models in models_by_type.items():
        for name, model in models.items():
            target = model.fallback_model
            if target is None:
                continue
            path = json_path([type_name, name, "fallback_model"])
            if target == name:
                problems.append((path, "a model cannot fall back to itself"))
            elif target not in active:
                problems.append((path, f"{target!r} is not an active model"))
    return problems


_STRATEGY = TypeAdapter(StrategyName)


def default_strategy(value: str | None = None) -> StrategyName:
    """The strategy of model types whose routing names none: `value`, else
    $LLM_ROUTER_BALANCE_STRATEGY, else `balanced`."""
    name = value or os.environ.get(STRATEGY_ENV) or DEFAULT_STRATEGY
    try:
        return _STRATEGY.validate_python(name)
    except ValidationError:
        choices = ", ".join(StrategyName.__args__)
        raise ConfigError(
            STRATEGY_ENV, [("$", f"unknown strategy {name!r}; one of {choices}")], "setting"
        ) from None


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The file named by the argument, else $LLM_ROUTER_MODELS_CONFIG, else the default."""
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def read_json(file: Path, kind: str = "models config") -> tuple[object, str]:
    """A decoded (not yet validated) JSON document and its source name."""
    source = str(file)
    try:
        data = file.read_bytes()
    except OSError as exc:
        why = f"cannot read file: {exc.strerror or exc}"
        raise ConfigError(source, [("$", why)], kind) from None
    try:
        return orjson.loads(data), source
    except orjson.JSONDecodeError as exc:
        raise ConfigError(source, [("$", f"not valid JSON: {exc}")], kind) from None


def read_raw(path: str | os.PathLike[str] | None = None) -> tuple[object, str]:
    """The models config document named by `path` (see config_path), for parse_config."""
    return read_json(config_path(path))


def load_config(path: str | os.PathLike[str] | None = None) -> RouterConfig:
    return parse_config(*read_raw(path))

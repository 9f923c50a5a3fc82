"""The registry's manifest: models config, profiles, LoRA adapter versions, one version number.

Pure data and rules, no Ray and no HTTP: the registry actor applies them and persists the result,
and every replica derives the config it routes with from `effective_config`.

An adapter version is loaded on vLLM under its own name, `<adapter>@v<version>`, so two versions
can be loaded side by side during a rolling update; the client always names the bare adapter.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import (
    ConfigError,
    ModelConfig,
    ModelTypeConfig,
    ProviderConfig,
    RouterConfig,
    json_path,
    parse_config,
)
from serve_app.errors import RouterError
from serve_app.profiles import DEFAULT_PROFILE, Role, parse_profiles

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED_KEYS = frozenset({"active_models", "routing"})


class AdapterVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = Field(ge=1)
    source: str
    sha256: str | None = None
    created: float
    # Provider ids on which this version is loaded now.
    loaded: tuple[str, ...] = ()
    # The manifest version that replaced it; set once it is retiring.
    retired_in: int | None = None


class Adapter(BaseModel):
    model_config = ConfigDict(frozen=True)

    base_model: str
    current: AdapterVersion
    # Older versions still loaded somewhere: unloaded once no replica has a request on them.
    retiring: tuple[AdapterVersion, ...] = ()


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = 0
    config_source: str = ""
    models_config: dict[str, Any] | None = None
    profiles: dict[str, Any] | None = None
    profiles_source: str = ""
    active_profile: str = DEFAULT_PROFILE
    adapters: dict[str, Adapter] = Field(default_factory=dict)  # adapter name -> adapter

    def roles(self) -> dict[str, Role]:
        """The active profile's roles (none without profiles); ConfigError if it is missing."""
        if self.profiles is None:
            return {}
        return parse_profiles(self.profiles, self.profiles_source).roles(self.active_profile)


class AdapterRegistration(BaseModel):
    """`POST /api/v1/adapters`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1)
    name: str = Field(min_length=1)
    source: str = Field(min_length=1, description="path or URI vLLM loads the adapter from")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class WeightsUpdate(BaseModel):
    """`POST /api/v1/weights`: new weights for some providers of one model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    weights: dict[str, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(min_length=1)


def with_weights(manifest: Manifest, update: WeightsUpdate) -> Manifest:
    """The manifest with these provider weights written into its models config (a new version,
    like a reload); ConfigError naming what does not fit."""
    raw = copy.deepcopy(manifest.models_config)
    source = manifest.config_source
    where = [
        t
        for t, names in raw.get("active_models", {}).items()
        if isinstance(names, list) and update.model in names
    ]
    if not where:
        raise ConfigError(source, [("$.model", f"{update.model!r} is not an active model")])
    model = raw[where[0]][update.model]
    problems: list[tuple[str, str]] = []
    seen = set()
    for tier in ("providers", "providers_sleep"):
        for provider in model.get(tier, []):
            if provider.get("id") in update.weights:
                provider["weight"] = update.weights[provider["id"]]
                seen.add(provider["id"])
    for pid in sorted(set(update.weights) - seen):
        problems.append((json_path(["weights", pid]), f"no provider {pid!r} in {update.model}"))
    if problems:
        raise ConfigError(source, problems)
    return with_config(manifest, raw, source)


def lora_name(name: str, number: int) -> str:
    """The name vLLM serves one adapter version under."""
    return f"{name}@v{number}"


def config_of(manifest: Manifest) -> RouterConfig:
    if manifest.models_config is None:
        raise ConfigError("<registry>", [("$", "no models config published yet")])
    return parse_config(manifest.models_config, manifest.config_source)


def providers_by_id(config: RouterConfig) -> dict[str, ProviderConfig]:
    return {
        p.id: p
        for group in config.model_types.values()
        for model in group.models.values()
        for p in (*model.providers, *model.providers_sleep)
    }


def defined_model_names(raw: Mapping[str, Any]) -> set[str]:
    """Every model the file defines, active or not: adapter names may not take any of them."""
    return {
        name
        for key, group in raw.items()
        if key not in _RESERVED_KEYS and isinstance(group, Mapping)
        for name in group
    }


def with_config(manifest: Manifest, raw: object, source: str) -> Manifest:
    """The manifest with this models config, or the same manifest if nothing changed.

    Raises ConfigError, as at start, for a document that does not validate or that defines a
    model under the name of a registered adapter.
    """
    parse_config(raw, source)
    assert isinstance(raw, Mapping)  # parse_config refuses anything else
    clashes = [
        (json_path([adapter.base_model]), f"model {name!r} is the name of a registered adapter")
        for name, adapter in manifest.adapters.items()
        if name in defined_model_names(raw)
    ]
    if clashes:
        raise ConfigError(source, clashes)
    if raw == manifest.models_config and source == manifest.config_source:
        return manifest
    return manifest.model_copy(
        update={
            "version": manifest.version + 1,
            "models_config": dict(raw),
            "config_source": source,
        }
    )


def with_profiles(manifest: Manifest, raw: object, source: str, active: str) -> Manifest:
    """The manifest with these profiles, or the same one; ConfigError if they do not validate
    or lack the active profile."""
    parse_profiles(raw, source).roles(active)
    assert isinstance(raw, Mapping)
    unchanged = (raw, source, active) == (
        manifest.profiles,
        manifest.profiles_source,
        manifest.active_profile,
    )
    if unchanged:
        return manifest
    update = {"profiles": dict(raw), "profiles_source": source, "active_profile": active}
    return manifest.model_copy(update={"version": manifest.version + 1, **update})


def check_registration(manifest: Manifest, req: AdapterRegistration) -> list[ProviderConfig]:
    """The vLLM providers to load the adapter on; RouterError (4xx) for a request to refuse."""
    config = config_of(manifest)
    models = {m: g.models[m] for g in config.model_types.values() for m in g.models}
    base = models.get(req.base_model)
    if base is None:
        raise RouterError(
            404,
            f"unknown base model {req.base_model!r}: not an active model",
            code="unknown_base_model",
            param="base_model",
        )
    if not ADAPTER_NAME.match(req.name):
        raise RouterError(
            400,
            "adapter name must be 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            code="invalid_adapter_name",
            param="name",
        )
    assert manifest.models_config is not None
    if req.name in defined_model_names(manifest.models_config):
        raise RouterError(
            409, f"{req.name!r} is already a model name", code="adapter_name_clash", param="name"
        )
    existing = manifest.adapters.get(req.name)
    if existing is not None and existing.base_model != req.base_model:
        raise RouterError(
            409,
            f"adapter {req.name!r} is registered for base model {existing.base_model!r}",
            code="adapter_name_clash",
            param="name",
        )
    targets = [p for p in (*base.providers, *base.providers_sleep) if p.api_type == "vllm"]
    if not targets:
        raise RouterError(
            400,
            f"base model {req.base_model!r} has no vLLM provider; LoRA adapters are loaded only "
            "on vLLM providers (not on ollama or openai ones)",
            code="no_vllm_provider",
            param="base_model",
        )
    return targets


def with_new_version(
    manifest: Manifest, req: AdapterRegistration, loaded: list[str], now: float
) -> Manifest:
    """The manifest where `req` is the adapter's current version, loaded on `loaded`."""
    version = manifest.version + 1
    existing = manifest.adapters.get(req.name)
    retiring: tuple[AdapterVersion, ...] = ()
    number = 1
    if existing is not None:
        number = existing.current.version + 1
        old = existing.current.model_copy(update={"retired_in": version})
        retiring = (*existing.retiring, old) if old.loaded else existing.retiring
    current = AdapterVersion(
        version=number, source=req.source, sha256=req.sha256, created=now, loaded=tuple(loaded)
    )
    adapter = Adapter(base_model=req.base_model, current=current, retiring=retiring)
    return manifest.model_copy(
        update={"version": version, "adapters": {**manifest.adapters, req.name: adapter}}
    )


def with_unloaded(manifest: Manifest, name: str, number: int, unloaded: set[str]) -> Manifest:
    """The manifest after a retiring version was unloaded from `unloaded` providers."""
    adapter = manifest.adapters[name]
    retiring = []
    for old in adapter.retiring:
        if old.version == number:
            old = old.model_copy(
                update={"loaded": tuple(p for p in old.loaded if p not in unloaded)}
            )
        if old.loaded:
            retiring.append(old)
    adapter = adapter.model_copy(update={"retiring": tuple(retiring)})
    return manifest.model_copy(
        update={"version": manifest.version + 1, "adapters": {**manifest.adapters, name: adapter}}
    )


def retiring_names(manifest: Manifest) -> set[str]:
    return {
        lora_name(name, old.version) for name, a in manifest.adapters.items() for old in a.retiring
    }


def _adapter_model(base: ModelConfig, name: str, version: AdapterVersion) -> ModelConfig | None:
    """The base model's providers that have this version loaded, asked for it by its vLLM name."""
    upstream = {"model_path": lora_name(name, version.version)}

    def tier(providers: list[ProviderConfig]) -> list[ProviderConfig]:
        return [p.model_copy(update=upstream) for p in providers if p.id in version.loaded]

    primaries, sleeping = tier(base.providers), tier(base.providers_sleep)
    if not primaries and not sleeping:
        return None
    return ModelConfig(
        providers=primaries or sleeping, providers_sleep=sleeping if primaries else []
    )


def effective_config(manifest: Manifest) -> RouterConfig:
    """The models config plus one routable model per adapter whose base model is active."""
    config = config_of(manifest)
    groups = {t: dict(g.models) for t, g in config.model_types.items()}
    type_of = config.model_type_of()
    for name, adapter in manifest.adapters.items():
        group = type_of.get(adapter.base_model)
        if group is None:
            continue
        model = _adapter_model(groups[group][adapter.base_model], name, adapter.current)
        if model is not None:
            groups[group][name] = model
    return RouterConfig(
        source=config.source,
        model_types={
            t: ModelTypeConfig(name=t, models=models, routing=config.model_types[t].routing)
            for t, models in groups.items()
        },
    )


def adapter_report(manifest: Manifest) -> list[dict[str, Any]]:
    """`GET /api/v1/adapters`: each adapter's current version and, per provider, what is loaded."""
    try:
        config = config_of(manifest)
    except ConfigError:
        return []
    models = {m: g.models[m] for g in config.model_types.values() for m in g.models}
    out = []
    for name, adapter in sorted(manifest.adapters.items()):
        base = models.get(adapter.base_model)
        providers = [] if base is None else [*base.providers, *base.providers_sleep]
        rows = []
        for p in providers:
            versions = [v.version for v in (adapter.current, *adapter.retiring) if p.id in v.loaded]
            row: dict[str, Any] = {"provider": p.id, "api_type": p.api_type}
            if p.api_type != "vllm":
                row |= {
                    "status": "unsupported",
                    "detail": f"LoRA adapters are not supported on {p.api_type} providers",
                }
            else:
                status = "current" if adapter.current.version in versions else "missing"
                row |= {"status": status, "loaded_versions": versions}
            rows.append(row)
        current = adapter.current
        out.append(
            {
                "name": name,
                "base_model": adapter.base_model,
                "base_model_active": base is not None,
                "version": current.version,
                "source": current.source,
                "sha256": current.sha256,
                "created": current.created,
                "retiring_versions": [v.version for v in adapter.retiring],
                "providers": rows,
            }
        )
    return out

"""The registry's manifest: models config, profiles, LoRA adapter versions, one version number.

Pure data and rules, no Ray and no HTTP: the registry actor applies them and persists the result,
and every replica derives the config it routes with from `effective_config`. The adapter rules
are in `adapters`.

An adapter version is loaded on vLLM under its own name, `<adapter>@v<version>`, so two versions
can be loaded side by side during a rolling update; the client always names the bare adapter.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from serve_app.access.keys import KeyRecord
from serve_app.core.config import (
    RESERVED_KEYS,
    ConfigError,
    ModelConfig,
    ModelTypeConfig,
    ProviderConfig,
    RouterConfig,
    json_path,
    parse_config,
)
from serve_app.provision.profiles import DEFAULT_PROFILE, Role, parse_profiles

_LORA_NAME = re.compile(r"@v[0-9]+$")


class AdapterVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = Field(ge=1)
    source: str
    sha256: str | None = None
    created: float
    # Provider ids on which this version is loaded now.
    loaded: tuple[str, ...] = ()


class Adapter(BaseModel):
    """A registered adapter: clients name it, it routes to its current version."""

    model_config = ConfigDict(frozen=True)

    base_model: str
    current: AdapterVersion


class RetiringVersion(AdapterVersion):
    """A version replaced by a newer one, or of a deleted adapter, still loaded somewhere: it is
    unloaded once no replica has a request on it."""

    adapter: str
    # The manifest version that stopped routing to it.
    retired_in: int

    @property
    def lora(self) -> str:
        return lora_name(self.adapter, self.version)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: int = 0
    config_source: str = ""
    models_config: dict[str, Any] | None = None
    profiles: dict[str, Any] | None = None
    profiles_source: str = ""
    active_profile: str = DEFAULT_PROFILE
    adapters: dict[str, Adapter] = Field(default_factory=dict)  # adapter name -> adapter
    retiring: tuple[RetiringVersion, ...] = ()
    keys: dict[str, KeyRecord] = Field(default_factory=dict)  # client key id -> its record

    def roles(self) -> dict[str, Role]:
        """The active profile's roles (none without profiles); ConfigError if it is missing."""
        if self.profiles is None:
            return {}
        return parse_profiles(self.profiles, self.profiles_source).roles(self.active_profile)


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


def is_lora_name(name: str | None) -> bool:
    """Whether an upstream model name is one of `lora_name`'s."""
    return name is not None and _LORA_NAME.search(name) is not None


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
        if key not in RESERVED_KEYS and isinstance(group, Mapping)
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


def _adapter_model(base: ModelConfig, name: str, version: AdapterVersion) -> ModelConfig | None:
    """The base model's providers that have this version loaded, asked for it by its vLLM name."""
    upstream = {"model_path": lora_name(name, version.version)}

    def tier(providers: list[ProviderConfig]) -> list[ProviderConfig]:
        return [p.model_copy(update=upstream) for p in providers if p.id in version.loaded]

    primaries, sleeping = tier(base.providers), tier(base.providers_sleep)
    if not primaries and not sleeping:
        return None
    return ModelConfig(
        providers=primaries or sleeping,
        providers_sleep=sleeping if primaries else [],
        tokenizer=base.tokenizer,  # kv_aware: the base model's, on the base's servers
        kv_block_size=base.kv_block_size,
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
        auth=config.auth,
        responses=config.responses,
    )


def unplaced_adapters(manifest: Manifest, config: RouterConfig) -> frozenset[str]:
    """Registered adapters that `config` (the manifest's effective config) routes nowhere: no
    server has their current version loaded right now, so a retry may succeed."""
    return frozenset(manifest.adapters) - set(config.model_type_of())


def with_key(manifest: Manifest, record: KeyRecord) -> Manifest:
    return manifest.model_copy(
        update={"version": manifest.version + 1, "keys": {**manifest.keys, record.id: record}}
    )


def without_key(manifest: Manifest, key_id: str) -> Manifest:
    keys = {k: v for k, v in manifest.keys.items() if k != key_id}
    return manifest.model_copy(update={"version": manifest.version + 1, "keys": keys})

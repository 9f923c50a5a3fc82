"""LoRA adapter rules on the manifest: registration, versions, retirement, deletion, and keeping
what the manifest says is loaded equal to what each vLLM server lists.

Pure, no Ray and no HTTP: the registry actor makes the calls (`lora`) and applies these rules.
A version counts as loaded on a provider only while that server lists it under its vLLM name
with the version's source as `root`: a restarted vLLM has forgotten its adapters, and a server
that does not answer may be restarting, so neither is routed adapter requests until it lists the
version again (the registry loads it there first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from serve_app.cluster.registry.manifest import (
    Adapter,
    AdapterVersion,
    Manifest,
    RetiringVersion,
    config_of,
    defined_model_names,
    lora_name,
    providers_by_id,
)
from serve_app.core.config import ConfigError, ProviderConfig, RouterConfig
from serve_app.core.errors import RouterError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# What one vLLM server lists (`GET /v1/models`): model id -> root (the path an adapter was loaded
# from; "" if the server does not say); None when it did not answer.
Listing = Mapping[str, str] | None


class AdapterRegistration(BaseModel):
    """`POST /api/v1/adapters`."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1)
    name: str = Field(min_length=1)
    source: str = Field(min_length=1, description="path or URI vLLM loads the adapter from")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class Load(NamedTuple):
    """A current version to load on a provider that answered without listing it."""

    adapter: str
    version: int
    provider: ProviderConfig
    source: str

    @property
    def lora(self) -> str:
        return lora_name(self.adapter, self.version)


def _vllm_providers(config: RouterConfig) -> dict[str, list[ProviderConfig]]:
    """Each active model's vLLM providers (both tiers)."""
    return {
        name: [p for p in (*model.providers, *model.providers_sleep) if p.api_type == "vllm"]
        for group in config.model_types.values()
        for name, model in group.models.items()
    }


def _targets(manifest: Manifest) -> dict[str, list[ProviderConfig]]:
    """Each live adapter's vLLM providers (those of its base model; none if that is not active,
    or without a models config). The config is parsed once for all adapters."""
    try:
        by_model = _vllm_providers(config_of(manifest))
    except ConfigError:
        return {}
    return {name: by_model.get(a.base_model, []) for name, a in manifest.adapters.items()}


def check_registration(manifest: Manifest, req: AdapterRegistration) -> list[ProviderConfig]:
    """The vLLM providers to load the adapter on; RouterError (4xx) for a request to refuse."""
    config = config_of(manifest)
    if req.base_model not in config.model_type_of():
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
    targets = _vllm_providers(config)[req.base_model]
    if not targets:
        raise RouterError(
            400,
            f"base model {req.base_model!r} has no vLLM provider; LoRA adapters are loaded only "
            "on vLLM providers (not on ollama or openai ones)",
            code="no_vllm_provider",
            param="base_model",
        )
    return targets


def next_number(manifest: Manifest, name: str) -> int:
    """The adapter's next version number: past every version still loaded anywhere, so that a
    name deleted and registered again never reuses a vLLM name that is still loaded."""
    numbers = [r.version for r in manifest.retiring if r.adapter == name]
    if name in manifest.adapters:
        numbers.append(manifest.adapters[name].current.version)
    return max(numbers, default=0) + 1


def _retire(name: str, version: AdapterVersion, retired_in: int) -> tuple[RetiringVersion, ...]:
    if not version.loaded:
        return ()
    return (RetiringVersion(**version.model_dump(), adapter=name, retired_in=retired_in),)


def with_new_version(
    manifest: Manifest, req: AdapterRegistration, loaded: list[str], now: float
) -> Manifest:
    """The manifest where `req` is the adapter's current version, loaded on `loaded`."""
    version = manifest.version + 1
    existing = manifest.adapters.get(req.name)
    retiring = manifest.retiring
    if existing is not None:
        retiring += _retire(req.name, existing.current, version)
    current = AdapterVersion(
        version=next_number(manifest, req.name),
        source=req.source,
        sha256=req.sha256,
        created=now,
        loaded=tuple(loaded),
    )
    adapters = {**manifest.adapters, req.name: Adapter(base_model=req.base_model, current=current)}
    return manifest.model_copy(
        update={"version": version, "adapters": adapters, "retiring": retiring}
    )


def without_adapter(manifest: Manifest, name: str) -> Manifest:
    """The manifest where the adapter is no longer a model; its versions retire (and are
    unloaded once no request uses them). KeyError if there is no such adapter."""
    adapter = manifest.adapters[name]
    version = manifest.version + 1
    adapters = {k: v for k, v in manifest.adapters.items() if k != name}
    retiring = manifest.retiring + _retire(name, adapter.current, version)
    return manifest.model_copy(
        update={"version": version, "adapters": adapters, "retiring": retiring}
    )


def _with_retiring(manifest: Manifest, retiring: list[RetiringVersion]) -> Manifest:
    """The manifest with these retiring versions, less those loaded nowhere any more."""
    return manifest.model_copy(
        update={
            "version": manifest.version + 1,
            "retiring": tuple(r for r in retiring if r.loaded),
        }
    )


def with_unloaded(manifest: Manifest, lora: str, unloaded: set[str]) -> Manifest:
    """The manifest after a retiring version was unloaded from `unloaded` providers."""
    retiring = [
        r.model_copy(update={"loaded": tuple(p for p in r.loaded if p not in unloaded)})
        if r.lora == lora
        else r
        for r in manifest.retiring
    ]
    return _with_retiring(manifest, retiring)


def retiring_names(manifest: Manifest) -> set[str]:
    return {r.lora for r in manifest.retiring}


def watched(manifest: Manifest) -> dict[str, ProviderConfig]:
    """The vLLM providers whose listing matters: those of live adapters' base models, and those
    still holding a retiring version."""
    try:
        config = config_of(manifest)
    except ConfigError:
        return {}
    by_model = _vllm_providers(config)
    out = {p.id: p for a in manifest.adapters.values() for p in by_model.get(a.base_model, [])}
    known = providers_by_id(config)
    for r in manifest.retiring:
        out |= {pid: known[pid] for pid in r.loaded if pid in known}
    return out


def _lists(listing: Listing, lora: str, source: str) -> bool:
    """Whether the server lists this version: its name, from its source (when it says)."""
    return listing is not None and listing.get(lora) in (source, "")


def with_listings(manifest: Manifest, listings: Mapping[str, Listing]) -> Manifest:
    """The manifest where, for every provider in `listings`, a version is loaded exactly when that
    server lists it; providers not in `listings` keep what the manifest says. The same manifest
    when nothing changed."""

    def agreed(lora: str, v: AdapterVersion, targets: list[str]) -> tuple[str, ...]:
        kept = [p for p in v.loaded if p not in listings or _lists(listings[p], lora, v.source)]
        found = [
            p for p in targets if p not in v.loaded and _lists(listings.get(p), lora, v.source)
        ]
        return tuple(kept + found)

    adapters = {}
    targets_of = _targets(manifest)
    for name, a in manifest.adapters.items():
        targets = [p.id for p in targets_of.get(name, [])]
        current = a.current.model_copy(
            update={"loaded": agreed(lora_name(name, a.current.version), a.current, targets)}
        )
        adapters[name] = a.model_copy(update={"current": current})
    retiring = [r.model_copy(update={"loaded": agreed(r.lora, r, [])}) for r in manifest.retiring]
    if adapters == manifest.adapters and tuple(retiring) == manifest.retiring:
        return manifest
    return _with_retiring(manifest, retiring).model_copy(update={"adapters": adapters})


def loads_due(manifest: Manifest, listings: Mapping[str, Listing]) -> list[Load]:
    """Current versions missing on a target provider that answered: to load there."""
    targets_of = _targets(manifest)
    return [
        Load(name, a.current.version, p, a.current.source)
        for name, a in manifest.adapters.items()
        for p in targets_of.get(name, [])
        if p.id not in a.current.loaded and listings.get(p.id) is not None
    ]


def with_loaded(manifest: Manifest, loads: list[Load]) -> Manifest:
    """The manifest after these loads succeeded, as one new version; loads of a version that is
    no longer current are ignored. The same manifest if nothing is new."""
    adapters = dict(manifest.adapters)
    for load in loads:
        a = adapters.get(load.adapter)
        if a is None or a.current.version != load.version or load.provider.id in a.current.loaded:
            continue
        loaded = (*a.current.loaded, load.provider.id)
        current = a.current.model_copy(update={"loaded": loaded})
        adapters[load.adapter] = a.model_copy(update={"current": current})
    if adapters == manifest.adapters:
        return manifest
    return manifest.model_copy(update={"version": manifest.version + 1, "adapters": adapters})


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
        retiring = [r for r in manifest.retiring if r.adapter == name]
        rows = []
        for p in providers:
            versions = [v.version for v in (adapter.current, *retiring) if p.id in v.loaded]
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
                "retiring_versions": [r.version for r in retiring],
                "providers": rows,
            }
        )
    return out

"""monGARS's `configs/llm_models.json`: profiles of roles, each role a model with defaults.

`profiles -> <name> -> models -> <role>`; a role is the model name (shorthand) or an object with
`name`, `provider` (default ollama), `auto_download` (default true), `parameters`, `description`
and optional LoRA `adapters`. Role names are matched case-insensitively. A role name is accepted
as the `model` of an inference request; its `parameters` are defaults the request overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.core.config import ConfigError, json_path, read_json

PROFILES_PATH_ENV = "LLM_MODELS_CONFIG"
DEFAULT_PROFILES_PATH = "configs/llm_models.json"
PROFILE_ENV = "LLM_MODELS_PROFILE"
DEFAULT_PROFILE = "default"
KIND = "models profiles"


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    auto_update: bool = False


class Role(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    provider: str = "ollama"
    auto_download: bool = True
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    adapters: tuple[AdapterSpec, ...] = ()


class Profiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    profiles: dict[str, dict[str, Role]]  # profile -> lower-cased role -> role

    def roles(self, profile: str) -> dict[str, Role]:
        if profile not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(
                self.source, [("$.profiles", f"no profile {profile!r} (known: {known})")], KIND
            )
        return self.profiles[profile]


def parse_profiles(raw: object, source: str = "<memory>") -> Profiles:
    """Validate a decoded llm_models.json; ConfigError names every bad field by JSON path."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("profiles"), Mapping):
        raise ConfigError(source, [("$.profiles", "must be an object of profile -> models")], KIND)
    problems: list[tuple[str, str]] = []
    out: dict[str, dict[str, Role]] = {}
    for name, profile in raw["profiles"].items():
        models = profile.get("models") if isinstance(profile, Mapping) else None
        if not isinstance(models, Mapping):
            problems.append((json_path(["profiles", name, "models"]), "must be an object"))
            continue
        roles: dict[str, Role] = {}
        for role_name, spec in models.items():
            path: list[str | int] = ["profiles", name, "models", role_name]
            key = role_name.lower()
            if key in roles:
                problems.append((json_path(path), "role names differ only in case"))
                continue
            try:
                roles[key] = Role.model_validate({"name": spec} if isinstance(spec, str) else spec)
            except ValidationError as exc:
                problems += [(json_path([*path, *err["loc"]]), err["msg"]) for err in exc.errors()]
        out[name] = roles
    if problems:
        raise ConfigError(source, problems, KIND)
    return Profiles(source=source, profiles=out)


def profiles_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(PROFILES_PATH_ENV) or DEFAULT_PROFILES_PATH)


def read_profiles(path: str | os.PathLike[str] | None = None) -> tuple[object, str] | None:
    """The decoded profiles file; None when it was not named and the default is absent."""
    file = profiles_path(path)
    if path is None and os.environ.get(PROFILES_PATH_ENV) is None and not file.exists():
        return None
    return read_json(file, KIND)


def active_profile_name() -> str:
    return os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def with_role_defaults(doc: dict[str, Any], role: Role, model: str) -> dict[str, Any]:
    """The request for `model` (the one serving the role), the role's parameters filling in
    what the request left out.

    `num_predict` (Ollama's name) becomes `max_tokens` unless the request sets a token limit;
    the Ollama translation maps it back.
    """
    defaults = dict(role.parameters)
    if "num_predict" in defaults:
        limit = defaults.pop("num_predict")
        if "max_tokens" not in doc and "max_completion_tokens" not in doc:
            defaults["max_tokens"] = limit
    return {**defaults, **doc, "model": model}

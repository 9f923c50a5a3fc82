"""deployments/Dockerfile: hadolint finds nothing, and the image it makes is the one
deployments/rayservice.yaml runs (its name and version, the `-gpu` variant on GPU workers, the
same Ray and Python). No image can be built or pulled on the machines this is tested on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.specifiers import SpecifierSet

from tests.conftest import ROOT
from tests.test_rayservice import CLUSTER, GROUPS

DOCKERFILE = ROOT / "deployments" / "Dockerfile"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _args() -> dict[str, str]:
    """The Dockerfile's ARG defaults."""
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), re.MULTILINE))


def _pinned(package: str) -> str:
    (pin,) = [d for d in PROJECT["dependencies"] if re.match(rf"{package}(\[.*\])?==", d)]
    return pin.split("==")[1]


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_rays_with_the_pinned_ray_and_a_supported_python() -> None:
    args = _args()
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms and all(
        f == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}" for f in froms
    )
    assert args["RAY_VERSION"] == _pinned("ray") == CLUSTER["rayVersion"]
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert python is not None
    assert f"3.{python.group(1)}" in SpecifierSet(PROJECT["requires-python"])
    assert args["VARIANT"] == ""  # the CPU image unless asked; `-gpu` is rayproject's GPU tag
    assert "--build-arg VARIANT=-gpu" in DOCKERFILE.read_text()


def test_the_rayservice_runs_this_version_and_the_gpu_image_on_gpu_workers() -> None:
    version = PROJECT["version"]
    for group in GROUPS:
        (container,) = group["template"]["spec"]["containers"]
        gpu = "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
        suffix = "-gpu" if gpu else ""
        assert container["image"] == f"registry.example.com/serve-router:{version}{suffix}"


def test_the_build_context_holds_what_the_wheel_is_made_of() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines  # everything else stays out (virtualenvs, models, databases)
    assert {"pyproject.toml", PROJECT["readme"], "serve_app"} <= kept

"""The router installed as a user installs it: the wheel built from this checkout, in a new
virtualenv, used from an empty directory (nothing of the checkout on its path).

`serve-router --help` and `check`; then `serve-router run` serves the demo and the console's
page from the files inside the package, the official openai client is answered with a key made
by `serve-router keys create`, refused once `keys revoke` has answered, `status` lists the
demo's providers, and Ctrl-C stops it all within 5 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
import venv
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import ROOT, SECRETS, free_port, wait_for
from tests.test_local_run import STOP_WITHIN_S, Run, alive, as_a_user
from tests.test_local_run import runs as runs  # the fixture: runs as a terminal starts them

ADMIN = "package-test-admin-token-5e2d9c1a"
SECRETS.append(ADMIN)  # its run's logs are checked at the session's end too
INSTALL_S = 840
# The first test's setup installs the wheel with its dependencies (pytest-timeout's 300 s
# default would end a cold install, which downloads Ray, before pip's own limit).
pytestmark = pytest.mark.timeout(INSTALL_S + 120)
DEMO_PROVIDERS = ("demo-openai-1", "demo-vllm-1", "demo-sleep-1", "demo-ollama-1")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a new virtualenv with the wheel (and its pinned dependencies)."""
    where = tmp_path_factory.mktemp("package")
    source, wheels = where / "source", where / "wheels"
    # The checkout's files as a clean clone has them (a `build/` folder left by an earlier
    # build would be packed into the wheel as it is).
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).exists():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name, follow_symlinks=False)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("serve_router-*.whl")
    venv.create(where / "venv", with_pip=True)
    bin_dir = where / "venv" / "bin"
    install = [str(bin_dir / "python"), *pip[1:], "install", str(wheel)]
    # On a new machine pip downloads Ray and the rest: its own limit, under the module's.
    done = subprocess.run(install, timeout=INSTALL_S, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def _command(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(installed / "serve-router"), *args],
        cwd=cwd,
        env={**as_a_user(cwd), "LLM_ROUTER_ADMIN_TOKEN": ADMIN},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_carries_the_router_and_nothing_test_only(installed: Path) -> None:
    (site,) = (installed.parent / "lib").glob("python3*/site-packages")
    (record,) = site.glob("serve_router-*.dist-info/RECORD")
    tops = {line.split("/", 1)[0] for line in record.read_text().splitlines()}
    # Besides the package: its metadata, and the scripts in the virtualenv's bin.
    assert {t for t in tops if not t.startswith(("serve_router-", ".."))} == {"serve_app"}
    assert (site / "serve_app/demo/config/models-config.json").is_file()


def test_help_and_check_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    helped = _command(installed, tmp_path, "--help")
    assert helped.returncode == 0
    for command in ("run", "check", "provision", "keys", "status"):
        assert f"    {command}" in helped.stdout
    for command in ("run", "check", "provision", "keys", "status"):
        assert _command(installed, tmp_path, command, "--help").returncode == 0

    good = _command(installed, tmp_path, "check")
    assert good.returncode == 0, good.stderr
    (line,) = good.stdout.splitlines()  # the demo's files, from the installed package
    assert line.startswith(f"ok: {installed.parent}/lib/") and "2 model types" in line

    bad = tmp_path / "models.json"
    bad.write_text('{"openai_models": {}, "active_models": {"openai_models": ["nope"]}}')
    refused = _command(installed, tmp_path, "check", "--config", str(bad))
    assert refused.returncode == 2
    assert refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"serve-router: invalid models config {bad}: $.active_models")


def test_run_keys_status_and_ctrl_c(
    installed: Path,
    tmp_path: Path,
    runs: Callable[..., Run],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run = runs(
        [str(installed / "serve-router"), "run", "--port", str(port)],
        cwd=tmp_path,
        LLM_ROUTER_ADMIN_TOKEN=ADMIN,
        LLM_ROUTER_REQUIRE_KEYS="1",
    )
    run.wait_ready()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return _command(installed, tmp_path, *args, "--url", url)

    made = cli("keys", "create", "package-test", "--models", "demo/echo")
    assert made.returncode == 0, made.stderr
    secret, note = made.stdout.splitlines()
    key_id = note.split()[1].rstrip(",")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=30)
    answer = client.chat.completions.create(
        model="demo/echo", messages=[{"role": "user", "content": "hello from the wheel"}]
    )
    assert answer.choices[0].message.content

    for name, kind in (("console", "text/html"), ("console/app.js", "text/javascript")):
        with urllib.request.urlopen(f"{url}/{name}", timeout=30) as page:  # from the package
            assert page.headers["content-type"].startswith(kind) and page.read()

    listed = cli("keys", "list")
    assert key_id in listed.stdout and secret not in listed.stdout + listed.stderr
    status = cli("status", "--interval", "0.2")
    assert status.returncode == 0, status.stderr
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert {row[1] for row in rows} == set(DEMO_PROVIDERS)
    assert {row[2] for row in rows} == {"primary", "sleeping"}

    revoked = cli("keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(
            model="demo/echo", messages=[{"role": "user", "content": "still there?"}]
        )
    gone = cli("keys", "revoke", key_id)
    assert gone.returncode == 1
    (line,) = gone.stderr.splitlines()
    assert line.startswith("serve-router: 404 key_not_found: ")

    tree = run.tree()
    run.ctrl_c()
    assert run.wait(30) < STOP_WITHIN_S
    assert run.proc.returncode == 0, run.output()[-2000:]
    wait_for(lambda: alive(tree) == [], 5, "every process of the run to end")

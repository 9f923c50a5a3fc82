"""The pure parts of the local run: HAProxy's admin binds, one-line config errors, leftovers."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from serve_app.core.config import ConfigError
from serve_app.local.haproxy import bind_admin_frontends, config_file, guard_requests
from serve_app.local.ports import leftover, needed_ports

# The shape of Serve's generated config (ray 2.60 haproxy_templates.py), trimmed.
SERVE_CONFIG = """global
    stats socket /tmp/haproxy-serve/x/admin.sock mode 666 level admin
defaults
    mode http
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
backend default_backend
    server s1 127.0.0.1:30000
listen stats
  bind *:8404
  stats enable
"""


def test_admin_frontends_move_to_the_given_address_and_nothing_else() -> None:
    text, moved = bind_admin_frontends(SERVE_CONFIG, "127.0.0.1")
    assert moved == 2
    assert "    bind 127.0.0.1:9101\n" in text and "  bind 127.0.0.1:8404\n" in text
    assert "    bind 127.0.0.1:8000\n" in text  # the router's own frontend as Serve wrote it
    assert text.replace("127.0.0.1:9101", ":9101").replace("127.0.0.1:8404", "*:8404") == (
        SERVE_CONFIG
    )
    assert bind_admin_frontends(text, "127.0.0.1") == (text, 2)  # a reload: same file


def test_a_config_without_admin_frontends_is_left_alone() -> None:
    plain = "frontend http_frontend\n    bind *:8000\n"
    assert bind_admin_frontends(plain, "127.0.0.1") == (plain, 0)


def test_the_http_frontend_gets_a_request_deadline_and_the_client_address() -> None:
    serves = SERVE_CONFIG.replace(
        "    bind 127.0.0.1:8000\n", "    bind 127.0.0.1:8000\n    timeout http-request 99s\n"
    )
    text, found = guard_requests(serves, 7)
    assert found
    rest = text.partition("frontend http_frontend\n")[2]
    section = rest.split("backend default_backend")[0]
    assert section.splitlines() == [
        "    timeout http-request 7s",  # Serve's own value replaced: one deadline
        "    option forwardfor",
        "    bind 127.0.0.1:8000",
    ]
    assert text.count("timeout http-request") == 1  # in no other section
    assert guard_requests(text, 7) == (text, True)  # a reload: the same file
    assert guard_requests("listen stats\n  bind *:8404\n", 7)[1] is False


def test_haproxy_config_file_from_its_command_line() -> None:
    assert config_file(["-db", "-f", "/tmp/haproxy-serve/a/haproxy.cfg", "-sf", "7"]) == (
        "/tmp/haproxy-serve/a/haproxy.cfg"
    )
    assert config_file(["-db"]) is None


def test_a_config_error_is_one_line_with_file_path_and_every_reason() -> None:
    err = ConfigError("c.json", [("$.a", "is required"), ("$.b[0]", "must be a number")])
    assert str(err) == "invalid models config c.json: $.a: is required; $.b[0]: must be a number"


def test_needed_ports_follow_serves_haproxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT", raising=False)
    assert [n.port for n in needed_ports(8000, 8101)] == [8000, 18404, 9101, 8101]
    assert [n.port for n in needed_ports(8000, None)] == [8000, 18404, 9101]


def test_a_process_of_another_program_is_never_a_leftover() -> None:
    """A process whose program is this Python but which is not one of Ray's or HAProxy's, and
    one whose parent is alive, are both left alone."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert leftover(psutil.Process(child.pid)) is None
        assert leftover(psutil.Process()) is None
    finally:
        child.kill()
        child.wait()

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-tools chaos e2e job-demo ci lint wheel bench bench-affinity bench-stream bench-peers bench-fleet openapi clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# `make run RUN_ARGS="--port 8080 --watch"`: see `serve-router run --help`.
RUN_ARGS ?=
run: install
	$(BIN)/serve-router run $(RUN_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Modules in a random order (the seed is printed at the top: rerun an order with
# PYTEST_ADDOPTS=--random-order-seed=N). A skipped test fails the run (tests/conftest.py).
test: lint test-tools
	$(BIN)/python -m pytest -q -rs --random-order-bucket=module

# The console's browser tests and the dashboard's Prometheus test use Debian's own chromium and
# prometheus (nothing is downloaded at test time): installed here where apt-get may, else named.
test-tools:
	@for tool in chromium prometheus; do \
		command -v $$tool >/dev/null && continue; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends $$tool >/dev/null \
				|| exit 1; \
		else \
			echo "make test needs Debian's $$tool: sudo apt-get install $$tool" >&2; exit 1; \
		fi; \
	done

# Fault injection under load and hostile clients; prints its figures (also in bench/chaos.json).
chaos: install
	$(BIN)/python -m pytest -q -s -m chaos

# Two real vLLM servers (CPU build, .venv-vllm, a tiny model made in .e2e/) behind the router.
e2e: install
	$(BIN)/python -m tests.e2e.harness

# `ray job submit` of the provisioning CLI against a local `ray start --head` cluster, with the
# demo upstream (loopback only; token auth off for this throwaway local cluster), once the
# head's job agent answers (a submit before that failed after 10 s). CI runs it.
job-demo: install
	@set -e; export PATH="$(CURDIR)/$(BIN):$$PATH" RAY_AUTH_MODE=disabled; \
	python -m serve_app.demo.upstream --port 8101 & demo=$$!; \
	trap 'ray stop --force >/dev/null 2>&1; kill $$demo' EXIT; \
	ray start --head --port=6390 --dashboard-host=127.0.0.1 --dashboard-port=8266 \
		--include-dashboard=true --num-cpus=2 --resources='{"gpu_node_demo": 1}' \
		--disable-usage-stats >/dev/null; \
	python -m tests.job_agent http://127.0.0.1:8266; \
	ray job submit --address http://127.0.0.1:8266 --working-dir . -- \
		python -m scripts.provision_models --json

# What CI runs.
ci: test chaos job-demo e2e

# dist/serve_router-<version>-py3-none-any.whl: `pip install` it anywhere (then `serve-router run`).
# build/ goes first: setuptools packs whatever an earlier build left there.
wheel: install
	rm -rf build dist
	$(BIN)/pip wheel -q --no-deps . -w dist

# Rewrite docs/api/openapi.json after changing an endpoint (a test checks it is current).
openapi: install
	$(BIN)/python -m tests.test_openapi_doc

bench: install
	$(BIN)/python -m bench.run

# Paced streams (200 events 25 ms apart) at 50, 200 and 500 at once, direct and through the
# router -> bench/stream.json. BENCH_ARGS="--ingress-replicas 2 --router-replicas 2" and others.
BENCH_ARGS ?=
bench-stream: install
	$(BIN)/python -m bench.stream $(BENCH_ARGS)

# The routing strategies on three real vLLM servers (the `make e2e` environment), multi-turn
# chats: prefix-cache hit rates, TTFT, spread per server -> bench/affinity.json (~15 min).
bench-affinity: install
	$(BIN)/python -m bench.affinity

# Side by side with LiteLLM proxy and vLLM's Rust router (each in .venv-peers/<name>), on the same
# demo upstreams and load generators -> bench/peers.json and a table (~10 min).
bench-peers: install
	$(BIN)/python -m bench.peers $(BENCH_ARGS)

# Routers in front of 16 simulated H100 vLLM servers (serve_app/demo/vllm_sim): the Mooncake
# trace, agent sessions, a Zipf load ramp -> bench/fleet.json and docs/fleet-*.png (~20 min).
bench-fleet: install
	$(BIN)/python -m bench.fleet $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm .venv-peers .e2e .pytest_cache .ruff_cache *.egg-info build dist

# The two commands: `make demo` and `make test`. Both run set-up first (idempotent).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit lint integration integration-encrypted integration-encrypted-strict bench clean kind-up

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/propolis demo

# The static checks first (about a minute): a type or layering error fails fast, before the packet tests.
test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests services $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest -q integration $(PYTEST_ARGS)

# The cross-node packet suites again with WireGuard between the nodes (`sandbox up --encryption wireguard`).
ENCRYPTED_SUITES = integration/policy/test_policy_packets.py integration/lb/test_lb_sandbox.py \
	integration/connectivity/test_connectivity.py integration/hubble/test_hubble_sandbox.py
integration-encrypted: setup
	PROPOLIS_TEST_ENCRYPTION=wireguard $(PY) -m pytest -q $(ENCRYPTED_SUITES) $(PYTEST_ARGS)

integration-encrypted-strict: setup
	PROPOLIS_TEST_ENCRYPTION=wireguard-strict $(PY) -m pytest -q $(ENCRYPTED_SUITES) $(PYTEST_ARGS)

# Static checks: mypy --strict, ruff and the import-linter contracts, configured in pyproject.toml ([tool.mypy], [tool.ruff], [tool.importlinter]).
lint: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check libs services tests integration
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/propolis bench bus

# A kind cluster for the chart and Tilt (tilt/kind.yaml: no default CNI, no kube-proxy, two workers).
# Needs docker and kind, which the development machines here do not have.
kind-up:
	@command -v kind >/dev/null || { echo "kind-up: kind is not installed (and needs docker)"; exit 1; }
	@kind get clusters 2>/dev/null | grep -qx propolis || kind create cluster --config tilt/kind.yaml
	@echo "kind cluster 'propolis' is up (context kind-propolis); next: tilt up -f tilt/Tiltfile"

clean:
	-$(VENV)/bin/propolis sandbox down --all 2>/dev/null
	rm -rf $(VENV) .pytest_cache

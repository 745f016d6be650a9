# masqued — common tasks. Run as root on Debian 12.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc iproute2 nftables iptables iputils-ping procps kmod

.PHONY: deps venv demo test unit lint clean

deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root"; exit 1; fi
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

## demo: build a namespace lab, run a relay and a client, push traffic, tear down
demo: deps venv
	bash scripts/demo.sh

## test: every test (unit + integration in network namespaces; needs root)
test: deps venv
	$(PY) -m pytest -q

unit: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check masqued tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

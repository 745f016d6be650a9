# masqued — common tasks. Run as root on Debian 12.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc iproute2 nftables iptables iputils-ping procps kmod ethtool \
	libsystemd-dev pkg-config \
	debhelper dh-virtualenv python3.11-venv python3.11-dev dpkg-dev lintian mmdebstrap systemd-container \
	bash-completion man-db
# The benchmark's tools and the peer VPNs it measures masqued against (bench/README.md).
BENCH_APT_PACKAGES := iperf3 wireguard-go wireguard-tools openvpn openssl sysstat procps iproute2 iptables iputils-ping
# Vagrant and its libvirt provider, to check the Vagrantfile, and what `make vagrant-test`
# boots the lab with here: libvirt, QEMU (TCG without KVM), and the tools that build the
# local box (README "Testing in VMs").
VAGRANT_APT_PACKAGES := vagrant vagrant-libvirt rsync libvirt-daemon-system libvirt-clients \
	qemu-system-x86 qemu-utils dnsmasq-base mmdebstrap e2fsprogs iproute2

.PHONY: deps venv demo test unit abuse lint clean deb docs lock systest bench-deps bench bench-smoke vagrant-deps vagrant-validate vagrant-box vagrant-test vagrant-clean

deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root"; exit 1; fi
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# Pinned dependencies with hashes (requirements/*.lock, `make lock`), the build back
# ends first; masqued itself editable, without fetching anything else.
$(VENV)/.installed: pyproject.toml requirements/build.lock requirements/dev.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements/build.lock
	$(PY) -m pip install -q --require-hashes --no-deps --no-build-isolation -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

venv: $(VENV)/.installed

## demo: build a namespace lab, run a relay and a client, push traffic, tear down
demo: deps venv
	bash scripts/demo.sh

## test: every test (unit + integration in network namespaces; needs root), then the
## conformance suites and a representative set of namespace tests again with the other
## QUIC engine and event loop (qh3 on uvloop; README, Tests)
QH3_TESTS := tests/conformance tests/integration/test_datagram.py \
	tests/integration/test_tunnel.py::test_ping_tcp_udp_ipv4_ipv6_with_nftables \
	tests/integration/test_tunnel.py::test_three_clients_at_once \
	tests/integration/test_tunnel.py::test_client_recovers_after_relay_sigkill \
	tests/integration/test_workers.py::test_two_workers_share_the_pool_and_carry_every_client
test: deps venv
	$(PY) -m pytest -q
	MASQUED_QUIC_ENGINE=qh3 MASQUED_EVENT_LOOP=uvloop $(PY) -m pytest -q $(QH3_TESTS)

unit: venv
	$(PY) -m pytest -q tests/unit

## abuse: the abuse suite with ten times CI's counts, on each QUIC engine (a few minutes
## each; needs root)
abuse: deps venv
	MASQUED_ABUSE_SCALE=10 $(PY) -m pytest -q tests/abuse
	MASQUED_QUIC_ENGINE=qh3 MASQUED_ABUSE_SCALE=10 $(PY) -m pytest -q tests/abuse

lint: venv
	$(VENV)/bin/ruff check masqued tests bench
	$(VENV)/bin/mypy

## bench-deps: iperf3 and the peer VPNs (wireguard-go, OpenVPN); not needed by `make test`
bench-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make bench-deps: run as root"; exit 1; fi
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

## bench: the full benchmark (<= 10 min): table on stdout, JSON in bench/results/, bench/README.md
bench: deps venv bench-deps
	$(PY) -m bench

## bench-smoke: the same harness with very short runs (CI keeps it working, the current
## wireguard-go's build included: bench/README.md; writes no results)
bench-smoke: deps venv bench-deps
	$(PY) -m bench --smoke

## deb: build dist/masqued_<version>_<arch>.deb and dist/masqued.deb (dh-virtualenv);
## fails if lintian reports an error or a warning
deb: deps
	bash packaging/build-deb.sh
	lintian --fail-on error,warning --info dist/masqued.deb

## docs: regenerate masqued.conf(5) and the bash completion (packaging/gen-docs.py)
docs: venv
	$(PY) packaging/gen-docs.py

## lock: re-resolve requirements/*.lock (pinned, with hashes) with uv
# The C extensions are built from source against the venv's Python (the .deb's:
# Debian's python3.11; packaging/debian/rules): lock their sdists.
UV_COMPILE = $(VENV)/bin/uv pip compile -q --python-version 3.11 --generate-hashes \
	--no-binary python-pytun --no-binary python-iptables --no-binary systemd-python \
	--custom-compile-command "make lock"
lock: venv
	$(PY) -m pip install -q uv
	$(UV_COMPILE) pyproject.toml --extra journal -o requirements/runtime.lock
	$(UV_COMPILE) pyproject.toml --extra journal --extra test -o requirements/dev.lock
	$(UV_COMPILE) requirements/build.in -o requirements/build.lock

## systest: only the system tests (build the .deb, boot Debian under systemd-nspawn)
systest: deps venv
	$(PY) -m pytest -q tests/system

## vagrant-deps: Vagrant from Debian, its libvirt provider, libvirt, QEMU, mmdebstrap
vagrant-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make vagrant-deps: run as root"; exit 1; fi
	@missing=""; for p in $(VAGRANT_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

## vagrant-validate: `vagrant validate` the Vagrantfile (1 and 3 clients); boots nothing
vagrant-validate: vagrant-deps
	@dot=$$(mktemp -d); trap 'rm -rf "$$dot"' EXIT; \
	VAGRANT_DOTFILE_PATH=$$dot vagrant validate && \
	VAGRANT_DOTFILE_PATH=$$dot MASQUED_VAGRANT_CLIENTS=3 vagrant validate

## vagrant-box: the lab's Debian 12 box built here (vagrant/build-box.sh) into $(VAGRANT_CACHE)
VAGRANT_CACHE ?= /var/cache/masqued-vagrant
vagrant-box: vagrant-deps
	bash vagrant/build-box.sh $(VAGRANT_CACHE)
	VAGRANT_HOME=$(VAGRANT_CACHE)/vagrant.d vagrant box add --force --name masqued/bookworm-local \
		$(VAGRANT_CACHE)/masqued-bookworm.box

## vagrant-test: box, vagrant up (relay, target, client), the any_lab tests in the VMs,
## teardown; confined to a namespace, time-bounded (vagrant/vm-test.sh; ~1 h under TCG)
vagrant-test: vagrant-deps venv
	MASQUED_VAGRANT_CACHE=$(VAGRANT_CACHE) bash vagrant/vm-test.sh

## vagrant-clean: remove the cached box ($(VAGRANT_CACHE))
vagrant-clean:
	rm -rf $(VAGRANT_CACHE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
